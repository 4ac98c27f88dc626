"""Entry point ``python -m scripts.synthetic``: a synthetic longitudinal cohort with known true outcomes.

The code lives in :mod:`scripts.bench.synthetic`.
"""

import fire

from scripts.bench.synthetic.cohort import main

if __name__ == "__main__":
    fire.Fire(main)
