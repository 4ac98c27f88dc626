"""Evaluation (``scripts/bench/evaluation``, ``bundle/configs/evaluate.json``): metrics with known answers, the
evaluator on perfect forecasts, and the bundle command end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import stats
from scripts.bench.evaluation.evaluator import Evaluator
from scripts.bench.evaluation.report import fmt
from scripts.bench.evaluation.scores import (
    ReliabilityAccumulator,
    activity_metrics,
    count_metrics,
    expected_calibration_error,
    generalized_energy_distance,
    interval_coverage,
    lesion_table,
    paired_comparison,
    poisson_interval,
    population_rates,
    ranking_agreement,
)
from scripts.bench.evaluation.summary import pooled_detection, summarize_location
from scripts.bench.synthetic.cohort import generate_cohort
from scripts.runtime.analysis import summarize_arm
from scripts.runtime.constants import ARMS, CONDITION_CHANNELS
from scripts.runtime.datalist import load_datalist
from scripts.runtime.forecast import CaseForecast
from scripts.runtime.lesions import match_lesions
from scripts.runtime.network import DeterministicForecastNet, ForecastDiffusionUNet

from tests.conftest import REPO_ROOT

SMALL = {
    "channels": (8, 16, 16, 16),
    "attention_levels": (False, False, False, True),
    "norm_num_groups": 8,
    "num_head_channels": 16,
}


# ---- metrics with known answers ----


def test_ece_and_reliability_bins() -> None:
    prob = np.array([0.05] * 10 + [0.95] * 10)
    truth = np.array([1] + [0] * 9 + [1] * 9 + [0])  # observed 0.1 in the low bin, 0.9 in the high one
    assert expected_calibration_error(prob, truth) == pytest.approx(0.05)
    assert expected_calibration_error(np.zeros(50), np.zeros(50)) == 0.0
    acc = ReliabilityAccumulator(10)
    acc.update(prob[:7], truth[:7])
    acc.update(prob[7:], truth[7:])  # accumulating over cases equals one pass over all voxels
    assert acc.ece() == pytest.approx(0.05)
    bins = acc.bins()
    assert bins[0]["voxels"] == 10 and bins[0]["observed_frequency"] == pytest.approx(0.1)
    assert bins[9]["mean_probability"] == pytest.approx(0.95) and bins[5]["voxels"] == 0
    acc.update(np.array([1.0]), np.array([1]))  # p = 1 falls in the last bin
    assert acc.bins()[9]["voxels"] == 11
    assert ReliabilityAccumulator().ece() is None


def test_generalized_energy_distance() -> None:
    y = np.zeros((4, 4, 4), bool)
    y[0, 0, :2] = True
    half = np.zeros_like(y)
    half[0, 0, 0] = True
    assert generalized_energy_distance(y[None], y) == 0.0
    assert generalized_energy_distance(half[None], y) == pytest.approx(2 * 0.5)  # IoU 1/2, one sample
    empty = np.zeros_like(y)
    assert generalized_energy_distance(empty[None], empty) == 0.0  # d(empty, empty) = 0
    assert generalized_energy_distance(empty[None], y) == pytest.approx(2.0)
    a, b = np.zeros_like(y), np.zeros_like(y)
    a[3, 3, 3] = b[2, 2, 2] = True
    # two disjoint samples, both disjoint from the truth: 2 * 1 - 1
    assert generalized_energy_distance(np.stack([a, b]), y) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    samples, truth = rng.random((5, 6, 6, 6)) > 0.7, rng.random((6, 6, 6)) > 0.7

    def d(p: np.ndarray, q: np.ndarray) -> float:
        union = np.logical_or(p, q).sum()
        return 0.0 if union == 0 else 1.0 - np.logical_and(p, q).sum() / union

    brute = 2 * np.mean([d(s, truth) for s in samples]) - np.mean(
        [d(samples[i], samples[j]) for i in range(5) for j in range(5) if i != j]
    )
    assert generalized_energy_distance(samples, truth) == pytest.approx(brute)


def test_interval_coverage_and_poisson_interval() -> None:
    assert interval_coverage([[0, 2], [1, 1], [3, 5], None], [2, 0, 4, 9]) == pytest.approx(2 / 3)
    assert interval_coverage([None], [1]) is None
    assert poisson_interval(4.0) == [stats.poisson.ppf(0.05, 4.0), stats.poisson.ppf(0.95, 4.0)] == [1.0, 8.0]
    assert poisson_interval(0.0) == [0.0, 0.0]


def test_count_and_activity_metrics() -> None:
    got = count_metrics([1, 2, 3], [1, 3, 2])
    assert got["mae"] == pytest.approx(2 / 3) and got["bias"] == 0.0 and got["spearman"] == pytest.approx(0.5)
    constant = count_metrics([0, 0, 0], [1, 3, 2])
    assert constant["spearman"] is None and "constant" in constant["notes"]["spearman"]
    got = activity_metrics([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
    assert got["auc"] == pytest.approx(0.75)
    assert got["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert got["balanced_accuracy"] == pytest.approx(0.75)  # sensitivity 1/2, specificity 1
    one_class = activity_metrics([0.2, 0.9], [True, True])
    assert one_class["auc"] is None and one_class["balanced_accuracy"] is None
    assert "only active" in one_class["notes"]["auc"]


def test_paired_comparison_of_a_perfect_and_a_constant_forecast() -> None:
    true = [0, 0, 1, 3, 0, 2]
    records = [
        {
            "true_count": t,
            "active": t > 0,
            "methods": {
                "a": {"expected_count": float(t), "p_active": float(t > 0)},
                "b": {"expected_count": 1.0, "p_active": 0.5},
            },
        }
        for t in true
    ]
    got = paired_comparison(records, "a", "b", n_boot=200)
    assert got["n_cases"] == 6
    assert got["mae_difference"] == pytest.approx(-np.mean(np.abs(np.array(true) - 1.0)))
    lo, hi = got["mae_difference_ci95"]
    assert lo <= got["mae_difference"] <= hi < 0 and got["mae_share_better"] > 0.9
    assert got["auc_difference"] == pytest.approx(0.5)  # perfect separation against a constant
    assert got["auc_difference_ci95"] == [pytest.approx(0.5), pytest.approx(0.5)] and got["auc_share_better"] == 1.0
    same = paired_comparison(records, "a", "a", n_boot=50)
    assert same["mae_difference"] == 0.0 and same["mae_share_better"] == 0.0 and same["auc_share_better"] == 0.0
    inactive = paired_comparison([r for r in records if not r["active"]], "a", "b", n_boot=50)
    assert inactive["auc_difference"] is None and "one class" in inactive["notes"]["auc_difference"]
    assert paired_comparison(records, "a", "missing")["n_cases"] == 0


def test_ranking_agreement() -> None:
    strength = {"placebo": 0.0, "laquinimod": 0.3, "ocrelizumab": 0.9}
    right = ranking_agreement({"placebo": 5.0, "laquinimod": 3.0, "ocrelizumab": 1.0}, strength)
    assert right["concordance"] == 1.0 and right["exact"] and right["n_pairs"] == 3
    assert right["predicted_order"] == right["true_order"] == ["ocrelizumab", "laquinimod", "placebo"]
    assert right["true_order_text"] == "ocrelizumab > laquinimod > placebo"
    wrong = ranking_agreement({"placebo": 1.0, "laquinimod": 3.0, "ocrelizumab": 5.0}, strength)
    assert wrong["concordance"] == 0.0 and not wrong["exact"]
    ties = ranking_agreement({"placebo": 2.0, "laquinimod": 2.0, "ocrelizumab": 2.0}, strength)
    assert ties["concordance"] == 0.5 and not ties["exact"]
    assert ties["predicted_order_text"] == "placebo = laquinimod = ocrelizumab"
    # arms of equal true strength are not compared
    equal = ranking_agreement({"a": 1.0, "b": 2.0, "c": 0.0}, {"a": 0.5, "b": 0.5, "c": 0.9})
    assert equal["n_pairs"] == 2 and equal["concordance"] == 1.0


def test_population_rates() -> None:
    got = population_rates([("placebo", 24, 6), ("placebo", 48, 6), ("ocrelizumab", 24, 0)])
    assert got["rate_per_week"]["placebo"] == pytest.approx(12 / 72)
    assert got["rate_per_week"]["ocrelizumab"] == 0.0
    assert got["pooled_rate_per_week"] == pytest.approx(12 / 96)
    assert got["rate_per_week"]["laquinimod"] == pytest.approx(12 / 96)  # no training case: pooled rate
    assert "laquinimod" in got["fallback"] and "placebo" not in got["fallback"]
    assert got["n_cases"]["placebo"] == 2
    with pytest.raises(ValueError):
        population_rates([])


def test_pooled_lesion_detection_conventions() -> None:

    def table(n_pred: int, n_true: int, matched: int, tp: int) -> dict:
        return {"n_forecast_lesions": n_pred, "n_true_lesions": n_true, "matched_forecast_lesions": matched, "tp": tp}

    got = pooled_detection([table(2, 3, 1, 2), table(2, 1, 2, 1)])
    assert (got["precision"], got["recall"]) == (0.75, 0.75) and got["f1"] == pytest.approx(0.75)
    assert (got["tp"], got["fp"], got["fn"]) == (3, 1, 1)
    missed = pooled_detection([table(0, 3, 0, 0)])  # nothing forecast: precision undefined, F1 0 (recall 0)
    assert missed["precision"] is None and missed["recall"] == 0.0 and missed["f1"] == 0.0
    assert pooled_detection([table(0, 0, 0, 0)])["f1"] is None


def test_lesion_table_matches_lesions_module_and_measures_anisotropic_distances() -> None:
    ref, pred = np.zeros((12, 12, 12), np.uint8), np.zeros((12, 12, 12), np.uint8)
    ref[2, 2, 2] = 1  # lesion A
    ref[8:10, 8:10, 8:10] = 1  # lesion B, missed
    pred[2, 2, 4] = 1  # near A but not touching: two voxels away along axis 2
    pred[2:4, 2, 2] = 1  # overlaps A
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    got = lesion_table(pred, ref, affine)
    expected = match_lesions(pred, ref)
    for key in ("tp", "fp", "fn", "precision", "recall", "f1", "dice"):
        assert got[key] == pytest.approx(expected[key]), key
    assert (got["tp"], got["fp"], got["fn"]) == (1, 1, 1)
    first, second = got["true_lesions"]
    assert first["detected"] and not second["detected"]
    # forecast centroids (2.5, 2, 2) and (2, 2, 4) at 1 x 2 x 3 mm: A (2, 2, 2) is 0.5 mm from the first;
    # B (8.5, 8.5, 8.5) is nearer the second: (6.5 * 1, 6.5 * 2, 4.5 * 3) mm
    assert first["distance_mm"] == pytest.approx(0.5)
    assert second["distance_mm"] == pytest.approx(math.sqrt(6.5**2 + 13**2 + 13.5**2), abs=1e-3)
    regions = np.full(ref.shape, 4, np.uint8)
    regions[:6] = 1  # periventricular half
    with_regions = lesion_table(pred, ref, affine, regions)
    assert with_regions["true_regions"] == ["periventricular", "deep_white_matter"]
    assert lesion_table(np.zeros_like(ref), ref, affine)["true_lesions"][0]["distance_mm"] is None


# ---- the evaluator on perfect forecasts (no network) ----


def _case_inputs(case: dict, truth: dict, base: Path, arms: list[str], k: int) -> CaseForecast:
    """A forecast case whose every sample is the true counterfactual mask (working = reference grid)."""
    label = nib.load(case["label"])
    affine, shape = label.affine, label.shape
    masks = np.stack([np.asanyarray(nib.load(base / truth["counterfactual_labels"][a]).dataobj) > 0 for a in arms])
    samples = np.repeat(masks[:, None], k, axis=1)  # (A, K, *S)
    arms_out = {}
    for a, arm in enumerate(arms):
        figures = summarize_arm(samples[a], affine)
        figures.pop("prob_working")
        arms_out[arm] = figures
    data = {
        "cond": np.zeros((len(CONDITION_CHANNELS), *shape), np.float32),
        "working_affine": affine,
        "reference_affine": affine,
        "reference_shape": np.asarray(shape),
    }
    forecast = {"id": case["id"], "num_samples": k, "horizon_weeks": float(case["horizon_weeks"]), "arms": arms_out}
    probs = {arm: samples[a].mean(0).astype(np.float32) for a, arm in enumerate(arms)}
    return CaseForecast(case, data, samples, forecast, probs, np.full(shape, 4, np.uint8), None)


def test_evaluator_scores_perfect_forecasts(tiny_cohort: Path, tmp_path: Path) -> None:
    arms = ["placebo", "laquinimod", "ocrelizumab"]
    evaluator = Evaluator(tiny_cohort, tmp_path)
    cases = load_datalist(tiny_cohort, "testing")
    for case in cases:
        truth = json.loads((tiny_cohort.parent / "truth" / f"{case['id']}.json").read_text())
        if truth["treatment"] not in arms:  # keep the factual arm among the forecast arms
            case["treatment"] = truth["treatment"] = "placebo"
            case["label"] = str(tiny_cohort.parent / truth["counterfactual_labels"]["placebo"])
        evaluator(_case_inputs(case, truth, tiny_cohort.parent, arms, k=2))
    metrics = evaluator.write()
    overall = metrics["overall"]
    assert overall["n_cases"] == len(cases)
    assert overall["dice_all"] == 1.0 and overall["count_mae"] == 0.0 and overall["ged_mean"] == 0.0
    assert overall["ece"] == 0.0 and overall["interval_coverage_90"] == 1.0
    assert overall["lesion_recall"] in (1.0, None) and overall["lesion_precision"] in (1.0, None)
    # every sample is the truth: per-sample detection is perfect, each true lesion counted once per sample
    samples = overall["sample_lesion_counts"]
    assert samples["tp"] == 2 * overall["lesion_counts"]["tp"] and samples["fp"] == samples["fn"] == 0
    assert overall["sample_lesion_f1"] in (1.0, None)
    location = overall["location"]
    assert location["share_within"] in (1.0, None)
    detected = sum(v["detected"] for v in location["detection_by_region"].values())
    assert detected == location["true_lesions"]
    cf = metrics["counterfactual"]
    assert cf["available"] and set(cf["per_arm"]) == set(arms)
    for figures in cf["per_arm"].values():
        assert figures["dice_mean"] == 1.0 and figures["lesion_f1_mean"] == 1.0
    # realised counterfactual lesions are nested (stronger arm: a subset), so perfect forecasts never rank wrongly
    assert cf["ranking"]["case_mean_concordance"] >= 0.5
    assert metrics["baselines"]["oracle"]["available"] and metrics["baselines"]["population"]["available"]
    assert metrics["baselines"]["reference"]["available"]
    assert set(metrics["baselines"]["reference"]["counterfactual"]["per_arm"]) == set(arms)
    assert not metrics["baselines"]["deterministic"]["available"]
    assert "not provided" in metrics["baselines"]["deterministic"]["note"]
    assert json.loads((tmp_path / "metrics.json").read_text())["overall"]["dice_all"] == 1.0
    report = (tmp_path / "report.md").read_text()
    assert "## Counterfactual forecasts" in report
    # the targets table: perfect counts meet the MAE target; intervals that always hold the truth over-cover
    targets = report[report.index("## Against the model's targets") :].split("\n## ")[0]
    mae_row = next(line for line in targets.splitlines() if line.startswith("| factual count MAE"))
    assert mae_row.startswith("| factual count MAE, ratio to the observable reference's | 0.00")
    assert "**met**" in mae_row
    assert "| 90% count interval coverage | 100% | 85%-95% | not met |" in targets
    if metrics["spatial"].get("n_cases"):
        assert metrics["spatial"]["methods"]["diffusion"]["auroc_truth_mean"] in (1.0, None)


class _StubForecaster:
    """The declared interface of ``ForecastRunner`` (``settings``, ``run(listeners, skip_ids)``); its forecasts are
    the true counterfactual masks with the optional exception of ``fail_id``, which fails after scoring the cases
    before it."""

    def __init__(self, datalist: Path, arms: list[str], fail_id: str | None = None, num_samples: int = 2) -> None:
        self.datalist, self.arms, self.fail_id, self.num_samples = datalist, arms, fail_id, num_samples
        self.forecast_ids: list[str] = []

    def settings(self) -> dict:
        return {"arms": self.arms, "num_samples": self.num_samples, "seed": 0, "overwrite": True}

    def run(self, listeners=(), skip_ids=()) -> None:
        for case in load_datalist(self.datalist, "testing"):
            if case["id"] in skip_ids:
                continue
            if case["id"] == self.fail_id:
                raise KeyboardInterrupt  # the run is stopped here
            truth = json.loads((self.datalist.parent / "truth" / f"{case['id']}.json").read_text())
            case["treatment"] = truth["treatment"] = "placebo"
            case["label"] = str(self.datalist.parent / truth["counterfactual_labels"]["placebo"])
            for listener in listeners:
                listener(_case_inputs(case, truth, self.datalist.parent, self.arms, k=2))
            self.forecast_ids.append(case["id"])


def _without_timing(metrics: dict) -> dict:
    metrics = json.loads(json.dumps(metrics))
    for key in ("seconds", "cases_resumed"):
        metrics["settings"].pop(key)
    metrics.pop("notes")
    return metrics


def test_stopped_evaluation_resumes_with_identical_metrics(tiny_cohort: Path, tmp_path: Path) -> None:
    arms = ["placebo", "ocrelizumab"]
    ids = [c["id"] for c in load_datalist(tiny_cohort, "testing")]
    assert len(ids) >= 2
    whole = Evaluator(tiny_cohort, tmp_path / "whole", figures=False).run(_StubForecaster(tiny_cohort, arms))

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        Evaluator(tiny_cohort, out, figures=False).run(_StubForecaster(tiny_cohort, arms, fail_id=ids[1]))
    assert sorted(p.stem for p in (out / "evaluation_cases").glob("*.json")) == [ids[0]]
    forecaster = _StubForecaster(tiny_cohort, arms)
    resumed = Evaluator(tiny_cohort, out, figures=False).run(forecaster)
    assert forecaster.forecast_ids == ids[1:]  # only the cases not scored before
    assert resumed["settings"]["cases_resumed"] == 1 and any("resumed: 1 case" in n for n in resumed["notes"])
    assert _without_timing(resumed) == _without_timing(whole)
    forecaster = _StubForecaster(tiny_cohort, arms)  # every case read back: the settings still name K
    again = Evaluator(tiny_cohort, out, figures=False).run(forecaster)
    assert forecaster.forecast_ids == [] and again["settings"]["num_samples"] == whole["settings"]["num_samples"]
    assert whole["settings"]["num_samples"] is not None

    # other settings (here: the samples per arm), or resume=False: every case again
    forecaster = _StubForecaster(tiny_cohort, arms, num_samples=3)
    Evaluator(tiny_cohort, out, figures=False).run(forecaster)
    assert forecaster.forecast_ids == ids
    forecaster = _StubForecaster(tiny_cohort, arms, num_samples=3)
    Evaluator(tiny_cohort, out, figures=False, resume=False).run(forecaster)
    assert forecaster.forecast_ids == ids


def test_evaluator_without_truth_files_skips_counterfactuals(tiny_cohort: Path, tmp_path: Path) -> None:
    case = load_datalist(tiny_cohort, "testing")[0]
    truth = json.loads((tiny_cohort.parent / "truth" / f"{case['id']}.json").read_text())
    evaluator = Evaluator(tiny_cohort, tmp_path, truth_dir=tmp_path / "none", figures=False)
    evaluator(_case_inputs(case, truth, tiny_cohort.parent, [case["treatment"]], k=1))
    metrics = evaluator.results()
    assert not metrics["counterfactual"]["available"] and "no truth files" in metrics["counterfactual"]["note"]
    assert metrics["baselines"]["population"]["available"]  # the tiny cohort has a training split
    assert not metrics["baselines"]["oracle"]["available"]
    assert metrics["overall"]["n_cases"] == 1


def test_population_baseline_needs_a_training_split(tmp_path: Path) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [], "testing": []}))
    evaluator = Evaluator(datalist, tmp_path / "out", figures=False)
    evaluator.prepare()
    section = evaluator.results()["baselines"]["population"]
    assert not section["available"] and "no training case" in section["note"]
    datalist.write_text(json.dumps({"testing": []}))
    evaluator = Evaluator(datalist, tmp_path / "out", figures=False)
    evaluator.prepare()
    assert "no list 'training'" in evaluator.results()["baselines"]["population"]["note"]


def test_population_baseline_from_another_datalist(tiny_cohort: Path, tmp_path: Path) -> None:
    test_only = tmp_path / "datalist.json"
    test_only.write_text(json.dumps({"testing": json.loads(tiny_cohort.read_text())["testing"]}))
    evaluator = Evaluator(test_only, tmp_path / "out", figures=False, population_datalist=tiny_cohort)
    evaluator.prepare()
    section = evaluator.results()["baselines"]["population"]
    assert section["available"] and section["rates"]["datalist"] == str(tiny_cohort)
    assert section["rates"]["n_training_cases"] == len(json.loads(tiny_cohort.read_text())["training"])


# ---- the bundle command ----


def test_evaluate_config_mirrors_the_deterministic_training_network_and_defaults_to_no_baselines() -> None:
    from monai.bundle import ConfigParser

    configs = REPO_ROOT / "bundle" / "configs"
    evaluate = ConfigParser.load_config_file(configs / "evaluate.json")
    trained = ConfigParser.load_config_file(configs / "train_deterministic.json")["network_def"]
    # the checkpoint of train_deterministic.json must load: the same class built from the same network_args
    assert trained == "$scripts.runtime.network.DeterministicForecastNet(**@network_args)"
    assert evaluate["deterministic_def"].startswith(trained)
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json"), str(configs / "evaluate.json")])
    assert parser.get_parsed_content("overwrite") is True  # the samples are needed: every case is forecast anew
    assert parser.get_parsed_content("deterministic_network") is None
    assert parser.get_parsed_content("unaware_network") is None
    assert parser.get_parsed_content("unaware_inferer").arms is None  # null treatment token
    assert isinstance(parser.get_parsed_content("evaluation"), Evaluator)
    with_baseline = ConfigParser()
    with_baseline.read_config([str(configs / "inference.json"), str(configs / "evaluate.json")])
    with_baseline["deterministic_ckpt"] = "unused.pt"
    assert isinstance(with_baseline.get_parsed_content("deterministic_def"), DeterministicForecastNet)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval_weights")
    paths = {}
    for name, cls, seed in (
        ("model", ForecastDiffusionUNet, 0),
        ("unaware", ForecastDiffusionUNet, 1),
        ("deterministic", DeterministicForecastNet, 2),
    ):
        torch.manual_seed(seed)
        paths[name] = folder / f"{name}.pt"
        torch.save(cls(**SMALL).state_dict(), paths[name])
    return paths


def test_evaluate_command_writes_metrics_report_and_plots(
    tiny_cohort: Path, tiny_weights: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    # the tiny cohort's test cases are under placebo and ocrelizumab: two arms keep the test short
    args = [
        "--datalist",
        str(tiny_cohort),
        "--output_dir",
        str(out),
        "--ckpt_path",
        str(tiny_weights["model"]),
        "--deterministic_ckpt",
        str(tiny_weights["deterministic"]),
        "--unaware_ckpt",
        str(tiny_weights["unaware"]),
        "--treatments",
        "['placebo','ocrelizumab']",
        "--network_channels",
        "[8,16,16,16]",
        "--spatial_size",
        "[32,32,32]",
        "--spacing",
        "[6,6,6]",
        "--num_samples",
        "2",
        "--num_inference_steps",
        "2",
        "--device",
        "cpu",
    ]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "['bundle/configs/inference.json','bundle/configs/evaluate.json']",
            *args,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"overall", "per_arm", "counterfactual", "baselines", "cases", "conventions"} <= set(metrics)
    testing = json.loads(tiny_cohort.read_text())["testing"]
    assert len(metrics["cases"]) == len(testing) == metrics["overall"]["n_cases"]
    for key in (
        "dice_active",
        "dice_all",
        "lesion_precision",
        "lesion_recall",
        "lesion_f1",
        "count_mae",
        "count_spearman",
        "interval_coverage_90",
        "auc",
        "average_precision",
        "balanced_accuracy",
        "ece",
        "ged_mean",
        "location",
        "sample_lesion_f1",
    ):
        assert key in metrics["overall"], key
    assert "lesion F1, per sample" in (out / "report.md").read_text()
    assert set(metrics["comparisons"]) == {"deterministic", "unaware", "population", "reference", "oracle"}
    assert metrics["comparisons"]["population"]["n_cases"] == len(testing)
    assert "paired-bootstrap interval" in (out / "report.md").read_text()
    assert set(metrics["baselines"]) == {"deterministic", "unaware", "population", "regression", "reference", "oracle"}
    assert all(section["available"] for name, section in metrics["baselines"].items() if name != "regression")
    assert "training case(s) for" in metrics["baselines"]["regression"]["note"]  # 4 training cases: too few
    assert metrics["counterfactual"]["available"]
    assert set(metrics["counterfactual"]["per_arm"]) == {"placebo", "ocrelizumab"}
    report = (out / "report.md").read_text()
    for heading in (
        "## Factual forecasts: all cases",
        "## Location",
        "## Uncertainty",
        "## Counterfactual",
        "## Conventions",
    ):
        assert heading in report
    for name in ("reliability", "count_scatter", "roc", "effects"):
        assert (out / f"{name}.png").stat().st_size > 10_000, name
        assert f"({name}.png)" in report
    for case in testing:
        assert (out / case["id"] / "forecast.json").is_file()  # the forecast outputs are there as well
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert metrics["settings"]["checkpoints"]["unaware"] == str(tiny_weights["unaware"])

    # the same command again reads every scored case back instead of forecasting it
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "['bundle/configs/inference.json','bundle/configs/evaluate.json']",
            *args,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming: {len(testing)} case(s) already scored" in again.stdout + again.stderr
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["settings"]["cases_resumed"] == len(testing)
    assert resumed["overall"] == metrics["overall"] and resumed["baselines"] == metrics["baselines"]


# ---- location metrics (known answers on hand-built maps) ----


def test_report_figures_have_no_negative_zero() -> None:
    assert [fmt(-1e-16, percent=True), fmt(-0.004), fmt(-0.006), fmt(0.254, percent=True)] == [
        "0%",
        "0.00",
        "-0.01",
        "25%",
    ]
    assert [fmt(3), fmt(True), fmt(None), fmt(float("nan"))] == ["3", "yes", "–", "–"]


def test_voxel_average_precision_known_answers() -> None:
    from scripts.bench.evaluation.scores import voxel_average_precision
    from sklearn.metrics import average_precision_score

    truth = np.array([1, 0, 1, 0, 0], float)
    assert voxel_average_precision(np.array([0.9, 0.1, 0.8, 0.2, 0.0]), truth) == 1.0
    # ranking: positive, negative, positive -> precision 1 at the first and 2/3 at the second positive
    assert voxel_average_precision(np.array([0.9, 0.8, 0.7, 0.0, 0.0]), truth) == pytest.approx((1 + 2 / 3) / 2)
    assert voxel_average_precision(np.full(5, 0.3), np.zeros(5)) is None
    # a fractional target equals the AP of its draws pooled: four draws, voxel 0 NET2 in one of them, voxel 1 in all
    prob, share = np.array([0.9, 0.5, 0.2]), np.array([0.25, 1.0, 0.0])
    pooled = average_precision_score([1, 0, 0, 0] + [1] * 4 + [0] * 4, [0.9] * 4 + [0.5] * 4 + [0.2] * 4)
    assert pooled == pytest.approx(0.2 * 0.25 + 0.8 * 5 / 8)
    assert voxel_average_precision(prob, share) == pytest.approx(pooled)
    where = np.array([True, False, True])
    assert voxel_average_precision(prob, share, where) == pytest.approx(0.25)  # 1 of the 4 draws at the top score
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        voxel_average_precision(prob, np.array([2.0, 0.0, 0.0]))


def test_voxel_auroc_known_answers() -> None:
    from scripts.bench.evaluation.scores import voxel_auroc

    truth = np.array([1, 0, 1, 0, 0], float)
    assert voxel_auroc(np.array([0.9, 0.1, 0.8, 0.2, 0.0]), truth) == 1.0
    # positives at 0.9 and 0.7 against negatives 0.8, 0.0, 0.0: 5 of the 6 pairs ordered right
    assert voxel_auroc(np.array([0.9, 0.8, 0.7, 0.0, 0.0]), truth) == pytest.approx(5 / 6)
    assert voxel_auroc(np.full(5, 0.3), truth) == pytest.approx(0.5)  # all tied: half
    assert voxel_auroc(np.full(5, 0.3), np.zeros(5)) is None and voxel_auroc(np.full(3, 0.3), np.ones(3)) is None
    # a fractional target is its draws pooled: four draws, voxel 0 NET2 in one, voxel 1 in all, voxel 2 in none
    prob, share = np.array([0.9, 0.5, 0.2]), np.array([0.25, 1.0, 0.0])
    # positives: 1 at 0.9, 4 at 0.5; negatives: 3 at 0.9, 4 at 0.2 -> right pairs 1*4 + 4*4, ties 1*3 count half
    assert voxel_auroc(prob, share) == pytest.approx((4 + 16 + 0.5 * 3) / (5 * 7))
    assert voxel_auroc(prob, share, np.array([True, False, True])) == pytest.approx((4 + 0.5 * 3) / 7)


def test_pooled_average_precision_from_histograms() -> None:
    """Binned AP equals scikit-learn's when no two voxels share a bin, pools cases like one concatenated map, and
    treats voxels in one bin as tied."""
    from scripts.bench.evaluation.scores import (
        histogram_average_precision,
        probability_histogram,
        voxel_average_precision,
    )
    from sklearn.metrics import average_precision_score

    a_prob, a_truth = np.array([0.9, 1e-3, 0.05, 0.0]), np.array([1.0, 0.0, 1.0, 0.0])
    b_prob, b_truth = np.array([0.5, 1e-5, 2e-2]), np.array([0.0, 1.0, 0.25])
    for prob, truth in ((a_prob, a_truth), (b_prob, b_truth)):
        assert histogram_average_precision([probability_histogram(prob, truth)]) == pytest.approx(
            voxel_average_precision(prob, truth)
        )
    pooled = histogram_average_precision(
        [probability_histogram(a_prob, a_truth), probability_histogram(b_prob, b_truth)]
    )
    assert pooled == pytest.approx(
        voxel_average_precision(np.concatenate([a_prob, b_prob]), np.concatenate([a_truth, b_truth]))
    )
    tied = np.array([0.300, 0.301, 0.9])  # the first two share a bin
    truth = np.array([0.0, 1.0, 1.0])
    assert histogram_average_precision([probability_histogram(tied, truth)]) == pytest.approx(
        average_precision_score(truth, [0.3, 0.3, 0.9])
    )
    assert histogram_average_precision([probability_histogram(tied, np.zeros(3))]) is None


def test_mean_log_likelihood_mass_share_and_lesion_sizes() -> None:
    from scripts.bench.evaluation.scores import PROBABILITY_CLIP, lesion_sizes, mass_share, mean_log_likelihood

    prob, target = np.array([0.5, 0.1]), np.array([1.0, 0.0])
    assert mean_log_likelihood(prob, target) == pytest.approx((np.log(0.5) + np.log(0.9)) / 2)
    assert mean_log_likelihood(np.array([0.0]), np.array([1.0])) == pytest.approx(np.log(PROBABILITY_CLIP))
    assert mean_log_likelihood(np.array([0.2]), np.array([0.5])) == pytest.approx(0.5 * np.log(0.2) + 0.5 * np.log(0.8))
    assert mean_log_likelihood(prob, target, np.zeros(2, bool)) is None
    assert mass_share(np.array([0.1, 0.3, 0.0]), np.array([True, False, True])) == pytest.approx(0.25)
    assert mass_share(np.zeros(3), np.ones(3, bool)) is None
    a = np.zeros((6, 6, 6), bool)
    a[0, 0, 0] = True  # one voxel
    a[3, 3, 3] = a[4, 4, 4] = a[4, 4, 5] = a[5, 5, 5] = True  # four voxels, 26-connected
    sizes = lesion_sizes([a, np.zeros_like(a)])
    assert sizes == {"lesions": 2, "median_voxels": 2.5, "mean_voxels": 2.5, "single_voxel_share": 0.5}
    assert lesion_sizes([np.zeros_like(a)])["median_voxels"] is None


def test_evaluator_scores_where_the_probability_lies(tmp_path: Path) -> None:
    """With the location oracle and outcome draws in the cohort: a perfect map has AP 1 against the truth and no
    mass outside the parenchyma, the oracle joins the scored maps and AP ratios are taken against it."""
    datalist = generate_cohort(
        tmp_path / "c", 2, 3, shape=32, spacing=6.0, split=(0, 0, 1), progress=False, oracle_draws=16, outcome_draws=16
    )
    arms = ["placebo", "ocrelizumab"]
    evaluator = Evaluator(datalist, tmp_path / "out", figures=False, population_datalist=None)
    for case in load_datalist(datalist, "testing"):
        truth = json.loads((datalist.parent / "truth" / f"{case['id']}.json").read_text())
        case["treatment"] = truth["treatment"] = "placebo"
        case["label"] = str(datalist.parent / truth["counterfactual_labels"]["placebo"])
        evaluator(_case_inputs(case, truth, datalist.parent, arms, k=2))
    spatial = evaluator.results()["spatial"]
    assert spatial["n_cases"] == 2 and spatial["domain"] == ["parenchyma (generator's tissue map)"]
    diffusion, oracle = spatial["methods"]["diffusion"], spatial["methods"]["location_oracle"]
    assert diffusion["ap_truth_mean"] in (1.0, None) and diffusion["mass_outside_domain_mean"] in (0.0, None)
    assert oracle["mass_outside_domain_mean"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < oracle["ap_outcomes_mean"] <= 1 and oracle["ll_outcomes_per_voxel"] < 0
    assert oracle["ap_ratio_to_oracle"]["ap_outcomes_mean"] == pytest.approx(1.0)
    assert set(oracle["mass_by_tissue"]) == {
        "csf",
        "cortical_gm",
        "white_matter",
        "ventricles",
        "infratentorial_wm",
        "infratentorial_gm",
        "deep_gm",
    }
    assert spatial["lesion_sizes"]["true"]["lesions"] == spatial["lesion_sizes"]["sampled"]["lesions"] / 2
    assert oracle["ap_ratio_to_oracle"]["ap_outcomes_pooled"] == pytest.approx(1.0)
    assert 0 < oracle["ap_outcomes_pooled"] <= 1
    prior = spatial["methods"]["region_prior"]  # the oracle's mass, spread over the regions' white matter
    assert prior["mass_outside_domain_mean"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < prior["ap_outcomes_mean"] <= 1 and prior["mass_by_tissue"]["cortical_gm"] == 0
    factual_placebo = [
        json.loads(p.read_text())["treatment"] == "placebo"
        for p in sorted((datalist.parent / "truth").glob("syn????.json"))
    ]
    ceiling = spatial.get("oracle_sample_lesions")  # outcome draws were scored against the generator's factual arm
    assert (ceiling is not None) == any(factual_placebo)
    if ceiling:
        assert ceiling["n_samples"] == 16 * sum(factual_placebo) and ceiling["tp"] <= ceiling["true_lesions"]


class _FactualStub:
    """A forecaster of the declared interface (``settings``, ``run``, ``preprocess``) whose samples are the true
    counterfactual masks of every arm; it records which cases it forecast and which it only preprocessed."""

    def __init__(self, datalist: Path) -> None:
        self.datalist, self.arms = datalist, list(ARMS)
        self.forecast_ids: list[str] = []
        self.preprocessed: list[str] = []

    def settings(self) -> dict:
        return {"arms": self.arms, "num_samples": 2, "seed": 0, "overwrite": True}

    def run(self, listeners=(), skip_ids=()) -> None:
        for case in load_datalist(self.datalist, "testing"):
            if case["id"] not in skip_ids:
                truth = json.loads((self.datalist.parent / "truth" / f"{case['id']}.json").read_text())
                for listener in listeners:
                    listener(_case_inputs(case, truth, self.datalist.parent, self.arms, k=2))
                self.forecast_ids.append(case["id"])

    def preprocess(self, case: dict) -> tuple[dict, np.ndarray]:
        self.preprocessed.append(case["id"])
        label = nib.load(case["label"])  # the grids and region map of _case_inputs
        grid = {"working_affine": label.affine, "reference_affine": label.affine}
        return {**grid, "reference_shape": np.asarray(label.shape)}, np.full(label.shape, 4, np.uint8)


def test_resumed_cases_get_the_location_references_of_a_cohort_written_again_with_them(tmp_path: Path) -> None:
    """A cohort evaluated before it held the location oracle, then written again with it (same seed: the same
    images and labels): the resumed evaluation scores the oracle, region prior and outcome draws of every case
    without forecasting any again, with the scores a fresh evaluation gets; the model's own scores against the
    outcome draws stay missing (its maps were not kept), and ratios to the oracle are taken on paired cases."""
    kwargs = {"shape": 32, "spacing": 6.0, "split": (0, 0, 1), "progress": False}
    datalist = Path(generate_cohort(tmp_path / "c", 2, 4, **kwargs))  # seed 4: both factual masks hold lesions
    images = {p.name: p.read_bytes() for p in sorted((tmp_path / "c").glob("*/*.nii.gz"))}
    out = tmp_path / "out"
    first = Evaluator(datalist, out, figures=False, population_datalist=None).run(_FactualStub(datalist))
    assert set(first["spatial"]["methods"]) == {"diffusion"}
    assert "location_oracle" not in (tmp_path / "c" / "truth" / "syn0000.json").read_text()

    generate_cohort(tmp_path / "c", 2, 4, oracle_draws=16, outcome_draws=16, **kwargs)
    again = {p.name: p.read_bytes() for p in sorted((tmp_path / "c").glob("*/*.nii.gz")) if p.name in images}
    assert again == images  # the oracle's random streams change nothing else of the cases
    ids = [c["id"] for c in load_datalist(datalist, "testing")]
    stub = _FactualStub(datalist)
    resumed = Evaluator(datalist, out, figures=False, population_datalist=None).run(stub)
    assert stub.forecast_ids == [] and stub.preprocessed == ids
    assert any(n.startswith("location references completed: 2 resumed") for n in resumed["notes"])
    fresh = Evaluator(datalist, tmp_path / "fresh", figures=False, population_datalist=None).run(_FactualStub(datalist))
    spatial, expected = resumed["spatial"], fresh["spatial"]
    for name in ("location_oracle", "region_prior"):
        assert spatial["methods"][name] == expected["methods"][name]
    assert spatial.get("oracle_sample_lesions") == expected.get("oracle_sample_lesions")
    diffusion, fresh_diffusion = spatial["methods"]["diffusion"], expected["methods"]["diffusion"]
    assert "ap_outcomes_mean" not in diffusion and fresh_diffusion["n_cases_outcomes"] == 2
    ratio = diffusion["ap_ratio_to_oracle"]
    assert ratio["n_outcomes"] == 0 and ratio["ap_outcomes_mean"] is None and ratio["n_truth"] == 2
    for key in ("ap_truth_mean", "ap_truth_pooled"):  # a perfect map: AP 1, above the oracle's
        assert ratio[key] == fresh_diffusion["ap_ratio_to_oracle"][key] and ratio[key] > 1

    stub = _FactualStub(datalist)  # a third run finds every record complete
    third = Evaluator(datalist, out, figures=False, population_datalist=None).run(stub)
    assert stub.forecast_ids == [] and stub.preprocessed == []
    assert third["spatial"] == spatial


def test_ratios_to_the_oracle_are_taken_on_paired_cases() -> None:
    """A map scored against the outcome draws on one case of two: its ratio uses the oracle's score on that case."""

    def cell(ap: float | None, outcomes: float | None = None) -> dict:
        hist = [[0, 0.0, 9.0], [9, 1.0, 1.0]]  # the same for both maps: pooled ratio 1
        c = {"ap_truth": ap, "histogram_truth": hist, "ll_truth_sum": -1.0, "voxels": 10, "mass_outside_domain": 0}
        if outcomes is not None:
            c.update(ap_outcomes=outcomes, histogram_outcomes=hist, ll_outcomes_sum=-1.0)
        return c

    records = [
        {"id": "a", "location": {"domain": "d", "methods": {"m": cell(0.2, 0.1), "location_oracle": cell(0.4, 0.5)}}},
        {"id": "b", "location": {"domain": "d", "methods": {"m": cell(0.3), "location_oracle": cell(0.2, 0.9)}}},
        {"id": "c", "location": {"domain": "d", "methods": {"m": cell(None), "location_oracle": cell(0.6, 0.3)}}},
    ]
    ratio = summarize_location(records)["methods"]["m"]["ap_ratio_to_oracle"]
    assert ratio["ap_outcomes_mean"] == pytest.approx(0.1 / 0.5) and ratio["n_outcomes"] == 1
    assert ratio["ap_truth_mean"] == pytest.approx(0.25 / 0.3) and ratio["n_truth"] == 3  # c: AP undefined
    assert ratio["ap_truth_pooled"] == pytest.approx(1.0)


