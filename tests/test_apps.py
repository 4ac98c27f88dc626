"""Serving the bundle: the postprocessing, the one-request forecaster, and the MONAI Label and MONAI Deploy apps.

The apps' own tests need their packages (``bundle/apps/*/requirements.txt``); they skip with a message where the
package is not installed (the bundle's test environment has neither).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scripts.runtime.errors import CaseError, InputError
from scripts.runtime.grids import to_reference_grid
from scripts.runtime.service import BundleForecaster, case_from_folder, resolve_case, stack_arm_maps
from scripts.runtime.transforms import ForecastMapsd, LoadCased, forecast_postprocessing

from tests.conftest import CONFIGS, REPO_ROOT

APPS = REPO_ROOT / "bundle" / "apps"
SAMPLE = REPO_ROOT / "bundle" / "sample_data"
SHIPPED = REPO_ROOT / "bundle" / "models" / "model.pt"
TINY = {
    "network_channels": [8, 16, 16, 16],
    "spatial_size": [32, 32, 32],
    "spacing": [6.0, 6.0, 6.0],
    "num_samples": 2,
    "num_inference_steps": 2,
    "device": "cpu",
}


def _config_postprocessing():
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    return parser.get_parsed_content("postprocessing")


def test_postprocessing_is_the_forecast_default_and_puts_maps_on_the_reference_grid() -> None:
    rng = np.random.default_rng(0)
    samples = rng.random((5, 8, 8, 8)) > 0.8
    working = np.diag([6.0, 6.0, 6.0, 1.0])
    working[:3, 3] = [-20.0, -22.0, -18.0]
    reference = np.array([[0.0, -2.0, 0.0, 30.0], [2.5, 0.0, 0.0, -25.0], [0.0, 0.0, 3.0, -20.0], [0, 0, 0, 1]])
    data = {"working_affine": working, "reference_affine": reference, "reference_shape": [20, 24, 16]}
    expected = np.clip(to_reference_grid(samples.mean(0).astype(np.float32), working, reference, [20, 24, 16]), 0, 1)
    for post in (forecast_postprocessing(), _config_postprocessing()):
        out = post({**data, "pred": torch.from_numpy(samples)})
        prob, mask = np.asarray(out["prob"]), np.asarray(out["mask"])
        assert prob.shape == mask.shape == (1, 20, 24, 16)
        assert prob.dtype == np.float32 and mask.dtype == np.uint8
        np.testing.assert_array_equal(prob[0], expected)
        np.testing.assert_array_equal(mask[0], (expected >= 0.5).astype(np.uint8))
        np.testing.assert_allclose(out["prob"].affine.numpy(), reference)
        assert 0.1 < prob.max() <= 1.0
        assert "agreement" not in out
    # the conditional mean as the probability map: the mask still holds what half of the samples agree on
    mean = rng.random((1, 8, 8, 8)).astype(np.float32) * 0.2
    out = forecast_postprocessing("conditional_mean")({**data, "pred": torch.from_numpy(samples), "mean": mean})
    expected_mean = np.clip(to_reference_grid(mean[0], working, reference, [20, 24, 16]), 0, 1)
    np.testing.assert_allclose(np.asarray(out["prob"])[0], expected_mean, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["mask"])[0], (expected >= 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="needs 'mean'"):
        ForecastMapsd("pred", probability="conditional_mean")({"pred": torch.from_numpy(samples)})
    with pytest.raises(ValueError, match="probability_map"):
        forecast_postprocessing("median")


def test_load_cased_takes_what_monai_label_hands_it(tiny_cohort: Path) -> None:
    """MONAI Label turns ``image_only`` off on every ``LoadImaged``, and a request has no ``label``."""
    case = json.loads(tiny_cohort.read_text())["testing"][0]
    case = {k: (str(tiny_cohort.parent / v) if k.endswith(("_0", "_1")) else v) for k, v in case.items() if v}
    case.pop("label", None)
    plain = LoadCased()(dict(case))
    label_style = LoadCased()
    label_style._loader.image_only = False
    patched = label_style(dict(case))
    assert "label" not in patched and set(plain) == set(patched)
    for key in ("flair_1", "t2les_0"):
        assert patched[key].shape == plain[key].shape
        torch.testing.assert_close(patched[key].as_tensor(), plain[key].as_tensor())
        np.testing.assert_allclose(patched[key].affine.numpy(), plain[key].affine.numpy())


def test_cases_are_found_from_a_folder_an_image_or_a_datalist(tmp_path: Path) -> None:
    folder = SAMPLE / "images" / "syn0000"
    case = case_from_folder(folder)
    assert case["id"] == "syn0000" and Path(case["flair_1"]) == folder.resolve() / "flair_1.nii.gz"
    assert len(case) == 16  # id and the 15 images of the sample case
    assert resolve_case(folder / "t1_1.nii.gz") == case
    by_id = resolve_case("syn0002", SAMPLE / "datalist.json")
    assert by_id["id"] == "syn0002" and by_id["flair_1"].endswith("syn0002/flair_1.nii.gz")
    assert resolve_case(str(SAMPLE / "images" / "syn0007" / "pd_0.nii.gz"), SAMPLE / "datalist.json")["id"] == "syn0007"
    (tmp_path / "syn0000.nii.gz").symlink_to(folder / "flair_1.nii.gz")  # a MONAI Label studies folder
    assert resolve_case(tmp_path / "syn0000.nii.gz", SAMPLE / "datalist.json")["id"] == "syn0000"
    with pytest.raises(InputError, match="names no case.*nor a case of"):
        resolve_case("syn9999", SAMPLE / "datalist.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image named after a datalist key"):
        case_from_folder(tmp_path / "empty")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scripts.runtime.network import ForecastDiffusionUNet

    torch.manual_seed(0)
    network = ForecastDiffusionUNet(
        channels=(8, 16, 16, 16), attention_levels=(False, False, False, True), norm_num_groups=8, num_head_channels=16
    )
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(network.state_dict(), path)
    return path


def test_a_served_forecast_equals_the_command_line_forecast(
    tiny_cohort: Path, tiny_weights: Path, tmp_path: Path
) -> None:
    case = json.loads(tiny_cohort.read_text())["testing"][0]
    arms = ["placebo", "ocrelizumab"]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json")]
    for key, value in {
        **TINY,
        "datalist": str(tiny_cohort),
        "ckpt_path": str(tiny_weights),
        "treatments": arms,
    }.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "cli")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]

    forecaster = BundleForecaster(REPO_ROOT / "bundle", overrides={**TINY, "ckpt_path": str(tiny_weights)})
    entry = {
        k: (str(tiny_cohort.parent / v) if isinstance(v, str) and v.endswith(".nii.gz") else v) for k, v in case.items()
    }
    forecast, case_dir = forecaster.forecast(entry, tmp_path / "served", arms=arms)
    assert case_dir == tmp_path / "served" / case["id"]
    cli = json.loads((tmp_path / "cli" / case["id"] / "forecast.json").read_text())
    assert forecast == cli
    for arm in arms:
        for kind in ("prob", "mask"):
            served = np.asarray(nib.load(case_dir / f"{arm}_{kind}.nii.gz").dataobj)
            np.testing.assert_array_equal(
                served, np.asarray(nib.load(tmp_path / "cli" / case["id"] / f"{arm}_{kind}.nii.gz").dataobj)
            )

    stacked = nib.load(stack_arm_maps(case_dir, forecast, tmp_path / "stack.nii.gz"))
    reference = nib.load(entry["flair_1"])
    assert stacked.shape == (*reference.shape, 2)
    np.testing.assert_allclose(stacked.affine, reference.affine, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(stacked.dataobj)[..., 1], np.asarray(nib.load(case_dir / "ocrelizumab_prob.nii.gz").dataobj)
    )

    with pytest.raises(CaseError, match="horizon_weeks: 80 weeks is outside the trained range"):
        forecaster.forecast(entry, tmp_path / "served", arms=arms, horizon_weeks=80)
    with pytest.raises(InputError, match="unknown treatment 'natalizumab'"):
        forecaster.forecast(entry, tmp_path / "served", arms="placebo,natalizumab")


def test_the_figure_draws_the_saved_maps_on_one_scale(
    tiny_cohort: Path, tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import scripts.runtime.forecast as forecast_module

    drawn = {}
    real = forecast_module.forecast_figure

    def spy(mri, probs, arms, out, **kwargs):
        drawn.update(mri=mri, probs={k: v.copy() for k, v in probs.items()}, **kwargs)
        return real(mri, probs, arms, out, **kwargs)

    monkeypatch.setattr(forecast_module, "forecast_figure", spy)
    case = json.loads(tiny_cohort.read_text())["testing"][0]
    entry = {
        k: (str(tiny_cohort.parent / v) if isinstance(v, str) and v.endswith(".nii.gz") else v) for k, v in case.items()
    }
    forecaster = BundleForecaster(REPO_ROOT / "bundle", overrides={**TINY, "ckpt_path": str(tiny_weights)})
    forecast, case_dir = forecaster.forecast(entry, tmp_path, arms=["placebo", "ocrelizumab"])
    reference = nib.load(entry["flair_1"])
    assert drawn["vmax"] == forecast_module.FIGURE_VMAX == 0.5 and drawn["mri_name"] == "flair_1"
    np.testing.assert_allclose(drawn["affine"], reference.affine, atol=1e-5)
    assert drawn["mri"].shape == reference.shape
    for arm in forecast["arms"]:
        saved = np.asarray(nib.load(case_dir / f"{arm}_prob.nii.gz").dataobj)
        np.testing.assert_array_equal(drawn["probs"][arm], saved)
    assert (case_dir / "forecast.png").stat().st_size > 10_000


def test_step_map_scores_have_known_answers() -> None:
    from scripts.bench.trajectory import score_step_map

    tissue = np.zeros((6, 6, 6), np.uint8)
    tissue[1:5, 1:5, 1:5] = 3  # white matter
    tissue[1:5, 1:5, 4] = 1  # a CSF layer (not parenchyma)
    label = np.zeros_like(tissue, bool)
    label[2, 2, 2] = True
    prob = np.where(label, 0.9, 0.0)
    prob[2, 2, 4] = 0.1  # a tenth of the mass in CSF
    scores = score_step_map(prob, label, tissue)
    assert scores["auroc"] == 1.0 and scores["ap"] == pytest.approx(1.0)
    assert scores["mass"] == pytest.approx(1.0) and scores["max"] == pytest.approx(0.9)
    assert scores["mass_outside_parenchyma"] == pytest.approx(0.1)
    assert scores["mass_in_white_matter"] == pytest.approx(0.9)
    assert score_step_map(np.zeros_like(prob), np.zeros_like(label), tissue)["auroc"] is None
    assert scores["ap_outcomes"] is None
    # against outcome draws with a lesion at the top voxel in half of them: it is half positive, half negative
    assert score_step_map(prob, label, tissue, outcomes=label * 0.5)["ap_outcomes"] == pytest.approx(0.5)


def test_the_reverse_process_is_traced_step_by_step(tiny_cohort: Path, tiny_weights: Path) -> None:
    from scripts.bench.evaluation.scores import lesion_sizes
    from scripts.bench.trajectory import trace_case
    from scripts.runtime.datalist import load_datalist

    forecaster = BundleForecaster(REPO_ROOT / "bundle", overrides={**TINY, "ckpt_path": str(tiny_weights)})
    case = load_datalist(tiny_cohort, "testing")[0]
    result = trace_case(forecaster, case, tiny_cohort, "ocrelizumab")
    assert [s["step"] for s in result["steps"]] == [0, 1] and result["steps"][0]["timestep"] == 999
    for step in result["steps"]:
        assert 0.0 <= step["p0"]["max"] <= 1.0 and 0.0 <= step["state"]["max"] <= 1.0
    # the last step's state is the samples, as the forecast draws them
    assert result["steps"][-1]["state"]["mass"] == pytest.approx(result["samples"]["mass"])
    # the traced samples are the forecast's own (same preprocessing, inferer and seed), not a re-implementation
    samples = forecaster.inferer(
        torch.as_tensor(forecaster.preprocessing(dict(case))["cond"]).float()[None],
        forecaster.network,
        horizon=torch.tensor([float(case["horizon_weeks"])]),
        arms=["ocrelizumab"],
    )[0, 0].numpy()
    assert result["sampled_lesions"] == lesion_sizes(list(samples > 0.5))


def test_the_trace_scores_the_location_oracle_and_the_outcome_draws(tmp_path: Path, tiny_weights: Path) -> None:
    from scripts.bench.synthetic.cohort import generate_cohort
    from scripts.bench.trajectory import trace_case
    from scripts.runtime.datalist import load_datalist

    kwargs = {"shape": 32, "spacing": 6.0, "split": (0, 0, 1), "progress": False}
    datalist = Path(generate_cohort(tmp_path / "c", 1, 4, oracle_draws=4, outcome_draws=4, **kwargs))
    forecaster = BundleForecaster(REPO_ROOT / "bundle", overrides={**TINY, "ckpt_path": str(tiny_weights)})
    case = load_datalist(datalist, "testing")[0]
    factual = trace_case(forecaster, case, datalist, "factual", exact_draws=4)
    assert factual["arm"] == case["treatment"]
    exact = factual["exact_draws"]  # the generator's own draws: lesions only in the parenchyma
    assert exact["draws"] == 4 and exact["mass_outside_parenchyma"] in (None, pytest.approx(0.0, abs=1e-9))
    oracle = factual["location_oracle"]
    assert (
        oracle is not None
        and oracle["ap_outcomes"] is not None
        and oracle["mass_outside_parenchyma"] == pytest.approx(0.0, abs=1e-9)
    )
    assert all(step["p0"]["ap_outcomes"] is not None for step in factual["steps"])
    other = next(arm for arm in ("placebo", "ocrelizumab") if arm != case["treatment"])
    counterfactual = trace_case(forecaster, case, datalist, other)  # the draws are written for every arm
    assert counterfactual["arm"] == other and counterfactual["samples"]["ap_outcomes"] is not None
    assert counterfactual["location_oracle"]["mass"] != pytest.approx(oracle["mass"])  # the arm's keep probability
    plain = trace_case(forecaster, load_datalist(SAMPLE / "datalist.json", "testing")[0], SAMPLE / "datalist.json")
    assert plain["location_oracle"] is None and plain["samples"]["ap_outcomes"] is None


def _require(module: str, requirements: Path) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed: pip install -r {requirements.relative_to(REPO_ROOT)} to run this test")


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped weights in bundle/models/model.pt")
def test_monai_label_app_answers_a_forecast_request(tmp_path: Path) -> None:
    _require("monailabel", APPS / "monailabel" / "requirements.txt")
    from monailabel.interfaces.utils.app import app_instance

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE / "images" / "syn0000" / "flair_1.nii.gz", studies / "syn0000.nii.gz")
    conf = {"num_samples": "1", "device": "cpu", "output_dir": str(tmp_path / "out")}
    app = app_instance(app_dir=str(APPS / "monailabel"), studies=str(studies), conf=conf)
    assert "net2_forecast" in app.info()["models"]
    result = app.infer(
        {"model": "net2_forecast", "image": "syn0000", "arms": "placebo,ocrelizumab", "horizon_weeks": 36}
    )
    label = nib.load(result["file"])
    assert label.shape == (64, 64, 64, 2) and label.get_data_dtype() == np.float32
    params = result["params"]
    assert params["label_arms"] == ["placebo", "ocrelizumab"]
    assert params["forecast"]["horizon_weeks"] == 36.0 and params["forecast"]["num_samples"] == 1
    assert (Path(params["output_folder"]) / "forecast.json").is_file()


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped weights in bundle/models/model.pt")
def test_monai_deploy_app_forecasts_the_input_case(tmp_path: Path) -> None:
    _require("monai.deploy", APPS / "deploy" / "requirements.txt")
    case = tmp_path / "input" / "syn0000"
    shutil.copytree(SAMPLE / "images" / "syn0000", case)
    (case / "request.json").write_text(json.dumps({"arms": ["placebo", "ocrelizumab"], "horizon_weeks": 36}))
    env = {**os.environ, "NET2_NUM_SAMPLES": "1", "NET2_DEVICE": "cpu"}
    result = subprocess.run(
        [sys.executable, str(APPS / "deploy" / "app.py"), "-i", str(case), "-o", str(tmp_path / "output")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    forecast = json.loads((tmp_path / "output" / "syn0000" / "forecast.json").read_text())
    assert list(forecast["arms"]) == ["placebo", "ocrelizumab"] and forecast["horizon_weeks"] == 36.0
    assert nib.load(tmp_path / "output" / "syn0000" / "syn0000_prob.nii.gz").shape == (64, 64, 64, 2)
