"""The forecast job (``bundle/configs/inference.json``): outputs, geometry, counterfactual figures, bad cases."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from scripts.runtime.analysis import effects_vs_placebo, summarize_arm
from scripts.runtime.constants import ARMS
from scripts.runtime.lesions import count_lesions
from scripts.runtime.network import ForecastDiffusionUNet

from tests.conftest import REPO_ROOT

SMALL_NET = ["--network_channels", "[8,16,16,16]"]
TINY_GRID = ["--spatial_size", "[32,32,32]", "--spacing", "[6,6,6]"]
FAST = ["--num_samples", "2", "--num_inference_steps", "2", "--device", "cpu"]
SHIPPED = REPO_ROOT / "bundle" / "models" / "model.pt"


def _forecast(args: list[str], expect_ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.json", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    network = ForecastDiffusionUNet(
        channels=(8, 16, 16, 16), attention_levels=(False, False, False, True), norm_num_groups=8, num_head_channels=16
    )
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(network.state_dict(), path)
    return path


def _check_case_outputs(case_dir: Path, reference: Path, arms: list[str], num_samples: int) -> dict:
    ref = nib.load(reference)
    forecast = json.loads((case_dir / "forecast.json").read_text())
    assert forecast["id"] == case_dir.name and forecast["num_samples"] == num_samples
    assert list(forecast["arms"]) == arms
    for arm in arms:
        figures = forecast["arms"][arm]
        for key in ("expected_count", "p_active", "expected_volume_mm3", "count_samples", "lesions", "prob", "mask"):
            assert key in figures, (arm, key)
        assert len(figures["count_samples"]) == num_samples
        assert figures["expected_count"] == pytest.approx(np.mean(figures["count_samples"]))
        assert 0.0 <= figures["p_active"] <= 1.0
        prob, mask = nib.load(case_dir / figures["prob"]), nib.load(case_dir / figures["mask"])
        for image in (prob, mask):
            assert image.shape == ref.shape
            np.testing.assert_allclose(image.affine, ref.affine, atol=1e-5)
        p = np.asanyarray(prob.dataobj)
        assert p.dtype == np.float32 and p.min() >= 0.0 and p.max() <= 1.0
        m = np.asanyarray(mask.dataobj)
        assert set(np.unique(m).tolist()) <= {0, 1}
        assert len(figures["lesions"]) == count_lesions(m)
        for lesion in figures["lesions"]:
            assert {"centroid_mm", "volume_mm3", "probability", "region"} <= set(lesion)
            assert lesion["region"] in {"periventricular", "juxtacortical", "infratentorial", "deep_white_matter"}
    if "placebo" in arms:
        assert set(forecast["effects_vs_placebo"]) == set(arms)
    assert (case_dir / "forecast.png").stat().st_size > 10_000
    return forecast


def test_summaries_and_effects() -> None:
    samples = np.zeros((4, 8, 8, 8), dtype=bool)
    samples[0, 1, 1, 1] = samples[0, 5, 5, 5] = True  # two lesions
    samples[1, 2, 2, 2] = True  # one lesion
    figures = summarize_arm(samples, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert figures["count_samples"] == [2, 1, 0, 0]
    assert figures["expected_count"] == 0.75 and figures["p_active"] == 0.5
    assert figures["expected_volume_mm3"] == pytest.approx(3 * 8 / 4)
    assert figures["prob_working"][1, 1, 1] == 0.25
    effects = effects_vs_placebo(
        {"placebo": {"expected_count": 2.0, "p_active": 0.5}, "ocrelizumab": {"expected_count": 0.5, "p_active": 0.25}}
    )
    assert effects["ocrelizumab"] == {"count_ratio": 0.25, "count_difference": -1.5, "p_active_difference": -0.25}
    zero = effects_vs_placebo({"placebo": {"expected_count": 0.0, "p_active": 0.0}})
    assert zero["placebo"]["count_ratio"] is None


def test_forecast_writes_contract_outputs(tiny_cohort: Path, small_weights: Path, tmp_path: Path) -> None:
    arms = ["placebo", "ocrelizumab", "laquinimod"]
    _forecast(
        [
            "--datalist",
            str(tiny_cohort),
            "--output_dir",
            str(tmp_path),
            "--ckpt_path",
            str(small_weights),
            "--treatments",
            json.dumps(arms),
            *FAST,
            *TINY_GRID,
            *SMALL_NET,
        ]
    )
    cases = json.loads(tiny_cohort.read_text())["testing"]
    for case in cases:
        _check_case_outputs(tmp_path / case["id"], tiny_cohort.parent / case["flair_1"], arms, num_samples=2)
    with open(tmp_path / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(cases) * len(arms)
    assert {r["arm"] for r in rows} == set(arms)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_counterfactual_arms_share_noise(tiny_cohort: Path, small_weights: Path, tmp_path: Path) -> None:
    """The same arm requested twice under different names order gives identical samples (same starting noise)."""
    common = ["--datalist", str(tiny_cohort), "--ckpt_path", str(small_weights), *FAST, *TINY_GRID, *SMALL_NET]
    _forecast([*common, "--output_dir", str(tmp_path / "a"), "--treatments", "['placebo','ocrelizumab']"])
    _forecast([*common, "--output_dir", str(tmp_path / "b"), "--treatments", "['ocrelizumab','placebo']"])
    case = json.loads(tiny_cohort.read_text())["testing"][0]["id"]
    a = json.loads((tmp_path / "a" / case / "forecast.json").read_text())["arms"]
    b = json.loads((tmp_path / "b" / case / "forecast.json").read_text())["arms"]
    for arm in ("placebo", "ocrelizumab"):
        assert a[arm]["count_samples"] == b[arm]["count_samples"]


def test_bad_case_is_reported_and_leaves_nothing(tiny_cohort: Path, small_weights: Path, tmp_path: Path) -> None:
    data = json.loads(tiny_cohort.read_text())
    good = {
        k: str(tiny_cohort.parent / v) if isinstance(v, str) and v.endswith(".nii.gz") else v
        for k, v in data["testing"][0].items()
    }
    bad = dict(good, id="broken", t1_1=str(tmp_path / "missing_t1.nii.gz"))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [bad, good]}))
    out = tmp_path / "out"
    result = _forecast(
        [
            "--datalist",
            str(datalist),
            "--output_dir",
            str(out),
            "--ckpt_path",
            str(small_weights),
            "--treatments",
            "['placebo']",
            *FAST,
            *TINY_GRID,
            *SMALL_NET,
        ],
        expect_ok=False,
    )
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "broken" in log and "t1_1" in log
    assert (out / good["id"] / "forecast.json").is_file()  # the other case is done
    assert not (out / "broken").exists()


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped weights in bundle/models/model.pt")
def test_real_patient_all_arms_on_its_grid(patient01_study1: dict[str, str], tmp_path: Path) -> None:
    """No visit 0, no treatment given: all six arms, written on the FLAIR's own (LPS, anisotropic) grid."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [patient01_study1]}))
    _forecast(["--datalist", str(datalist), "--output_dir", str(tmp_path / "out"), *FAST])
    _check_case_outputs(tmp_path / "out" / "patient01", Path(patient01_study1["flair_1"]), list(ARMS), num_samples=2)


