"""Put the bundle's ``scripts`` package on ``sys.path`` for an application shipped in ``<bundle>/apps/``.

A packaged bundle holds ``scripts/`` itself (``<bundle>/scripts``); in the source repository it lies beside
``bundle/``. Both applications call :func:`bundle_root` before importing anything from ``scripts``.
"""

from __future__ import annotations

import sys
from pathlib import Path

APPS_DIR = Path(__file__).resolve().parent
"""``<bundle>/apps``."""


def bundle_root() -> Path:
    """The bundle folder (``configs/``, ``models/``, ``sample_data/``), with the folder that holds its ``scripts``
    package on ``sys.path``.

    Raises:
        ModuleNotFoundError: neither ``<bundle>/scripts`` nor ``<bundle>/../scripts`` exists.
    """
    root = APPS_DIR.parent
    for holder in (root, root.parent):
        if (holder / "scripts" / "__init__.py").is_file():
            if str(holder) not in sys.path:
                sys.path.insert(0, str(holder))
            return root
    raise ModuleNotFoundError(f"the bundle's scripts package is neither in {root} nor in {root.parent}")
