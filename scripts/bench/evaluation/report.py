"""``report.md``: the Markdown rendering of ``metrics.json``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scripts.bench.evaluation.conventions import BASELINE_DESCRIPTIONS, METHOD_LABELS, NOT_APPLICABLE


def fmt(value: Any, digits: int = 2, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and not percent:
        return str(value)
    text = f"{100 * float(value):.0f}" if percent else f"{float(value):.{digits}f}"
    if float(text) == 0:  # a rounding residue (1 - 1.0000000000000002) is no negative figure
        text = text.lstrip("-")
    return f"{text}%" if percent else text


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(m: Mapping[str, Any], key: str, digits: int = 2, percent: bool = False) -> str:
    """A table cell: the value, "n/a" where the method cannot have it, "–" where it is undefined."""
    if m.get(key) is None and str(m.get("notes", {}).get(key, "")).startswith(NOT_APPLICABLE):
        return "n/a"
    return fmt(m.get(key), digits, percent)


def _undefined_notes(sections: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    """ "method: metric: reason" for every undefined (not merely inapplicable) entry."""
    return [
        f"{label}: {key.replace('_', ' ')} {reason}"
        for label, m in sections
        for key, reason in m.get("notes", {}).items()
        if not str(reason).startswith(NOT_APPLICABLE) and reason != "no case"
    ]


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
    out = [
        f"- Count: the expected NET2 count differs from the observed count by {fmt(o['count_mae'])} lesions on "
        f"average (mean true count {fmt(o['mean_true_count'])}, mean expected {fmt(o['mean_expected_count'])})."
    ]
    if o.get("interval_coverage_90") is not None:
        out.append(
            f"- Uncertainty: the 90% interval holds the observed count in "
            f"{fmt(o['interval_coverage_90'], percent=True)} of cases (90% expected if well calibrated)."
        )
    if o.get("auc") is not None:
        out.append(
            f"- Activity: P(at least one NET2 lesion) separates active from inactive patients with AUC "
            f"{fmt(o['auc'])} (0.5 = chance, 1 = perfect)."
        )
    if o.get("dice_active") is not None:
        out.append(
            f"- Segmentation: mean Dice {fmt(o['dice_active'])} on active cases; lesion-wise recall "
            f"{fmt(o.get('lesion_recall'))}, precision {fmt(o.get('lesion_precision'))}."
        )
    cf = metrics.get("counterfactual", {})
    rank = cf.get("ranking", {}).get("cohort", {})
    if cf.get("available") and rank.get("concordance") is not None:
        out.append(
            f"- Treatment effects (synthetic truth): {fmt(rank['concordance'], percent=True)} of arm pairs "
            "are ordered like their true efficacies over the cohort."
        )
    return [*out, ""]


def _baselines_section(metrics: Mapping[str, Any]) -> list[str]:
    """Report lines describing the baselines and the population rates."""
    lines = ["## Baselines", ""]
    for method, section in metrics["baselines"].items():
        state = "included" if section.get("available") else section.get("note", "not available")
        lines.append(f"- **{section['label']}**: {BASELINE_DESCRIPTIONS[method]}. {state[0].upper() + state[1:]}.")
    lines.append("")
    rates = metrics["baselines"].get("population", {}).get("rates")
    if rates:
        lines += [
            f"Population rates from {rates.get('n_training_cases', 0)} training case(s):",
            "",
            _table(
                ["arm", "training cases", "NET2 lesions per 24 weeks"],
                [
                    [
                        arm,
                        fmt(rates["n_cases"][arm]),
                        fmt(24 * rate) + (" (pooled: no training case)" if arm in rates["fallback"] else ""),
                    ]
                    for arm, rate in rates["rate_per_week"].items()
                ],
            ),
            "",
        ]
    return lines


def _interval(values: Sequence[float] | None) -> str:
    return "–" if not values else f"{fmt(values[0])} to {fmt(values[1])}"


def _comparisons_section(metrics: Mapping[str, Any]) -> list[str]:
    """Report lines: the diffusion model against each baseline, paired over the same cases, with bootstrap CIs."""
    comparisons = {m: c for m, c in metrics.get("comparisons", {}).items() if c.get("n_cases")}
    if not comparisons:
        return []
    first = next(iter(comparisons.values()))
    return [
        "Diffusion model minus baseline on the same cases (95% paired-bootstrap interval, "
        f"{first['n_resamples']} resamples of the cases; 'better' = share of resamples in which the diffusion "
        "model is better). A count MAE difference below 0 and an AUC difference above 0 favour the diffusion "
        "model; an interval that excludes 0 is a difference this cohort resolves.",
        "",
        _table(
            [
                "baseline",
                "n",
                "count MAE difference (lesions)",
                "95% interval",
                "better",
                "activity AUC difference",
                "95% interval",
                "better",
            ],
            [
                [
                    metrics["baselines"][m]["label"],
                    fmt(c["n_cases"]),
                    fmt(c.get("mae_difference")),
                    _interval(c.get("mae_difference_ci95")),
                    fmt(c.get("mae_share_better"), percent=True),
                    fmt(c.get("auc_difference")),
                    _interval(c.get("auc_difference_ci95")),
                    fmt(c.get("auc_share_better"), percent=True),
                ]
                for m, c in comparisons.items()
            ],
        ),
        "",
    ]


def _spatial_section(metrics: Mapping[str, Any]) -> list[str]:
    """Where each probability map puts its mass, against the generator's location oracle where there is one."""
    sp = metrics.get("spatial") or {}
    if not sp.get("n_cases"):
        return []
    labels = {
        **METHOD_LABELS,
        "location_oracle": "location oracle: generator's true probability given the past",
        "region_prior": "region prior: generator's region weights only",
    }
    rows, fit_rows, region_rows = [], [], []
    regions = list(dict.fromkeys(k for m in sp["methods"].values() for k in (m.get("mass_by_region") or {})))
    for name, m in sp["methods"].items():
        ratio = m.get("ap_ratio_to_oracle") or {}
        tissue = m.get("mass_by_tissue") or {}
        rows.append(
            [
                labels.get(name, name),
                fmt(m["n_cases"]),
                fmt(m.get("ap_truth_mean"), 4),
                fmt(m.get("ap_truth_pooled"), 4),
                fmt(ratio.get("ap_truth_mean")),
                fmt(ratio.get("ap_truth_pooled")),
                fmt(m.get("n_cases_outcomes")),
                fmt(m.get("ap_outcomes_mean"), 4),
                fmt(m.get("ap_outcomes_pooled"), 4),
                fmt(ratio.get("ap_outcomes_mean")),
                fmt(ratio.get("ap_outcomes_pooled")),
            ]
        )
        fit_rows.append(
            [
                labels.get(name, name),
                fmt(m.get("auroc_truth_mean"), 3),
                fmt(m.get("auroc_outcomes_mean"), 3),
                fmt(m.get("ll_truth_per_voxel"), 5),
                fmt(m.get("ll_outcomes_per_voxel"), 5),
                fmt(m.get("mass_outside_domain_mean"), percent=True),
                fmt(tissue.get("white_matter"), percent=True),
                fmt(tissue.get("cortical_gm"), percent=True),
            ]
        )
        by_region = m.get("mass_by_region") or {}
        region_rows.append(
            [
                labels.get(name, name),
                *(fmt(by_region.get(r), percent=True) for r in regions),
                fmt(1.0 - sum(v for v in by_region.values() if v is not None), percent=True) if by_region else "–",
            ]
        )
    sizes = sp["lesion_sizes"]

    def size_text(kind: str) -> str:
        s = sizes[kind]
        return (
            f"median {fmt(s['median_voxels'], 1)} voxels, {fmt(s['single_voxel_share'], percent=True)} single "
            f"voxels ({s['lesions']} lesions)"
        )

    lines = [
        "## Where the probability lies",
        "",
        f"Factual arm, {sp['n_cases']} case(s); domain: {'; '.join(sp['domain'])}. AP: voxel average precision "
        "of the map on the domain, within case (mean of the cases' APs, cases without a lesion left out) and pooled "
        "over the cases, against the realised NET2 mask and against the share of independent outcome draws with a "
        "lesion (when the cohort holds them; n with outcome draws: the cases scored so). Ratios to the location "
        "oracle's AP are taken on the cases both maps were scored on.",
        "",
        _table(
            [
                "map",
                "n",
                "AP vs truth, within case",
                "AP vs truth, pooled",
                "ratio to oracle, within case",
                "ratio to oracle, pooled",
                "n with outcome draws",
                "AP vs outcome draws, within case",
                "AP vs outcome draws, pooled",
                "ratio to oracle, within case",
                "ratio to oracle, pooled",
            ],
            rows,
        ),
        "",
        "Ranking, fit and mass: AUROC, within-case voxel AUROC on the domain (mean over cases); LL, mean "
        "log-likelihood per domain voxel (probabilities clipped at 1e-6); mass, share of the map's total probability "
        "(means over cases).",
        "",
        _table(
            [
                "map",
                "AUROC vs truth, within case",
                "AUROC vs outcome draws, within case",
                "LL vs truth",
                "LL vs outcome draws",
                "mass outside domain",
                "mass in white matter",
                "mass in cortex",
            ],
            fit_rows,
        ),
        "",
    ]
    if regions:
        lines += [
            "Share of each map's probability mass by region (region map of the case's images; the rest lies "
            "outside every region):",
            "",
            _table(["map", *(r.replace("_", " ") for r in regions), "elsewhere"], region_rows),
            "",
        ]
    lines += [
        f"Lesion sizes: sampled lesions (diffusion model, working grid) {size_text('sampled')}; true lesions "
        f"{size_text('true')}.",
        "",
    ]
    ceiling = sp.get("oracle_sample_lesions")
    if ceiling:
        lines += [
            f"Per-sample lesion detection of the oracle (the cohort's {ceiling['n_samples']} outcome draws of "
            f"{ceiling['n_cases']} case(s) scored as samples against the realised mask): precision "
            f"{fmt(ceiling['precision'], 3)}, recall {fmt(ceiling['recall'], 3)}, F1 {fmt(ceiling['f1'], 3)} "
            f"({ceiling['tp']} of {ceiling['true_lesions']} true lesion instances hit by "
            f"{ceiling['forecast_lesions']} drawn lesions): the ceiling of the per-sample lesion F1 on this "
            "bench.",
            "",
        ]
    return lines


