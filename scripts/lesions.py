"""Entry point ``python -m scripts.lesions``: lesion analysis of one binary mask (:mod:`scripts.runtime.lesions`)."""

from scripts.runtime.cli import strict_fire
from scripts.runtime.lesions import main

if __name__ == "__main__":
    strict_fire(main, "scripts.lesions")
