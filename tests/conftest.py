"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

SMALL_NET = {
    "channels": (8, 16, 16),
    "attention_levels": (False, False, True),
    "norm_num_groups": 8,
    "num_head_channels": 8,
}
"""A diffusion U-Net small enough for unit tests on 16^3 volumes."""


def perturbed_small_net(**kwargs: Any) -> torch.nn.Module:
    """``ForecastDiffusionUNet(**SMALL_NET, **kwargs)`` in eval mode with perturbed weights (seed 0): the U-Net's
    output convolution starts at zero, so without the perturbation no input would visibly reach the output."""
    from scripts.runtime.network import ForecastDiffusionUNet

    torch.manual_seed(0)
    network = ForecastDiffusionUNet(**SMALL_NET, **kwargs).eval()
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return network


REPO_ROOT = Path(__file__).resolve().parents[1]
"""Repository root: bundle commands run from here."""
CONFIGS = REPO_ROOT / "bundle" / "configs"


@pytest.fixture(autouse=True, scope="session")
def _run_from_the_repository_root() -> Iterator[None]:
    """The contract's commands run from the repository root, where the configs' macros
    (``%bundle/configs/inference.json#...``) resolve; the tests do too, wherever pytest starts."""
    start = Path.cwd()
    os.chdir(REPO_ROOT)
    yield
    os.chdir(start)


def config_preprocessing(spatial_size=(64, 64, 64), spacing=(3.0, 3.0, 3.0), train: bool = False) -> list:
    """The shipped configs' preprocessing as a list of transforms, at the given working grid.

    ``train=False``: ``inference.json``'s ``preprocessing``; ``train=True``: ``train.json``'s
    ``deterministic_transforms`` and its random input drop (the random crop left out, so shapes stay whole).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / ("train.json" if train else "inference.json")))
    parser["spatial_size"], parser["spacing"] = list(spatial_size), [float(s) for s in spacing]
    if not train:
        return list(parser.get_parsed_content("preprocessing").transforms)
    drop = [t for t in parser["train"]["random_transforms"] if t["_target_"].endswith("RandDropInputsd")]
    parser["train"]["random_transforms"] = drop
    return list(parser.get_parsed_content("deterministic_transforms")) + list(
        parser.get_parsed_content("train#random_transforms")
    )


SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
"""Real test data, kept outside the repository (``../shared/data`` relative to the repository root)."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA.resolve()} (../shared/data next to the repository)")
    return SHARED_DATA.resolve()


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic cohort (8 cases, 32^3 at 6 mm) for workflow tests; returns its datalist path."""
    from scripts.bench.synthetic.cohort import generate_cohort

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