# ---- the negative-binomial regression baseline ----


def test_regression_recovers_known_coefficients() -> None:
    from scripts.bench.evaluation.regression import FEATURES, CountRegression, design_row

    rng = np.random.default_rng(0)
    arms = list(ARMS)
    truth = np.zeros(1 + len(FEATURES) + 5)
    truth[0], truth[1], truth[5] = -2.5, 0.6, 0.3  # intercept (log rate per week), past NET2, T2 count at visit 1
    truth[1 + len(FEATURES) + 0], truth[1 + len(FEATURES) + 4] = -0.35, -2.0  # laquinimod, ocrelizumab
    alpha = 0.5
    rows = []
    for _ in range(4000):
        features = {f: float(rng.poisson(3)) for f in FEATURES}
        arm, horizon = arms[rng.integers(len(arms))], float(rng.choice([12, 24, 48]))
        mu = np.exp(design_row(features, arm) @ truth) * horizon
        count = int(rng.negative_binomial(1 / alpha, 1 / (1 + alpha * mu)))
        rows.append((features, arm, horizon, count))
    fit = CountRegression.fit(rows)
    used = [0, 1, 5, 1 + len(FEATURES), 1 + len(FEATURES) + 4]
    # about three standard errors each (the intercept trades off with the seven log1p features)
    assert np.all(np.abs(fit.coefficients[used] - truth[used]) < [0.35, 0.15, 0.15, 0.15, 0.3]), fit.coefficients[used]
    assert fit.alpha == pytest.approx(alpha, abs=0.1)
    pred = fit.predict(rows[0][0], ["placebo", "ocrelizumab"], 24.0)
    assert pred["ocrelizumab"].expected_count < pred["placebo"].expected_count
    size = 1 / fit.alpha
    mu = pred["placebo"].expected_count
    assert pred["placebo"].p_active == pytest.approx(1 - (size / (size + mu)) ** size)
    lo, hi = pred["placebo"].interval_90
    assert lo <= mu <= hi
    assert fit.summary()["coefficients"]["arm_ocrelizumab"] == pytest.approx(fit.coefficients[-1])


def test_regression_needs_enough_training_cases(tiny_cohort: Path, tmp_path: Path) -> None:
    evaluator = Evaluator(tiny_cohort, tmp_path, figures=False)
    evaluator.prepare()
    section = evaluator.results()["baselines"]["regression"]
    assert not section["available"] and "training case(s) for" in section["note"]
