"""Evaluation of NET2 forecasts on a datalist split: metrics, baselines, ``metrics.json``, ``report.md`` and plots.

Command (contract)::

    python -m monai.bundle run --config_file "['bundle/configs/inference.json','bundle/configs/evaluate.json']" \\
        --datalist D --output_dir O [--deterministic_ckpt DET.pt] [--unaware_ckpt UNAWARE.pt]

forecasts the ``testing`` cases with :class:`scripts.forecast.ForecastRunner` (its usual per-case outputs) and
evaluates them from the same samples: :class:`Evaluator` is a per-case hook of the runner, so it sees the K binary
samples of every arm without them being saved. At the end it writes ``O/metrics.json``, ``O/report.md`` and the
plots ``O/reliability.png``, ``O/count_scatter.png``, ``O/effects.png`` and ``O/roc.png`` (each atomically).

What is compared (everything on the case's reference grid, the grid of ``flair_1``; working-grid samples are put
there with nearest-neighbour resampling, probability maps with linear interpolation):

* the *factual* forecast (the case's ``treatment`` arm) against the observed NET2 mask ``label``;
* with a synthetic truth file ``<datalist folder>/truth/<id>.json``: every forecast arm against the generator's
  true expected count and true counterfactual mask of that arm, the effects against placebo and the arm ranking.

Methods: the diffusion model; the deterministic network (``DeterministicForecastNet`` thresholded at 0.5); the
diffusion model trained without treatment (forecast with the null treatment token, so every arm gets the same
forecast); the population baseline (the arm's NET2 rate in the training split); the oracle (the generator's true
expected count). The conventions (:data:`CONVENTIONS`) are written into ``metrics.json`` and the report.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats
from tqdm.auto import tqdm

from scripts.analysis import summarize_arm
from scripts.constants import ARMS, arm_index
from scripts.data import load_datalist, to_reference_grid
from scripts.errors import CaseError, ForecastFailed
from scripts.files import file_sha256, write_text_atomic
from scripts.inferer import ThresholdInferer
from scripts.lesions import count_lesions, dice, label_lesions, load_mask, voxel_volume_mm3
from scripts.regions import REGIONS, lesion_regions
from scripts.reports import evaluation_figures
from scripts.weights import load_weights

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("diffusion", "deterministic", "unaware", "population", "oracle")
METHOD_LABELS: dict[str, str] = {
    "diffusion": "diffusion model (treatment-aware)",
    "deterministic": "deterministic network",
    "unaware": "diffusion model, treatment-unaware",
    "population": "population: training-split arm rate",
    "oracle": "oracle: generator's true expected count",
}
COUNTERFACTUAL_METHODS: tuple[str, ...] = ("diffusion", "deterministic", "unaware", "population")
NOT_APPLICABLE = "not applicable: "
"""Prefix of the note of a metric the method cannot have (no mask, samples, interval or probabilities)."""
INTERVAL_LEVEL = 0.9
DISTANCE_MM = 10.0
BOOTSTRAP_RESAMPLES = 2000

CONVENTIONS: dict[str, str] = {
    "grid": "Forecasts and truth masks are compared on the case's reference grid (that of flair_1). Binary "
            "samples go there by nearest-neighbour resampling, probability maps by linear interpolation; the "
            "forecast mask is probability >= 0.5 (the written <arm>_mask.nii.gz).",
    "lesion": "A lesion is a 26-connected component. True counts are counted on the truth mask's own grid, "
              "forecast counts on the working grid of the samples (as in forecast.json).",
    "factual": "The factual forecast of a case is its datalist 'treatment' arm; it is compared with 'label'. Cases "
               "without a treatment or a label, or whose arm was not forecast, are left out of the factual metrics.",
    "dice": "Voxel Dice of the forecast mask. 'over active cases': mean over cases with at least one true lesion. "
            "'over all cases': empty forecast vs empty truth scores 1, an empty mask against a non-empty one 0.",
    "lesion_detection": "A true lesion is detected when a forecast lesion overlaps it by a voxel; a forecast lesion "
                        "is matched when it overlaps a true lesion. Pooled over cases: precision = matched forecast "
                        "lesions / forecast lesions, recall = detected true lesions / true lesions, F1 their "
                        "harmonic mean. Precision is null without forecast lesions and recall without true lesions; "
                        "F1 then follows scripts.lesions (precision 1 without forecast lesions, recall 1 without "
                        "true lesions; null when both are absent). The per-case F1 is that of scripts.lesions (1 "
                        "when both masks are empty). Per sample: the same detection for every sampled forecast "
                        "mask (a method's K samples of a case count as K forecasts; the deterministic network's mask "
                        "as one), pooled over samples and cases.",
    "count": "Expected count: diffusion models the mean lesion count over samples; deterministic network the "
             "lesion count of its mask (working grid); population the training-split arm rate (NET2 lesions per "
             "week, sum of counts over sum of horizons; arms absent from the training split use the pooled rate) "
             "times the horizon; oracle the generator's true expected count. MAE in lesions; Spearman rank "
             "correlation (null when fewer than 2 cases or a constant series).",
    "interval": "90% interval: diffusion models the 5th-95th percentiles of the sample counts (linear "
                "interpolation); population and oracle the 5% and 95% quantiles of a Poisson with the expected "
                "count; the deterministic network gives none. Coverage: share of cases with lo <= true count <= hi.",
    "activity": "Active = at least one true NET2 lesion. P(active): diffusion models the share of samples with a "
                "lesion; deterministic network its largest voxel probability; population and oracle "
                "1 - exp(-expected count) (Poisson). AUC and average precision from scikit-learn; balanced accuracy "
                "of P(active) >= 0.5. Null when only one class is present.",
    "calibration": "Voxel probabilities of the factual forecast against the truth, pooled over cases, on the brain "
                   "voxels of the region map plus any voxel where the forecast or the truth is non-zero (the "
                   "empty background outside the head is trivially calibrated and would swamp the figure). "
                   "10 equal-width bins; ECE = sum over bins of (bin share) x |mean probability - observed "
                   "frequency|.",
    "ged": "Generalized energy distance D^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')] with d = 1 - IoU, "
           "d(empty, empty) = 0; S, S' distinct forecast samples (all ordered pairs i != j; a single sample "
           "gives 0 for that term), Y the one truth mask, so E[d(Y, Y')] = 0. Mean over cases.",
    "location": "Distance from each true lesion's centroid to the nearest forecast-mask lesion's centroid (world "
                "mm); none where the forecast mask is empty. Regions (periventricular, juxtacortical, "
                "infratentorial, deep white matter) from scripts.regions (region map of the case's own images), "
                "majority vote over the lesion's voxels.",
    "counterfactual": "With truth/<id>.json: every forecast arm against the generator's true expected count "
                      "(count error) and true counterfactual mask (Dice, lesion F1, GED). Effects against placebo "
                      "per case: count ratio (null where the predicted placebo count is 0) and count difference; "
                      "error = predicted - true. Cohort rate ratio = sum of the arm's expected counts / sum of "
                      "placebo's over the same cases. Ranking: over pairs of arms with different true strength, "
                      "the share where the stronger arm has the lower predicted count (a tie scores 0.5); 'exact' "
                      "when every pair is right. Per case the strength is the patient's true efficacy; for the "
                      "cohort, arms are ordered by their summed expected counts (predicted against true). The "
                      "treatment-unaware model forecasts every arm alike.",
    "comparison": "Diffusion model against each baseline on the same factual cases: differences of count MAE and "
                  "activity AUC (diffusion minus baseline) with 95% percentile intervals of a paired bootstrap "
                  f"({BOOTSTRAP_RESAMPLES} resamples of the cases with replacement, seed 0; resamples holding one "
                  "activity class only are skipped for the AUC).",
}


# ----------------------------------------------------------------------------------------------------------------
# Metric functions (pure)
# ----------------------------------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    """A float, or None for None/NaN/Inf (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Iterable[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def count_metrics(expected: Sequence[float], true: Sequence[float]) -> dict[str, Any]:
    """MAE and mean error (lesions) and Spearman correlation of expected against true counts, with reasons for nulls."""
    e, t = np.asarray(expected, dtype=np.float64), np.asarray(true, dtype=np.float64)
    out: dict[str, Any] = {"n": int(e.size), "mae": None, "bias": None, "spearman": None, "notes": {}}
    if e.size == 0:
        out["notes"]["mae"] = "no case"
        return out
    out["mae"] = float(np.mean(np.abs(e - t)))
    out["bias"] = float(np.mean(e - t))
    if e.size < 2:
        out["notes"]["spearman"] = "fewer than 2 cases"
    elif np.ptp(e) == 0 or np.ptp(t) == 0:
        which = "expected" if np.ptp(e) == 0 else "true"
        out["notes"]["spearman"] = f"undefined: the {which} counts are constant"
    else:
        out["spearman"] = _finite(stats.spearmanr(e, t).statistic)
    return out


def activity_metrics(p_active: Sequence[float], active: Sequence[bool], threshold: float = 0.5) -> dict[str, Any]:
    """AUC, average precision and balanced accuracy (at ``threshold``) of P(active) against true activity."""
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

    p, y = np.asarray(p_active, dtype=np.float64), np.asarray(active, dtype=bool)
    out: dict[str, Any] = {"n": int(y.size), "n_active": int(y.sum()), "auc": None, "average_precision": None,
                           "balanced_accuracy": None, "notes": {}}
    if y.size == 0:
        out["notes"]["auc"] = "no case"
    elif y.all() or not y.any():
        reason = f"undefined: only {'active' if y.all() else 'inactive'} cases"
        out["notes"].update(auc=reason, average_precision=reason, balanced_accuracy=reason)
    else:
        out["auc"] = float(roc_auc_score(y, p))
        out["average_precision"] = float(average_precision_score(y, p))
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, p >= threshold))
    return out


