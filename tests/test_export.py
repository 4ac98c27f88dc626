"""TorchScript export (``scripts/tools/export.py``): the traced network matches the eager one, loads for inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata
from scripts.runtime.constants import CONDITION_CHANNELS
from scripts.runtime.inferer import ForecastInferer
from scripts.tools.export import (
    EXPORT_INFO,
    device_constants,
    example_inputs,
    export,
    load_torchscript,
    matches_checkpoint,
)

from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "bundle" / "configs"
TINY = {"network_channels": [8, 16, 16, 16]}
"""Overrides for a small network (as in the forecast tests); the traced size is 16^3, the smallest it accepts."""
TRACE_SIZE = [16, 16, 16]


def tiny_network(seed: int = 0) -> torch.nn.Module:
    """``inference.json``'s network with :data:`TINY` channels and seeded random weights."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update(TINY)
    torch.manual_seed(seed)
    return parser.get_parsed_content("network_def").eval()


def tiny_checkpoint(path: Path) -> Path:
    torch.save(tiny_network().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(folder / "model.pt")
    info = export(ckpt, folder / "model.ts", spatial_size=TRACE_SIZE, **TINY)
    return {"ckpt": ckpt, "ts": folder / "model.ts", "info": info}


def test_export_embeds_metadata_config_and_checks(exported: dict) -> None:
    info = exported["info"]
    # checked at export against the eager network at batch sizes other than the traced one
    assert info["checked_batch_sizes"] == [1, 3] and info["traced_batch_size"] == 2
    assert info["max_abs_difference_vs_eager"] <= 1e-5
    assert info["spatial_multiple"] == 16 and info["cond_channels"] == len(CONDITION_CHANNELS)
    assert matches_checkpoint(exported["ts"], exported["ckpt"])

    _, meta, extra = load_net_with_metadata(str(exported["ts"]), more_extra_files=("inference.json", EXPORT_INFO))
    bundle_meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] == bundle_meta["version"]
    assert meta["network_data_format"] == bundle_meta["network_data_format"]
    assert {"MONAI", "Pytorch", "Numpy"} <= set(meta)  # save_net_with_metadata's version record
    config = json.loads(extra["inference.json"])
    assert config["network_channels"] == TINY["network_channels"]  # the config the trace was built from
    assert config["spatial_size"] == TRACE_SIZE and "_meta_" not in config
    assert json.loads(extra[EXPORT_INFO]) == info


def test_torchscript_matches_eager_for_other_batch_and_spatial_sizes(exported: dict) -> None:
    traced = load_torchscript(exported["ts"], "cpu", spatial_size=[16, 32, 48])
    # no device written into the graph: the file loads onto a GPU as well (map_location)
    assert device_constants(traced) == []
    eager = tiny_network()
    worst = 0.0
    with torch.no_grad():
        for seed, (batch, size) in enumerate([(5, TRACE_SIZE), (1, [16, 32, 48])]):
            inputs = example_inputs(batch, size, seed=seed)
            out = traced(*inputs)
            assert out.shape == (batch, 1, *size)
            worst = max(worst, (out - eager(*inputs)).abs().max().item())
    assert worst <= 1e-5, worst


def test_load_torchscript_rejects_wrong_files_and_sizes(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        load_torchscript(exported["ts"], spatial_size=[24, 24, 24])
    with pytest.raises(FileNotFoundError, match="scripts.export"):
        load_torchscript(tmp_path / "missing.ts")
    other = tmp_path / "other.ts"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(other))
    with pytest.raises(ValueError, match="not an export"):
        load_torchscript(other)
    torch.save({k: v + 1 for k, v in tiny_network().state_dict().items()}, tmp_path / "changed.pt")
    assert not matches_checkpoint(exported["ts"], tmp_path / "changed.pt")


def test_inferer_called_as_deploy_does_gives_the_same_samples(exported: dict) -> None:
    """``inferer(inputs=..., network=...)`` (MONAI Deploy's call) with the TorchScript and the eager network."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    scheduler = parser.get_parsed_content("noise_scheduler")
    inferer = ForecastInferer(scheduler, num_samples=2, num_inference_steps=2, arms=["placebo", "ocrelizumab"])
    cond = example_inputs(1, TRACE_SIZE, seed=7)[2]
    horizon = torch.tensor([24.0])
    traced = load_torchscript(exported["ts"])
    from_ts = inferer(inputs=cond, network=traced, horizon=horizon)
    from_eager = inferer(inputs=cond, network=tiny_network(), horizon=horizon)
    assert from_ts.shape == (1, 2, 2, *TRACE_SIZE)
    assert torch.equal(from_ts, from_eager)


def test_torchscript_config_only_replaces_the_network() -> None:
    """``inference_ts.json`` swaps network and weights for model.ts and keeps the rest of the initialisation."""
    base = ConfigParser.load_config_file(CONFIGS / "inference.json")
    ts = ConfigParser.load_config_file(CONFIGS / "inference_ts.json")
    assert ts["initialize"] == [e for e in base["initialize"] if "load_weights" not in e]
    merged = ConfigParser.load_config_files([CONFIGS / "inference.json", CONFIGS / "inference_ts.json"])
    assert merged["imports"] == base["imports"] + ["$import scripts.tools.export"]
    assert "load_torchscript" in merged["network"] and merged["evaluator"]["network"] == "@network"
