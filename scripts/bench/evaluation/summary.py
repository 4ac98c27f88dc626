"""Aggregation of the per-case records of the evaluation into the sections of ``metrics.json``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scripts.bench.evaluation.conventions import DISTANCE_MM, NOT_APPLICABLE
from scripts.bench.evaluation.location import ORACLE
from scripts.bench.evaluation.scores import (
    ReliabilityAccumulator,
    activity_metrics,
    count_metrics,
    histogram_average_precision,
    interval_coverage,
    mean_or_none,
    ranking_agreement,
    size_summary,
)
from scripts.runtime.constants import ARMS
from scripts.runtime.regions import REGIONS


def pooled_detection(tables: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
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
    return {
        "true_lesions": n_true,
        "forecast_lesions": n_pred,
        "tp": tp,
        "fp": n_pred - matched,
        "fn": n_true - tp,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def location_summary(tables: Sequence[Mapping[str, Any]], distance_mm: float) -> dict[str, Any]:
    lesions = [les for t in tables for les in t["true_lesions"]]
    distances = [les["distance_mm"] for les in lesions if les["distance_mm"] is not None]
    by_region: dict[str, dict[str, Any]] = {}
    for region in REGIONS:
        true = [
            les
            for t in tables
            for les, r in zip(t["true_lesions"], t.get("true_regions", []), strict=True)
            if r == region
        ]
        forecast = [
            les
            for t in tables
            for les, r in zip(t["forecast_lesions"], t.get("forecast_regions", []), strict=True)
            if r == region
        ]
        detected = sum(les["detected"] for les in true)
        matched = sum(les["matched"] for les in forecast)
        by_region[region] = {
            "true_lesions": len(true),
            "detected": detected,
            "recall": detected / len(true) if true else None,
            "forecast_lesions": len(forecast),
            "matched": matched,
            "precision": matched / len(forecast) if forecast else None,
        }
    return {
        "true_lesions": len(lesions),
        "true_lesions_with_forecast_lesion": len(distances),
        "distance_mm_median": float(np.median(distances)) if distances else None,
        "distance_mm_mean": float(np.mean(distances)) if distances else None,
        "within_mm": distance_mm,
        "share_within": sum(d <= distance_mm for d in distances) / len(lesions) if lesions else None,
        "detection_by_region": by_region,
    }


def summarize_factual(
    records: Sequence[Mapping[str, Any]],
    method: str,
    calibration: ReliabilityAccumulator | None = None,
    distance_mm: float = DISTANCE_MM,
) -> dict[str, Any]:
    """Factual-arm metrics of ``method`` over case records (see :meth:`Evaluator.results` for the layout)."""
    rows = [(r, r["methods"][method]) for r in records if method in r.get("methods", {})]
    notes: dict[str, str] = {}
    out: dict[str, Any] = {"n_cases": len(rows), "n_active": sum(bool(r["active"]) for r, _ in rows)}
    true = [r["true_count"] for r, _ in rows]
    counts = count_metrics([m["expected_count"] for _, m in rows], true)
    notes.update({f"count_{k}": v for k, v in counts.pop("notes").items()})
    out.update(
        count_mae=counts["mae"],
        count_bias=counts["bias"],
        count_spearman=counts["spearman"],
        mean_true_count=mean_or_none(true),
        mean_expected_count=mean_or_none(m["expected_count"] for _, m in rows),
    )
    intervals = [m.get("interval_90") for _, m in rows]
    out["interval_coverage_90"] = interval_coverage(intervals, true)
    if out["interval_coverage_90"] is None:
        notes["interval_coverage_90"] = NOT_APPLICABLE + "no count interval" if rows else "no case"
    activity = activity_metrics([m["p_active"] for _, m in rows], [r["active"] for r, _ in rows])
    notes.update(activity.pop("notes"))
    out.update(
        auc=activity["auc"],
        average_precision=activity["average_precision"],
        balanced_accuracy=activity["balanced_accuracy"],
    )
    tables = [m["lesions"] for _, m in rows if "lesions" in m]
    if tables:
        dice_all = [t["dice"] for t in tables]
        dice_active = [t["dice"] for t in tables if t["n_true_lesions"] > 0]
        out["dice_active"] = mean_or_none(dice_active)
        if out["dice_active"] is None:
            notes["dice_active"] = "no active case"
        out["dice_all"] = mean_or_none(dice_all)
        pooled = pooled_detection(tables)
        out.update(
            lesion_precision=pooled["precision"],
            lesion_recall=pooled["recall"],
            lesion_f1=pooled["f1"],
            lesion_f1_case_mean=mean_or_none(t["f1"] for t in tables),
            lesion_counts=pooled,
            location=location_summary(tables, distance_mm),
        )
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
        pooled = pooled_detection(sample_tables)
        out.update(
            sample_lesion_precision=pooled["precision"],
            sample_lesion_recall=pooled["recall"],
            sample_lesion_f1=pooled["f1"],
            sample_lesion_counts=pooled,
        )
    else:
        for key in ("sample_lesion_precision", "sample_lesion_recall", "sample_lesion_f1"):
            out[key] = None
            notes[key] = NOT_APPLICABLE + "no forecast samples" if rows else "no case"
    geds = [m["ged"] for _, m in rows if m.get("ged") is not None]
    out["ged_mean"] = mean_or_none(geds)
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
            "mean_predicted_count": mean_or_none(pred),
            "mean_true_expected_count": mean_or_none(true),
            "mean_true_count": mean_or_none(c["true_count"] for c in cells),
            "count_mae": mean_or_none(abs(p - t) for p, t in zip(pred, true, strict=True)),
            "count_bias": mean_or_none(p - t for p, t in zip(pred, true, strict=True)),
            "ratio_n": len(ratio),
            "mean_predicted_ratio": mean_or_none(c["predicted_ratio"] for c in ratio),
            "mean_true_ratio": mean_or_none(c["true_ratio"] for c in cells if c.get("true_ratio") is not None),
            "ratio_mae": mean_or_none(abs(c["predicted_ratio"] - c["true_ratio"]) for c in ratio),
            "mean_predicted_difference": mean_or_none(c["predicted_difference"] for c in diff),
            "mean_true_difference": mean_or_none(c["true_difference"] for c in diff),
            "difference_mae": mean_or_none(abs(c["predicted_difference"] - c["true_difference"]) for c in diff),
            "ratio_bias": mean_or_none(c["predicted_ratio"] - c["true_ratio"] for c in ratio),
            "difference_bias": mean_or_none(c["predicted_difference"] - c["true_difference"] for c in diff),
            "dice_mean": mean_or_none(c.get("dice") for c in cells),
            "lesion_f1_mean": mean_or_none(c.get("f1") for c in cells),
            "ged_mean": mean_or_none(c.get("ged") for c in cells),
        }
    counts = count_metrics(pairs_pred, pairs_true)
    out["all_arms"] = {
        "n_case_arms": counts["n"],
        "count_mae": counts["mae"],
        "count_bias": counts["bias"],
        "count_spearman": counts["spearman"],
        "notes": counts["notes"],
    }
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
        "case_mean_concordance": mean_or_none(r["concordance"] for r in ranked),
        "share_exactly_ranked": mean_or_none(float(r["exact"]) for r in ranked),
        "cohort": cohort,
    }
    return out


def case_summary(record: Mapping[str, Any]) -> dict[str, Any]:
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
            entry.update(
                {k: t[k] for k in ("dice", "tp", "fp", "fn", "precision", "recall", "f1", "n_forecast_lesions")}
            )
            entry["distances_mm"] = [les["distance_mm"] for les in t["true_lesions"]]
            entry["true_regions"] = t.get("true_regions")
            entry["detected"] = [les["detected"] for les in t["true_lesions"]]
        methods[method] = entry
    out["methods"] = methods
    if record.get("counterfactual"):
        out["counterfactual"] = record["counterfactual"]
    return out


def ratios_to_oracle(located: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    """AP of map ``name`` over the location oracle's AP, against the realised mask (``truth``) and against the
    outcome draws (``outcomes``), within case (ratio of the means over cases) and pooled, each on the cases where
    both maps were scored against that target (``n_truth``, ``n_outcomes``; the within-case ratio leaves out the
    cases whose AP is undefined, without a lesion), so that a map scored on fewer cases is not set against
    the oracle's figure on others."""
    out: dict[str, Any] = {}
    for target in ("truth", "outcomes"):
        ap, histogram = f"ap_{target}", f"histogram_{target}"
        pairs = [
            (r["location"]["methods"][name], r["location"]["methods"][ORACLE])
            for r in located
            if name in r["location"]["methods"] and ORACLE in r["location"]["methods"]
        ]
        pooled = [(m, o) for m, o in pairs if histogram in m and histogram in o]  # empty cases count here
        pairs = [(m, o) for m, o in pairs if m.get(ap) is not None and o.get(ap) is not None]
        mean_m, mean_o = mean_or_none(m[ap] for m, _ in pairs), mean_or_none(o[ap] for _, o in pairs)
        pooled_m = histogram_average_precision(m[histogram] for m, _ in pooled) if pooled else None
        pooled_o = histogram_average_precision(o[histogram] for _, o in pooled) if pooled else None
        out[f"{ap}_mean"] = mean_m / mean_o if mean_m is not None and mean_o else None
        out[f"{ap}_pooled"] = pooled_m / pooled_o if pooled_m is not None and pooled_o else None
        out[f"n_{target}"] = len(pooled)
    return out


