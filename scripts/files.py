"""Atomic file output: every file this bundle writes (NIfTI, checkpoints, JSON, CSV, PNG) appears complete or not
at all, so a run that is killed or fails leaves no partial file under a final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
"""Mode of a finished file: what ``open`` would give (``mkstemp`` creates 0600)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, prefix: str | None = None, suffix: str = ".tmp",
                fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; after the block it is moved onto ``path`` (``os.replace``).

    Args:
        path: the final file; its folder is created.
        prefix: name prefix of the temporary file (default ``.<name>.``: hidden, and tied to the final name so
            cleanup code can recognise it).
        suffix: name suffix of the temporary file (keep a format's extension where the writer picks the format from
            the name, e.g. ``.tmp.nii.gz``).
        fsync: flush the data to the disk before the rename (for files whose loss on power failure would corrupt a
            run, e.g. checkpoints).

    On any exception inside the block, the temporary file is removed and the exception propagates; ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix if prefix is not None else f".{path.name}.", suffix=suffix,
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
