"""Pure metric functions of the evaluation: counts, activity, intervals, calibration, GED, ranking, lesion tables.

No I/O and no state except :class:`ReliabilityAccumulator`; conventions in
:data:`scripts.bench.evaluation.conventions.CONVENTIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from scripts.bench.evaluation.conventions import BOOTSTRAP_RESAMPLES, INTERVAL_LEVEL
from scripts.runtime.constants import ARMS
from scripts.runtime.lesions import dice, label_lesions, lesion_centroids, lesion_matching
from scripts.runtime.regions import lesion_regions
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score


def finite(value: Any) -> float | None:
    """A float, or None for None/NaN/Inf (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def mean_or_none(values: Iterable[Any]) -> float | None:
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
        out["spearman"] = finite(stats.spearmanr(e, t).statistic)
    return out


def activity_metrics(p_active: Sequence[float], active: Sequence[bool], threshold: float = 0.5) -> dict[str, Any]:
    """AUC, average precision and balanced accuracy (at ``threshold``) of P(active) against true activity."""

    p, y = np.asarray(p_active, dtype=np.float64), np.asarray(active, dtype=bool)
    out: dict[str, Any] = {
        "n": int(y.size),
        "n_active": int(y.sum()),
        "auc": None,
        "average_precision": None,
        "balanced_accuracy": None,
        "notes": {},
    }
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


def paired_comparison(
    records: Sequence[Mapping[str, Any]], method: str, baseline: str, n_boot: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, Any]:
    """``method`` against ``baseline`` on the same factual cases: count MAE and activity AUC differences with 95%
    paired-bootstrap intervals (cases resampled with replacement, seeded; resamples with one class skip the AUC).

    ``mae_difference`` < 0 and ``auc_difference`` > 0 favour ``method``; ``*_share_better`` is the share of
    resamples in which ``method`` is strictly better."""

    rows = [
        (r, r["methods"][method], r["methods"][baseline])
        for r in records
        if method in r.get("methods", {}) and baseline in r.get("methods", {})
    ]
    out: dict[str, Any] = {
        "n_cases": len(rows),
        "n_resamples": int(n_boot),
        "seed": int(seed),
        "mae_difference": None,
        "mae_difference_ci95": None,
        "mae_share_better": None,
        "auc_difference": None,
        "auc_difference_ci95": None,
        "auc_share_better": None,
        "notes": {},
    }
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
    auc_diff = [
        roc_auc_score(active[i], p_a[i]) - roc_auc_score(active[i], p_b[i])
        for i in idx
        if active[i].any() and not active[i].all()
    ]
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
            out.append(
                {
                    "lower": float(edges[i]),
                    "upper": float(edges[i + 1]),
                    "voxels": n,
                    "mean_probability": float(self.sum_prob[i] / n) if n else None,
                    "observed_frequency": float(self.sum_true[i] / n) if n else None,
                }
            )
        return out


def expected_calibration_error(prob: np.ndarray, truth: np.ndarray, num_bins: int = 10) -> float | None:
    """ECE of voxel probabilities against a binary truth (see :class:`ReliabilityAccumulator`)."""
    acc = ReliabilityAccumulator(num_bins)
    acc.update(prob, truth)
    return acc.ece()


def ranking_agreement(
    predicted: Mapping[str, float], strength: Mapping[str, float], tol: float = 1e-9
) -> dict[str, Any]:
    """How well predicted counts rank arms by their true strength (efficacy: higher = fewer lesions).

    Over pairs of arms whose true strengths differ by more than ``tol``: 1 when the stronger arm has the lower
    predicted count, 0.5 for a predicted tie, 0 otherwise. Returns ``concordance`` (mean), ``exact`` (every pair
    right), ``n_pairs`` and both orders (strongest first).
    """
    arms = [a for a in predicted if a in strength and predicted[a] is not None]
    scores = []
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
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
    return {
        "rate_per_week": rate,
        "pooled_rate_per_week": pooled,
        "n_cases": {a: cases.get(a, 0) for a in ARMS},
        "fallback": [a for a in ARMS if weeks.get(a, 0) <= 0],
    }


def lesion_table(
    pred: np.ndarray, ref: np.ndarray, affine: np.ndarray, regions: np.ndarray | None = None
) -> dict[str, Any]:
    """Lesion-wise comparison of a forecast mask with a truth mask (same grid), with the scripts.lesions conventions.

    Returns tp/fp/fn, precision/recall/f1/dice as :func:`scripts.runtime.lesions.match_lesions`, plus per true lesion
    ``detected``, ``distance_mm`` (centroid to the nearest forecast lesion centroid, None without forecast lesion)
    and ``region``; per forecast lesion ``matched`` and ``region`` (regions when a region map is given).
    """
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if pred.shape != ref.shape:
        raise ValueError(f"forecast shape {pred.shape} differs from truth shape {ref.shape}")
    match = lesion_matching(pred, ref)
    n_pred, n_ref = match.matched.size, match.detected.size
    ref_c = lesion_centroids(match.ref_labels, n_ref, affine)
    pred_c = lesion_centroids(match.pred_labels, n_pred, affine)
    distances: list[float | None] = [None] * n_ref
    if n_pred:
        nearest = np.linalg.norm(ref_c[:, None, :] - pred_c[None, :, :], axis=-1).min(1)
        distances = [round(float(d), 3) for d in nearest]
    return {
        "tp": match.tp,
        "fp": match.fp,
        "fn": match.fn,
        "n_forecast_lesions": n_pred,
        "n_true_lesions": n_ref,
        "matched_forecast_lesions": int(match.matched.sum()),
        "precision": match.precision,
        "recall": match.recall,
        "f1": match.f1,
        "dice": dice(pred, ref),
        "true_lesions": [
            {
                "detected": bool(match.detected[i]),
                "distance_mm": distances[i],
                "centroid_mm": [round(float(c), 3) for c in ref_c[i]],
            }
            for i in range(n_ref)
        ],
        "forecast_lesions": [{"matched": bool(flag)} for flag in match.matched],
        **_regions_of(pred, ref, regions),
    }


def _regions_of(pred: np.ndarray, ref: np.ndarray, regions: np.ndarray | None) -> dict[str, list[str]]:
    if regions is None:
        return {}
    return {"true_regions": lesion_regions(ref, regions), "forecast_regions": lesion_regions(pred, regions)}


PROBABILITY_CLIP = 1e-6
"""Probabilities are clipped to [PROBABILITY_CLIP, 1 - PROBABILITY_CLIP] before a log-likelihood."""


def _voxels(prob: np.ndarray, target: np.ndarray, where: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    prob, target = np.asarray(prob, np.float64), np.asarray(target, np.float64)
    if prob.shape != target.shape:
        raise ValueError(f"probability map shape {prob.shape} differs from target shape {target.shape}")
    if where is not None:
        prob, target = prob[np.asarray(where, bool)], target[np.asarray(where, bool)]
    if target.size and (target.min() < 0 or target.max() > 1):
        raise ValueError("targets must lie in [0, 1] (a mask, or the share of outcome draws with a lesion)")
    return prob.ravel(), target.ravel()


def _weighted_pairs(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each voxel as a positive of weight ``t`` and a negative of weight ``1 - t`` (zero weights dropped): labels,
    scores and scikit-learn ``sample_weight`` for a target in [0, 1]."""
    labels = np.concatenate([np.ones_like(t), np.zeros_like(t)])
    weights = np.concatenate([t, 1.0 - t])
    keep = weights > 0
    return labels[keep], np.concatenate([p, p])[keep], weights[keep]


def voxel_average_precision(prob: np.ndarray, target: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """Average precision of a voxel probability map against a target in [0, 1] on the voxels ``where``.

    A binary target is one realised NET2 mask; a fractional one (the share of independent outcome draws in which
    the voxel is NET2) scores the map against the outcome distribution: each voxel counts as a positive with weight
    ``target`` and as a negative with weight ``1 - target`` (scikit-learn's ``sample_weight``), which is the AP of
    the draws pooled. None without any positive.
    """
    p, t = _voxels(prob, target, where)
    if t.sum() <= 0:
        return None
    labels, scores, weights = _weighted_pairs(p, t)
    return float(average_precision_score(labels, scores, sample_weight=weights))


def voxel_auroc(prob: np.ndarray, target: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """Area under the ROC curve of a voxel probability map against a target in [0, 1] on the voxels ``where``:
    the probability that a lesion voxel scores above a background voxel (ties count half). A fractional target
    weighs each voxel as a positive by ``target`` and as a negative by ``1 - target``, as
    :func:`voxel_average_precision` does. None without both a positive and a negative."""
    p, t = _voxels(prob, target, where)
    if t.sum() <= 0 or (1.0 - t).sum() <= 0:
        return None
    labels, scores, weights = _weighted_pairs(p, t)
    return float(roc_auc_score(labels, scores, sample_weight=weights))


def bernoulli_log_likelihood(prob: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per voxel ``t log p + (1 - t) log(1 - p)`` of a target in [0, 1] (for a fractional target the expected
    log-likelihood of an outcome draw), probabilities clipped by :data:`PROBABILITY_CLIP`."""
    p = np.clip(np.asarray(prob, np.float64), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    t = np.asarray(target, np.float64)
    return t * np.log(p) + (1.0 - t) * np.log1p(-p)


def mean_log_likelihood(prob: np.ndarray, target: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """Mean :func:`bernoulli_log_likelihood` per voxel on ``where``; None on an empty domain."""
    p, t = _voxels(prob, target, where)
    if t.size == 0:
        return None
    return float(np.mean(bernoulli_log_likelihood(p, t)))


def mass_share(prob: np.ndarray, inside: np.ndarray) -> float | None:
    """Share of a probability map's total mass that lies on the voxels ``inside`` (None for an empty map), at most 1
    (a partial sum can exceed the total by its rounding)."""
    prob = np.asarray(prob, np.float64)
    total = prob.sum()
    return min(1.0, float(prob[np.asarray(inside, bool)].sum() / total)) if total > 0 else None


def lesion_voxel_counts(mask: np.ndarray) -> list[int]:
    """Voxels of each 26-connected lesion of a binary mask."""
    labels, n = label_lesions(mask)
    return np.bincount(labels.ravel(), minlength=n + 1)[1:].tolist() if n else []


def size_summary(sizes: Sequence[int]) -> dict[str, Any]:
    """Count, median and mean voxels, and share of single-voxel lesions, of pooled lesion sizes."""
    if not len(sizes):
        return {"lesions": 0, "median_voxels": None, "mean_voxels": None, "single_voxel_share": None}
    arr = np.asarray(sizes)
    return {
        "lesions": int(arr.size),
        "median_voxels": float(np.median(arr)),
        "mean_voxels": float(arr.mean()),
        "single_voxel_share": float((arr == 1).mean()),
    }


def lesion_sizes(masks: Iterable[np.ndarray]) -> dict[str, Any]:
    """:func:`size_summary` of the lesions of several binary masks, pooled."""
    return size_summary([s for mask in masks for s in lesion_voxel_counts(mask)])


PROBABILITY_BINS_PER_DECADE = 50
PROBABILITY_FLOOR = 1e-8
"""Pooled AP bins: bin 0 holds probabilities below the floor, then 50 log-spaced bins per decade up to 1."""


def probability_histogram(prob: np.ndarray, target: np.ndarray, where: np.ndarray | None = None) -> list[list[float]]:
    """Positive and negative weight of the voxels ``where`` per probability bin, as sparse ``[bin, positive,
    negative]`` rows (a fractional target counts ``t`` positive and ``1 - t`` negative): enough to pool the AP of
    many cases without keeping their voxels."""
    p, t = _voxels(prob, target, where)
    decades = -math.log10(PROBABILITY_FLOOR)
    index = np.where(
        p < PROBABILITY_FLOOR,
        0,
        1 + np.floor((np.log10(np.maximum(p, PROBABILITY_FLOOR)) + decades) * PROBABILITY_BINS_PER_DECADE),
    ).astype(np.int64)
    index = np.minimum(index, int(decades * PROBABILITY_BINS_PER_DECADE))
    positive = np.bincount(index, weights=t)
    negative = np.bincount(index, weights=1.0 - t)
    return [[int(i), float(positive[i]), float(negative[i])] for i in np.flatnonzero(positive + negative)]


def histogram_average_precision(histograms: Iterable[Sequence[Sequence[float]]]) -> float | None:
    """Average precision of :func:`probability_histogram` rows summed over cases (ties within a bin share one
    threshold, as scikit-learn treats equal scores); None without any positive."""
    positive: dict[int, float] = {}
    negative: dict[int, float] = {}
    for rows in histograms:
        for i, pos, neg in rows:
            positive[int(i)] = positive.get(int(i), 0.0) + pos
            negative[int(i)] = negative.get(int(i), 0.0) + neg
    bins = sorted(positive, reverse=True)
    pos = np.array([positive[i] for i in bins])
    neg = np.array([negative[i] for i in bins])
    if pos.sum() <= 0:
        return None
    precision = np.cumsum(pos) / np.maximum(np.cumsum(pos + neg), 1e-300)
    return float(np.sum(precision * pos) / pos.sum())
