"""File output of the whole bundle: every file it writes (NIfTI, checkpoints, JSON, CSV, PNG) and every case folder
appears complete or not at all, under one temporary-name scheme that a later run can clean up.

Temporaries are named ``.<final name>.tmp-<pid>@<host>-<random><suffix>``: hidden, tied to the final name, and
owned by a process, so that :func:`remove_stale_temporaries` deletes what a killed run left behind without touching
the work of a run still in progress on the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
"""Mode of a finished file: what ``open`` would give (``mkstemp`` creates 0600)."""
_FOLDER_MODE = 0o777 & ~_UMASK
"""Mode of a finished folder: what ``mkdir`` would give (``mkdtemp`` creates 0700)."""

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"
_TEMP_NAME = re.compile(r"^\..+\.tmp-(?P<pid>\d+)@(?P<host>[A-Za-z0-9]+)-[^/]*$")


def temp_prefix(name: str) -> str:
    """Prefix of a temporary file or folder standing in for ``name``, owned by this process.

    Process id and host are in the name so that a later run can tell a killed run's leftovers from the work of a
    run still in progress on the same folder.
    """
    return f".{name}.tmp-{os.getpid()}@{_HOST}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporaries (see :func:`temp_prefix`) left in ``folder`` by dead processes of this host; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or entry.name.endswith(".claim"):  # a claim is released by its owner (see claim)
            continue
        if match["host"] != _HOST or _process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "", fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; after the block it is moved onto ``path`` (``os.replace``).

    Args:
        path: the final file; its folder is created.
        suffix: name suffix of the temporary file (keep a format's extension where the writer picks the format from
            the name, e.g. ``.nii.gz``).
        fsync: flush the data to the disk before the rename (for files whose loss on power failure would corrupt a
            run, e.g. checkpoints).

    On any exception inside the block, the temporary file is removed and the exception propagates; ``path`` is
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=suffix, dir=path.parent)
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


def staging_folder(parent: str | os.PathLike[str], name: str) -> Path:
    """A new temporary folder in ``parent`` that will become ``parent/name`` (see :func:`move_into_place`), with the
    mode the umask gives a new folder (others on a shared server can read the results when the umask lets them)."""
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(name), dir=parent))
    os.chmod(folder, _FOLDER_MODE)
    return folder


def claim_path(folder: str | os.PathLike[str], name: str) -> Path:
    """The claim file of ``name`` in ``folder`` (see :func:`claim`)."""
    return Path(folder) / f".{name}.claim"


def _owner() -> str:
    return f"{os.getpid()}@{_HOST}"


def claim(folder: str | os.PathLike[str], name: str) -> str | None:
    """Claim ``name`` in ``folder`` for this process, so that runs sharing an output folder split the work.

    The claim is a file ``.<name>.claim`` holding ``<pid>@<host>``: written under a temporary name, then linked into
    place (``os.link`` fails if the claim exists, so exactly one run wins, and a claim is never seen empty). A claim
    of this host whose process is dead, or that names this very process (a restarted container reusing the pid), is
    stale and taken over. Returns None when the claim is this process's, else the owner of the claim that stands
    (``pid@host``; claims of other hosts cannot be checked and stand until removed).
    """
    path = claim_path(folder, name)
    fd, name_tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=folder)
    tmp = Path(name_tmp)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(_owner())
        os.chmod(tmp, _FILE_MODE)
        for _ in range(3):
            try:
                os.link(tmp, path)
                return None
            except FileExistsError:
                holder = _read_claim(path)
                if holder is None:  # released in between: try again
                    continue
                if not _stale(holder):
                    return holder
                _take_over(path, holder)
        raise OSError(f"cannot claim {path}: other runs keep taking it over")
    finally:
        tmp.unlink(missing_ok=True)


def _read_claim(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None


def _local_pid(holder: str) -> int | None:
    """The process id of a claim of this host; None for another machine's (it cannot be checked from here)."""
    pid, _, host = holder.partition("@")
    return int(pid) if host == _HOST and pid.isdigit() else None


def _stale(holder: str) -> bool:
    pid = _local_pid(holder)
    return pid is not None and (pid == os.getpid() or not _process_alive(pid))


def claim_is_live(holder: str) -> bool:
    """Whether the claim ``holder`` (``pid@host``) is a running process of this host other than this one."""
    return _local_pid(holder) is not None and not _stale(holder)


def _take_over(path: Path, holder: str) -> None:
    """Remove the stale claim ``path`` of ``holder`` without removing a fresh one another run put there meanwhile:
    it is renamed aside first (only one run can), and put back if it turns out to be someone else's."""
    aside = path.parent / f"{temp_prefix(path.name)}stale"
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # another run took it over first
    if _read_claim(aside) != holder:  # a fresh claim: restore it
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def release(folder: str | os.PathLike[str], name: str) -> None:
    """Remove this process's claim of ``name`` (see :func:`claim`); a claim of another process is left alone."""
    path = claim_path(folder, name)
    if _read_claim(path) == _owner():
        path.unlink(missing_ok=True)


def move_into_place(staging: Path, final: Path) -> None:
    """Rename the finished ``staging`` folder to ``final``, replacing an older one.

    The old folder is first renamed aside, not deleted in place: a run killed while deleting it would otherwise
    leave a partial folder under the final name.
    """
    if not final.exists():
        os.replace(staging, final)
        return
    aside = final.parent / f"{temp_prefix(final.name)}replaced"
    os.replace(final, aside)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (which weights an export or an evaluation came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
