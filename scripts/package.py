"""Entry point ``python -m scripts.package``: a self-contained bundle folder in the MONAI Model Zoo layout.

The code lives in :mod:`scripts.tools.package`.
"""

from scripts.runtime.cli import strict_fire
from scripts.tools.package import main

if __name__ == "__main__":
    strict_fire(main, "scripts.package")
