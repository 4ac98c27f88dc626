"""Entry point ``python -m scripts.export``: TorchScript export of the shipped weights (:mod:`scripts.tools.export`)."""

import fire

from scripts.tools.export import main

if __name__ == "__main__":
    fire.Fire(main)
