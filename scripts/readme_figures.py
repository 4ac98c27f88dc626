"""Entry point ``python -m scripts.readme_figures``: the README's sample-case figures against a forecast.

The code lives in :mod:`scripts.tools.readme_figures`.
"""

from scripts.runtime.cli import strict_fire
from scripts.tools.readme_figures import main

if __name__ == "__main__":
    strict_fire(main, "scripts.readme_figures")
