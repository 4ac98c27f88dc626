"""Entry point ``python -m scripts.export``: TorchScript export of the shipped weights (:mod:`scripts.tools.export`)."""

from scripts.runtime.cli import strict_fire
from scripts.tools.export import main

if __name__ == "__main__":
    strict_fire(main, "scripts.export")
