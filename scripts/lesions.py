"""Entry point ``python -m scripts.lesions``: lesion analysis of one binary mask (:mod:`scripts.runtime.lesions`)."""

import fire

from scripts.runtime.lesions import main

if __name__ == "__main__":
    fire.Fire(main)
