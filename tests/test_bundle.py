"""Bundle-level checks: metadata against the Model Zoo schema, and configs in step with the code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from monai.bundle import ConfigParser
from scripts.runtime.constants import ARMS, CONDITION_CHANNELS, NULL_TREATMENT
from scripts.training.engines import WeightedBCEWithLogitsLoss

from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "bundle" / "configs"
SCHEMA = REPO_ROOT / ".." / "shared" / "schema" / "meta_schema_20240725.json"


def _metadata() -> dict:
    return json.loads((CONFIGS / "metadata.json").read_text())


def test_metadata_verifies_against_schema() -> None:
    if not SCHEMA.is_file():
        pytest.skip(f"bundle metadata schema not found at {SCHEMA.resolve()}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(CONFIGS / "metadata.json"),
            "--filepath",
            str(SCHEMA),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_metadata_describes_channels_arms_and_version() -> None:
    meta = _metadata()
    assert meta["version"] in meta["changelog"]
    cond = meta["network_data_format"]["inputs"]["cond"]
    assert cond["num_channels"] == len(CONDITION_CHANNELS)
    assert [v.split(":")[0] for v in cond["channel_def"].values()] == list(CONDITION_CHANNELS)
    arms = meta["network_data_format"]["inputs"]["treatment"]["channel_def"]
    assert [arms[str(i)] for i in range(len(ARMS))] == list(ARMS)
    assert str(NULL_TREATMENT) in arms
    assert meta["forecast_horizon"]["unit"] == "weeks"


def _resolved(*files: str) -> ConfigParser:
    """The configs ``files`` (layered in order) with their macros resolved (``train.json`` refers to
    ``inference.json`` by a repository-relative macro, so this runs from the repository root)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.resolve_macro_and_relative_ids()
    return parser


def test_training_configs_share_the_network_and_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    raw = ConfigParser.load_config_file(CONFIGS / "train.json")
    shared = (
        "network_channels",
        "network_args",
        "network_def",
        "noise_scheduler",
        "spatial_size",
        "spacing",
        "snap_grid",
        "debias_weight",
    )
    # defined once, in inference.json: the shipped weights are trained with train.json and loaded with inference.json
    for key in shared:
        assert raw[key] == f"%bundle/configs/inference.json#{key}", key
    assert raw["deterministic_transforms"] == "%bundle/configs/inference.json#preprocessing#transforms"
    inference, train = _resolved("inference.json"), _resolved("train.json")
    for key in shared:
        assert train[key] == inference[key], key
    assert train["deterministic_transforms"] == inference["preprocessing#transforms"]
    assert inference["debias_weight"] > 0
    assert inference["network_args#cond_channels"] == len(CONDITION_CHANNELS)
    baseline = _resolved("train.json", "train_deterministic.json")
    assert baseline["network_def"] == "$scripts.runtime.network.DeterministicForecastNet(**@network_args)"
    assert baseline["network_args"] == inference["network_args"]
    meta = _metadata()
    assert meta["network_data_format"]["inputs"]["cond"]["spatial_shape"] == inference["spatial_size"]


def test_train_config_parses_and_builds_the_workflow(tiny_cohort) -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(
        {
            "datalist": str(tiny_cohort),
            "output_dir": "/tmp/unused",
            "spatial_size": [32, 32, 32],
            "spacing": [6, 6, 6],
            "cache_rate": 0.0,
        }
    )
    network = parser.get_parsed_content("network_def")
    assert network.cond_channels == len(CONDITION_CHANNELS)
    scheduler = parser.get_parsed_content("noise_scheduler")
    assert scheduler.prediction_type == "mask_logits" and scheduler.lesion_weight > 1
    assert isinstance(parser.get_parsed_content("train#loss"), WeightedBCEWithLogitsLoss)