def summarize_location(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``spatial`` section of ``metrics.json``, where each map puts its probability: per map the within-case
    AP (mean over cases), the pooled log-likelihood per voxel, the mass outside the domain and by tissue and region
    (means over cases) and AP ratios to the location oracle; the pooled sizes of sampled and true lesions."""
    located = [r for r in records if r.get("location")]
    methods: dict[str, Any] = {}
    names = list(dict.fromkeys(m for r in located for m in r["location"]["methods"]))
    for name in names:
        cells = [r["location"]["methods"][name] for r in located if name in r["location"]["methods"]]
        voxels = sum(c["voxels"] for c in cells)
        ll_truth = sum(c["ll_truth_sum"] for c in cells) / voxels if voxels else None
        entry: dict[str, Any] = {
            "n_cases": len(cells),
            "ap_truth_mean": mean_or_none(c["ap_truth"] for c in cells),
            "ap_truth_pooled": histogram_average_precision(
                c["histogram_truth"] for c in cells if "histogram_truth" in c
            ),
            "auroc_truth_mean": mean_or_none(c.get("auroc_truth") for c in cells),
            "ll_truth_per_voxel": ll_truth,
            "mass_outside_domain_mean": mean_or_none(c["mass_outside_domain"] for c in cells),
        }
        with_outcomes = [c for c in cells if "ap_outcomes" in c]
        if with_outcomes:
            n = sum(c["voxels"] for c in with_outcomes)
            entry["n_cases_outcomes"] = len(with_outcomes)
            entry["ap_outcomes_mean"] = mean_or_none(c["ap_outcomes"] for c in with_outcomes)
            entry["auroc_outcomes_mean"] = mean_or_none(c.get("auroc_outcomes") for c in with_outcomes)
            entry["ap_outcomes_pooled"] = histogram_average_precision(
                c["histogram_outcomes"] for c in with_outcomes if "histogram_outcomes" in c
            )
            entry["ll_outcomes_per_voxel"] = sum(c["ll_outcomes_sum"] for c in with_outcomes) / n if n else None
        for group in ("mass_by_tissue", "mass_by_region"):
            keys = list(dict.fromkeys(k for c in cells for k in c.get(group, {})))
            if keys:
                entry[group] = {k: mean_or_none(c[group].get(k) for c in cells if group in c) for k in keys}
        methods[name] = entry
    if ORACLE in methods:
        for name, entry in methods.items():
            entry["ap_ratio_to_oracle"] = ratios_to_oracle(located, name)
    domains = sorted({r["location"]["domain"] for r in located})
    sizes = {
        kind: size_summary([s for r in records for s in r.get("lesion_sizes", {}).get(kind, [])])
        for kind in ("sampled", "true")
    }
    out = {"n_cases": len(located), "domain": domains, "methods": methods, "lesion_sizes": sizes}
    ceiling = [r["location"]["oracle_sample_lesions"] for r in located if "oracle_sample_lesions" in r["location"]]
    if ceiling:
        out["oracle_sample_lesions"] = {
            **pooled_detection(ceiling),
            "n_cases": len(ceiling),
            "n_samples": sum(t["n_samples"] for t in ceiling),
        }
    return out
