"""The evaluation's plots: reliability, count scatter, ROC and effects against placebo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from scripts.bench.evaluation.conventions import METHOD_LABELS
from scripts.runtime.figures import arm_label, figure_file
from sklearn.metrics import roc_auc_score, roc_curve

_METHOD_STYLE: dict[str, tuple[str, str, Any]] = {
    "diffusion": ("tab:blue", "o", "-"),
    "deterministic": ("tab:orange", "s", "--"),
    "unaware": ("tab:green", "^", ":"),
    "population": ("tab:gray", "D", "-."),
    "regression": ("tab:purple", "v", (0, (3, 1, 1, 1))),
    "oracle": ("tab:red", "x", (0, (1, 3))),
}
"""Colour, marker and line style per evaluated method (line styles keep coinciding curves apart)."""


_ARM_COLOURS: dict[str, Any] = {
    arm: matplotlib.colormaps["tab10"].colors[i]
    for i, arm in enumerate(
        ("placebo", "laquinimod", "interferon_beta_1a", "glatiramer_acetate", "dimethyl_fumarate", "ocrelizumab")
    )
}


def _style(method: str) -> tuple[Any, str, str]:
    """(colour, marker, line style) of an evaluation method."""
    return _METHOD_STYLE.get(method, ("k", "o", "-"))


def reliability_figure(curves: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path) -> Path:
    """Reliability diagram (observed NET2 frequency against mean forecast probability per bin) and voxels per bin."""
    layout = {"nrows": 2, "ncols": 1, "figsize": (5.5, 6.5), "height_ratios": (3, 1.2), "sharex": True}
    with figure_file(out, **layout) as (fig, (ax, ax_n)):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
        for method, bins in curves.items():
            colour, marker, style = _style(method)
            full = [b for b in bins if b["voxels"]]
            ax.plot(
                [b["mean_probability"] for b in full],
                [b["observed_frequency"] for b in full],
                marker=marker,
                color=colour,
                linestyle=style,
                label=METHOD_LABELS.get(method, method),
            )
            ax_n.plot(
                [(b["lower"] + b["upper"]) / 2 for b in full],
                [b["voxels"] for b in full],
                marker=marker,
                color=colour,
                linestyle=style,
            )
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("observed frequency of NET2 voxels")
        ax.set_title("Calibration of voxel probabilities (factual arm)")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        ax_n.set_yscale("log")
        ax_n.set_xlabel("forecast probability of NET2 (bin mean)")
        ax_n.set_ylabel("voxels per bin")
        ax_n.grid(alpha=0.3)
    return Path(out)


def count_scatter_figure(
    points: Mapping[str, Sequence[tuple[float, float, Sequence[float] | None]]], out: str | Path
) -> Path:
    """Expected against true NET2 count per case and method; the diffusion model's 90% intervals as bars."""
    with figure_file(out, figsize=(6, 5.5)) as (fig, ax):
        top = 1.0
        for i, (method, rows) in enumerate(points.items()):
            if not rows:
                continue
            colour, marker, _line = _style(method)
            # a small horizontal offset per method keeps coinciding points apart (counts are integers)
            x = np.asarray([r[0] for r in rows], float) + 0.08 * (i - (len(points) - 1) / 2)
            y = np.asarray([r[1] for r in rows], float)
            intervals = [r[2] for r in rows]
            if method == "diffusion" and all(iv is not None for iv in intervals):
                lo = y - np.asarray([iv[0] for iv in intervals], float)
                hi = np.asarray([iv[1] for iv in intervals], float) - y
                ax.errorbar(
                    x, y, yerr=np.clip([lo, hi], 0, None), fmt="none", ecolor=colour, alpha=0.4, elinewidth=1, capsize=2
                )
                top = max(top, float(np.max(y + hi)))
            ax.scatter(x, y, color=colour, marker=marker, s=28, label=METHOD_LABELS.get(method, method), alpha=0.85)
            top = max(top, float(np.max(x)), float(np.max(y)))
        ax.plot([0, top * 1.05], [0, top * 1.05], color="0.6", linestyle="--", linewidth=1, label="expected = true")
        ax.set_xlim(-0.5, top * 1.05 + 0.5)
        ax.set_ylim(-0.5, top * 1.05 + 0.5)
        ax.set_xlabel("true NET2 lesion count at the forecast visit (lesions)")
        ax.set_ylabel("expected NET2 lesion count (lesions)")
        ax.set_title("Expected vs true NET2 count (factual arm; bars: 90% interval)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return Path(out)


def roc_figure(curves: Mapping[str, tuple[Sequence[bool], Sequence[float]]], out: str | Path) -> Path:
    """ROC curves of P(active) against true activity (at least one NET2 lesion), one per method."""

    with figure_file(out, figsize=(5.5, 5.2)) as (fig, ax):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
        undefined = []
        for method, (active, p) in curves.items():
            y = np.asarray(active, bool)
            if y.size == 0 or y.all() or not y.any():
                undefined.append(METHOD_LABELS.get(method, method))
                continue
            fpr, tpr, _ = roc_curve(y, np.asarray(p, float))
            colour, _marker, style = _style(method)
            ax.plot(
                fpr,
                tpr,
                color=colour,
                linestyle=style,
                linewidth=2,
                label=f"{METHOD_LABELS.get(method, method)} (AUC {roc_auc_score(y, p):.2f})",
            )
        if undefined:
            ax.text(
                0.5,
                0.15,
                "ROC undefined: only one outcome class\n(" + ", ".join(undefined) + ")",
                ha="center",
                fontsize=8,
                transform=ax.transAxes,
            )
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("false positive rate (inactive cases forecast active)")
        ax.set_ylabel("true positive rate (active cases forecast active)")
        ax.set_title("Activity: P(>=1 NET2 lesion) vs observed activity")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    return Path(out)


def effects_figure(
    ratios: Mapping[str, Mapping[str, float | None]],
    true_ratios: Mapping[str, float | None],
    points: Sequence[tuple[str, float, float]],
    out: str | Path,
) -> Path:
    """Left: cohort NET2 rate ratio against placebo per arm, true and per method. Right: predicted against true
    expected count for every case and arm (diffusion model), coloured by arm."""
    arms = [a for a in true_ratios if a != "placebo"]
    with figure_file(out, nrows=1, ncols=2, figsize=(12, 5)) as (fig, (ax, ax_pts)):
        series = [("truth (generator)", true_ratios, "black")] + [
            (METHOD_LABELS.get(m, m), r, _style(m)[0]) for m, r in ratios.items()
        ]
        width = 0.8 / len(series)
        for i, (label, values, colour) in enumerate(series):
            x = np.arange(len(arms)) + (i - (len(series) - 1) / 2) * width
            y = [np.nan if values.get(a) is None else values[a] for a in arms]
            ax.bar(x, y, width=width, color=colour, alpha=0.85 if i else 0.6, label=label)
            for xi, yi in zip(x, y, strict=True):
                if not np.isfinite(yi):  # e.g. the placebo forecast expects no lesion: no ratio
                    ax.text(xi, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color=colour)
        ax.axhline(1.0, color="0.5", linewidth=1, linestyle="--")
        ax.set_xticks(np.arange(len(arms)), [arm_label(a) for a in arms], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("NET2 rate ratio vs placebo (1 = no effect)")
        ax.set_title("Treatment effect: cohort rate ratio vs placebo")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        top = 1.0
        for arm in dict.fromkeys(a for a, _, _ in points):
            xs = [t for a, t, _ in points if a == arm]
            ys = [p for a, _, p in points if a == arm]
            ax_pts.scatter(xs, ys, s=22, color=_ARM_COLOURS.get(arm, "k"), label=arm_label(arm), alpha=0.85)
            top = max(top, max(xs), max(ys))
        ax_pts.plot(
            [0, top * 1.05], [0, top * 1.05], color="0.6", linestyle="--", linewidth=1, label="predicted = true"
        )
        ax_pts.set_xlabel("generator's true expected NET2 count (lesions)")
        ax_pts.set_ylabel("diffusion model's expected NET2 count (lesions)")
        ax_pts.set_title("Counterfactual counts: every case under every arm")
        ax_pts.legend(fontsize=8)
        ax_pts.grid(alpha=0.3)
    return Path(out)


def evaluation_figures(
    metrics: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]], out_dir: str | Path
) -> dict[str, str]:
    """Draw the evaluation plots of :mod:`scripts.bench.evaluation` into ``out_dir``; returns {plot: file name}."""
    out_dir = Path(out_dir)
    sections = {"diffusion": metrics["overall"]}
    sections.update({m: s["overall"] for m, s in metrics["baselines"].items() if s.get("available")})
    written: dict[str, str] = {}
    curves = {m: s["reliability_bins"] for m, s in sections.items() if s.get("reliability_bins")}
    if curves:
        written["reliability"] = reliability_figure(curves, out_dir / "reliability.png").name
    factual = [r for r in records.values() if "true_count" in r]
    points = {
        m: [
            (r["true_count"], r["methods"][m]["expected_count"], r["methods"][m].get("interval_90"))
            for r in factual
            if m in r["methods"]
        ]
        for m in sections
    }
    written["count_scatter"] = count_scatter_figure(points, out_dir / "count_scatter.png").name
    roc = {
        m: (
            [r["active"] for r in factual if m in r["methods"]],
            [r["methods"][m]["p_active"] for r in factual if m in r["methods"]],
        )
        for m in sections
    }
    written["roc"] = roc_figure(roc, out_dir / "roc.png").name
    cf = metrics.get("counterfactual", {})
    if cf.get("available") and cf.get("per_arm"):
        true_ratios = {a: v.get("cohort_rate_ratio_true") for a, v in cf["per_arm"].items()}
        ratios = {"diffusion": {a: v.get("cohort_rate_ratio_predicted") for a, v in cf["per_arm"].items()}}
        for m, s in metrics["baselines"].items():
            if s.get("available") and s.get("counterfactual", {}).get("per_arm"):
                ratios[m] = {a: v.get("cohort_rate_ratio_predicted") for a, v in s["counterfactual"]["per_arm"].items()}
        pts = [
            (arm, c["true_expected_count"], c["predicted_count"])
            for r in records.values()
            for arm, c in (r.get("counterfactual") or {}).get("diffusion", {}).get("arms", {}).items()
        ]
        if any(v is not None for v in true_ratios.values()):
            written["effects"] = effects_figure(ratios, true_ratios, pts, out_dir / "effects.png").name
    return written
