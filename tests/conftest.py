"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
"""Real test data, kept outside the repository (``../shared/data`` relative to the repository root)."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA.resolve()} (../shared/data next to the repository)")
    return SHARED_DATA.resolve()


REPO_ROOT = Path(__file__).resolve().parents[1]
"""Repository root: bundle commands run from here."""


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic cohort (8 cases, 32^3 at 6 mm) for workflow tests; returns its datalist path."""
    from scripts.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    return Path(generate_cohort(out, n=8, seed=11, shape=32, spacing=6.0, split=(0.5, 0.25, 0.25), progress=False))


@pytest.fixture(scope="session")
def patient01_study1(shared_data: Path) -> dict[str, str]:
    """Datalist entry of the real patient: its study 1 FLAIR, T1 and T2 (common space) as visit 1, no visit 0."""
    p = shared_data / "lesjak2016_longitudinal" / "patient01"
    return {
        "id": "patient01",
        "flair_1": str(p / "study1_FLAIR.nii.gz"),
        "t1_1": str(p / "study1_T1W.nii.gz"),
        "t2_1": str(p / "study1_T2W.nii.gz"),
    }
