"""The per-patient forecast figure (``forecast.png``) and the figure-file helper every plot of the bundle uses.

:func:`forecast_figure` draws axial slices of the MRI with the voxel probability of a new/enlarging T2 (NET2)
lesion under every treatment arm, and the expected NET2 count and P(active) per arm.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from scipy import ndimage
from scripts.runtime.files import atomic_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import cm, colors  # noqa: E402

logger = logging.getLogger(__name__)


ARM_LABELS: dict[str, str] = {
    "placebo": "placebo",
    "laquinimod": "laquinimod",
    "interferon_beta_1a": "interferon beta-1a",
    "glatiramer_acetate": "glatiramer acetate",
    "dimethyl_fumarate": "dimethyl fumarate",
    "ocrelizumab": "ocrelizumab",
}
"""Human-readable names of the treatment arms (:data:`scripts.runtime.constants.ARMS`)."""


PROB_LABEL = "probability of new/enlarging T2 lesion"


PROB_CMAP = colors.ListedColormap(matplotlib.colormaps["inferno"](np.linspace(0.3, 1.0, 256)), name="net2_prob")
"""Overlay colormap: the perceptually uniform inferno without its near-black end (invisible on a dark MRI)."""


def arm_label(arm: str) -> str:
    """Human-readable name of a treatment arm (unknown names: underscores become spaces)."""
    return ARM_LABELS.get(arm, arm.replace("_", " "))


def _to_ras(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], tuple[float, float, float]]:
    """For an axis-aligned voxel-to-world affine: the voxel axis along world x, y, z, whether it runs backwards
    (towards L, P or I), and the voxel size along x, y, z in mm."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    world_of_axis = np.argmax(np.abs(lin), axis=0)
    if sorted(world_of_axis.tolist()) != [0, 1, 2]:
        raise ValueError(f"affine is too oblique to display axial slices: {np.asarray(affine).tolist()}")
    px, py, pz = (int(np.flatnonzero(world_of_axis == w)[0]) for w in range(3))
    fx, fy, fz = (bool(lin[w, a] < 0) for w, a in enumerate((px, py, pz)))
    sx, sy, sz = (float(np.linalg.norm(lin[:, a])) for a in (px, py, pz))
    return (px, py, pz), (fx, fy, fz), (sx, sy, sz)


def _reorient(volume: np.ndarray, perm: Sequence[int], flip: Sequence[bool]) -> np.ndarray:
    """Transpose and flip a volume so its axes run towards R, A and S."""
    out = np.transpose(volume, perm)
    for axis, f in enumerate(flip):
        if f:
            out = np.flip(out, axis)
    return out


def _head_mask(mri: np.ndarray) -> np.ndarray:
    """Voxels of the head: above 25% of the robust maximum, with isolated background noise voxels opened away."""

    data = np.nan_to_num(np.asarray(mri, dtype=np.float64))
    top = float(np.percentile(data, 99.5)) if data.size else 0.0
    if top <= 0:
        return np.zeros(data.shape, bool)
    mask = data > 0.25 * top
    opened = ndimage.binary_opening(mask)
    return opened if opened.any() else mask


def _brain_z_range(mri: np.ndarray | None, n_z: int) -> tuple[int, int]:
    """First and last axial slice holding the head (:func:`_head_mask`); the whole stack without an MRI."""
    rows = np.flatnonzero(_head_mask(mri).any(axis=(0, 1))) if mri is not None else np.array([], int)
    return (int(rows[0]), int(rows[-1])) if rows.size else (0, n_z - 1)