def test_forecasts_are_restricted_to_the_brain(tiny_cohort: Path, small_weights: Path, tmp_path: Path) -> None:
    """Untrained weights with a de-bias weight far below 1 draw lesion voxels everywhere; the default run keeps only
    those in or next to the brain."""
    common = [
        "--datalist",
        str(tiny_cohort),
        "--ckpt_path",
        str(small_weights),
        "--treatments",
        "['placebo']",
        "--debias_weight",
        "0.001",
        *FAST,
        *TINY_GRID,
        *SMALL_NET,
    ]
    _forecast([*common, "--output_dir", str(tmp_path / "brain")])
    _forecast([*common, "--output_dir", str(tmp_path / "all"), "--restrict_to_brain", "False"])
    case = json.loads(tiny_cohort.read_text())["testing"][0]
    kept = json.loads((tmp_path / "brain" / case["id"] / "forecast.json").read_text())
    drawn = json.loads((tmp_path / "all" / case["id"] / "forecast.json").read_text())
    assert kept["brain_restriction"]["applied"] and kept["brain_restriction"]["brain_margin_voxels"] == 1
    assert kept["brain_restriction"]["removed_voxels_per_sample"] > 0
    assert drawn["brain_restriction"] == {"brain_margin_voxels": None, "applied": False}
    # the same noise: the restricted samples are the drawn ones minus the voxels outside
    assert kept["arms"]["placebo"]["expected_volume_mm3"] < drawn["arms"]["placebo"]["expected_volume_mm3"]
    prob = np.asanyarray(nib.load(tmp_path / "brain" / case["id"] / "placebo_prob.nii.gz").dataobj)
    tissue = np.asanyarray(nib.load(tiny_cohort.parent / "truth" / f"{case['id']}_tissue.nii.gz").dataobj) > 0
    # well outside the brain (1 voxel of margin, 1 of resampling to the input grid, and the mask's own error)
    far = ~ndimage.binary_dilation(tissue, iterations=5)
    assert prob[far].max() == 0.0
    unrestricted = np.asanyarray(nib.load(tmp_path / "all" / case["id"] / "placebo_prob.nii.gz").dataobj)
    assert unrestricted[far].max() > 0.0


def test_brain_restriction_margin() -> None:
    from scripts.runtime.regions import brain_restriction

    regions = np.zeros((9, 9, 9), np.uint8)
    regions[3:6, 3:6, 3:6] = 2
    assert brain_restriction(regions, 0).sum() == 27
    grown = brain_restriction(regions, 1)
    assert grown.sum() == 5**3 and grown[2, 2, 2] and not grown[1, 4, 4]
    assert brain_restriction(np.zeros((4, 4, 4), np.uint8)) is None
