"""Entry point ``python -m scripts.synthetic``: a synthetic longitudinal cohort with known true outcomes.

The code lives in :mod:`scripts.bench.synthetic`.
"""

from scripts.bench.synthetic.cohort import main
from scripts.runtime.cli import strict_fire

if __name__ == "__main__":
    strict_fire(main, "scripts.synthetic")
