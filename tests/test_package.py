"""The packaged bundle (``scripts/tools/package.py``): Model Zoo layout and checks, a forecast from another working
directory, and the way MONAI Deploy's ``MonaiBundleInferenceOperator`` loads and calls it.

Tests replace the packaged weights with a small random network (they must not depend on the shipped weights) and
export its ``model.ts`` with the export command.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, create_workflow, verify_metadata, verify_net_in_out
from scripts.runtime.datalist import load_datalist
from scripts.tools.export import matches_checkpoint
from scripts.tools.package import PACKAGED_BUNDLE_ROOT, package

from tests.conftest import REPO_ROOT
from tests.test_export import TINY, tiny_checkpoint

SCHEMA = REPO_ROOT / ".." / "shared" / "schema" / "meta_schema_20240725.json"
NAME = "ms_bundle_under_test"
SMALL_RUN = {
    "num_samples": 1,
    "num_inference_steps": 2,
    "treatments": ["placebo", "ocrelizumab"],
    "spatial_size": [32, 32, 32],
    "spacing": [6, 6, 6],
}
"""A quick forecast, written to the packaged ``configs/deploy_test.json`` that MONAI Deploy merges by name."""


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = package(tmp_path_factory.mktemp("packaged"), name=NAME)
    ckpt = tiny_checkpoint(bundle / "models" / "model.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.export",
            "--ckpt",
            str(ckpt),
            "--out",
            str(bundle / "models" / "model.ts"),
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--network_channels",
            json.dumps(TINY["network_channels"]),
            "--spatial_size",
            "[16,16,16]",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert json.loads(result.stdout)["max_abs_difference_vs_eager"] <= 1e-5
    (bundle / "configs" / "deploy_test.json").write_text(json.dumps(SMALL_RUN))
    return bundle


def test_layout_follows_the_model_zoo(packaged: Path, tmp_path: Path) -> None:
    # necessary and preferred files of the Model Zoo's verify_bundle_directory, and this bundle's parts
    for item in (
        "configs/metadata.json",
        "LICENSE",
        "models/model.pt",
        "configs/inference.json",
        "configs/inference_ts.json",
        "configs/train.json",
        "configs/logging.conf",
        "docs/README.md",
        "sample_data/datalist.json",
        "scripts/__init__.py",
        "scripts/runtime/network.py",
        "scripts/runtime/inferer.py",
        "apps/monailabel/main.py",
        "apps/deploy/app.py",
    ):
        assert (packaged / item).is_file(), item
    # the packaged apps find the packaged scripts, not the repository's
    spec = importlib.util.spec_from_file_location("packaged_bundle_path", packaged / "apps" / "bundle_path.py")
    bundle_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle_path)
    assert bundle_path.bundle_root() == packaged.resolve() and str(packaged.resolve()) in sys.path
    sys.path.remove(str(packaged.resolve()))
    assert not list(packaged.rglob("__pycache__"))
    for config in ("inference.json", "train.json"):
        assert ConfigParser.load_config_file(packaged / "configs" / config)["bundle_root"] == PACKAGED_BUNDLE_ROOT
    assert matches_checkpoint(packaged / "models" / "model.ts", packaged / "models" / "model.pt")
    card = (packaged / "docs" / "README.md").read_text()  # the model card names the packaged bundle's paths
    assert "bundle/configs/" not in card and "--config_file configs/inference.json" in card

    with pytest.raises(FileExistsError):
        package(packaged.parent, name=NAME)
    # a model.ts exported from other weights than the model.pt shipped beside it is refused
    torch.manual_seed(3)
    torch.save(
        {k: torch.randn_like(v) for k, v in torch.load(packaged / "models" / "model.pt").items()}, tmp_path / "other.pt"
    )
    stale = tmp_path / "bundle"
    (stale / "models").mkdir(parents=True)
    (stale / "configs").symlink_to(packaged / "configs")
    (stale / "LICENSE").symlink_to(packaged / "LICENSE")
    (stale / "models" / "model.pt").symlink_to(tmp_path / "other.pt")
    (stale / "models" / "model.ts").symlink_to(packaged / "models" / "model.ts")
    with pytest.raises(ValueError, match="was not exported from"):
        package(tmp_path / "out", bundle_dir=stale)


def test_packaged_forecast_runs_from_another_directory(packaged: Path, tmp_path: Path) -> None:
    """The packaged TorchScript forecast on the embedded sample cases, with only the bundle folder on the path."""
    configs = [str(packaged / "configs" / "inference.json"), str(packaged / "configs" / "inference_ts.json")]
    overrides = {**SMALL_RUN, "num_inference_steps": 1, "treatments": ["placebo"], "device": "cpu"}
    args = [a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v).replace('"', "'"))]
    # no repository on the path: bundle_root (and so model.ts and sample_data) comes from the copy of scripts
    env = {**os.environ, "PYTHONPATH": str(packaged), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs), "--output_dir", "out", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cases = [c["id"] for c in load_datalist(packaged / "sample_data" / "datalist.json", "testing")]
    for case in cases:
        forecast = json.loads((tmp_path / "out" / case / "forecast.json").read_text())
        assert list(forecast["arms"]) == ["placebo"] and forecast["num_samples"] == 1
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        assert [row["id"] for row in csv.DictReader(handle)] == cases


def test_model_zoo_checks_pass_on_the_packaged_bundle(packaged: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    configs = packaged / "configs"
    meta = json.loads((configs / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    if SCHEMA.is_file():
        verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(SCHEMA.resolve()))

    # the network and its metadata agree (forward needs timesteps, cond, treatment and horizon besides the image)
    size = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    cond_channels = meta["network_data_format"]["inputs"]["cond"]["num_channels"]
    extra = {
        "timesteps": torch.tensor([500]),
        "cond": torch.rand(1, cond_channels, *size),
        "treatment": torch.tensor([0]),
        "horizon": torch.tensor([24.0]),
    }
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        device="cpu",
        bundle_root=str(packaged),
        extra_forward_args=extra,
    )

    common = {
        "bundle_root": str(packaged),
        "meta_file": str(configs / "metadata.json"),
        "logging_file": str(configs / "logging.conf"),
        **TINY,
    }
    infer = create_workflow(config_file=str(configs / "inference.json"), workflow_type="infer", **common)
    assert infer.check_properties() == []

    # the packaged train.json holds the content of the repository's macros and passes as it is
    assert "%bundle/configs/" not in (configs / "train.json").read_text()
    train = create_workflow(
        config_file=str(configs / "train.json"),
        workflow_type="train",
        datalist=str(tiny_cohort),
        output_dir=str(tmp_path / "train"),
        cache_rate=0.0,
        spatial_size=[32, 32, 32],
        spacing=[6, 6, 6],
        **common,
    )
    assert train.check_properties() == []


def test_the_shipped_zoo_unit_test_passes_on_the_packaged_bundle(packaged: Path, tmp_path: Path) -> None:
    """``ci/unit_tests/test_<name>.py`` as the Model Zoo's runner would run it: one training epoch, then a forecast."""
    test = packaged / "ci" / "unit_tests" / "test_ms_mri_net2_forecast.py"
    env = {**os.environ, "MS_NET2_BUNDLE_ROOT": str(packaged), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the packaged scripts, not the repository's
    result = subprocess.run(
        [sys.executable, "-m", "unittest", "-v", test.stem],
        cwd=test.parent,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Ran 1 test" in result.stderr and result.stderr.rstrip().endswith("OK")


def _sample_case(bundle: Path) -> dict:
    return load_datalist(bundle / "sample_data" / "datalist.json", "testing")[0]


def test_deploy_loading_path_emulated(packaged: Path) -> None:
    """MonaiBundleInferenceOperator (monai-deploy-app-sdk 4.0.0) on a directory bundle, step by step, without it.

    ``_init_config``: bundle folder on ``sys.path``; ``read_meta(configs/metadata.json)``; ``read_config`` of the
    named configs (merged in order); ``parse()``; then ``device``, ``inferer`` and ``preprocessing`` minus any
    ``LoadImage``/``SaveImage`` transform. ``_load_model_from_directory_bundle``: ``models/model.ts`` through
    ``torch.jit.load(map_location=device).eval()``. ``predict``: ``inferer(inputs=..., network=..., **others)``.
    """
    sys.path.insert(0, str(packaged))  # as Deploy does; this process has already imported the repository's scripts
    try:
        parser = ConfigParser()
        parser.read_meta(f=json.loads((packaged / "configs" / "metadata.json").read_text()))
        parser.read_config([packaged / "configs" / f"{name}.json" for name in ("inference", "deploy_test")])
        parser.parse()
        device = parser.get_parsed_content("device")
        inferer = parser.get_parsed_content("inferer")
        preprocessing = parser.get_parsed_content("preprocessing")
        preprocessing.transforms = tuple(
            t for t in preprocessing.transforms if not any(d in type(t).__name__ for d in ("LoadImage", "SaveImage"))
        )
        postprocessing = parser.get_parsed_content("postprocessing")  # Deploy's post_process runs it on one arm
        network = torch.jit.load(str(packaged / "models" / "model.ts"), map_location=device).eval()
        data = preprocessing(_sample_case(packaged))
        samples = inferer(
            inputs=data["cond"][None].to(device),
            network=network,
            horizon=torch.as_tensor(data["horizon"]).reshape(1).to(device),
        )
        post = postprocessing({**data, "pred": samples[0, 0]})
    finally:
        sys.path.remove(str(packaged))
    assert samples.shape == (1, 2, 1, *SMALL_RUN["spatial_size"])
    reference = nib.load(_sample_case(packaged)["flair_1"])
    assert post["prob"].shape == post["mask"].shape == (1, *reference.shape)
    np.testing.assert_allclose(post["prob"].affine.numpy(), reference.affine, atol=1e-5)
    assert set(samples.unique().tolist()) <= {0.0, 1.0}

    # a TorchScript file as the bundle: Deploy reads <stem>/extra/metadata.json and the named configs from the zip
    with zipfile.ZipFile(packaged / "models" / "model.ts") as archive:
        names = set(archive.namelist())
        assert {"model/extra/metadata.json", "model/extra/inference.json"} <= names
        embedded = ConfigParser()
        embedded.read_meta(f=json.loads(archive.read("model/extra/metadata.json")))
        embedded.read_config(json.loads(archive.read("model/extra/inference.json")))
    embedded.parse()
    assert type(embedded.get_parsed_content("inferer")).__name__ == "ForecastInferer"
    assert "image" in embedded["_meta_"]["network_data_format"]["inputs"]


def test_deploy_sdk_operator_runs_the_packaged_bundle(packaged: Path) -> None:
    """The real operator, where monai-deploy-app-sdk is installed (it needs Holoscan, so it is not a requirement).

    The operator's own ``_init_config`` and model loading, its ``pre_process`` and ``predict`` run on a sample
    case. ``compute`` itself is left out: it receives every ``network_data_format`` input (the denoiser's ``image``,
    ``timesteps``, ``cond``, ``treatment``, ``horizon``) from an input port, while this bundle's inferer runs the
    whole sampler from the conditioning volume, so a Deploy application wraps it with its own ports.
    """
    sdk = pytest.importorskip(
        "monai.deploy.operators.monai_bundle_inference_operator", reason="monai-deploy-app-sdk is not installed"
    )
    from monai.deploy.core import AppContext, Fragment, Image, IOType

    op = sdk.MonaiBundleInferenceOperator(
        Fragment(),
        app_context=AppContext({}),
        input_mapping=[sdk.IOMapping("image", Image, IOType.IN_MEMORY)],
        output_mapping=[sdk.IOMapping("pred", Image, IOType.IN_MEMORY)],
        bundle_path=str(packaged),
        bundle_config_names=sdk.BundleConfigNames(config_names=["inference", "deploy_test"]),
        name="net2_forecast",
    )
    # what compute() does first for a directory bundle
    op._init_config(op._bundle_config_names.config_names)
    op._model_network = sdk._load_model_from_directory_bundle(op.bundle_path, op._device, op.parser)
    assert isinstance(op._model_network, torch.jit.ScriptModule)  # models/model.ts, not model.pt
    data = op.pre_process(_sample_case(packaged))
    samples = op.predict(
        data=data["cond"][None].to(op._device), horizon=torch.as_tensor(data["horizon"]).reshape(1).to(op._device)
    )
    assert samples.shape == (1, 2, 1, *SMALL_RUN["spatial_size"])

    parser = sdk.get_bundle_config(str(packaged / "models" / "model.ts"), ["inference"])
    assert type(parser.get_parsed_content("inferer")).__name__ == "ForecastInferer"
