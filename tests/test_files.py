"""Atomic output: a file appears complete or not at all, and a failure keeps the previous file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from scripts.runtime.files import atomic_path, write_text_atomic


def test_atomic_path_moves_the_finished_file_in_place(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "result.json"
    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".result.json.") and not out.exists()
        tmp.write_text("{}")
    assert out.read_text() == "{}"
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # like open(), not mkstemp's 0600


def test_atomic_path_failure_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    write_text_atomic(out, "old")

    def fail_half_way() -> None:
        with atomic_path(out, suffix=".tmp.md", fsync=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fail_half_way()
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
