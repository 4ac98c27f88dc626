"""Entry point ``python -m scripts.benchmark``: the speed, memory and quality-parity benchmark.

The code lives in :mod:`scripts.bench.benchmark`.
"""

import sys

from scripts.bench.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