def pick_slices(
    probs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    n: int = 4,
    mri: np.ndarray | None = None,
    min_gap: int | None = None,
) -> list[int]:
    """Axial slice indices (last axis, ascending) where the forecasts have the most probability mass over all arms.

    Greedy by mass, each pick at least ``min_gap`` slices (default ``max(2, Z // (4 n))``) from those already
    taken: first the peaks of the mass profile (separate lesions), then any slice (flanks of a large lesion).
    Slices with under 0.1% of the peak mass are not worth showing;
    the remaining picks are spread evenly over the central part of the brain (``mri``; the whole stack without it),
    from 30% to 80% of its height so that they go through the cerebrum rather than the posterior fossa.
    """
    volumes = list(probs.values()) if isinstance(probs, Mapping) else list(probs)
    if not volumes:
        raise ValueError("no probability maps given")
    n_z = int(np.shape(volumes[0])[2])
    n = max(1, min(int(n), n_z))
    gap = max(1, min(max(2, n_z // (4 * n)) if min_gap is None else int(min_gap), n_z // n))
    profile = np.zeros(n_z)
    for volume in volumes:
        profile += np.clip(np.nan_to_num(np.asarray(volume, dtype=np.float64)), 0, None).sum(axis=(0, 1))
    chosen: list[int] = []
    free = np.ones(n_z, bool)
    floor = max(1e-6, 1e-3 * float(profile.max()))
    padded = np.concatenate([[-np.inf], profile, [-np.inf]])
    peaks = (profile >= padded[:-2]) & (profile >= padded[2:])
    for candidates in (np.flatnonzero(peaks), np.arange(n_z)):  # separate lesions first, then their flanks
        for k in sorted(candidates.tolist(), key=lambda q: -profile[q]):
            if len(chosen) < n and free[k] and profile[k] >= floor:
                chosen.append(int(k))
                free[max(0, k - gap + 1) : k + gap] = False
    if len(chosen) < n:
        # Evenly spaced anchors over the brain centre; those nearest to a chosen slice are taken already.
        lo, hi = _brain_z_range(mri, n_z)
        anchors = list(np.linspace(lo + 0.3 * (hi - lo), lo + 0.8 * (hi - lo), n))
        for k in chosen:
            anchors.pop(int(np.argmin([abs(a - k) for a in anchors])))
        for anchor in anchors:
            pool = np.flatnonzero(free) if free.any() else np.setdiff1d(np.arange(n_z), chosen)
            if not pool.size:
                break
            k = int(pool[np.argmin(np.abs(pool - anchor))])
            chosen.append(k)
            free[max(0, k - gap + 1) : k + gap] = False
    return sorted(chosen)


def _nice_vmax(peak: float) -> float:
    """Top of the probability colour scale: the smallest of 0.1, 0.2, 0.3, 0.5, 1 at or above ``peak``."""
    return next((v for v in (0.1, 0.2, 0.3, 0.5) if peak <= v), 1.0)


def _crop_box(mri: np.ndarray, probs: Sequence[np.ndarray], threshold: float, margin: int = 2) -> tuple[slice, slice]:
    """In-plane bounding box (x, y) of the head and of any shown forecast probability, with a margin of voxels."""
    footprint = _head_mask(mri).any(axis=2)
    for p in probs:
        footprint |= (p >= threshold).any(axis=2)
    if not footprint.any():
        return slice(0, mri.shape[0]), slice(0, mri.shape[1])
    box = []
    for axis in (0, 1):
        idx = np.flatnonzero(footprint.any(axis=1 - axis))
        box.append(slice(max(0, int(idx[0]) - margin), min(footprint.shape[axis], int(idx[-1]) + margin + 1)))
    return box[0], box[1]


def _axial(volume: np.ndarray, k: int, box: tuple[slice, slice]) -> np.ndarray:
    """Axial slice ``k`` of a RAS volume as an image (rows = posterior to anterior for ``origin="lower"``, columns
    = patient right to left: radiological convention)."""
    return volume[box[0], box[1], k].T[:, ::-1]


def _summary(arm: Mapping[str, Any] | None) -> tuple[float, float, np.ndarray, float | None]:
    """Expected count, P(active), sample counts and expected volume of one arm summary (NaN where missing)."""
    arm = arm or {}
    samples = np.asarray(arm.get("count_samples", []), dtype=np.float64).ravel()
    volume = arm.get("expected_volume_mm3")
    return (
        float(arm.get("expected_count", np.nan)),
        float(arm.get("p_active", np.nan)),
        samples[np.isfinite(samples)],
        None if volume is None else float(volume),
    )


def _save_atomic(fig: plt.Figure, out: Path, dpi: int) -> None:
    """Write ``fig`` as PNG atomically (readers never see half a file)."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


@contextlib.contextmanager
def figure_file(out: str | Path, dpi: int = 110, **subplots: Any) -> Iterator[tuple[plt.Figure, Any]]:
    """``plt.subplots(**subplots)`` for the block; on success laid out and written atomically to ``out``; always
    closed."""
    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        _save_atomic(fig, Path(out), dpi)
    finally:
        plt.close(fig)


def forecast_figure(
    mri: np.ndarray,
    probs: Mapping[str, np.ndarray],
    arms: Mapping[str, Mapping[str, Any]],
    out: str | Path,
    title: str = "",
    mri_name: str = "FLAIR",
    voxel_mm: Sequence[float] = (3.0, 3.0, 3.0),
    affine: np.ndarray | None = None,
    n_slices: int = 4,
    threshold: float = 0.05,
    vmax: float | None = None,
    mri_range: tuple[float, float] = (0.0, 1.5),
    dpi: int = 100,
) -> Path:
    """Draw the forecast figure (``forecast.png``) and return its path.

    Top: one row per arm, ``n_slices`` axial slices (radiological convention, anterior up) where the forecasts
    have the most probability mass; the MRI in grey with the voxel probability of a new/enlarging T2 lesion on one
    shared colour scale (transparent below ``threshold``; ``vmax`` defaults to 0.1, 0.2, 0.3, 0.5 or 1 above the
    largest probability). Bottom: expected NET2 count per arm with the 5th-95th percentile of the sample counts
    and the individual samples, and P(active) in %. Placebo comes first, then the arms in the order of ``probs``.

    ``mri`` and every map in ``probs`` share one (X, Y, Z) grid whose axes run towards R, A and S; with an
    ``affine`` (axis-aligned, voxel to world RAS mm) any axis order or direction is accepted, the voxel size comes
    from it and the columns give world z. ``arms`` maps arm name to ``expected_count``, ``p_active`` (0-1),
    ``count_samples`` and optionally ``expected_volume_mm3``. The PNG is written atomically.
    """
    mri = np.nan_to_num(np.asarray(mri, dtype=np.float32))
    if mri.ndim != 3:
        raise ValueError(f"mri must be a 3-D (X, Y, Z) array, got shape {mri.shape}")
    if not probs:
        raise ValueError("probs is empty: nothing to draw")
    order = list(probs)
    if "placebo" in order:
        order = ["placebo"] + [a for a in order if a != "placebo"]
    maps = {}
    for name in order:
        p = np.clip(np.nan_to_num(np.asarray(probs[name], dtype=np.float32)), 0.0, 1.0)
        if p.shape != mri.shape:
            raise ValueError(f"probability map of {name!r} has shape {p.shape}, the MRI {mri.shape}")
        maps[name] = p
    shape_in = mri.shape
    perm: tuple[int, int, int] = (0, 1, 2)
    k_index = np.arange(mri.shape[2])  # index along the input's z voxel axis of each displayed axial slice
    if affine is not None:
        perm, flip, (vx, vy, vz) = _to_ras(affine)
        mri = _reorient(mri, perm, flip)
        maps = {name: _reorient(p, perm, flip) for name, p in maps.items()}
        k_index = np.arange(mri.shape[2])[::-1] if flip[2] else np.arange(mri.shape[2])
    else:
        vx, vy, vz = (float(v) for v in voxel_mm)
    slices = pick_slices(maps, n_slices, mri=mri, min_gap=max(2, round(10.0 / vz)))  # about 1 cm apart
    box = _crop_box(mri, list(maps.values()), threshold)
    peak = max(float(p.max()) for p in maps.values())
    top = float(vmax) if vmax is not None else _nice_vmax(peak)
    norm = colors.Normalize(vmin=0.0, vmax=top)

    def column_title(k: int) -> str:
        if affine is None:
            return f"slice {k}\n{k * vz:.0f} mm above slice 0"
        ijk = np.array([(n - 1) / 2.0 for n in shape_in] + [1.0])
        ijk[perm[2]] = float(k_index[k])
        z_world = float((np.asarray(affine, dtype=np.float64) @ ijk)[2])
        return f"z = {round(z_world):+d} mm\nslice {int(k_index[k])}"  # round first: no "-0"

    # Layout in inches, then converted to figure fractions.
    n_rows, n_cols = len(order), len(slices)
    width_px, height_px = box[0].stop - box[0].start, box[1].stop - box[1].start
    aspect = (height_px * vy) / max(width_px * vx, 1e-6)
    left, gap, cbar_w, cbar_pad, cbar_label, right = 2.0, 0.06, 0.18, 0.15, 0.75, 0.25
    top_margin, col_title, chart_gap, bottom, fig_w = 0.95, 0.45, 0.85, 0.6, 12.0
    panel_w = (fig_w - left - right - cbar_pad - cbar_w - cbar_label - (n_cols - 1) * gap) / n_cols
    panel_w = min(panel_w, 12.0 / (n_rows * aspect), 3.2 / aspect)
    panel_h = panel_w * aspect
    grid_w, grid_h = n_cols * panel_w + (n_cols - 1) * gap, n_rows * panel_h + (n_rows - 1) * gap
    grid_x = left + max(0.0, (fig_w - left - right - grid_w - cbar_pad - cbar_w - cbar_label) / 2)  # centred
    chart_h = max(1.3, 0.36 * n_rows + 0.5)
    fig_h = top_margin + col_title + grid_h + chart_gap + chart_h + bottom
    fig = plt.figure(figsize=(fig_w, fig_h))

    def place(x: float, y_top: float, w: float, h: float) -> plt.Axes:
        return fig.add_axes((x / fig_w, 1.0 - (y_top + h) / fig_h, w / fig_w, h / fig_h))

    try:
        grid_top = top_margin + col_title
        for row, name in enumerate(order):
            count, _, _, volume = _summary(arms.get(name))
            for col, k in enumerate(slices):
                ax = place(grid_x + col * (panel_w + gap), grid_top + row * (panel_h + gap), panel_w, panel_h)
                ax.imshow(
                    _axial(mri, k, box),
                    cmap="gray",
                    vmin=mri_range[0],
                    vmax=mri_range[1],
                    origin="lower",
                    aspect=vy / vx,
                    interpolation="bilinear",
                )
                p = _axial(maps[name], k, box)
                rgba = PROB_CMAP(norm(p))
                rgba[..., 3] = np.where(p >= threshold, 0.6 + 0.35 * np.clip(p / top, 0, 1), 0.0)
                ax.imshow(rgba, origin="lower", aspect=vy / vx, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if row == 0:
                    ax.set_title(column_title(k), fontsize=9)
                if row == 0 or n_rows == 1:
                    for x, text in ((0.03, "R"), (0.97, "L")):
                        ax.text(
                            x,
                            0.5,
                            text,
                            transform=ax.transAxes,
                            color="white",
                            fontsize=9,
                            fontweight="bold",
                            ha="left" if x < 0.5 else "right",
                            va="center",
                        )
                if col == 0:
                    lines = [arm_label(name)]
                    if np.isfinite(count):
                        lines.append(f"expected NET2: {count:.1f}")
                    if volume is not None:
                        lines.append(f"expected volume: {volume:.0f} mm\u00b3")
                    ax.text(
                        -0.06,
                        0.5,
                        lines[0],
                        transform=ax.transAxes,
                        ha="right",
                        va="bottom",
                        fontsize=10,
                        fontweight="bold",
                    )
                    ax.text(-0.06, 0.48, "\n".join(lines[1:]), transform=ax.transAxes, ha="right", va="top", fontsize=9)
        cax = place(
            grid_x + grid_w + cbar_pad,
            grid_top + 0.1 * grid_h if n_rows > 2 else grid_top,
            cbar_w,
            0.8 * grid_h if n_rows > 2 else grid_h,
        )
        bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=PROB_CMAP), cax=cax)
        bar.set_label(PROB_LABEL, fontsize=9)
        bar.ax.tick_params(labelsize=8)
        bar.ax.axhline(threshold, color="black", linewidth=0.8)

        fig.suptitle(
            title or "Forecast of new/enlarging T2 (NET2) lesions by treatment arm",
            fontsize=13,
            y=1.0 - 0.22 / fig_h,
            va="top",
        )
        fig.text(
            0.5,
            1.0 - 0.55 / fig_h,
            f"{mri_name} axial slices, radiological convention (patient's R on image "
            f"left), anterior up; colour: voxel probability, transparent below {threshold:g}",
            ha="center",
            va="top",
            fontsize=9,
            color="0.25",
        )

        # Bottom: expected count with its 90% interval and the samples, and P(active).
        chart_top = grid_top + grid_h + chart_gap
        chart_w = fig_w - left - right
        count_w = 0.66 * chart_w
        ax_count = place(left, chart_top, count_w, chart_h)
        ax_active = place(left + count_w + 0.35, chart_top, chart_w - count_w - 0.35, chart_h)
        y = np.arange(n_rows)
        rng = np.random.default_rng(0)
        n_samples = 0
        for i, name in enumerate(order):
            count, p_active, samples, _ = _summary(arms.get(name))
            colour = "0.55" if name == "placebo" else "tab:blue"
            if np.isfinite(count):
                ax_count.barh(i, count, height=0.6, color=colour, alpha=0.45)
            if samples.size:
                n_samples = max(n_samples, samples.size)
                ax_count.scatter(
                    samples,
                    i + rng.uniform(-0.2, 0.2, samples.size),
                    s=7,
                    color="0.1",
                    linewidths=0,
                    alpha=float(np.clip(60.0 / samples.size, 0.15, 0.7)),
                    zorder=3,
                )
                lo, hi = np.percentile(samples, [5, 95])
                ax_count.plot([lo, hi], [i, i], color="black", linewidth=1.6, zorder=4)
                ax_count.plot(
                    [lo, lo, np.nan, hi, hi],
                    [i - 0.2, i + 0.2, np.nan, i - 0.2, i + 0.2],
                    color="black",
                    linewidth=1.6,
                    zorder=4,
                )
            if np.isfinite(p_active):
                pct = 100.0 * float(np.clip(p_active, 0, 1))
                ax_active.barh(i, pct, height=0.6, color=colour, alpha=0.7)
                inside = pct > 80
                ax_active.text(
                    pct - 2 if inside else pct + 2,
                    i,
                    f"{pct:.0f}%",
                    va="center",
                    fontsize=8,
                    ha="right" if inside else "left",
                    color="white" if inside else "black",
                )
        ax_count.set_yticks(y, [arm_label(name) for name in order], fontsize=9)
        ax_count.set_ylim(n_rows - 0.5, -0.5)
        x_max = max(ax_count.get_xlim()[1], 1.0)
        ax_count.set_xlim(-0.02 * x_max, x_max)
        ax_count.set_xlabel("NET2 lesions at forecast visit", fontsize=9)
        ax_count.set_title(
            "bar: expected count, whiskers: 5th-95th percentile"
            + (f", dots: {n_samples} sampled forecasts" if n_samples else ""),
            fontsize=9,
            loc="left",
        )
        ax_count.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax_active.set_yticks(y, [""] * n_rows)
        ax_active.set_ylim(n_rows - 0.5, -0.5)
        ax_active.set_xlim(0, 100)
        ax_active.set_xlabel("P(active) %", fontsize=9)
        ax_active.set_title("P(\u22651 NET2 lesion)", fontsize=9, loc="left")
        for ax in (ax_count, ax_active):
            ax.grid(axis="x", alpha=0.3)
            ax.tick_params(labelsize=8)
            ax.spines[["top", "right"]].set_visible(False)
        out = Path(out)
        _save_atomic(fig, out, dpi)
    finally:
        plt.close(fig)
    logger.debug("wrote %s", out)  # a staging path: the runner logs the case folder once it is in place
    return out