def poisson_interval(mean: float, level: float = INTERVAL_LEVEL) -> list[float]:
    """Central ``level`` interval of a Poisson count with the given mean: its (1-level)/2 and (1+level)/2 quantiles."""
    if not mean > 0:
        return [0.0, 0.0]
    tail = (1.0 - level) / 2.0
    return [float(stats.poisson.ppf(tail, mean)), float(stats.poisson.ppf(1.0 - tail, mean))]


def interval_coverage(intervals: Sequence[Sequence[float] | None], true: Sequence[float]) -> float | None:
    """Share of cases whose true count lies in its interval (bounds included); cases without interval are left out."""
    hits = [lo <= t <= hi for (lo, hi), t in ((i, t) for i, t in zip(intervals, true, strict=True) if i is not None)]
    return float(np.mean(hits)) if hits else None


def paired_comparison(records: Sequence[Mapping[str, Any]], method: str, baseline: str,
                      n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """``method`` against ``baseline`` on the same factual cases: count MAE and activity AUC differences with 95%
    paired-bootstrap intervals (cases resampled with replacement, seeded; resamples with one class skip the AUC).

    ``mae_difference`` < 0 and ``auc_difference`` > 0 favour ``method``; ``*_share_better`` is the share of
    resamples in which ``method`` is strictly better."""
    from sklearn.metrics import roc_auc_score

    rows = [(r, r["methods"][method], r["methods"][baseline]) for r in records
            if method in r.get("methods", {}) and baseline in r.get("methods", {})]
    out: dict[str, Any] = {"n_cases": len(rows), "n_resamples": int(n_boot), "seed": int(seed),
                           "mae_difference": None, "mae_difference_ci95": None, "mae_share_better": None,
                           "auc_difference": None, "auc_difference_ci95": None, "auc_share_better": None, "notes": {}}
    if not rows:
        out["notes"]["mae_difference"] = "no case with both methods"
        return out
    true = np.array([r["true_count"] for r, _, _ in rows], dtype=np.float64)
    active = np.array([bool(r["active"]) for r, _, _ in rows])
    err_a = np.abs(np.array([a["expected_count"] for _, a, _ in rows], dtype=np.float64) - true)
    err_b = np.abs(np.array([b["expected_count"] for _, _, b in rows], dtype=np.float64) - true)
    p_a = np.array([a["p_active"] for _, a, _ in rows], dtype=np.float64)
    p_b = np.array([b["p_active"] for _, _, b in rows], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(rows), size=(int(n_boot), len(rows)))
    mae_diff = (err_a[idx] - err_b[idx]).mean(axis=1)
    out["mae_difference"] = float(np.mean(err_a - err_b))
    out["mae_difference_ci95"] = [float(q) for q in np.quantile(mae_diff, [0.025, 0.975])]
    out["mae_share_better"] = float(np.mean(mae_diff < 0))
    if active.all() or not active.any():
        out["notes"]["auc_difference"] = "undefined: only one class of activity"
        return out
    out["auc_difference"] = float(roc_auc_score(active, p_a) - roc_auc_score(active, p_b))
    auc_diff = [roc_auc_score(active[i], p_a[i]) - roc_auc_score(active[i], p_b[i])
                for i in idx if active[i].any() and not active[i].all()]
    out["auc_difference_ci95"] = [float(q) for q in np.quantile(auc_diff, [0.025, 0.975])]
    out["auc_share_better"] = float(np.mean(np.asarray(auc_diff) > 0))
    return out


def iou_distance_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``1 - IoU`` between every mask of ``a`` (N, V) and of ``b`` (M, V) (boolean, flattened); 0 for two empty."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return 1.0 - iou


def generalized_energy_distance(samples: np.ndarray, truth: np.ndarray) -> float:
    """Squared generalized energy distance between K binary samples (K, *S) and one truth mask (*S), d = 1 - IoU.

    ``2 mean_i d(S_i, Y) - mean_{i != j} d(S_i, S_j)`` (the truth term is 0 for a single truth mask).
    """
    s = np.asarray(samples).reshape(len(samples), -1) > 0
    y = np.asarray(truth).reshape(1, -1) > 0
    if s.shape[1] != y.shape[1]:
        raise ValueError(f"samples {np.shape(samples)} and truth {np.shape(truth)} differ in size")
    # voxels empty in every mask add nothing to intersections or unions: drop them to keep the products small
    keep = s.any(0) | y[0]
    s, y = s[:, keep], y[:, keep]
    cross = float(iou_distance_matrix(s, y).mean())
    k = s.shape[0]
    within = 0.0
    if k > 1:
        d = iou_distance_matrix(s, s)
        within = float(d.sum() / (k * (k - 1)))  # the diagonal is 0
    return 2.0 * cross - within


class ReliabilityAccumulator:
    """Equal-width reliability bins of voxel probabilities against binary truth, accumulated over cases."""

    def __init__(self, num_bins: int = 10) -> None:
        self.num_bins = int(num_bins)
        self.count = np.zeros(self.num_bins, np.int64)
        self.sum_prob = np.zeros(self.num_bins, np.float64)
        self.sum_true = np.zeros(self.num_bins, np.float64)

    def update(self, prob: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add voxels (those of ``mask`` when given)."""
        p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
        y = np.asarray(truth) > 0
        if mask is not None:
            p, y = p[mask], y[mask]
        p, y = p.ravel(), y.ravel()
        index = np.minimum((p * self.num_bins).astype(np.int64), self.num_bins - 1)  # p = 1 goes to the last bin
        self.count += np.bincount(index, minlength=self.num_bins)
        self.sum_prob += np.bincount(index, weights=p, minlength=self.num_bins)
        self.sum_true += np.bincount(index, weights=y.astype(np.float64), minlength=self.num_bins)

    def merge(self, other: ReliabilityAccumulator) -> None:
        """Add the voxels of ``other`` (same number of bins)."""
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot merge {other.num_bins} reliability bins into {self.num_bins}")
        self.count += other.count
        self.sum_prob += other.sum_prob
        self.sum_true += other.sum_true

    def state_dict(self) -> dict[str, list[float]]:
        """The bin sums as lists (JSON), for :meth:`from_state_dict`."""
        return {"count": self.count.tolist(), "sum_prob": self.sum_prob.tolist(), "sum_true": self.sum_true.tolist()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Sequence[float]]) -> ReliabilityAccumulator:
        """The accumulator :meth:`state_dict` described."""
        acc = cls(len(state["count"]))
        acc.count = np.asarray(state["count"], np.int64)
        acc.sum_prob = np.asarray(state["sum_prob"], np.float64)
        acc.sum_true = np.asarray(state["sum_true"], np.float64)
        return acc

    def ece(self) -> float | None:
        """Expected calibration error: bin-share-weighted mean |mean probability - observed frequency|."""
        total = int(self.count.sum())
        return float(np.abs(self.sum_prob - self.sum_true).sum() / total) if total else None

    def bins(self) -> list[dict[str, Any]]:
        """Per bin: bounds, voxel count, mean probability and observed frequency (null for empty bins)."""
        edges = np.linspace(0.0, 1.0, self.num_bins + 1)
        out = []
        for i in range(self.num_bins):
            n = int(self.count[i])
            out.append({"lower": float(edges[i]), "upper": float(edges[i + 1]), "voxels": n,
                        "mean_probability": float(self.sum_prob[i] / n) if n else None,
                        "observed_frequency": float(self.sum_true[i] / n) if n else None})
        return out


def expected_calibration_error(prob: np.ndarray, truth: np.ndarray, num_bins: int = 10) -> float | None:
    """ECE of voxel probabilities against a binary truth (see :class:`ReliabilityAccumulator`)."""
    acc = ReliabilityAccumulator(num_bins)
    acc.update(prob, truth)
    return acc.ece()


def ranking_agreement(predicted: Mapping[str, float], strength: Mapping[str, float],
                      tol: float = 1e-9) -> dict[str, Any]:
    """How well predicted counts rank arms by their true strength (efficacy: higher = fewer lesions).

    Over pairs of arms whose true strengths differ by more than ``tol``: 1 when the stronger arm has the lower
    predicted count, 0.5 for a predicted tie, 0 otherwise. Returns ``concordance`` (mean), ``exact`` (every pair
    right), ``n_pairs`` and both orders (strongest first).
    """
    arms = [a for a in predicted if a in strength and predicted[a] is not None]
    scores = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            if abs(strength[a] - strength[b]) <= tol:
                continue
            strong, weak = (a, b) if strength[a] > strength[b] else (b, a)
            gap = predicted[weak] - predicted[strong]
            scores.append(0.5 if abs(gap) <= tol else float(gap > 0))
    return {
        "n_pairs": len(scores),
        "concordance": float(np.mean(scores)) if scores else None,
        "exact": bool(all(s == 1.0 for s in scores)) if scores else None,
        "predicted_order": sorted(arms, key=lambda a: predicted[a]),
        "true_order": sorted(arms, key=lambda a: -strength[a]),
        "predicted_order_text": order_text({a: -float(predicted[a]) for a in arms}, tol),
        "true_order_text": order_text({a: float(strength[a]) for a in arms}, tol),
    }


def order_text(strength: Mapping[str, float], tol: float = 1e-9) -> str:
    """Arms strongest first, ties joined by ``=``: ``"ocrelizumab > laquinimod = placebo"``."""
    groups: list[list[str]] = []
    last: float | None = None
    for arm in sorted(strength, key=lambda a: -strength[a]):
        if last is not None and abs(strength[arm] - last) <= tol:
            groups[-1].append(arm)
        else:
            groups.append([arm])
            last = strength[arm]
    return " > ".join(" = ".join(group) for group in groups)


def population_rates(observations: Iterable[tuple[str, float, int]]) -> dict[str, Any]:
    """NET2 rate per week of each arm from (treatment, horizon weeks, true count) observations of a training split.

    rate = sum of counts / sum of horizons. Arms without observations get the pooled rate (listed in ``fallback``).
    """
    counts: dict[str, float] = {}
    weeks: dict[str, float] = {}
    cases: dict[str, int] = {}
    for arm, horizon, count in observations:
        counts[arm] = counts.get(arm, 0.0) + float(count)
        weeks[arm] = weeks.get(arm, 0.0) + float(horizon)
        cases[arm] = cases.get(arm, 0) + 1
    total_weeks = sum(weeks.values())
    if total_weeks <= 0:
        raise ValueError("no training case with a treatment, a horizon and a label")
    pooled = sum(counts.values()) / total_weeks
    rate = {arm: counts[arm] / weeks[arm] if weeks.get(arm, 0) > 0 else pooled for arm in ARMS}
    return {"rate_per_week": rate, "pooled_rate_per_week": pooled, "n_cases": {a: cases.get(a, 0) for a in ARMS},
            "fallback": [a for a in ARMS if weeks.get(a, 0) <= 0]}


def lesion_table(pred: np.ndarray, ref: np.ndarray, affine: np.ndarray,
                 regions: np.ndarray | None = None) -> dict[str, Any]:
    """Lesion-wise comparison of a forecast mask with a truth mask (same grid), with the scripts.lesions conventions.

    Returns tp/fp/fn, precision/recall/f1/dice as :func:`scripts.lesions.match_lesions`, plus per true lesion
    ``detected``, ``distance_mm`` (centroid to the nearest forecast lesion centroid, None without forecast lesion)
    and ``region``; per forecast lesion ``matched`` and ``region`` (regions when a region map is given).
    """
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if pred.shape != ref.shape:
        raise ValueError(f"forecast shape {pred.shape} differs from truth shape {ref.shape}")
    pred_labels, n_pred = label_lesions(pred)
    ref_labels, n_ref = label_lesions(ref)
    both = (pred_labels > 0) & (ref_labels > 0)
    detected = np.zeros(n_ref, bool)
    detected[np.unique(ref_labels[both]) - 1] = True
    matched = np.zeros(n_pred, bool)
    matched[np.unique(pred_labels[both]) - 1] = True

    def centroids(labels: np.ndarray, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros((0, 3))
        voxel = np.asarray(ndimage.center_of_mass(labels > 0, labels, np.arange(1, n + 1)), np.float64).reshape(n, 3)
        a = np.asarray(affine, dtype=np.float64)
        return voxel @ a[:3, :3].T + a[:3, 3]

    ref_c, pred_c = centroids(ref_labels, n_ref), centroids(pred_labels, n_pred)
    distances: list[float | None] = [None] * n_ref
    if n_pred:
        nearest = np.linalg.norm(ref_c[:, None, :] - pred_c[None, :, :], axis=-1).min(1)
        distances = [round(float(d), 3) for d in nearest]
    tp, n_matched = int(detected.sum()), int(matched.sum())
    precision = n_matched / n_pred if n_pred else 1.0
    recall = tp / n_ref if n_ref else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "tp": tp, "fp": n_pred - n_matched, "fn": n_ref - tp, "n_forecast_lesions": n_pred, "n_true_lesions": n_ref,
        "matched_forecast_lesions": n_matched, "precision": precision, "recall": recall, "f1": f1,
        "dice": dice(pred, ref),
        "true_lesions": [{"detected": bool(detected[i]), "distance_mm": distances[i],
                          "centroid_mm": [round(float(c), 3) for c in ref_c[i]]} for i in range(n_ref)],
        "forecast_lesions": [{"matched": bool(m)} for m in matched],
        **_regions_of(pred, ref, regions),
    }


def _regions_of(pred: np.ndarray, ref: np.ndarray, regions: np.ndarray | None) -> dict[str, list[str]]:
    if regions is None:
        return {}
    return {"true_regions": lesion_regions(ref, regions), "forecast_regions": lesion_regions(pred, regions)}


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------


def _pooled_detection(tables: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n_pred = sum(t["n_forecast_lesions"] for t in tables)
    n_true = sum(t["n_true_lesions"] for t in tables)
    matched = sum(t["matched_forecast_lesions"] for t in tables)
    tp = sum(t["tp"] for t in tables)
    precision = matched / n_pred if n_pred else None
    recall = tp / n_true if n_true else None
    f1 = None
    if n_pred or n_true:  # scripts.lesions conventions: precision 1 without forecast, recall 1 without true lesions
        p, r = (1.0 if precision is None else precision), (1.0 if recall is None else recall)
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"true_lesions": n_true, "forecast_lesions": n_pred, "tp": tp, "fp": n_pred - matched, "fn": n_true - tp,
            "precision": precision, "recall": recall, "f1": f1}


def _location(tables: Sequence[Mapping[str, Any]], distance_mm: float) -> dict[str, Any]:
    lesions = [les for t in tables for les in t["true_lesions"]]
    distances = [les["distance_mm"] for les in lesions if les["distance_mm"] is not None]
    by_region: dict[str, dict[str, Any]] = {}
    for region in REGIONS:
        true = [les for t in tables for les, r in zip(t["true_lesions"], t.get("true_regions", []), strict=True)
                if r == region]
        forecast = [les for t in tables
                    for les, r in zip(t["forecast_lesions"], t.get("forecast_regions", []), strict=True) if r == region]
        detected = sum(les["detected"] for les in true)
        matched = sum(les["matched"] for les in forecast)
        by_region[region] = {"true_lesions": len(true), "detected": detected,
                             "recall": detected / len(true) if true else None,
                             "forecast_lesions": len(forecast), "matched": matched,
                             "precision": matched / len(forecast) if forecast else None}
    return {
        "true_lesions": len(lesions),
        "true_lesions_with_forecast_lesion": len(distances),
        "distance_mm_median": float(np.median(distances)) if distances else None,
        "distance_mm_mean": float(np.mean(distances)) if distances else None,
        "within_mm": distance_mm,
        "share_within": sum(d <= distance_mm for d in distances) / len(lesions) if lesions else None,
        "detection_by_region": by_region,
    }


def summarize_factual(records: Sequence[Mapping[str, Any]], method: str,
                      calibration: ReliabilityAccumulator | None = None,
                      distance_mm: float = DISTANCE_MM) -> dict[str, Any]:
    """Factual-arm metrics of ``method`` over case records (see :meth:`Evaluator.results` for the layout)."""
    rows = [(r, r["methods"][method]) for r in records if method in r.get("methods", {})]
    notes: dict[str, str] = {}
    out: dict[str, Any] = {"n_cases": len(rows), "n_active": sum(bool(r["active"]) for r, _ in rows)}
    true = [r["true_count"] for r, _ in rows]
    counts = count_metrics([m["expected_count"] for _, m in rows], true)
    notes.update({f"count_{k}": v for k, v in counts.pop("notes").items()})
    out.update(count_mae=counts["mae"], count_bias=counts["bias"], count_spearman=counts["spearman"],
               mean_true_count=_mean(true), mean_expected_count=_mean(m["expected_count"] for _, m in rows))
    intervals = [m.get("interval_90") for _, m in rows]
    out["interval_coverage_90"] = interval_coverage(intervals, true)
    if out["interval_coverage_90"] is None:
        notes["interval_coverage_90"] = NOT_APPLICABLE + "no count interval" if rows else "no case"
    activity = activity_metrics([m["p_active"] for _, m in rows], [r["active"] for r, _ in rows])
    notes.update(activity.pop("notes"))
    out.update(auc=activity["auc"], average_precision=activity["average_precision"],
               balanced_accuracy=activity["balanced_accuracy"])
    tables = [m["lesions"] for _, m in rows if "lesions" in m]
    if tables:
        dice_all = [t["dice"] for t in tables]
        dice_active = [t["dice"] for t in tables if t["n_true_lesions"] > 0]
        out["dice_active"] = _mean(dice_active)
        if out["dice_active"] is None:
            notes["dice_active"] = "no active case"
        out["dice_all"] = _mean(dice_all)
        pooled = _pooled_detection(tables)
        out.update(lesion_precision=pooled["precision"], lesion_recall=pooled["recall"], lesion_f1=pooled["f1"],
                   lesion_f1_case_mean=_mean(t["f1"] for t in tables), lesion_counts=pooled,
                   location=_location(tables, distance_mm))
        if pooled["precision"] is None:
            notes["lesion_precision"] = "undefined: no forecast lesion"
        if pooled["recall"] is None:
            notes["lesion_recall"] = "undefined: no true lesion"
        if pooled["f1"] is None:
            notes["lesion_f1"] = "undefined: no forecast and no true lesion"
    else:
        for key in ("dice_active", "dice_all", "lesion_precision", "lesion_recall", "lesion_f1", "location"):
            out[key] = None
            notes[key] = NOT_APPLICABLE + "no forecast mask" if rows else "no case"
    sample_tables = [m["sample_lesions"] for _, m in rows if "sample_lesions" in m]
    if sample_tables:
        pooled = _pooled_detection(sample_tables)
        out.update(sample_lesion_precision=pooled["precision"], sample_lesion_recall=pooled["recall"],
                   sample_lesion_f1=pooled["f1"], sample_lesion_counts=pooled)
    else:
        for key in ("sample_lesion_precision", "sample_lesion_recall", "sample_lesion_f1"):
            out[key] = None
            notes[key] = NOT_APPLICABLE + "no forecast samples" if rows else "no case"
    geds = [m["ged"] for _, m in rows if m.get("ged") is not None]
    out["ged_mean"] = _mean(geds)
    if not geds:
        notes["ged_mean"] = NOT_APPLICABLE + "no forecast samples" if rows else "no case"
    if calibration is not None and calibration.count.sum() > 0:
        out["ece"] = calibration.ece()
        out["reliability_bins"] = calibration.bins()
    else:
        out["ece"] = None
        notes["ece"] = NOT_APPLICABLE + "no voxel probabilities" if rows else "no case"
    out["notes"] = notes
    return out


def summarize_counterfactual(records: Sequence[Mapping[str, Any]], method: str) -> dict[str, Any]:
    """Counterfactual metrics of ``method`` over the case records that have a truth file."""
    rows = [r["counterfactual"][method] for r in records if method in (r.get("counterfactual") or {})]
    out: dict[str, Any] = {"n_cases": len(rows), "per_arm": {}}
    if not rows:
        return out
    arms = [a for a in ARMS if any(a in row["arms"] for row in rows)]
    pairs_pred, pairs_true = [], []
    cohort_pred: dict[str, float] = {}
    cohort_true: dict[str, float] = {}
    for arm in arms:
        cells = [row["arms"][arm] for row in rows if arm in row["arms"]]
        pred = [c["predicted_count"] for c in cells]
        true = [c["true_expected_count"] for c in cells]
        pairs_pred += pred
        pairs_true += true
        ratio = [c for c in cells if c.get("predicted_ratio") is not None and c.get("true_ratio") is not None]
        diff = [c for c in cells if c.get("predicted_difference") is not None]
        cohort_pred[arm], cohort_true[arm] = float(np.sum(pred)), float(np.sum(true))
        out["per_arm"][arm] = {
            "n_cases": len(cells),
            "mean_predicted_count": _mean(pred),
            "mean_true_expected_count": _mean(true),
            "mean_true_count": _mean(c["true_count"] for c in cells),
            "count_mae": _mean(abs(p - t) for p, t in zip(pred, true, strict=True)),
            "count_bias": _mean(p - t for p, t in zip(pred, true, strict=True)),
            "ratio_n": len(ratio),
            "mean_predicted_ratio": _mean(c["predicted_ratio"] for c in ratio),
            "mean_true_ratio": _mean(c["true_ratio"] for c in cells if c.get("true_ratio") is not None),
            "ratio_mae": _mean(abs(c["predicted_ratio"] - c["true_ratio"]) for c in ratio),
            "mean_predicted_difference": _mean(c["predicted_difference"] for c in diff),
            "mean_true_difference": _mean(c["true_difference"] for c in diff),
            "difference_mae": _mean(abs(c["predicted_difference"] - c["true_difference"]) for c in diff),
            "ratio_bias": _mean(c["predicted_ratio"] - c["true_ratio"] for c in ratio),
            "difference_bias": _mean(c["predicted_difference"] - c["true_difference"] for c in diff),
            "dice_mean": _mean(c.get("dice") for c in cells),
            "lesion_f1_mean": _mean(c.get("f1") for c in cells),
            "ged_mean": _mean(c.get("ged") for c in cells),
        }
    counts = count_metrics(pairs_pred, pairs_true)
    out["all_arms"] = {"n_case_arms": counts["n"], "count_mae": counts["mae"], "count_bias": counts["bias"],
                       "count_spearman": counts["spearman"], "notes": counts["notes"]}
    if "placebo" in cohort_pred:
        pred_ratio = {a: cohort_pred[a] / cohort_pred["placebo"] if cohort_pred["placebo"] > 0 else None for a in arms}
        true_ratio = {a: cohort_true[a] / cohort_true["placebo"] if cohort_true["placebo"] > 0 else None for a in arms}
        for arm in arms:
            out["per_arm"][arm]["cohort_rate_ratio_predicted"] = pred_ratio[arm]
            out["per_arm"][arm]["cohort_rate_ratio_true"] = true_ratio[arm]
    # arms ranked by their summed expected counts over the same cases: the order of the cohort rate ratios, and
    # defined even when the placebo forecast expects no lesion
    cohort = ranking_agreement(cohort_pred, {a: -v for a, v in cohort_true.items()})
    ranked = [row["ranking"] for row in rows if row.get("ranking", {}).get("concordance") is not None]
    out["ranking"] = {
        "n_cases": len(ranked),
        "case_mean_concordance": _mean(r["concordance"] for r in ranked),
        "share_exactly_ranked": _mean(float(r["exact"]) for r in ranked),
        "cohort": cohort,
    }
    return out


# ----------------------------------------------------------------------------------------------------------------
# Per-case work
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ArmPrediction:
    """One method's forecast of one case under one arm (reference-grid arrays where the method has them)."""

    expected_count: float
    p_active: float
    interval_90: list[float] | None = None
    prob: np.ndarray | None = None
    mask: np.ndarray | None = None
    samples: np.ndarray | None = None  # (K, *reference shape) bool


def load_baseline(network: torch.nn.Module | None, ckpt: str | os.PathLike | None, device: str | torch.device = "cpu",
                  copy_network: bool = False) -> torch.nn.Module | None:
    """A baseline network with the weights of ``ckpt`` (None without checkpoint); ``copy_network`` loads into a copy."""
    if ckpt is None or network is None:
        return None
    net = copy.deepcopy(network) if copy_network else network
    load_weights(net, ckpt, device)
    return net.to(device).eval()


def null_treatment_inferer(inferer: Any) -> Any:
    """A copy of the forecast's ``ForecastInferer`` that samples under the null treatment token (no arms), for the
    treatment-unaware baseline: same steps, samples, guidance and seed as the evaluated model."""
    unaware = copy.deepcopy(inferer)
    unaware.arms = None
    if hasattr(unaware, "sampler") and hasattr(unaware.sampler, "progress"):
        unaware.sampler.progress = False  # the case progress bar is enough
    return unaware


def count_native(path: str | os.PathLike) -> int:
    """Lesion count of a binary NIfTI mask on its own grid (``scripts.lesions.load_mask``: 3D, finite)."""
    return count_lesions(load_mask(path)[0])


def mask_on_grid(mask: np.ndarray, own_affine: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A binary mask (on its grid ``own_affine``) on the grid (``affine``, ``shape``); nearest-neighbour resampled
    when the grids differ."""
    if tuple(mask.shape) == tuple(shape) and np.allclose(own_affine, affine, atol=1e-3):
        return mask
    return to_reference_grid(mask.astype(np.float32), own_affine, affine, shape, mode="nearest") > 0.5


def load_mask_on(path: str | os.PathLike, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A binary NIfTI mask on the grid (``affine``, ``shape``); nearest-neighbour resampled when on another grid."""
    return mask_on_grid(*load_mask(path), affine, shape)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _clean(value: Any) -> Any:
    """Recursively replace NaN/Inf by None so the JSON is strict."""
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return _finite(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def file_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file (None for None; the path itself when it is not a file)."""
    if path is None:
        return None
    return file_sha256(path) if Path(path).is_file() else str(path)


class Evaluator:
    """Per-case hook of :class:`scripts.forecast.ForecastRunner` that scores the forecasts and baselines, then writes
    ``metrics.json``, ``report.md`` and the plots (module docstring; conventions in :data:`CONVENTIONS`).

    Args:
        datalist: the datalist (its ``training`` split feeds the population baseline unless ``population_datalist``
            is given; ``truth/<id>.json`` next to it, when present, the counterfactual and oracle sections).
        output_dir: where the forecasts and the evaluation go.
        split: the evaluated split.
        device: torch device of the baseline networks.
        deterministic_network: trained ``DeterministicForecastNet`` (None: baseline not provided).
        deterministic_inferer: ``ThresholdInferer(return_probability=True)``.
        unaware_network: diffusion network trained with the treatment always dropped (None: not provided).
        unaware_inferer: a ``ForecastInferer`` without arms (samples under the null treatment token).
        truth_dir: folder of the truth files (default ``<datalist folder>/truth``).
        num_bins: reliability bins.
        distance_mm: the "within" distance of the location summary.
        model: a name for the evaluated weights (shown in the report).
        figures: write the PNG plots.
        checkpoints: method -> checkpoint file of the networks (``diffusion``, ``deterministic``, ``unaware``), shown
            in the report; their SHA-256 are part of the resume key.
        resume: read back the cases a previous run with the same key already scored (``O/evaluation_cases/<id>.json``)
            instead of forecasting them again, so a long evaluation that was stopped continues where it stopped.
        resume_key: further settings that change the forecasts (e.g. working grid); the key also holds the datalist,
            split, arms, samples, steps, guidance, seed and the checkpoints' digests.
        population_datalist: datalist whose ``training`` split feeds the population baseline (default ``datalist``;
            set it when the evaluated cohort is a separate test-only datalist).
    """

    CASES_FOLDER = "evaluation_cases"

    def __init__(
        self,
        datalist: str | os.PathLike,
        output_dir: str | os.PathLike,
        split: str = "testing",
        device: str | torch.device = "cpu",
        deterministic_network: torch.nn.Module | None = None,
        deterministic_inferer: Any = None,
        unaware_network: torch.nn.Module | None = None,
        unaware_inferer: Any = None,
        truth_dir: str | os.PathLike | None = None,
        num_bins: int = 10,
        distance_mm: float = DISTANCE_MM,
        model: str | None = None,
        figures: bool = True,
        checkpoints: Mapping[str, str | os.PathLike | None] | None = None,
        resume: bool = True,
        resume_key: Mapping[str, Any] | None = None,
        population_datalist: str | os.PathLike | None = None,
    ) -> None:
        self.datalist = Path(datalist)
        self.output_dir = Path(output_dir)
        self.split = split
        self.device = torch.device(device)
        self.deterministic_network = deterministic_network
        if deterministic_network is not None and deterministic_inferer is None:
            deterministic_inferer = ThresholdInferer(return_probability=True)
        self.deterministic_inferer = deterministic_inferer
        self.unaware_network = unaware_network
        if unaware_network is not None and unaware_inferer is None:
            raise ValueError("unaware_network needs an unaware_inferer (a ForecastInferer without arms)")
        self.unaware_inferer = unaware_inferer
        self.truth_dir = Path(truth_dir) if truth_dir is not None else self.datalist.parent / "truth"
        self.num_bins = int(num_bins)
        self.distance_mm = float(distance_mm)
        self.model = model
        self.figures = figures
        self.records: dict[str, dict[str, Any]] = {}
        self.calibration: dict[tuple[str, str], ReliabilityAccumulator] = {}
        self.notes: list[str] = []
        self.population: dict[str, Any] | None = None
        self.population_note: str | None = None
        self.arms: list[str] = []
        self.num_samples: int | None = None
        self.failed: list[str] = []
        self.checkpoints = {k: None if v is None else str(v) for k, v in (checkpoints or {}).items()}
        self.resume = bool(resume)
        self.resume_key = dict(resume_key or {})
        self.key: dict[str, Any] | None = None
        self.population_datalist = Path(population_datalist) if population_datalist is not None else self.datalist
        self.resumed: list[str] = []
        self._started = time.perf_counter()

    # ---- population baseline ----

    def prepare(self) -> None:
        """Fit the population baseline on the training split's labels (once)."""
        if self.population is not None or self.population_note is not None:
            return
        try:
            errors: list[CaseError] = []
            cases = [c for c in load_datalist(self.population_datalist, "training", errors=errors)
                     if c.get("label") and c.get("treatment")]
            observations = []
            for case in tqdm(cases, desc="population baseline: training labels", unit="case"):
                observations.append((case["treatment"], float(case["horizon_weeks"]), count_native(case["label"])))
            self.population = population_rates(observations)
            self.population["n_training_cases"] = len(observations)
            self.population["datalist"] = str(self.population_datalist)
        except (ValueError, OSError) as err:
            self.population_note = f"not available: {err}"
            logger.warning("population baseline %s", self.population_note)

    # ---- the hook ----

    def __call__(self, *, case: Mapping[str, Any], data: Mapping[str, Any], samples: np.ndarray,
                 forecast: Mapping[str, Any], probs: Mapping[str, np.ndarray], regions: np.ndarray,
                 allowed: np.ndarray | None = None, **_: Any) -> None:
        """Score one forecast case (called by ``ForecastRunner`` with the binary samples (A, K, *working grid))."""
        self.prepare()
        case_id = str(case["id"])
        arms = list(forecast["arms"])
        self.arms = self.arms or arms
        self.num_samples = int(forecast["num_samples"])
        working_affine = np.asarray(data["working_affine"], dtype=np.float64)
        affine = np.asarray(data["reference_affine"], dtype=np.float64)
        shape = [int(s) for s in np.asarray(data["reference_shape"]).reshape(-1)]
        horizon = float(forecast["horizon_weeks"])

        def to_ref(volume: np.ndarray, mode: str) -> np.ndarray:
            return to_reference_grid(np.asarray(volume, dtype=np.float32), working_affine, affine, shape, mode=mode)

        regions_ref = np.rint(to_ref(regions, "nearest")).astype(np.uint8)
        truth_path = self.truth_dir / f"{case_id}.json"
        truth = json.loads(truth_path.read_text()) if truth_path.is_file() else None
        factual = case.get("treatment") or (truth or {}).get("treatment")
        record: dict[str, Any] = {"id": case_id, "treatment": factual, "horizon_weeks": horizon,
                                  "truth_file": truth is not None, "methods": {}}

        # samples go to the reference grid only where they are compared (GED): reference grids can be large
        evaluated = case.get("label") is not None and factual in arms
        sample_arms = set(arms) if truth is not None else {factual} if evaluated else set()
        # the baselines get the restriction the diffusion samples got (``allowed``)
        predictions = self._predict(data, samples, forecast, probs, arms, truth, horizon, to_ref, sample_arms,
                                    allowed)
        pending: list[tuple[tuple[str, str], np.ndarray, np.ndarray, np.ndarray]] = []

        if case.get("label") is None:
            record["note"] = "no label: left out of the factual metrics"
        elif factual is None:
            record["note"] = "no treatment: left out of the factual metrics"
        elif factual not in arms:
            record["note"] = f"factual arm {factual} not forecast: left out of the factual metrics"
        else:
            native, native_affine = load_mask(case["label"])  # read once: counted on its own grid, scored on ours
            label = mask_on_grid(native, native_affine, affine, shape)
            record["true_count"] = count_lesions(native)
            record["active"] = record["true_count"] > 0
            record["true_volume_mm3"] = float(label.sum() * voxel_volume_mm3(affine))
            domain = (regions_ref > 0) | label
            for method, per_arm in predictions.items():
                if factual in per_arm:
                    record["methods"][method] = self._score_factual(per_arm[factual], label, affine, regions_ref,
                                                                    domain, method, factual, pending)
        if truth is not None:
            record["counterfactual"] = self._score_counterfactual(predictions, truth, affine, shape, arms)
        calibration: dict[tuple[str, str], ReliabilityAccumulator] = {}
        for key, prob, label, where in pending:
            calibration.setdefault(key, ReliabilityAccumulator(self.num_bins)).update(prob, label, where)
        # JSON round trip: a case scored now and one read back by a resumed run are the same record
        text = json.dumps(_clean({"key": self.key, "record": record, "calibration": {
            f"{method}|{group}": acc.state_dict() for (method, group), acc in calibration.items()}}),
            default=_json_default, allow_nan=False)
        if self.key is not None:  # inside run(): keep the case for a resumed run
            write_text_atomic(self.output_dir / self.CASES_FOLDER / f"{case_id}.json", text)
        self._add(json.loads(text))

    def _add(self, state: Mapping[str, Any]) -> None:
        """Count one scored case (its record and voxel statistics); only a fully scored case gets here."""
        record = state["record"]
        for name, acc in state["calibration"].items():
            method, group = name.split("|", 1)
            self.calibration.setdefault((method, group), ReliabilityAccumulator(self.num_bins)).merge(
                ReliabilityAccumulator.from_state_dict(acc))
        self.records[record["id"]] = record

    def _predict(self, data: Mapping[str, Any], samples: np.ndarray, forecast: Mapping[str, Any],
                 probs: Mapping[str, np.ndarray], arms: Sequence[str], truth: Mapping[str, Any] | None,
                 horizon: float, to_ref: Any, sample_arms: set[str],
                 allowed: np.ndarray | None = None) -> dict[str, dict[str, ArmPrediction]]:
        """Every available method's forecast of this case, per arm (reference-grid samples for ``sample_arms``);
        ``allowed`` (working grid), where given, restricts the baseline networks' forecasts as the samples were."""
        working_affine = np.asarray(data["working_affine"], dtype=np.float64)
        out: dict[str, dict[str, ArmPrediction]] = {"diffusion": {}}
        for a, arm in enumerate(arms):
            figures = forecast["arms"][arm]
            prob = np.asarray(probs[arm]) if arm in probs else None
            out["diffusion"][arm] = ArmPrediction(
                figures["expected_count"], figures["p_active"], list(figures["count_interval_90"]), prob,
                None if prob is None else prob >= 0.5,
                to_ref(samples[a], "nearest") > 0.5 if arm in sample_arms else None)
        cond = torch.as_tensor(data["cond"]).float()[None].to(self.device)
        h = torch.tensor([horizon], device=self.device)
        if self.deterministic_network is not None:
            out["deterministic"] = {}
            with torch.no_grad():
                for arm in arms:  # one arm at a time keeps the peak memory of one forward pass
                    prob_w = self.deterministic_inferer(cond, self.deterministic_network, horizon=h,
                                                        treatment=torch.tensor([arm_index(arm)], device=self.device))
                    prob_w = prob_w[0, 0].float().cpu().numpy()
                    if allowed is not None:
                        prob_w = np.where(allowed, prob_w, 0.0).astype(np.float32)
                    prob = np.clip(to_ref(prob_w, "bilinear"), 0.0, 1.0)
                    mask = prob >= 0.5
                    out["deterministic"][arm] = ArmPrediction(float(count_lesions(prob_w >= 0.5)),
                                                              float(prob_w.max()), None, prob, mask, mask[None])
        if self.unaware_network is not None:
            with torch.no_grad():
                unaware = self.unaware_inferer(cond, self.unaware_network, horizon=h)[0].cpu().numpy() > 0.5
            if allowed is not None:
                unaware &= allowed
            figures = summarize_arm(unaware, working_affine)
            prob = np.clip(to_ref(figures["prob_working"], "bilinear"), 0.0, 1.0)
            prediction = ArmPrediction(figures["expected_count"], figures["p_active"], figures["count_interval_90"],
                                       prob, prob >= 0.5, to_ref(unaware, "nearest") > 0.5 if sample_arms else None)
            out["unaware"] = {arm: prediction for arm in arms}  # one forecast, whatever the arm
        if self.population is not None:
            out["population"] = {}
            for arm in arms:
                mean = self.population["rate_per_week"][arm] * horizon
                out["population"][arm] = ArmPrediction(mean, 1.0 - math.exp(-mean), poisson_interval(mean))
        if truth is not None:
            out["oracle"] = {}
            for arm in arms:
                mean = float(truth["expected_count"][arm])
                out["oracle"][arm] = ArmPrediction(mean, 1.0 - math.exp(-mean), poisson_interval(mean))
        return out

    def _score_factual(self, pred: ArmPrediction, label: np.ndarray, affine: np.ndarray, regions: np.ndarray,
                       domain: np.ndarray, method: str, arm: str,
                       pending: list[tuple[tuple[str, str], np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
        """Factual figures of one method; its voxel probabilities are queued in ``pending`` for the calibration."""
        out: dict[str, Any] = {"expected_count": float(pred.expected_count), "p_active": float(pred.p_active),
                               "interval_90": pred.interval_90}
        if pred.mask is not None:
            out["lesions"] = lesion_table(pred.mask, label, affine, regions)
        if pred.samples is not None:
            out["ged"] = generalized_energy_distance(pred.samples, label)
            # every sample is a forecast of its own: lesion-wise detection of each, summed (the mask of a sampled
            # forecast holds only voxels most samples agree on, which new lesions at uncertain places never are)
            keys = ("tp", "fp", "fn", "n_forecast_lesions", "n_true_lesions", "matched_forecast_lesions")
            per_sample = [lesion_table(sample, label, affine) for sample in pred.samples]
            out["sample_lesions"] = {k: int(sum(t[k] for t in per_sample)) for k in keys}
            out["sample_lesions"]["n_samples"] = len(per_sample)
        if pred.prob is not None:
            where = domain | (pred.prob > 0)
            pending += [((method, group), pred.prob, label, where) for group in ("all", arm)]
        return out

    def _score_counterfactual(self, predictions: Mapping[str, Mapping[str, ArmPrediction]], truth: Mapping[str, Any],
                              affine: np.ndarray, shape: Sequence[int], arms: Sequence[str]) -> dict[str, Any]:
        expected = {arm: float(v) for arm, v in truth["expected_count"].items()}
        efficacy = {arm: float(v) for arm, v in truth.get("efficacy", {}).items()}
        labels = truth.get("counterfactual_labels", {})
        masks: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for arm in arms:
            if arm in labels:
                path = Path(labels[arm])
                path = path if path.is_absolute() else self.truth_dir.parent / path
                masks[arm] = load_mask_on(path, affine, shape)
                counts[arm] = int(truth.get("counts", {}).get(arm, count_lesions(masks[arm])))
        out: dict[str, Any] = {}
        for method in COUNTERFACTUAL_METHODS:
            per_arm = predictions.get(method)
            if not per_arm:
                continue
            cells: dict[str, dict[str, Any]] = {}
            base = per_arm.get("placebo")
            for arm in arms:
                if arm not in expected:
                    continue
                pred = per_arm[arm]
                cell: dict[str, Any] = {"predicted_count": float(pred.expected_count),
                                        "true_expected_count": expected[arm], "true_count": counts.get(arm)}
                if arm in masks and pred.mask is not None:
                    table = lesion_table(pred.mask, masks[arm], affine)
                    cell.update(dice=table["dice"], f1=table["f1"])
                if arm in masks and pred.samples is not None:
                    cell["ged"] = generalized_energy_distance(pred.samples, masks[arm])
                if base is not None and "placebo" in expected:
                    cell["predicted_ratio"] = (pred.expected_count / base.expected_count
                                               if base.expected_count > 0 else None)
                    cell["true_ratio"] = expected[arm] / expected["placebo"] if expected["placebo"] > 0 else None
                    cell["predicted_difference"] = float(pred.expected_count - base.expected_count)
                    cell["true_difference"] = expected[arm] - expected["placebo"]
                cells[arm] = cell
            ranking = ranking_agreement({a: c["predicted_count"] for a, c in cells.items()}, efficacy)
            out[method] = {"arms": cells, "ranking": ranking}
        return out

    # ---- results ----

    def results(self) -> dict[str, Any]:
        """The content of ``metrics.json``."""
        records = list(self.records.values())
        factual = [r for r in records if "true_count" in r]
        arms_seen = [a for a in ARMS if any(r["treatment"] == a for r in factual)]

        def factual_section(method: str) -> dict[str, Any]:
            return {
                "overall": summarize_factual(factual, method, self.calibration.get((method, "all")), self.distance_mm),
                "per_arm": {arm: summarize_factual([r for r in factual if r["treatment"] == arm], method,
                                                   self.calibration.get((method, arm)), self.distance_mm)
                            for arm in arms_seen},
            }

        with_truth = [r for r in records if r.get("counterfactual")]
        truth_note = None if with_truth else (f"no truth files in {self.truth_dir}: counterfactual and oracle "
                                              "sections skipped (synthetic cohorts only)")
        diffusion = factual_section("diffusion")
        baselines: dict[str, Any] = {}
        availability = {
            "deterministic": (self.deterministic_network is not None, "not provided (set deterministic_ckpt)"),
            "unaware": (self.unaware_network is not None, "not provided (set unaware_ckpt)"),
            "population": (self.population is not None, self.population_note or "not available"),
            "oracle": (bool(with_truth), truth_note or "not available"),
        }
        for method, (available, note) in availability.items():
            section: dict[str, Any] = {"label": METHOD_LABELS[method], "available": available}
            if available:
                section.update(factual_section(method))
                if method in COUNTERFACTUAL_METHODS and with_truth:
                    section["counterfactual"] = summarize_counterfactual(with_truth, method)
            else:
                section["note"] = note
            if method == "population" and self.population is not None:
                section["rates"] = self.population
            baselines[method] = section
        comparisons = {method: paired_comparison(factual, "diffusion", method)
                       for method, section in baselines.items() if section["available"]}
        counterfactual: dict[str, Any] = {"available": bool(with_truth)}
        if with_truth:
            counterfactual.update(summarize_counterfactual(with_truth, "diffusion"))
        else:
            counterfactual["note"] = truth_note
        return _clean({
            "settings": {
                "datalist": str(self.datalist), "split": self.split, "model": self.model, "arms": self.arms,
                "num_samples": self.num_samples, "cases_forecast": len(records), "cases_evaluated": len(factual),
                "cases_with_truth": len(with_truth), "failed_cases": self.failed,
                "cases_resumed": len(self.resumed), "checkpoints": self.checkpoints,
                "seconds": round(time.perf_counter() - self._started, 1),
            },
            "overall": diffusion["overall"],
            "per_arm": diffusion["per_arm"],
            "counterfactual": counterfactual,
            "baselines": baselines,
            "comparisons": comparisons,
            "cases": [_case_summary(r) for r in records],
            "notes": self.notes + [f"{r['id']}: {r['note']}" for r in records if r.get("note")],
            "conventions": CONVENTIONS,
        })

    def write(self) -> dict[str, Any]:
        """Write ``metrics.json``, the plots and ``report.md`` into the output folder; returns the metrics."""
        metrics = self.results()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        figures: dict[str, str] = {}
        if self.figures:
            figures = evaluation_figures(metrics, self.records, self.output_dir)
        metrics["figures"] = figures
        write_text_atomic(self.output_dir / "metrics.json",
                          json.dumps(metrics, indent=2, default=_json_default, allow_nan=False))
        write_text_atomic(self.output_dir / "report.md", render_report(metrics))
        o = metrics["overall"]
        logger.info("evaluated %d case(s): count MAE %s lesions, 90%% coverage %s, activity AUC %s, Dice (active) %s; "
                    "wrote %s, %s and %d plot(s)", o["n_cases"], _fmt(o.get("count_mae")),
                    _fmt(o.get("interval_coverage_90"), percent=True), _fmt(o.get("auc")), _fmt(o.get("dice_active")),
                    self.output_dir / "metrics.json", self.output_dir / "report.md", len(figures))
        return metrics

    def run(self, forecaster: Any) -> dict[str, Any]:
        """Forecast with ``forecaster`` (this evaluator as its per-case hook), then write the evaluation.

        The evaluation is written even when some cases failed; the forecaster's error is raised afterwards.
        """
        if self not in forecaster.case_hooks:
            forecaster.case_hooks.append(self)
        self.arms = list(forecaster.arms)
        self.prepare()
        self.key = self.run_key(forecaster)
        if self.resume:
            self.resumed = self.read_back()
            forecaster.skip_ids = set(self.resumed)
        if not forecaster.overwrite:
            self.notes.append("overwrite was false: cases already forecast were skipped and are not evaluated")
        failure: ForecastFailed | None = None
        try:
            forecaster.run()
        except ForecastFailed as err:
            failure = err
            self.failed = [line for line in str(err).splitlines()[1:] if line]
        metrics = self.write()
        if failure is not None:
            raise failure
        return metrics


    def run_key(self, forecaster: Any) -> dict[str, Any]:
        """What a scored case depends on: a case scored under another key is forecast and scored again."""
        inferer = forecaster.inferer
        sampler = getattr(inferer, "sampler", None)
        return _clean(json.loads(json.dumps({
            "datalist": str(self.datalist.resolve()), "split": self.split, "arms": list(forecaster.arms),
            "num_samples": getattr(inferer, "num_samples", None), "seed": getattr(inferer, "seed", None),
            "num_inference_steps": getattr(sampler, "num_inference_steps", None),
            "guidance_scale": getattr(sampler, "guidance_scale", None), "num_bins": self.num_bins,
            "distance_mm": self.distance_mm, "truth_dir": str(self.truth_dir.resolve()),
            "population_datalist": str(self.population_datalist.resolve()),
            "weights": {method: file_digest(path) for method, path in sorted(self.checkpoints.items())},
            **self.resume_key,
        }, default=_json_default)))

    def read_back(self) -> list[str]:
        """Add the cases of a previous run with the same key (and still in the split); returns their ids."""
        folder = self.output_dir / self.CASES_FOLDER
        if not folder.is_dir():
            return []
        wanted = {str(c["id"]) for c in load_datalist(self.datalist, self.split, errors=[])}
        resumed, other_key = [], 0
        for path in sorted(folder.glob("*.json")):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # unreadable: that case is simply scored again
            if state.get("key") != self.key:
                other_key += 1
                continue
            if state["record"]["id"] in wanted and state["record"]["id"] not in self.records:
                self._add(state)
                resumed.append(state["record"]["id"])
        if resumed:
            self.notes.append(f"resumed: {len(resumed)} case(s) scored by an earlier run with the same weights and "
                              f"settings were read back from {folder} (resume=False, or delete it, to redo them)")
            logger.info("resuming: %d case(s) already scored in %s", len(resumed), folder)
        if other_key:
            logger.info("%d scored case(s) in %s have other weights or settings: scored again", other_key, folder)
        return resumed


def _case_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The ``cases`` entry of one record: figures per method, without per-lesion lists."""
    out = {k: v for k, v in record.items() if k not in ("methods", "counterfactual")}
    methods = {}
    for method, m in record.get("methods", {}).items():
        entry = {k: v for k, v in m.items() if k != "lesions"}
        if m.get("interval_90") is not None and "true_count" in record:
            lo, hi = m["interval_90"]
            entry["covered"] = bool(lo <= record["true_count"] <= hi)
        if "lesions" in m:
            t = m["lesions"]
            entry.update({k: t[k] for k in ("dice", "tp", "fp", "fn", "precision", "recall", "f1",
                                             "n_forecast_lesions")})
            entry["distances_mm"] = [les["distance_mm"] for les in t["true_lesions"]]
            entry["true_regions"] = t.get("true_regions")
            entry["detected"] = [les["detected"] for les in t["true_lesions"]]
        methods[method] = entry
    out["methods"] = methods
    if record.get("counterfactual"):
        out["counterfactual"] = record["counterfactual"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if percent:
        return f"{100 * float(value):.0f}%"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(m: Mapping[str, Any], key: str, digits: int = 2, percent: bool = False) -> str:
    """A table cell: the value, "n/a" where the method cannot have it, "–" where it is undefined."""
    if m.get(key) is None and str(m.get("notes", {}).get(key, "")).startswith(NOT_APPLICABLE):
        return "n/a"
    return _fmt(m.get(key), digits, percent)


def _undefined_notes(sections: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """"method: metric: reason" for every undefined (not merely inapplicable) entry."""
    return [f"{label}: {key.replace('_', ' ')} {reason}" for label, m in sections
            for key, reason in m.get("notes", {}).items()
            if not str(reason).startswith(NOT_APPLICABLE) and reason != "no case"]


def _method_sections(metrics: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(label, factual overall section) of the diffusion model and every available baseline."""
    out = [(METHOD_LABELS["diffusion"], metrics["overall"])]
    for section in metrics["baselines"].values():
        if section.get("available"):
            out.append((section["label"], section["overall"]))
    return out


def _images(metrics: Mapping[str, Any], *plots: tuple[str, str]) -> list[str]:
    """Markdown image lines of the plots that were written."""
    figures = metrics.get("figures", {})
    return [line for name, alt in plots if name in figures for line in (f"![{alt}]({figures[name]})", "")]


def _key_results(metrics: Mapping[str, Any]) -> list[str]:
    """Plain-language bullets of the diffusion model's main figures."""
    o = metrics["overall"]
    if not o["n_cases"]:
        return []
    out = [f"- Count: the expected NET2 count differs from the observed count by {_fmt(o['count_mae'])} lesions on "
           f"average (mean true count {_fmt(o['mean_true_count'])}, mean expected {_fmt(o['mean_expected_count'])})."]
    if o.get("interval_coverage_90") is not None:
        out.append(f"- Uncertainty: the 90% interval holds the observed count in "
                   f"{_fmt(o['interval_coverage_90'], percent=True)} of cases (90% expected if well calibrated).")
    if o.get("auc") is not None:
        out.append(f"- Activity: P(at least one NET2 lesion) separates active from inactive patients with AUC "
                   f"{_fmt(o['auc'])} (0.5 = chance, 1 = perfect).")
    if o.get("dice_active") is not None:
        out.append(f"- Segmentation: mean Dice {_fmt(o['dice_active'])} on active cases; lesion-wise recall "
                   f"{_fmt(o.get('lesion_recall'))}, precision {_fmt(o.get('lesion_precision'))}.")
    cf = metrics.get("counterfactual", {})
    rank = cf.get("ranking", {}).get("cohort", {})
    if cf.get("available") and rank.get("concordance") is not None:
        out.append(f"- Treatment effects (synthetic truth): {_fmt(rank['concordance'], percent=True)} of arm pairs "
                   "are ordered like their true efficacies over the cohort.")
    return [*out, ""]


BASELINE_DESCRIPTIONS: dict[str, str] = {
    "deterministic": "the same network architecture trained to output the NET2 mask directly (Dice + cross-entropy), "
                     "thresholded at 0.5: one forecast, no samples",
    "unaware": "the diffusion model trained with the treatment always dropped, forecast with the null treatment: "
               "the same forecast under every arm",
    "population": "each arm's NET2 rate in the training split times the horizon, the same for every patient",
    "oracle": "the generator's true expected count of the patient under the arm: the best any count forecast can "
              "do on average (an upper bound for count and activity)",
}


def _baselines_section(metrics: Mapping[str, Any]) -> list[str]:
    """Report lines describing the baselines and the population rates."""
    lines = ["## Baselines", ""]
    for method, section in metrics["baselines"].items():
        state = "included" if section.get("available") else section.get("note", "not available")
        lines.append(f"- **{section['label']}**: {BASELINE_DESCRIPTIONS[method]}. {state[0].upper() + state[1:]}.")
    lines.append("")
    rates = metrics["baselines"].get("population", {}).get("rates")
    if rates:
        lines += [f"Population rates from {rates.get('n_training_cases', 0)} training case(s):", "", _table(
            ["arm", "training cases", "NET2 lesions per 24 weeks"],
            [[arm, _fmt(rates["n_cases"][arm]),
              _fmt(24 * rate) + (" (pooled: no training case)" if arm in rates["fallback"] else "")]
             for arm, rate in rates["rate_per_week"].items()]), ""]
    return lines


def _interval(values: Sequence[float] | None) -> str:
    return "–" if not values else f"{_fmt(values[0])} to {_fmt(values[1])}"


def _comparisons_section(metrics: Mapping[str, Any]) -> list[str]:
    """Report lines: the diffusion model against each baseline, paired over the same cases, with bootstrap CIs."""
    comparisons = {m: c for m, c in metrics.get("comparisons", {}).items() if c.get("n_cases")}
    if not comparisons:
        return []
    first = next(iter(comparisons.values()))
    return ["Diffusion model minus baseline on the same cases (95% paired-bootstrap interval, "
            f"{first['n_resamples']} resamples of the cases; 'better' = share of resamples in which the diffusion "
            "model is better). A count MAE difference below 0 and an AUC difference above 0 favour the diffusion "
            "model; an interval that excludes 0 is a difference this cohort resolves.", "", _table(
                ["baseline", "n", "count MAE difference (lesions)", "95% interval", "better",
                 "activity AUC difference", "95% interval", "better"],
                [[metrics["baselines"][m]["label"], _fmt(c["n_cases"]), _fmt(c.get("mae_difference")),
                  _interval(c.get("mae_difference_ci95")), _fmt(c.get("mae_share_better"), percent=True),
                  _fmt(c.get("auc_difference")), _interval(c.get("auc_difference_ci95")),
                  _fmt(c.get("auc_share_better"), percent=True)] for m, c in comparisons.items()]), ""]


def render_report(metrics: Mapping[str, Any]) -> str:
    """``report.md``: the evaluation for a clinician-researcher, tables with units, plots, conventions."""
    s = metrics["settings"]
    o = metrics["overall"]
    lines = [
        "# Evaluation of the NET2 lesion forecasts",
        "",
        f"Datalist `{s['datalist']}`, split `{s['split']}`: {s['cases_forecast']} case(s) forecast, "
        f"{s['cases_evaluated']} with an observed outcome evaluated ({o['n_active']} active, i.e. with at least one "
        f"new/enlarging T2 lesion), {s['cases_with_truth']} with synthetic counterfactual truth. Model: "
        f"`{s.get('model') or 'n/a'}`; {s.get('num_samples') or '–'} samples per case and arm; arms: "
        f"{', '.join(s.get('arms') or []) or '–'}.",
        "",
        "NET2 = new or enlarging T2 lesion between the last past visit and the forecast visit; a lesion is a "
        "26-connected group of voxels. Small numbers of cases give wide uncertainty: read every figure with its n.",
        "",
    ]
    key = _key_results(metrics)
    if key:
        lines += ["## Key results (diffusion model)", "", *key]
    if s.get("failed_cases"):
        lines += ["**Failed cases (not evaluated):**", "", *[f"- {f}" for f in s["failed_cases"]], ""]
    lines += ["## Factual forecasts: all cases", "",
              "Each case's forecast under the treatment it received, against the observed NET2 mask.", ""]
    sections = _method_sections(metrics)
    lines.append(_table(
        ["method", "n", "Dice, active cases (0-1)", "Dice, all cases (0-1)", "lesion precision", "lesion recall",
         "lesion F1", "count MAE (lesions)", "count Spearman", "90% interval coverage (nominal 90%)"],
        [[label, _fmt(m["n_cases"]), _cell(m, "dice_active"), _cell(m, "dice_all"), _cell(m, "lesion_precision"),
          _cell(m, "lesion_recall"), _cell(m, "lesion_f1"), _cell(m, "count_mae"), _cell(m, "count_spearman"),
          _cell(m, "interval_coverage_90", percent=True)] for label, m in sections]))
    lines += ["", _table(
        ["method", "activity AUC", "activity average precision", "balanced accuracy (P >= 0.5)",
         "voxel ECE (0-1)", "GED (0-2)", "lesion precision, per sample", "lesion recall, per sample",
         "lesion F1, per sample"],
        [[label, _cell(m, "auc"), _cell(m, "average_precision"), _cell(m, "balanced_accuracy"),
          _cell(m, "ece", 4), _cell(m, "ged_mean"), _cell(m, "sample_lesion_precision"),
          _cell(m, "sample_lesion_recall"), _cell(m, "sample_lesion_f1")] for label, m in sections]), "",
        "Per sample: every sampled forecast mask against the observed mask, lesion-wise, pooled over samples and "
        "cases (the deterministic network's one mask counts as one sample); the columns 'lesion precision/recall/"
        "F1' above score the forecast mask (voxels with probability >= 0.5).", ""]
    lines += ["n/a: the method does not produce this (e.g. no lesion mask for the count-only baselines).", ""]
    notes = _undefined_notes(sections)
    if not o["n_cases"]:
        lines += ["No case with an observed outcome was evaluated.", ""]
    if notes:
        lines += ["Undefined entries (–): " + "; ".join(notes) + ".", ""]
    not_provided = [f"{sec['label']}: {sec.get('note')}" for sec in metrics["baselines"].values()
                    if not sec.get("available")]
    if not_provided:
        lines += ["Baselines not in the tables: " + "; ".join(not_provided) + ".", ""]
    lines += _comparisons_section(metrics)
    lines += _images(metrics, ("count_scatter", "expected vs true NET2 count"), ("roc", "ROC of P(active)"))

    lines += ["## Factual forecasts by treatment arm (diffusion model)", ""]
    if metrics["per_arm"]:
        lines.append(_table(
            ["arm", "n", "active", "mean true count (lesions)", "mean expected count (lesions)",
             "count MAE (lesions)", "90% coverage", "Dice, active cases", "lesion F1", "AUC", "ECE"],
            [[arm, _fmt(m["n_cases"]), _fmt(m["n_active"]), _fmt(m.get("mean_true_count")),
              _fmt(m.get("mean_expected_count")), _fmt(m.get("count_mae")),
              _fmt(m.get("interval_coverage_90"), percent=True), _fmt(m.get("dice_active")),
              _fmt(m.get("lesion_f1")), _fmt(m.get("auc")), _fmt(m.get("ece"), 4)]
             for arm, m in metrics["per_arm"].items()]))
        lines.append("")
    else:
        lines += ["No evaluated case.", ""]

    loc = o.get("location")
    lines += ["## Location", ""]
    if loc:
        lines += [
            f"{loc['true_lesions']} true NET2 lesion(s); {loc['true_lesions_with_forecast_lesion']} in cases with a "
            f"forecast lesion. Distance from a true lesion's centre to the nearest forecast lesion's centre: median "
            f"{_fmt(loc['distance_mm_median'], 1)} mm, mean {_fmt(loc['distance_mm_mean'], 1)} mm; "
            f"{_fmt(loc['share_within'], percent=True)} of true lesions have a forecast lesion within "
            f"{loc['within_mm']:g} mm. Detection by region (lesion-wise, pooled over cases):",
            "",
            _table(["region", "true lesions", "detected", "recall", "forecast lesions", "matched", "precision"],
                   [[r.replace("_", " "), _fmt(v["true_lesions"]), _fmt(v["detected"]), _fmt(v["recall"]),
                     _fmt(v["forecast_lesions"]), _fmt(v["matched"]), _fmt(v["precision"])]
                    for r, v in loc["detection_by_region"].items()]),
            "",
        ]
    else:
        lines += ["No forecast mask evaluated.", ""]

    lines += ["## Uncertainty", "",
              f"Voxel calibration of the diffusion model: ECE {_fmt(o.get('ece'), 4)} (0 = perfectly calibrated). "
              f"Generalized energy distance between forecast samples and the truth: {_fmt(o.get('ged_mean'))} "
              "(0 = samples identical to the truth; 2 = no overlap at all).", "",
              *_images(metrics, ("reliability", "reliability diagram"))]

    cf = metrics["counterfactual"]
    lines += ["## Counterfactual forecasts (synthetic truth)", ""]
    if not cf.get("available"):
        lines += [f"Skipped: {cf.get('note')}.", ""]
    else:
        lines += [
            "Every arm of every case against the generator's true expected NET2 count and true counterfactual mask "
            "(the same patient under another treatment). Ratio and difference are against placebo.", "",
            _table(["arm", "n", "mean predicted count (lesions)", "mean true expected count (lesions)",
                    "count MAE (lesions)", "predicted cohort rate ratio", "true cohort rate ratio",
                    "ratio MAE (per case)", "difference MAE (lesions)", "Dice vs true mask", "lesion F1"],
                   [[arm, _fmt(v["n_cases"]), _fmt(v["mean_predicted_count"]), _fmt(v["mean_true_expected_count"]),
                     _fmt(v["count_mae"]), _fmt(v.get("cohort_rate_ratio_predicted")),
                     _fmt(v.get("cohort_rate_ratio_true")), _fmt(v["ratio_mae"]), _fmt(v["difference_mae"]),
                     _fmt(v["dice_mean"]), _fmt(v["lesion_f1_mean"])] for arm, v in cf["per_arm"].items()]),
            "",
        ]
        rows = []
        for label, method_cf in [(METHOD_LABELS["diffusion"], cf)] + [
                (sec["label"], sec["counterfactual"]) for sec in metrics["baselines"].values()
                if sec.get("available") and sec.get("counterfactual")]:
            rank = method_cf.get("ranking", {})
            cohort = rank.get("cohort", {})
            allarms = method_cf.get("all_arms", {})
            rows.append([label, _fmt(allarms.get("count_mae")), _fmt(allarms.get("count_spearman")),
                         _fmt(rank.get("case_mean_concordance"), percent=True),
                         _fmt(rank.get("share_exactly_ranked"), percent=True), _fmt(cohort.get("concordance"),
                                                                                     percent=True),
                         cohort.get("predicted_order_text") or "–"])
        lines += [_table(["method", "count MAE, all arms (lesions)", "Spearman, all arms",
                          "arm pairs ranked right (per case)", "cases ranked exactly", "arm pairs ranked right "
                          "(cohort)", "predicted order, strongest first (cohort)"], rows), "",
                  f"True order, strongest first: {cf['ranking']['cohort'].get('true_order_text') or '–'}.",
                  "", *_images(metrics, ("effects", "effects against placebo"))]

    lines += _baselines_section(metrics)
    lines += ["## Cases", "", _table(
        ["case", "arm", "horizon (weeks)", "true count", "expected count", "90% interval", "P(active)", "Dice",
         "lesion F1"],
        [[c["id"], c.get("treatment") or "–", _fmt(c.get("horizon_weeks"), 0), _fmt(c.get("true_count")),
          _fmt(c["methods"].get("diffusion", {}).get("expected_count")),
          "–" if c["methods"].get("diffusion", {}).get("interval_90") is None else
          "{:g}-{:g}".format(*c["methods"]["diffusion"]["interval_90"]),
          _fmt(c["methods"].get("diffusion", {}).get("p_active")),
          _fmt(c["methods"].get("diffusion", {}).get("dice")), _fmt(c["methods"].get("diffusion", {}).get("f1"))]
         for c in metrics["cases"]]), ""]
    if metrics.get("notes"):
        lines += ["Notes:", "", *[f"- {n}" for n in metrics["notes"]], ""]
    lines += ["## Conventions", "", *[f"- **{k}**: {v}" for k, v in metrics["conventions"].items()], ""]
    return "\n".join(lines)