TARGETS = {
    "mass_outside_parenchyma": 0.02,
    "white_matter_points": 0.10,
    "ap_ratio_outcomes": 0.7,
    "auroc": 0.80,
    "median_volume_relative": 0.30,
    "single_voxel_points": 0.10,
    "mae_ratio_to_reference": 1.1,
    "auc_below_reference": 0.02,
    "arm_mean_relative": 0.10,
    "rate_ratio_difference": 0.05,
    "coverage": (0.85, 0.95),
}
"""The model's targets on the bench (fixed before any test-cohort run; see ``bundle/docs/evaluation.md``)."""


def _met(value: bool | None) -> str:
    return "–" if value is None else ("**met**" if value else "not met")


def _worst(values: Mapping[str, float | None]) -> tuple[str | None, float | None]:
    kept = {k: v for k, v in values.items() if v is not None}
    if not kept:
        return None, None
    arm = max(kept, key=lambda k: abs(kept[k]))
    return arm, kept[arm]


def _targets_section(metrics: Mapping[str, Any]) -> list[str]:
    """Each target of the model on this bench with the measured figure and whether it is met."""
    o = metrics["overall"]
    if not o.get("n_cases"):
        return []
    t = TARGETS
    rows: list[list[str]] = []
    spatial = metrics.get("spatial") or {}
    model = (spatial.get("methods") or {}).get("diffusion") or {}
    oracle = (spatial.get("methods") or {}).get("location_oracle") or {}
    if model:
        outside = model.get("mass_outside_domain_mean")
        rows.append(
            [
                "share of the probability mass outside the parenchyma",
                fmt(outside, percent=True),
                f"<= {fmt(t['mass_outside_parenchyma'], percent=True)}",
                _met(None if outside is None else outside <= t["mass_outside_parenchyma"]),
            ]
        )
        wm = (model.get("mass_by_tissue") or {}).get("white_matter")
        wm_oracle = (oracle.get("mass_by_tissue") or {}).get("white_matter")
        gap = None if wm is None or wm_oracle is None else wm - wm_oracle
        rows.append(
            [
                "white-matter share of the mass, against the location oracle's",
                f"{fmt(wm, percent=True)} vs {fmt(wm_oracle, percent=True)}",
                f"within {fmt(t['white_matter_points'] * 100, 0)} points",
                _met(None if gap is None else abs(gap) <= t["white_matter_points"]),
            ]
        )
        ratio = (model.get("ap_ratio_to_oracle") or {}).get("ap_outcomes_mean")
        rows.append(
            [
                "voxel AP against the outcome draws, within case, ratio to the location oracle's",
                fmt(ratio),
                f">= {fmt(t['ap_ratio_outcomes'], 1)}",
                _met(None if ratio is None else ratio >= t["ap_ratio_outcomes"]),
            ]
        )
        auroc = model.get("auroc_truth_mean")
        rows.append(
            [
                "within-case voxel AUROC (against the realised mask)",
                fmt(auroc),
                f">= {fmt(t['auroc'])} (location oracle {fmt(oracle.get('auroc_truth_mean'))})",
                _met(None if auroc is None else auroc >= t["auroc"]),
            ]
        )
        sizes = spatial.get("lesion_sizes") or {}
        sampled, true = sizes.get("sampled") or {}, sizes.get("true") or {}
        median_s, median_t = sampled.get("median_voxels"), true.get("median_voxels")
        single_s, single_t = sampled.get("single_voxel_share"), true.get("single_voxel_share")
        ok = None
        if None not in (median_s, median_t, single_s, single_t) and median_t:
            ok = (
                abs(median_s / median_t - 1) <= t["median_volume_relative"]
                and abs(single_s - single_t) <= t["single_voxel_points"]
            )
        rows.append(
            [
                "sampled lesions: median volume; share of single-voxel lesions (true lesions)",
                f"{fmt(median_s, 1)} voxels, {fmt(single_s, percent=True)} "
                f"({fmt(median_t, 1)} voxels, {fmt(single_t, percent=True)})",
                f"within {fmt(t['median_volume_relative'], percent=True)} and "
                f"{fmt(t['single_voxel_points'] * 100, 0)} points",
                _met(ok),
            ]
        )
    counts = o.get("lesion_counts") or {}
    if counts:
        rows.append(
            [
                "forecast mask (voxels at least half of the samples hold): what it holds",
                f"{counts.get('forecast_lesions', 0)} lesions over {o['n_cases']} cases, "
                f"{counts.get('tp', 0)} of {counts.get('true_lesions', 0)} true lesions hit",
                "the lesions most samples agree on",
                "–",
            ]
        )
    baselines = metrics.get("baselines") or {}
    reference = (baselines.get("reference") or {}).get("overall") or {}
    if reference.get("count_mae"):
        ratio = o["count_mae"] / reference["count_mae"] if o.get("count_mae") is not None else None
        rows.append(
            [
                "factual count MAE, ratio to the observable reference's",
                f"{fmt(ratio)} ({fmt(o.get('count_mae'))} vs {fmt(reference['count_mae'])})",
                f"<= {fmt(t['mae_ratio_to_reference'], 1)}",
                _met(None if ratio is None else ratio <= t["mae_ratio_to_reference"]),
            ]
        )
    if reference.get("auc") is not None and o.get("auc") is not None:
        rows.append(
            [
                "activity AUC, against the observable reference's",
                f"{fmt(o['auc'])} vs {fmt(reference['auc'])}",
                f">= reference - {fmt(t['auc_below_reference'])}",
                _met(o["auc"] >= reference["auc"] - t["auc_below_reference"]),
            ]
        )
    regression = (metrics.get("comparisons") or {}).get("regression") or {}
    mae_ci, auc_ci = regression.get("mae_difference_ci95"), regression.get("auc_difference_ci95")
    if mae_ci and auc_ci:
        not_worse = mae_ci[0] <= 0 and auc_ci[1] >= 0
        better = mae_ci[1] < 0 or auc_ci[0] > 0
        rows.append(
            [
                "against the negative-binomial regression (paired 95% intervals of model minus regression)",
                f"MAE {fmt(regression.get('mae_difference'))} ({_interval(mae_ci)}), "
                f"AUC {fmt(regression.get('auc_difference'))} ({_interval(auc_ci)})",
                "not worse on count MAE and AUC, better on one",
                _met(not_worse and better),
            ]
        )
    cf = metrics.get("counterfactual") or {}
    per_arm = cf.get("per_arm") or {}
    if per_arm:
        relative = {
            arm: (a["mean_predicted_count"] / a["mean_true_expected_count"] - 1)
            if a.get("mean_predicted_count") is not None and a.get("mean_true_expected_count")
            else None
            for arm, a in per_arm.items()
        }
        arm, worst = _worst(relative)
        rows.append(
            [
                "cohort mean forecast count per arm, against the true mean",
                f"worst {arm}: {'+' if (worst or 0) > 0 else ''}{fmt(worst, percent=True)}",
                f"every arm within {fmt(t['arm_mean_relative'], percent=True)}",
                _met(
                    None
                    if worst is None
                    else all(abs(v) <= t["arm_mean_relative"] for v in relative.values() if v is not None)
                ),
            ]
        )
        gaps = {
            arm: a["cohort_rate_ratio_predicted"] - a["cohort_rate_ratio_true"]
            for arm, a in per_arm.items()
            if arm != "placebo"
            and a.get("cohort_rate_ratio_predicted") is not None
            and a.get("cohort_rate_ratio_true") is not None
        }
        arm, worst = _worst(gaps)
        if arm is not None:
            a = per_arm[arm]
            rows.append(
                [
                    "cohort rate ratio against placebo, per arm",
                    f"worst {arm}: {fmt(a['cohort_rate_ratio_predicted'])} vs {fmt(a['cohort_rate_ratio_true'])}",
                    f"every arm within {fmt(t['rate_ratio_difference'])}",
                    _met(all(abs(v) <= t["rate_ratio_difference"] for v in gaps.values())),
                ]
            )
    coverage = o.get("interval_coverage_90")
    low, high = t["coverage"]
    rows.append(
        [
            "90% count interval coverage",
            fmt(coverage, percent=True),
            f"{fmt(low, percent=True)}-{fmt(high, percent=True)}",
            _met(None if coverage is None else low <= coverage <= high),
        ]
    )
    return [
        "## Against the model's targets",
        "",
        "The targets the model is judged by on this bench, set before the test cohort was forecast (speed and memory "
        "are in `bundle/docs/performance.md`). Location figures are on the factual arm, within case, means over "
        "cases; per-arm figures over the counterfactual truth of every case.",
        "",
        _table(["figure", "measured", "target", ""], rows),
        "",
    ]


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
    lines += _targets_section(metrics)
    if s.get("failed_cases"):
        lines += ["**Failed cases (not evaluated):**", "", *[f"- {f}" for f in s["failed_cases"]], ""]
    lines += [
        "## Factual forecasts: all cases",
        "",
        "Each case's forecast under the treatment it received, against the observed NET2 mask.",
        "",
    ]
    sections = _method_sections(metrics)
    lines.append(
        _table(
            [
                "method",
                "n",
                "Dice, active cases (0-1)",
                "Dice, all cases (0-1)",
                "lesion precision",
                "lesion recall",
                "lesion F1",
                "count MAE (lesions)",
                "count Spearman",
                "90% interval coverage (nominal 90%)",
            ],
            [
                [
                    label,
                    fmt(m["n_cases"]),
                    _cell(m, "dice_active"),
                    _cell(m, "dice_all"),
                    _cell(m, "lesion_precision"),
                    _cell(m, "lesion_recall"),
                    _cell(m, "lesion_f1"),
                    _cell(m, "count_mae"),
                    _cell(m, "count_spearman"),
                    _cell(m, "interval_coverage_90", percent=True),
                ]
                for label, m in sections
            ],
        )
    )
    lines += [
        "",
        _table(
            [
                "method",
                "activity AUC",
                "activity average precision",
                "balanced accuracy (P >= 0.5)",
                "voxel ECE (0-1)",
                "GED (0-2)",
                "lesion precision, per sample",
                "lesion recall, per sample",
                "lesion F1, per sample",
            ],
            [
                [
                    label,
                    _cell(m, "auc"),
                    _cell(m, "average_precision"),
                    _cell(m, "balanced_accuracy"),
                    _cell(m, "ece", 4),
                    _cell(m, "ged_mean"),
                    _cell(m, "sample_lesion_precision"),
                    _cell(m, "sample_lesion_recall"),
                    _cell(m, "sample_lesion_f1"),
                ]
                for label, m in sections
            ],
        ),
        "",
        "Per sample: every sampled forecast mask against the observed mask, lesion-wise, pooled over samples and "
        "cases (the deterministic network's one mask counts as one sample); the columns 'lesion precision/recall/"
        "F1' above score the forecast mask (voxels with probability >= 0.5).",
        "",
    ]
    lines += ["n/a: the method does not produce this (e.g. no lesion mask for the count-only baselines).", ""]
    notes = _undefined_notes(sections)
    if not o["n_cases"]:
        lines += ["No case with an observed outcome was evaluated.", ""]
    if notes:
        lines += ["Undefined entries (–): " + "; ".join(notes) + ".", ""]
    not_provided = [
        f"{sec['label']}: {sec.get('note')}" for sec in metrics["baselines"].values() if not sec.get("available")
    ]
    if not_provided:
        lines += ["Baselines not in the tables: " + "; ".join(not_provided) + ".", ""]
    lines += _comparisons_section(metrics)
    lines += _images(metrics, ("count_scatter", "expected vs true NET2 count"), ("roc", "ROC of P(active)"))

    lines += ["## Factual forecasts by treatment arm (diffusion model)", ""]
    if metrics["per_arm"]:
        lines.append(
            _table(
                [
                    "arm",
                    "n",
                    "active",
                    "mean true count (lesions)",
                    "mean expected count (lesions)",
                    "count MAE (lesions)",
                    "90% coverage",
                    "Dice, active cases",
                    "lesion F1",
                    "AUC",
                    "ECE",
                ],
                [
                    [
                        arm,
                        fmt(m["n_cases"]),
                        fmt(m["n_active"]),
                        fmt(m.get("mean_true_count")),
                        fmt(m.get("mean_expected_count")),
                        fmt(m.get("count_mae")),
                        fmt(m.get("interval_coverage_90"), percent=True),
                        fmt(m.get("dice_active")),
                        fmt(m.get("lesion_f1")),
                        fmt(m.get("auc")),
                        fmt(m.get("ece"), 4),
                    ]
                    for arm, m in metrics["per_arm"].items()
                ],
            )
        )
        lines.append("")
    else:
        lines += ["No evaluated case.", ""]

    lines += _spatial_section(metrics)
    loc = o.get("location")
    lines += ["## Location", ""]
    if loc:
        lines += [
            f"{loc['true_lesions']} true NET2 lesion(s); {loc['true_lesions_with_forecast_lesion']} in cases with a "
            f"forecast lesion. Distance from a true lesion's centre to the nearest forecast lesion's centre: median "
            f"{fmt(loc['distance_mm_median'], 1)} mm, mean {fmt(loc['distance_mm_mean'], 1)} mm; "
            f"{fmt(loc['share_within'], percent=True)} of true lesions have a forecast lesion within "
            f"{loc['within_mm']:g} mm. Detection by region (lesion-wise, pooled over cases):",
            "",
            _table(
                ["region", "true lesions", "detected", "recall", "forecast lesions", "matched", "precision"],
                [
                    [
                        r.replace("_", " "),
                        fmt(v["true_lesions"]),
                        fmt(v["detected"]),
                        fmt(v["recall"]),
                        fmt(v["forecast_lesions"]),
                        fmt(v["matched"]),
                        fmt(v["precision"]),
                    ]
                    for r, v in loc["detection_by_region"].items()
                ],
            ),
            "",
        ]
    else:
        lines += ["No forecast mask evaluated.", ""]

    lines += [
        "## Uncertainty",
        "",
        f"Voxel calibration of the diffusion model: ECE {fmt(o.get('ece'), 4)} (0 = perfectly calibrated). "
        f"Generalized energy distance between forecast samples and the truth: {fmt(o.get('ged_mean'))} "
        "(0 = samples identical to the truth; 2 = no overlap at all).",
        "",
        *_images(metrics, ("reliability", "reliability diagram")),
    ]

    cf = metrics["counterfactual"]
    lines += ["## Counterfactual forecasts (synthetic truth)", ""]
    if not cf.get("available"):
        lines += [f"Skipped: {cf.get('note')}.", ""]
    else:
        lines += [
            "Every arm of every case against the generator's true expected NET2 count and true counterfactual mask "
            "(the same patient under another treatment). Ratio and difference are against placebo.",
            "",
            _table(
                [
                    "arm",
                    "n",
                    "mean predicted count (lesions)",
                    "mean true expected count (lesions)",
                    "count MAE (lesions)",
                    "predicted cohort rate ratio",
                    "true cohort rate ratio",
                    "ratio MAE (per case)",
                    "difference MAE (lesions)",
                    "Dice vs true mask",
                    "lesion F1",
                ],
                [
                    [
                        arm,
                        fmt(v["n_cases"]),
                        fmt(v["mean_predicted_count"]),
                        fmt(v["mean_true_expected_count"]),
                        fmt(v["count_mae"]),
                        fmt(v.get("cohort_rate_ratio_predicted")),
                        fmt(v.get("cohort_rate_ratio_true")),
                        fmt(v["ratio_mae"]),
                        fmt(v["difference_mae"]),
                        fmt(v["dice_mean"]),
                        fmt(v["lesion_f1_mean"]),
                    ]
                    for arm, v in cf["per_arm"].items()
                ],
            ),
            "",
        ]
        rows = []
        for label, method_cf in [(METHOD_LABELS["diffusion"], cf)] + [
            (sec["label"], sec["counterfactual"])
            for sec in metrics["baselines"].values()
            if sec.get("available") and sec.get("counterfactual")
        ]:
            rank = method_cf.get("ranking", {})
            cohort = rank.get("cohort", {})
            allarms = method_cf.get("all_arms", {})
            rows.append(
                [
                    label,
                    fmt(allarms.get("count_mae")),
                    fmt(allarms.get("count_spearman")),
                    fmt(rank.get("case_mean_concordance"), percent=True),
                    fmt(rank.get("share_exactly_ranked"), percent=True),
                    fmt(cohort.get("concordance"), percent=True),
                    cohort.get("predicted_order_text") or "–",
                ]
            )
        lines += [
            _table(
                [
                    "method",
                    "count MAE, all arms (lesions)",
                    "Spearman, all arms",
                    "arm pairs ranked right (per case)",
                    "cases ranked exactly",
                    "arm pairs ranked right (cohort)",
                    "predicted order, strongest first (cohort)",
                ],
                rows,
            ),
            "",
            f"True order, strongest first: {cf['ranking']['cohort'].get('true_order_text') or '–'}.",
            "",
            *_images(metrics, ("effects", "effects against placebo")),
        ]

    lines += _baselines_section(metrics)
    lines += [
        "## Cases",
        "",
        _table(
            [
                "case",
                "arm",
                "horizon (weeks)",
                "true count",
                "expected count",
                "90% interval",
                "P(active)",
                "Dice",
                "lesion F1",
            ],
            [
                [
                    c["id"],
                    c.get("treatment") or "–",
                    fmt(c.get("horizon_weeks"), 0),
                    fmt(c.get("true_count")),
                    fmt(c["methods"].get("diffusion", {}).get("expected_count")),
                    (
                        "–"
                        if c["methods"].get("diffusion", {}).get("interval_90") is None
                        else "{:g}-{:g}".format(*c["methods"]["diffusion"]["interval_90"])
                    ),
                    fmt(c["methods"].get("diffusion", {}).get("p_active")),
                    fmt(c["methods"].get("diffusion", {}).get("dice")),
                    fmt(c["methods"].get("diffusion", {}).get("f1")),
                ]
                for c in metrics["cases"]
            ],
        ),
        "",
    ]
    if metrics.get("notes"):
        lines += ["Notes:", "", *[f"- {n}" for n in metrics["notes"]], ""]
    lines += ["## Conventions", "", *[f"- **{k}**: {v}" for k, v in metrics["conventions"].items()], ""]
    return "\n".join(lines)
