"""Synthetic longitudinal MS cohort with exactly known counterfactual NET2 truth.

Every case is one patient with two past visits (visit 0 = week 0, visit 1 = week 24) and a forecast visit at
week ``24 + horizon_weeks``. The generator draws, per patient,

* an anatomy: a brain-shaped phantom defined in millimetres (so it does not depend on the voxel grid) with
  cortex, folded grey/white boundary, sulci, interhemispheric fissure, lateral/third/fourth ventricles, deep grey
  nuclei, cerebellum and brainstem. The tissue label map uses the codes in :data:`TISSUE_LABELS`;
* a hidden disease activity (gamma distributed across patients, so counts are overdispersed) that drives the
  baseline lesion load, gadolinium-enhancing (Gd) lesions and the rate of new/enlarging T2 (NET2) lesions in
  the past and the future interval;
* lesions (ovoids, lognormal volumes, mostly white matter with a periventricular preference) and from them the
  T2 lesion and Gd masks of both visits and the NET2 mask between visit 0 and visit 1;
* MRI contrasts FLAIR, T1, T2, PD and T1-Gd from the tissue map and the lesions, with partial-volume smoothing,
  a smooth multiplicative bias field, Rician noise and a raw-scanner gain; stored as int16 "scanner units";
* one pool of candidate future NET2 events at the placebo rate. Under arm ``a`` the event ``i`` happens iff
  ``u_i < 1 - e_p(a)`` (Poisson thinning with the patient's efficacy ``e_p``), so a stronger arm's future lesions
  are a subset of a weaker arm's and the true expected count is ``lambda_placebo * (1 - e_p(a))``.

Simplification (documented in ``bundle/docs/synthetic_cohort.md``): treatment acts only in the forecast
interval; the past interval is untreated natural history, so the observed past is identical across arms. In the
trials treatment started at week 0.

Run ``python -m scripts.synthetic --out DIR --n N --seed S``; see :func:`main`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fire
import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from scripts.constants import ARMS, IMAGE_KEYS, MRI_MODALITIES, VISITS
from scripts.files import atomic_path, write_text_atomic
from scripts.lesions import CONNECTIVITY_26, count_lesions, label_lesions

logger = logging.getLogger("scripts.synthetic")

GENERATOR_VERSION = "1.0"
VISIT_INTERVAL_WEEKS = 24.0
"""Weeks between visit 0 and visit 1 (the past, untreated interval)."""

TISSUE_LABELS: dict[int, str] = {
    0: "background",
    1: "csf",  # extracerebral CSF, sulci, interhemispheric fissure, cisterns
    2: "cortical_gm",
    3: "white_matter",  # supratentorial white matter
    4: "ventricles",  # lateral, third and fourth ventricles
    5: "infratentorial_wm",  # brainstem and cerebellar white matter
    6: "infratentorial_gm",  # cerebellar cortex
    7: "deep_gm",  # thalamus, lentiform nucleus, caudate head
}
"""Codes of the tissue label map written to ``truth/<id>_tissue.nii.gz``."""

PARENCHYMA_LABELS: tuple[int, ...] = (2, 3, 5, 6, 7)
"""Tissue codes a lesion may occupy."""

# Approximate efficacy against placebo on new/enlarging T2 lesions (1 - rate ratio). These are rounded,
# approximate figures meant to give the arms a realistic ordering and spread, not exact trial estimates:
# - laquinimod 0.30: ALLEGRO (Comi et al., NEJM 2012), about 30% fewer new/enlarging T2 lesions;
# - interferon beta-1a 0.55: placebo-controlled trials of interferon beta-1a report roughly a third (i.m.) to
#   three quarters (s.c., PRISMS) fewer active T2 lesions; 0.55 is an approximate middle value, close to
#   glatiramer acetate, consistent with head-to-head trials finding the two similar;
# - glatiramer acetate 0.54: CONFIRM (Fox et al., NEJM 2012) reference arm, about 54% fewer NET2 lesions;
# - dimethyl fumarate 0.75: DEFINE (Gold et al., NEJM 2012, about 85%) and CONFIRM (about 71%) for the
#   twice-daily dose; 0.75 sits between the two;
# - ocrelizumab 0.93: OPERA I/II (Hauser et al., NEJM 2017) found 77-83% fewer NET2 lesions than s.c.
#   interferon beta-1a; 1 - (1 - 0.55) * (1 - 0.8) is about 0.91, rounded up to 0.93.
ARM_EFFICACY: dict[str, float] = {
    "placebo": 0.0,
    "laquinimod": 0.30,
    "interferon_beta_1a": 0.55,
    "glatiramer_acetate": 0.54,
    "dimethyl_fumarate": 0.75,
    "ocrelizumab": 0.93,
}

# Relative tissue intensities per contrast (white matter of T1 about 0.85). Order follows TISSUE_LABELS.
# FLAIR: CSF suppressed, GM > WM; T1: WM > GM > CSF; T2: CSF brightest, GM > WM; PD: CSF ~ GM > WM.
_TISSUE_INTENSITY: dict[str, tuple[float, ...]] = {
    #          bg   csf   cGM   WM   vent  iWM   iGM  deepGM
    "flair": (0.0, 0.10, 0.72, 0.52, 0.07, 0.55, 0.70, 0.63),
    "t1": (0.0, 0.20, 0.55, 0.85, 0.18, 0.80, 0.56, 0.68),
    "t2": (0.0, 1.00, 0.56, 0.33, 1.00, 0.36, 0.52, 0.44),
    "pd": (0.0, 0.86, 0.84, 0.66, 0.88, 0.68, 0.80, 0.76),
}
_TISSUE_INTENSITY["t1gd"] = _TISSUE_INTENSITY["t1"]
# Fully expressed lesion intensity per contrast (hyperintense on FLAIR/T2/PD, hypointense on T1).
_LESION_INTENSITY: dict[str, float] = {"flair": 1.05, "t2": 0.85, "pd": 0.97, "t1": 0.30, "t1gd": 0.30}
_ENHANCING_INTENSITY = 1.5  # T1-Gd intensity of an enhancing lesion (brighter than white matter)


@dataclass(frozen=True)
class CohortConfig:
    """Rates and distributions of the generator (defaults calibrated for a realistic placebo arm)."""

    net2_rate: float = 3.5
    """Mean NET2 count per 24 weeks, untreated, at activity 1 (the cohort mean activity)."""
    activity_shape: float = 0.5
    """Gamma shape of the activity across patients (mean 1); 0.5 gives ~35-40% inactive placebo patients."""
    activity_drift_sd: float = 0.25
    """SD of the log-normal, mean-preserving change of activity from the past to the forecast interval."""
    efficacy_gamma: float = 0.3
    """Exponent of activity in the patient efficacy exponent k_p (stronger effect at higher activity)."""
    efficacy_reference_activity: float = 2.0
    """Activity at which k_p = 1; ~ the activity-weighted median, so cohort rate ratios match ARM_EFFICACY."""
    efficacy_sd: float = 0.2
    """SD of the patient-specific log-normal noise on k_p."""
    baseline_lesions: float = 45.0
    """Mean number of chronic lesions at visit 0 for a patient of mean activity and disease duration."""
    recent_window_weeks: float = 16.0
    """Lesions that formed in this window before visit 0 are 'recent' and may still enhance at visit 0."""
    gd_duration_mean_weeks: float = 6.0
    """Mean duration of gadolinium enhancement of a new lesion (gamma, shape 2)."""
    enlarging_fraction: float = 0.2
    """Share of NET2 events that are enlargements of existing lesions (the rest are new lesions)."""
    chronic_volume_median_mm3: float = 150.0
    chronic_volume_sigma: float = 1.1
    new_volume_median_mm3: float = 150.0
    new_volume_sigma: float = 1.0
    enlarge_volume_median_mm3: float = 80.0
    enlarge_volume_sigma: float = 0.8
    min_volume_mm3: float = 8.0
    max_volume_mm3: float = 8000.0
    efficacy: tuple[tuple[str, float], ...] = tuple(ARM_EFFICACY.items())
    """Arm efficacies against placebo (see :data:`ARM_EFFICACY`)."""

    def arm_efficacy(self) -> dict[str, float]:
        """The arm efficacies as a dict, in :data:`ARMS` order."""
        eff = dict(self.efficacy)
        return {arm: float(eff[arm]) for arm in ARMS}


# Region sampling weights of lesion centres (periventricular preference; new lesions also cluster near old ones).
_CHRONIC_REGION_WEIGHTS = {"periventricular": 0.45, "deep_white": 0.28, "juxtacortical": 0.15, "infratentorial": 0.12}
_NEW_REGION_WEIGHTS = {
    "near_lesion": 0.20,
    "periventricular": 0.35,
    "deep_white": 0.25,
    "juxtacortical": 0.13,
    "infratentorial": 0.07,
}


# --------------------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A voxel grid in RAS world space: voxel ``ijk`` lies at ``origin + ijk * spacing`` (diagonal affine)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 voxel-to-world (RAS, mm) affine."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff

    @property
    def voxel_volume(self) -> float:
        """Volume of one voxel in mm^3."""
        return float(np.prod(self.spacing))

    def axes_mm(self) -> tuple[np.ndarray, ...]:
        """Grid-frame coordinates (mm, origin at voxel 0) of the voxel centres along each axis."""
        return tuple(np.arange(n, dtype=np.float64) * s for n, s in zip(self.shape, self.spacing, strict=True))


def _as_triple(value: Any, kind: type, name: str) -> tuple:
    """Turn an int/float or a sequence of 1 or 3 of them into a 3-tuple."""
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    if isinstance(value, (int, float, np.integer, np.floating)):
        value = [value]
    values = [kind(v) for v in value]
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ValueError(f"{name} must be a positive number or three positive numbers, got {value!r}")
    return tuple(values)


# --------------------------------------------------------------------------------------------------------------
# Random smooth fields (sums of random plane waves, defined in mm so they do not depend on the grid)
# --------------------------------------------------------------------------------------------------------------
def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A small random rotation (independent angles about x, y, z, normal with SD max_deg/2, clipped)."""
    ang = np.deg2rad(np.clip(rng.normal(0.0, max_deg / 2, 3), -max_deg, max_deg))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _plane_wave_field(
    rng: np.random.Generator,
    axes: Sequence[np.ndarray],
    rotation: np.ndarray,
    centre: np.ndarray,
    n_modes: int,
    wavelength_mm: tuple[float, float],
    direction_scale: Sequence[float] = (1.0, 1.0, 1.0),
    with_gradient_norm: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """A smooth random field of unit variance as a sum of plane waves in the phantom frame.

    The phantom frame is ``p = rotation @ (x - centre)``. Each wave is separable on the grid, so the cost is one
    outer product per mode. With ``with_gradient_norm`` also returns |grad f| (per mm), used to turn the field's
    zero set into sheets of a given thickness in mm.
    """
    dirs = rng.normal(size=(n_modes, 3)) * np.asarray(direction_scale)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-12
    wavelengths = np.exp(rng.uniform(np.log(wavelength_mm[0]), np.log(wavelength_mm[1]), n_modes))
    k_phantom = dirs * (2 * np.pi / wavelengths)[:, None]
    k_grid = k_phantom @ rotation  # k . R (x - c) = (R^T k) . (x - c)
    phases = rng.uniform(0, 2 * np.pi, n_modes) - k_grid @ centre
    amp = np.sqrt(2.0 / n_modes)
    shape = tuple(len(a) for a in axes)
    value = np.zeros(shape, np.float32)
    grad = np.zeros((3, *shape), np.float32) if with_gradient_norm else None
    wave = np.empty(shape, np.complex64)
    tmp = np.empty(shape, np.float32) if with_gradient_norm else None
    for m in range(n_modes):
        e0 = amp * np.exp(1j * (k_grid[m, 0] * axes[0] + phases[m]))
        e1 = np.exp(1j * k_grid[m, 1] * axes[1])
        e2 = np.exp(1j * k_grid[m, 2] * axes[2]).astype(np.complex64)
        e01 = (e0[:, None] * e1[None, :]).astype(np.complex64)
        np.multiply(e01[:, :, None], e2[None, None, :], out=wave)
        value += wave.real
        if grad is not None:
            for d in range(3):
                np.multiply(wave.imag, np.float32(-k_grid[m, d]), out=tmp)
                grad[d] += tmp
    gnorm = np.sqrt((grad**2).sum(0)) if grad is not None else None
    return value, gnorm


# --------------------------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Anatomy:
    """Tissue labels and the derived maps that lesion placement needs."""

    tissue: np.ndarray  # uint8 labels, TISSUE_LABELS
    parenchyma: np.ndarray  # bool
    dist_ventricle: np.ndarray  # mm from the nearest ventricle voxel
    dist_cortex: np.ndarray  # mm from the nearest cortical grey matter voxel
    texture: np.ndarray  # unit-variance smooth field for tissue texture
    params: dict[str, float]


def _ellipsoid_depth(
    p: Sequence[np.ndarray], centre: Sequence[float], semi: Sequence[np.ndarray | float]
) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to an axis-aligned ellipsoid surface in the phantom frame."""
    q = [(p[i] - centre[i]) / semi[i] for i in range(3)]
    r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2) + 1e-6
    grad = np.sqrt(sum((q[i] / semi[i]) ** 2 for i in range(3))) / r + 1e-6
    return ((1.0 - r) / grad).astype(np.float32)


def _inside_ellipsoid(p: Sequence[np.ndarray], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    return sum(((p[i] - centre[i]) / semi[i]) ** 2 for i in range(3)) <= 1.0


def build_anatomy(rng: np.random.Generator, grid: Grid, atrophy: float, head_offset: np.ndarray) -> Anatomy:
    """Draw a patient's brain phantom on ``grid``; all sizes are in mm, scaled by a random head size.

    ``atrophy`` in [0, 1] enlarges the ventricles, sulci and extracerebral CSF. ``head_offset`` is the head
    centre in the grid frame (mm).
    """
    size = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.08))
    asym = float(rng.normal(0.0, 0.02))  # right/left hemisphere width difference
    rotation = _random_rotation(rng, 8.0)
    axes = grid.axes_mm()
    # Phantom-frame coordinates of every voxel: x right, y anterior, z superior (mm from the head centre).
    d = [axes[i] - head_offset[i] for i in range(3)]
    p = [
        (rotation[r, 0] * d[0][:, None, None] + rotation[r, 1] * d[1][None, :, None] + rotation[r, 2] * d[2]).astype(
            np.float32
        )
        for r in range(3)
    ]
    x, y, z = p
    s_min = float(min(grid.spacing))
    s_max = float(max(grid.spacing))
    vent_scale = 0.75 + 0.9 * atrophy
    csf_mm = 1.5 + 3.0 * atrophy
    params = {"size": size, "asymmetry": asym, "atrophy": atrophy, "ventricle_scale": vent_scale}

    # Cerebrum: an egg-shaped ellipsoid, narrower in front, flatter below, slightly asymmetric; the surface is
    # perturbed by a low-frequency field so every patient has a different outline.
    a = np.where(x > 0, 68.0 * size * (1 + asym), 68.0 * size * (1 - asym)) * (1 - 0.08 * y / (82.0 * size))
    c = np.where(z > 0, 60.0 * size, 46.0 * size)
    outline, _ = _plane_wave_field(rng, axes, rotation, head_offset, 12, (50.0, 120.0))
    depth_cerebrum = _ellipsoid_depth(p, (0.0, 0.0, 0.0), (a, 82.0 * size, c)) + 2.5 * outline
    # Cerebellum below and behind, brainstem as a tapering tube going down from the midbrain.
    cb_centre = (0.0, -50.0 * size, -44.0 * size)
    cb_semi = (52.0 * size, 30.0 * size, 22.0 * size)
    depth_cb = _ellipsoid_depth(p, cb_centre, cb_semi)
    p1 = np.array([0.0, -14.0, -22.0]) * size
    p2 = np.array([0.0, -34.0, -100.0]) * size
    seg = p2 - p1
    t = np.clip(((x - p1[0]) * seg[0] + (y - p1[1]) * seg[1] + (z - p1[2]) * seg[2]) / float(seg @ seg), 0, 1)
    dist_axis = np.sqrt((x - p1[0] - t * seg[0]) ** 2 + (y - p1[1] - t * seg[1]) ** 2 + (z - p1[2] - t * seg[2]) ** 2)
    radius = size * (10.0 + 6.0 * np.exp(-(((t - 0.3) / 0.13) ** 2)))  # the pons bulges
    below_tentorium = z < -24.0 * size
    depth_bs = np.where(below_tentorium, radius - dist_axis, -1e3).astype(np.float32)

    tissue = np.zeros(grid.shape, np.uint8)
    envelope = (depth_cerebrum > -csf_mm) | (depth_cb > -csf_mm - 1) | (depth_bs > -csf_mm - 2)
    tissue[envelope] = 1
    cerebrum = (depth_cerebrum > 0) & (depth_cb < -3.0) & (depth_bs < -3.0)

    # Interhemispheric fissure: a CSF sheet in the midline, stopping above the corpus callosum.
    vent_y, vent_z = -4.0 * size, 10.0 * size
    half_w = 0.5 * max(1.5 + 2.0 * atrophy, grid.spacing[0])
    midline = 60.0 * asym + 2.0 * np.sin(y / (30.0 * size))  # shifted by the asymmetry, gently curved
    callosum_top = vent_z + 7.0 * vent_scale * size + 9.0 * size
    floor = np.where(np.abs(y - vent_y) < 36.0 * size, callosum_top, -80.0)
    fissure = (np.abs(x - midline) < half_w) & (z > floor)
    # Sulci: the zero set of a random field with ~1.5-3 cm wavelength, thickened to a width in mm and limited
    # to a (noisy) depth below the brain surface; the cortex then follows the folds.
    fold, fold_grad = _plane_wave_field(rng, axes, rotation, head_offset, 48, (14.0, 30.0), with_gradient_norm=True)
    depth_mod, _ = _plane_wave_field(rng, axes, rotation, head_offset, 8, (30.0, 80.0))
    sulcus_w = max(1.2 + 2.5 * atrophy, 0.9 * s_min)
    sulcal_depth = (20.0 + 5.0 * depth_mod) * size
    sulci = (np.abs(fold) < 0.5 * sulcus_w * fold_grad) & (depth_cerebrum < sulcal_depth)
    del fold, fold_grad, depth_mod
    cerebral_tissue = cerebrum & ~fissure & ~sulci
    # Cortical GM: cerebral tissue within the cortical thickness of non-tissue (outside, sulci, fissure); the
    # thickness is modulated by a noise field so the grey/white boundary is irregular (gyral crowns, fundi).
    thickness = float(rng.uniform(2.6, 3.4)) * (1 - 0.1 * atrophy)
    ribbon, _ = _plane_wave_field(rng, axes, rotation, head_offset, 24, (8.0, 24.0))
    local_thickness = np.maximum(thickness * (1.0 + 0.45 * ribbon), 0.5 * thickness)
    dist_out = ndimage.distance_transform_edt(cerebral_tissue, sampling=grid.spacing)
    # A voxel next to CSF is cortex whatever the grid, so the ribbon is at least one voxel thick.
    cortex = cerebral_tissue & ((dist_out <= local_thickness + 0.5 * s_min) | (dist_out <= s_max + 1e-3))
    del ribbon, local_thickness
    tissue[cerebrum] = 1
    tissue[cerebral_tissue] = 3
    tissue[cortex] = 2

    # Deep grey nuclei (thalamus, lentiform nucleus, caudate head), then ventricles on top.
    deep = np.zeros(grid.shape, bool)
    for side in (-1.0, 1.0):
        for ctr, semi in (
            ((11.0, -14.0, -4.0), (8.0, 13.0, 9.0)),
            ((23.0, 2.0, -2.0), (6.0, 14.0, 9.0)),
            ((13.0, 16.0, 6.0), (5.0, 8.0, 8.0)),
        ):
            deep |= _inside_ellipsoid(p, (side * ctr[0] * size, ctr[1] * size, ctr[2] * size), [v * size for v in semi])
    tissue[deep & cerebral_tissue & ~cortex] = 7

    vent = np.zeros(grid.shape, bool)
    ax_v, ay_v, az_v = 5.0 * vent_scale * size, 30.0 * size, 7.0 * vent_scale * size
    bend = 10.0 * size
    tv = (y - vent_y) / ay_v
    for side in (-1.0, 1.0):
        xc = side * (ax_v + 1.2) * (1 - 0.2 * tv)  # frontal horns a little closer to the midline
        zc = vent_z - bend * tv**2  # the bodies arch over the thalami
        vent |= ((x - xc) / ax_v) ** 2 + tv**2 + ((z - zc) / az_v) ** 2 <= 1.0
    vent |= _inside_ellipsoid(p, (0.0, -10.0 * size, -4.0 * size), (1.5 * vent_scale, 12.0 * size, 8.0 * size))
    tissue[vent & cerebrum] = 4

    # Infratentorial: cerebellar cortex with folia (thin CSF sheets), a white matter core, brainstem.
    cerebellum = depth_cb > 0
    folia, folia_grad = _plane_wave_field(
        rng, axes, rotation, head_offset, 24, (8.0, 16.0), direction_scale=(0.3, 0.6, 1.0), with_gradient_norm=True
    )
    folia_csf = (np.abs(folia) < 0.5 * max(1.0, 0.9 * s_min) * folia_grad) & (depth_cb < 12.0 * size)
    core, _ = _plane_wave_field(rng, axes, rotation, head_offset, 10, (15.0, 40.0))
    cb_tissue = cerebellum & ~folia_csf
    tissue[cb_tissue] = 6
    tissue[cb_tissue & (depth_cb > (10.0 + 2.5 * core) * size)] = 5
    brainstem = depth_bs > 0
    tissue[brainstem] = 5
    tissue[_inside_ellipsoid(p, (0.0, -38.0 * size, -45.0 * size), (5.0 * size, 3.5 * size, 8.0 * size))] = 4
    del folia, folia_grad, core

    parenchyma = np.isin(tissue, PARENCHYMA_LABELS)
    dist_ventricle = ndimage.distance_transform_edt(tissue != 4, sampling=grid.spacing).astype(np.float32)
    dist_cortex = ndimage.distance_transform_edt(tissue != 2, sampling=grid.spacing).astype(np.float32)
    texture, _ = _plane_wave_field(rng, axes, rotation, head_offset, 24, (5.0, 20.0))
    params["cortical_thickness_mm"] = thickness
    params["sulcus_width_mm"] = sulcus_w
    return Anatomy(tissue, parenchyma, dist_ventricle, dist_cortex, texture, params)


# --------------------------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Lesion:
    """One lesion or NET2 event: its voxels (flat indices) and what the images and the truth need of it."""

    voxels: np.ndarray
    kind: str  # "chronic", "recent", "new" or "enlarging"
    region: str
    centre_mm: np.ndarray  # grid frame
    nominal_volume_mm3: float
    hyper: float  # FLAIR/T2/PD contrast fraction
    t1_dark: float  # T1 hypointensity fraction
    enhance: float = 0.0  # T1-Gd enhancement fraction when enhancing
    onset_week: float | None = None
    gd_duration_weeks: float | None = None
    parent: int | None = None  # for enlargements: index of the prior lesion (component) that grew


_NEIGHBOURS6 = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


class LesionPlacer:
    """Rasterizes ovoid lesions on a grid and places NET2 events so that they never touch each other."""

    def __init__(self, grid: Grid, anatomy: Anatomy, config: CohortConfig, rng: np.random.Generator) -> None:
        self.grid = grid
        self.anatomy = anatomy
        self.config = config
        self.rng = rng
        self.spacing = np.asarray(grid.spacing)
        self.shape = np.asarray(grid.shape)
        tissue = anatomy.tissue
        wm = tissue == 3
        near = max(3.0, 1.01 * float(self.spacing.max()))
        self.abut_mm = near
        self.pv_mm = max(6.0, 1.01 * float(self.spacing.max()))
        pv = wm & (anatomy.dist_ventricle <= self.pv_mm)
        jc = wm & (anatomy.dist_cortex <= near) & ~pv
        self.candidates: dict[str, np.ndarray] = {
            "periventricular": np.flatnonzero(pv),
            "juxtacortical": np.flatnonzero(jc),
            "deep_white": np.flatnonzero(wm & ~pv & ~jc),
            "infratentorial": np.flatnonzero(tissue == 5),
            "any": np.flatnonzero(wm | (tissue == 5) | (tissue == 7)),
        }
        if self.candidates["any"].size == 0:
            self.candidates["any"] = np.flatnonzero(anatomy.parenchyma)
        if self.candidates["any"].size == 0:
            raise ValueError("the grid holds no brain parenchyma; enlarge --shape or --spacing")
        self.flat_parenchyma = anatomy.parenchyma.ravel()

    # -- geometry ------------------------------------------------------------------------------------------
    def _draw_volume(self, median: float, sigma: float) -> float:
        v = median * math.exp(sigma * self.rng.normal())
        return float(np.clip(v, self.config.min_volume_mm3, self.config.max_volume_mm3))

    def _draw_axes(self, volume: float, elongated: bool) -> np.ndarray:
        """Semi-axes (mm, longest first) of an ovoid of the given volume."""
        lo = 0.35 if elongated else 0.55
        b = self.rng.uniform(lo, 1.0)
        c = self.rng.uniform(lo, 1.0) * b
        a = (3 * volume / (4 * np.pi * b * c)) ** (1 / 3)
        return np.array([a, a * b, a * c])

    def _orientation(self, long_axis: np.ndarray | None) -> np.ndarray:
        """Rotation whose first column is ``long_axis`` (or random); columns are the ovoid's axes."""
        m = self.rng.normal(size=(3, 3))
        if long_axis is not None and np.linalg.norm(long_axis) > 1e-6:
            m[:, 0] = long_axis
        q, r = np.linalg.qr(m)
        return q * np.sign(np.diag(r))

    def _ventricle_normal(self, flat: int) -> np.ndarray | None:
        """Direction away from the ventricles at a voxel (Dawson's fingers point along it)."""
        ijk = np.array(np.unravel_index(flat, self.grid.shape))
        dv = self.anatomy.dist_ventricle
        g = np.zeros(3)
        for ax in range(3):
            hi = ijk.copy()
            lo = ijk.copy()
            hi[ax] = min(hi[ax] + 1, self.shape[ax] - 1)
            lo[ax] = max(lo[ax] - 1, 0)
            g[ax] = (dv[tuple(hi)] - dv[tuple(lo)]) / self.spacing[ax]
        return g if np.linalg.norm(g) > 1e-6 else None

    def rasterize(
        self, centre: np.ndarray, semi: np.ndarray, rot: np.ndarray, seed_flat: int | None = None
    ) -> np.ndarray:
        """Flat indices of the voxels whose centres lie in the ovoid, clipped to parenchyma.

        The voxel holding the centre (or ``seed_flat``) is always kept, so a lesion smaller than a voxel still has
        one voxel; only the 26-connected piece containing it is returned, so the lesion is a single component.
        """
        seed = (
            np.array(np.unravel_index(seed_flat, self.grid.shape))
            if seed_flat is not None
            else np.clip(np.rint(centre / self.spacing).astype(int), 0, self.shape - 1)
        )
        reach = float(semi.max())
        lo = np.maximum(np.floor((centre - reach) / self.spacing).astype(int), 0)
        hi = np.minimum(np.ceil((centre + reach) / self.spacing).astype(int) + 1, self.shape)
        lo = np.minimum(lo, seed)
        hi = np.maximum(hi, seed + 1)
        offs = [np.arange(lo[i], hi[i]) * self.spacing[i] - centre[i] for i in range(3)]
        # Coordinates along the ovoid's own axes: q_j = sum_i rot[i, j] * d_i.
        inside = np.zeros(tuple(hi - lo), np.float64)
        for j in range(3):
            q = (
                rot[0, j] * offs[0][:, None, None]
                + rot[1, j] * offs[1][None, :, None]
                + rot[2, j] * offs[2][None, None, :]
            )
            inside += (q / semi[j]) ** 2
        mask = inside <= 1.0
        box = tuple(slice(lo[i], hi[i]) for i in range(3))
        mask &= self.anatomy.parenchyma[box]
        local_seed = tuple(seed - lo)
        mask[local_seed] = True
        labels, _ = label_lesions(mask)
        mask = labels == labels[local_seed]
        idx = np.nonzero(mask)
        return np.ravel_multi_index(tuple(idx[i] + lo[i] for i in range(3)), self.grid.shape)

    def region_of(self, voxels: np.ndarray) -> str:
        """Anatomical region of a lesion from its voxels.

        Infratentorial: mostly in the brainstem/cerebellum. Periventricular: a voxel within ``pv_mm`` (6 mm, at
        least one voxel) of the ventricle wall. Juxtacortical: the voxel nearest the lesion's centroid is in or
        next to the cortex (at coarse grids much white matter is one voxel from cortex, so a single touching voxel
        would call too many lesions juxtacortical). Else deep grey or deep white matter.
        """
        tissue = self.anatomy.tissue.ravel()[voxels]
        if np.mean(np.isin(tissue, (5, 6))) >= 0.5:
            return "infratentorial"
        if self.anatomy.dist_ventricle.ravel()[voxels].min() <= self.pv_mm:
            return "periventricular"
        ijk = np.stack(np.unravel_index(voxels, self.grid.shape), 1)
        nearest = ijk[np.argmin(((ijk - ijk.mean(0)) ** 2).sum(1))]
        if self.anatomy.dist_cortex[tuple(nearest)] <= self.abut_mm:
            return "juxtacortical"
        if np.mean(tissue == 7) >= 0.5:
            return "deep_grey"
        return "deep_white"

    def _pick_region(self, weights: dict[str, float], near: np.ndarray | None) -> np.ndarray:
        names = [
            k
            for k in weights
            if (k == "near_lesion" and near is not None and near.size)
            or (k != "near_lesion" and self.candidates[k].size)
        ]
        if not names:
            return self.candidates["any"]
        w = np.array([weights[k] for k in names])
        name = names[int(self.rng.choice(len(names), p=w / w.sum()))]
        return near if name == "near_lesion" else self.candidates[name]

    def _ovoid_at(self, flat: int, volume: float, candidates_are_pv: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Centre (jittered within the voxel), semi-axes and orientation of an ovoid started at voxel ``flat``."""
        ijk = np.array(np.unravel_index(flat, self.grid.shape), float)
        centre = (ijk + self.rng.uniform(-0.5, 0.5, 3)) * self.spacing
        pv = candidates_are_pv or self.anatomy.dist_ventricle.ravel()[flat] <= 8.0
        long_axis = self._ventricle_normal(flat) if pv else None
        semi = self._draw_axes(volume, elongated=long_axis is not None)
        return centre, semi, self._orientation(long_axis)

    # -- chronic lesions (may be confluent) --------------------------------------------------------------------
    def chronic(self, n: int) -> list[Lesion]:
        """Baseline chronic lesions; they may overlap and merge (confluent lesions are common)."""
        cfg = self.config
        lesions = []
        for _ in range(n):
            cand = self._pick_region(_CHRONIC_REGION_WEIGHTS, None)
            flat = int(cand[self.rng.integers(cand.size)])
            volume = self._draw_volume(cfg.chronic_volume_median_mm3, cfg.chronic_volume_sigma)
            centre, semi, rot = self._ovoid_at(flat, volume, cand is self.candidates["periventricular"])
            vox = self.rasterize(centre, semi, rot)
            lesions.append(
                Lesion(
                    vox,
                    "chronic",
                    self.region_of(vox),
                    centre,
                    volume,
                    hyper=self.rng.uniform(0.6, 1.0),
                    t1_dark=self.rng.uniform(0.2, 1.0),
                )
            )
        return lesions

    # -- non-touching events ---------------------------------------------------------------------------------
    def place_events(
        self,
        kinds: Sequence[str],
        prior_mask: np.ndarray,
        recent_mask: np.ndarray | None = None,
        new_volume: tuple[float, float] | None = None,
    ) -> list[Lesion]:
        """Place events (``"new"`` or ``"enlarging"``) that touch neither each other nor, for new lesions, any
        prior lesion; an enlargement is the newly grown, connected voxels next to one prior lesion.

        Every event is a single 26-connected component of >= 1 voxel, and no two events are 26-adjacent, so the
        connected components of the union of any subset of the events equal that subset's size.
        """
        cfg = self.config
        prior = prior_mask.ravel()
        prior_components, n_prior = label_lesions(prior_mask)
        prior_components = prior_components.ravel()
        # new lesions must not touch old ones
        blocked_new = ndimage.binary_dilation(prior_mask, CONNECTIVITY_26).ravel()
        blocked_rim = np.zeros(prior.size, bool)  # enlargements must not touch other events
        near = None
        if n_prior:
            dist = ndimage.distance_transform_edt(~prior_mask, sampling=self.grid.spacing).ravel()
            near = self.candidates["any"]  # white matter (supra- and infratentorial) and deep grey matter
            near = near[(dist[near] > 1.01 * self.spacing.max()) & (dist[near] <= 15.0)]
        # Enlargement parents: prior components, bigger and recent lesions more likely to grow.
        parent_weights = None
        if n_prior:
            sizes = np.bincount(prior_components, minlength=n_prior + 1)[1:].astype(float)
            parent_weights = np.sqrt(sizes)
            if recent_mask is not None and recent_mask.any():
                recent_ids = np.unique(prior_components[recent_mask.ravel() & prior])
                parent_weights[recent_ids[recent_ids > 0] - 1] *= 3.0
            parent_weights /= parent_weights.sum()
        med, sig = new_volume or (cfg.new_volume_median_mm3, cfg.new_volume_sigma)
        events: list[Lesion] = []
        for kind in kinds:
            ev = None
            if kind == "enlarging" and n_prior:
                ev = self._enlarge(prior, prior_components, parent_weights, blocked_rim)
            if ev is None:  # a new lesion (also the fallback when no prior lesion can grow)
                ev = self._new_lesion(med, sig, near, blocked_new | blocked_rim)
            events.append(ev)
            # Block the event's 26-neighbourhood for every later event.
            grown = self._dilate_flat(ev.voxels)
            blocked_new[grown] = True
            blocked_rim[grown] = True
        return events

    def _dilate_flat(self, voxels: np.ndarray) -> np.ndarray:
        ijk = np.stack(np.unravel_index(voxels, self.grid.shape), 1)
        offs = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
        nb = (ijk[:, None, :] + offs[None]).reshape(-1, 3)
        nb = nb[np.all((nb >= 0) & (nb < self.shape), 1)]
        return np.unique(np.ravel_multi_index(nb.T, self.grid.shape))

    def _new_lesion(self, median: float, sigma: float, near: np.ndarray | None, blocked: np.ndarray) -> Lesion:
        # The region is kept for several tries so crowded regions (periventricular rims of confluent lesions) are
        # not silently under-sampled; later rounds draw smaller lesions so crowded brains still find room.
        for round_ in range(4):
            cand = self._pick_region(_NEW_REGION_WEIGHTS, near)
            free = cand[~blocked[cand]]
            if free.size == 0:
                continue
            for _ in range(15):
                flat = int(free[self.rng.integers(free.size)])
                volume = self._draw_volume(median, sigma) * 0.5 ** max(0, round_ - 1)
                centre, semi, rot = self._ovoid_at(flat, volume, cand is self.candidates["periventricular"])
                vox = self.rasterize(centre, semi, rot)
                if not blocked[vox].any():
                    return self._acute(vox, "new", centre, volume)
        # Exhaustive fallback: a single-voxel lesion at any free parenchyma voxel.
        free = np.flatnonzero(self.flat_parenchyma & ~blocked)
        if free.size == 0:
            raise RuntimeError("no room left for a new lesion; the grid is too small for this lesion load")
        flat = int(free[self.rng.integers(free.size)])
        centre = np.array(np.unravel_index(flat, self.grid.shape), float) * self.spacing
        return self._acute(np.array([flat]), "new", centre, self.config.min_volume_mm3)

    def _enlarge(
        self, prior: np.ndarray, components: np.ndarray, weights: np.ndarray, blocked: np.ndarray
    ) -> Lesion | None:
        cfg = self.config
        shape = self.grid.shape
        for _ in range(30):
            parent = int(self.rng.choice(weights.size, p=weights)) + 1
            vox = np.flatnonzero(components == parent)
            ijk = np.stack(np.unravel_index(vox, shape), 1)
            # Outward 6-neighbours of the parent that are free parenchyma: possible seeds of growth.
            nb = (ijk[:, None, :] + _NEIGHBOURS6[None]).reshape(-1, 3)
            nb = nb[np.all((nb >= 0) & (nb < self.shape), 1)]
            nb_flat = np.unique(np.ravel_multi_index(nb.T, shape))
            nb_flat = nb_flat[self.flat_parenchyma[nb_flat] & ~prior[nb_flat] & ~blocked[nb_flat]]
            if nb_flat.size == 0:
                continue
            seed = int(nb_flat[self.rng.integers(nb_flat.size)])
            seed_mm = np.array(np.unravel_index(seed, shape), float) * self.spacing
            parent_mm = ijk.mean(0) * self.spacing
            outward = seed_mm - parent_mm
            volume = self._draw_volume(cfg.enlarge_volume_median_mm3, cfg.enlarge_volume_sigma)
            semi = self._draw_axes(volume, elongated=False)
            rot = self._orientation(outward)
            # The bud grows out of the parent: centred half a semi-axis beyond the seed voxel.
            centre = seed_mm + 0.5 * semi[2] * outward / (np.linalg.norm(outward) + 1e-6)
            bud = self.rasterize(centre, semi, rot, seed_flat=seed)
            rim = bud[~prior[bud]]
            rim = self._component_with(rim, seed)
            if blocked[rim].any():
                rim = np.array([seed])  # fall back to the single seed voxel, which is free
            ev = self._acute(rim, "enlarging", seed_mm, volume)
            ev.parent = parent - 1
            return ev
        return None

    def _component_with(self, voxels: np.ndarray, seed: int) -> np.ndarray:
        """The 26-connected piece of ``voxels`` that contains ``seed``."""
        ijk = np.stack(np.unravel_index(voxels, self.grid.shape), 1)
        lo = ijk.min(0)
        local = np.zeros(tuple(ijk.max(0) - lo + 1), bool)
        local[tuple((ijk - lo).T)] = True
        labels, _ = label_lesions(local)
        seed_local = tuple(np.array(np.unravel_index(seed, self.grid.shape)) - lo)
        keep = labels[tuple((ijk - lo).T)] == labels[seed_local]
        return voxels[keep]

    def _acute(self, voxels: np.ndarray, kind: str, centre: np.ndarray, volume: float) -> Lesion:
        return Lesion(
            voxels,
            kind,
            self.region_of(voxels),
            centre,
            volume,
            hyper=self.rng.uniform(0.75, 1.0),
            t1_dark=self.rng.uniform(0.25, 0.7),
            enhance=self.rng.uniform(0.7, 1.0),
        )


# --------------------------------------------------------------------------------------------------------------
# Treatment
# --------------------------------------------------------------------------------------------------------------
def patient_efficacy(arm_efficacy: dict[str, float], exponent: float) -> dict[str, float]:
    """Patient-level efficacy ``e_p(a) = 1 - (1 - e_a) ** k_p``; monotone in ``e_a`` for any ``k_p > 0``."""
    return {arm: float(1.0 - (1.0 - e) ** exponent) for arm, e in arm_efficacy.items()}


# --------------------------------------------------------------------------------------------------------------
# MRI synthesis
# --------------------------------------------------------------------------------------------------------------
def _lesion_maps(lesions: Iterable[Lesion], n_vox: int, enhancing: set[int]) -> dict[str, np.ndarray]:
    """Per-voxel lesion contrast fractions (max over overlapping lesions)."""
    hyper = np.zeros(n_vox, np.float32)
    dark = np.zeros(n_vox, np.float32)
    gd = np.zeros(n_vox, np.float32)
    for i, les in enumerate(lesions):
        v = les.voxels
        hyper[v] = np.maximum(hyper[v], les.hyper)
        dark[v] = np.maximum(dark[v], les.t1_dark)
        if i in enhancing:
            gd[v] = np.maximum(gd[v], les.enhance)
    return {"hyper": hyper, "dark": dark, "gd": gd}


def synthesize_mri(
    rng: np.random.Generator,
    grid: Grid,
    anatomy: Anatomy,
    lesion_maps: dict[str, np.ndarray],
    gains: dict[str, float],
    bias_base: dict[str, np.ndarray],
    rotation: np.ndarray,
    head_offset: np.ndarray,
) -> dict[str, np.ndarray]:
    """The five MRI contrasts of one visit as int16 raw scanner units."""
    out = {}
    tissue = anatomy.tissue
    parenchyma = anatomy.parenchyma
    texture = np.where(parenchyma, 1.0 + 0.03 * anatomy.texture, 1.0).astype(np.float32)
    hyper = lesion_maps["hyper"].reshape(grid.shape)
    dark = lesion_maps["dark"].reshape(grid.shape)
    gd = lesion_maps["gd"].reshape(grid.shape)
    axes = grid.axes_mm()
    for m in MRI_MODALITIES:
        img = np.asarray(_TISSUE_INTENSITY[m], np.float32)[tissue] * texture
        if m in ("t1", "t1gd"):
            img = img * (1 - dark) + _LESION_INTENSITY[m] * dark
        else:
            img = img * (1 - hyper) + _LESION_INTENSITY[m] * hyper
        if m == "t1gd":
            img = img * (1 - gd) + _ENHANCING_INTENSITY * gd
        # Partial-volume effect of a voxel-sized point spread function.
        img = ndimage.gaussian_filter(img, sigma=0.5, mode="constant")
        # Smooth multiplicative bias: a per-patient coil profile plus a smaller per-visit change.
        visit_bias, _ = _plane_wave_field(rng, axes, rotation, head_offset, 4, (200.0, 400.0))
        img *= np.exp(bias_base[m] + 0.04 * visit_bias)
        # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
        sigma = float(rng.uniform(0.015, 0.035))
        real = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
        imag = rng.normal(0.0, sigma, img.shape).astype(np.float32)
        img = np.sqrt(real**2 + imag**2)
        out[m] = np.clip(np.rint(img * gains[m]), 0, np.iinfo(np.int16).max).astype(np.int16)
    return out


# --------------------------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticCase:
    """Everything generated for one case, in memory."""

    case_id: str
    grid: Grid
    images: dict[str, np.ndarray]  # IMAGE_KEYS -> array (int16 MRI, uint8 masks)
    counterfactual: dict[str, np.ndarray]  # arm -> uint8 NET2 mask at the forecast visit
    tissue: np.ndarray
    treatment: str
    horizon_weeks: float
    truth: dict[str, Any] = field(default_factory=dict)


def _case_id(index: int) -> str:
    return f"syn{index:04d}"


def _horizon_choices(horizon_weeks: float | Sequence[float] | str) -> list[float]:
    if isinstance(horizon_weeks, str):
        horizon_weeks = [v for v in horizon_weeks.strip("[]()").split(",") if v.strip()]
    values = [float(horizon_weeks)] if isinstance(horizon_weeks, (int, float)) else [float(v) for v in horizon_weeks]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"horizon_weeks must be positive, got {horizon_weeks!r}")
    return values


def _as_number(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def generate_case(
    case_index: int,
    seed: int,
    *,
    shape: int | Sequence[int] = 64,
    spacing: float | Sequence[float] = 3.0,
    horizon_weeks: float | Sequence[float] = 24.0,
    config: CohortConfig | None = None,
    treatment: str | None = None,
) -> SyntheticCase:
    """Generate one patient from ``SeedSequence([seed, case_index])`` (independent of the cohort size).

    ``treatment`` forces the factual arm (else drawn uniformly, as in a randomized trial); forcing it changes
    nothing but the factual label, because every random stream is separate.
    """
    cfg = config or CohortConfig()
    shape3 = _as_triple(shape, int, "shape")
    spacing3 = _as_triple(spacing, float, "spacing")
    arm_eff = cfg.arm_efficacy()
    # Independent streams, so e.g. the grid (which changes lesion placement) never changes the patient draws.
    s_patient, s_anatomy, s_lesions, s_imaging, s_arm, s_horizon = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, case_index]).spawn(6)
    )
    case_id = _case_id(case_index)
    horizons = _horizon_choices(horizon_weeks)
    horizon = horizons[int(s_horizon.integers(len(horizons)))]
    if treatment is None:
        treatment = ARMS[int(s_arm.integers(len(ARMS)))]
    elif treatment not in ARMS:
        raise ValueError(f"unknown treatment {treatment!r}; valid arms are: {', '.join(ARMS)}")

    # ---- patient-level draws (grid independent) ----
    rng = s_patient
    age = float(rng.uniform(18, 55))
    duration = float(rng.gamma(2.0, 0.5))  # disease duration factor, mean 1
    activity = float(rng.gamma(cfg.activity_shape, 1.0 / cfg.activity_shape))
    drift = cfg.activity_drift_sd
    activity_future = activity * math.exp(drift * rng.normal() - drift**2 / 2)
    atrophy = float(
        np.clip(
            0.35 * (age - 18) / 37 + 0.3 * min(duration, 2.5) / 2.5 + 0.15 * min(activity, 3) / 3 + rng.normal(0, 0.08),
            0.0,
            1.0,
        )
    )
    k_p = float(
        np.clip(
            (activity_future / cfg.efficacy_reference_activity) ** cfg.efficacy_gamma
            * math.exp(cfg.efficacy_sd * rng.normal()),
            0.25,
            4.0,
        )
    )
    efficacy = patient_efficacy(arm_eff, k_p)
    rate_per_week = cfg.net2_rate / 24.0
    n_chronic = int(rng.poisson(cfg.baseline_lesions * duration * (0.35 + 0.65 * min(activity, 4.0))))
    # Recent lesions before visit 0, the past interval (visit 0 -> 1) and the future pool: Poisson processes.
    n_recent = int(rng.poisson(rate_per_week * activity * cfg.recent_window_weeks))
    recent_onset = -rng.uniform(0, cfg.recent_window_weeks, n_recent)
    recent_gd = rng.gamma(2.0, cfg.gd_duration_mean_weeks / 2, n_recent)
    lam_past = rate_per_week * activity * VISIT_INTERVAL_WEEKS
    n_past = int(rng.poisson(lam_past))
    past_onset = rng.uniform(0, VISIT_INTERVAL_WEEKS, n_past)
    past_gd = rng.gamma(2.0, cfg.gd_duration_mean_weeks / 2, n_past)
    past_kinds = np.where(rng.uniform(size=n_past) < cfg.enlarging_fraction, "enlarging", "new")
    lam_future = rate_per_week * activity_future * horizon
    n_future = int(rng.poisson(lam_future))
    future_u = rng.uniform(size=n_future)
    future_kinds = np.where(rng.uniform(size=n_future) < cfg.enlarging_fraction, "enlarging", "new")

    # ---- anatomy and grid ----
    arng = s_anatomy
    translation = arng.uniform(-5.0, 5.0, 3)
    grid = Grid(
        shape3,
        spacing3,
        tuple(float(v) for v in -(np.asarray(shape3) - 1) / 2 * np.asarray(spacing3) + translation),
    )
    # Head centre in the grid frame: 14 mm above the grid centre so the cerebrum and cerebellum fit, plus jitter.
    head_offset = (np.asarray(shape3) - 1) / 2 * np.asarray(spacing3) + np.array([0.0, 0.0, 14.0])
    head_offset = head_offset + arng.uniform(-3, 3, 3)
    anatomy = build_anatomy(arng, grid, atrophy, head_offset)
    rotation = np.eye(3)  # bias fields are defined in the scanner frame

    # ---- lesions ----
    placer = LesionPlacer(grid, anatomy, cfg, s_lesions)
    n_vox = int(np.prod(shape3))
    chronic = placer.chronic(n_chronic)
    chronic_mask = np.zeros(n_vox, bool)
    for les in chronic:
        chronic_mask[les.voxels] = True
    recent = placer.place_events(["new"] * n_recent, chronic_mask.reshape(shape3))
    for les, onset, gd in zip(recent, recent_onset, recent_gd, strict=True):
        les.kind, les.onset_week, les.gd_duration_weeks = "recent", float(onset), float(gd)
    baseline = chronic + recent
    t2_0 = chronic_mask.copy()
    for les in recent:
        t2_0[les.voxels] = True
    enh0 = {len(chronic) + i for i, les in enumerate(recent) if -les.onset_week < les.gd_duration_weeks}
    recent_mask = np.zeros(n_vox, bool)
    for les in recent:
        recent_mask[les.voxels] = True
    past = placer.place_events(list(past_kinds), t2_0.reshape(shape3), recent_mask.reshape(shape3))
    for les, onset, gd in zip(past, past_onset, past_gd, strict=True):
        les.onset_week, les.gd_duration_weeks = float(onset), float(gd)
    net2_1 = np.zeros(n_vox, bool)
    for les in past:
        net2_1[les.voxels] = True
    t2_1 = t2_0 | net2_1
    enh1 = {
        len(baseline) + i for i, les in enumerate(past) if VISIT_INTERVAL_WEEKS - les.onset_week < les.gd_duration_weeks
    }
    future = placer.place_events(list(future_kinds), t2_1.reshape(shape3), net2_1.reshape(shape3))

    # ---- counterfactual NET2 masks by Poisson thinning of the shared future pool ----
    counterfactual: dict[str, np.ndarray] = {}
    kept: dict[str, list[int]] = {}
    for arm in ARMS:
        keep = [i for i in range(n_future) if future_u[i] < 1.0 - efficacy[arm]]
        mask = np.zeros(n_vox, np.uint8)
        for i in keep:
            mask[future[i].voxels] = 1
        counterfactual[arm] = mask.reshape(shape3)
        kept[arm] = keep

    # ---- images ----
    irng = s_imaging
    gains = {m: float(math.exp(irng.uniform(math.log(100.0), math.log(3000.0)))) for m in MRI_MODALITIES}
    axes = grid.axes_mm()
    bias_base = {}
    for m in MRI_MODALITIES:
        field_m, _ = _plane_wave_field(irng, axes, rotation, head_offset, 6, (150.0, 400.0))
        bias_base[m] = float(irng.uniform(0.05, 0.15)) * field_m
    images: dict[str, np.ndarray] = {}
    visit_lesions = {0: (baseline, enh0, t2_0), 1: (baseline + past, enh1, t2_1)}
    for v in VISITS:
        lesions, enh, t2 = visit_lesions[v]
        maps = _lesion_maps(lesions, n_vox, enh)
        visit_gains = {m: g * math.exp(irng.normal(0, 0.08)) for m, g in gains.items()}
        mri = synthesize_mri(irng, grid, anatomy, maps, visit_gains, bias_base, rotation, head_offset)
        for m in MRI_MODALITIES:
            images[f"{m}_{v}"] = mri[m]
        images[f"t2les_{v}"] = t2.reshape(shape3).astype(np.uint8)
        images[f"gadles_{v}"] = (maps["gd"] > 0).reshape(shape3).astype(np.uint8)
    images["net2_1"] = net2_1.reshape(shape3).astype(np.uint8)
    assert set(images) == set(IMAGE_KEYS)

    # ---- truth ----
    origin = np.asarray(grid.origin)
    vv = grid.voxel_volume

    def describe(les: Lesion, idx: int) -> dict[str, Any]:
        ijk = np.stack(np.unravel_index(les.voxels, shape3), 1)
        d = {
            "index": idx,
            "kind": les.kind,
            "region": les.region,
            "volume_mm3": round(les.voxels.size * vv, 3),
            "nominal_volume_mm3": round(les.nominal_volume_mm3, 3),
            "n_voxels": int(les.voxels.size),
            "centroid_mm": [round(float(c), 3) for c in ijk.mean(0) * np.asarray(spacing3) + origin],
        }
        if les.onset_week is not None:
            d["onset_week"] = round(les.onset_week, 3)
        if les.parent is not None:
            d["parent_component"] = les.parent
        return d

    future_desc = []
    for i, les in enumerate(future):
        d = describe(les, i)
        d["u"] = round(float(future_u[i]), 6)
        d["arms"] = [arm for arm in ARMS if i in kept[arm]]
        future_desc.append(d)
    n_t2_0, n_t2_1 = count_lesions(images["t2les_0"]), count_lesions(images["t2les_1"])
    truth: dict[str, Any] = {
        "id": case_id,
        "treatment": treatment,
        "horizon_weeks": _as_number(horizon),
        "activity": round(activity, 6),
        "activity_future": round(activity_future, 6),
        "expected_count": {arm: lam_future * (1.0 - efficacy[arm]) for arm in ARMS},
        "counts": {arm: len(kept[arm]) for arm in ARMS},
        "efficacy": efficacy,
        "efficacy_exponent": k_p,
        "arm_efficacy": arm_eff,
        "lambda_placebo": lam_future,
        "past": {
            "expected_net2_count": lam_past,
            "net2_count": len(past),
            "t2_lesion_count_0": int(n_t2_0),
            "t2_lesion_count_1": int(n_t2_1),
            "t2_volume_mm3_0": float(t2_0.sum() * vv),
            "t2_volume_mm3_1": float(t2_1.sum() * vv),
            "gd_count_0": len(enh0),
            "gd_count_1": len(enh1),
            "chronic_lesions_drawn": n_chronic,
            "recent_lesions": [describe(les, i) for i, les in enumerate(recent)],
            "net2_events": [describe(les, i) for i, les in enumerate(past)],
        },
        "future_events": future_desc,
        "patient": {
            "age": round(age, 2),
            "disease_duration_factor": round(duration, 4),
            "atrophy": round(atrophy, 4),
            **{k: round(v, 4) for k, v in anatomy.params.items()},
        },
        "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "grid": {"shape": list(shape3), "spacing": list(spacing3), "affine": grid.affine.tolist()},
        "mri_dtype": "int16",
        "seed": int(seed),
        "case_index": int(case_index),
        "generator_version": GENERATOR_VERSION,
    }
    return SyntheticCase(case_id, grid, images, counterfactual, anatomy.tissue, treatment, horizon, truth)


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------
def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI atomically (temporary file, then rename) with RAS scanner-space qform and sform."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def write_case(case: SyntheticCase, out: str | os.PathLike) -> dict[str, Any]:
    """Write one case under ``out`` and return its datalist entry (paths relative to ``out``)."""
    out = Path(out)
    cid = case.case_id
    img_dir, lab_dir, truth_dir = out / "images" / cid, out / "labels" / cid, out / "truth"
    for d in (img_dir, lab_dir, truth_dir):
        d.mkdir(parents=True, exist_ok=True)
    affine = case.grid.affine
    entry: dict[str, Any] = {"id": cid}
    for key in IMAGE_KEYS:
        _save_nifti(img_dir / f"{key}.nii.gz", case.images[key], affine)
        entry[key] = f"images/{cid}/{key}.nii.gz"
    labels = {}
    for arm in ARMS:
        _save_nifti(lab_dir / f"net2_{arm}.nii.gz", case.counterfactual[arm], affine)
        labels[arm] = f"labels/{cid}/net2_{arm}.nii.gz"
    _save_nifti(truth_dir / f"{cid}_tissue.nii.gz", case.tissue, affine)
    truth = dict(case.truth)
    truth["counterfactual_labels"] = labels
    truth["tissue"] = f"truth/{cid}_tissue.nii.gz"
    truth["images"] = {k: entry[k] for k in IMAGE_KEYS}
    _write_json(truth_dir / f"{cid}.json", truth)
    entry["treatment"] = case.treatment
    entry["horizon_weeks"] = _as_number(case.horizon_weeks)
    entry["label"] = labels[case.treatment]
    return entry


def split_indices(n: int, fractions: Sequence[float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Deterministic random split of ``range(n)`` into training/validation/testing by the given fractions."""
    fr = np.asarray(list(fractions), float)
    if fr.size != 3 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {fractions!r}")
    cum = np.cumsum(fr / fr.sum())
    b1, b2 = round(float(n * cum[0])), round(float(n * cum[1]))
    order = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1])).permutation(n)
    return sorted(order[:b1].tolist()), sorted(order[b1:b2].tolist()), sorted(order[b2:].tolist())


def _generate_and_write(args: tuple[int, int, dict[str, Any], CohortConfig, str]) -> dict[str, Any]:
    index, seed, grid_kw, config, out = args
    case = generate_case(index, seed, config=config, **grid_kw)
    return write_case(case, out)


def generate_cohort(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    *,
    shape: int | Sequence[int] = 64,
    spacing: float | Sequence[float] = 3.0,
    horizon_weeks: float | Sequence[float] = 24.0,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    workers: int = 1,
    config: CohortConfig | None = None,
    progress: bool = True,
) -> Path:
    """Generate ``n`` cases into ``out`` and return the path of ``out/datalist.json`` (written last)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cfg = config or CohortConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid_kw = {
        "shape": _as_triple(shape, int, "shape"),
        "spacing": _as_triple(spacing, float, "spacing"),
        "horizon_weeks": _horizon_choices(horizon_weeks),
    }
    logger.info(
        "generating %d synthetic cases into %s (seed %d, grid %s at %s mm, horizon %s weeks, %d worker(s))",
        n,
        out,
        seed,
        grid_kw["shape"],
        grid_kw["spacing"],
        grid_kw["horizon_weeks"],
        workers,
    )
    jobs = [(i, seed, grid_kw, cfg, str(out)) for i in range(n)]
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            entries = list(tqdm(pool.map(_generate_and_write, jobs), total=n, desc="cases", disable=not progress))
    else:
        entries = [_generate_and_write(j) for j in tqdm(jobs, desc="cases", disable=not progress)]
    elapsed = time.perf_counter() - start
    logger.info("generated %d cases in %.1f s (%.2f s per case)", n, elapsed, elapsed / n)
    train, val, test = split_indices(n, split, seed)
    cohort = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        **{k: list(v) for k, v in grid_kw.items()},
        "split": list(split),
        "config": {k: (dict(v) if k == "efficacy" else v) for k, v in asdict(cfg).items()},
        "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "mri_dtype": "int16",
    }
    _write_json(out / "cohort.json", cohort)
    datalist = {
        "training": [entries[i] for i in train],
        "validation": [entries[i] for i in val],
        "testing": [entries[i] for i in test],
    }
    path = out / "datalist.json"
    _write_json(path, datalist)  # last, so a crash never leaves a datalist pointing at missing files
    logger.info("wrote %s (%d training, %d validation, %d testing)", path, len(train), len(val), len(test))
    return path


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, float)
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, [10, 25, 50, 75, 90])
    keys = ("p10", "p25", "median", "p75", "p90")
    return {
        "n": int(v.size),
        "mean": round(float(v.mean()), 3),
        **{k: round(float(x), 3) for k, x in zip(keys, q, strict=True)},
    }


def summarize_cohort(root: str | os.PathLike) -> dict[str, Any]:
    """Cohort figures measured from a written cohort (truth files and masks), for the realism documentation.

    Run ``python -c "import json, sys; from scripts.synthetic import summarize_cohort;
    print(json.dumps(summarize_cohort(sys.argv[1]), indent=2))" DIR``.
    """
    root = Path(root)
    datalist = json.loads((root / "datalist.json").read_text())
    entries = [e for split in ("training", "validation", "testing") for e in datalist[split]]
    truths = [json.loads((root / "truth" / f"{e['id']}.json").read_text()) for e in entries]
    n = len(truths)
    arms: dict[str, Any] = {}
    for arm in ARMS:
        counts = np.array([t["counts"][arm] for t in truths])
        factual = np.array([t["counts"][arm] for t in truths if t["treatment"] == arm])
        arms[arm] = {
            "mean_expected_count": round(float(np.mean([t["expected_count"][arm] for t in truths])), 3),
            "mean_count": round(float(counts.mean()), 3),
            "share_active": round(float((counts >= 1).mean()), 3),
            "rate_ratio_vs_placebo": None,
            "factual_n": int(factual.size),
            "factual_mean_count": round(float(factual.mean()), 3) if factual.size else None,
            "factual_share_active": round(float((factual >= 1).mean()), 3) if factual.size else None,
        }
    placebo_mean = arms["placebo"]["mean_count"]
    for arm in ARMS:
        arms[arm]["rate_ratio_vs_placebo"] = round(arms[arm]["mean_count"] / placebo_mean, 3) if placebo_mean else None
    future = [ev for t in truths for ev in t["future_events"]]
    past_events = [ev for t in truths for ev in t["past"]["net2_events"]]
    regions: dict[str, int] = {}
    for ev in future + past_events:
        regions[ev["region"]] = regions.get(ev["region"], 0) + 1
    baseline_volumes: list[float] = []
    for e in entries:
        img = nib.load(str(root / e["t2les_0"]))
        labels, k = label_lesions(np.asanyarray(img.dataobj))
        vv = float(np.prod(img.header.get_zooms()[:3]))
        baseline_volumes += (np.bincount(labels.ravel())[1:] * vv).tolist() if k else []
    past_counts = np.array([t["past"]["net2_count"] for t in truths])
    placebo_counts = np.array([t["counts"]["placebo"] for t in truths])
    gd0 = np.array([t["past"]["gd_count_0"] for t in truths])
    gd1 = np.array([t["past"]["gd_count_1"] for t in truths])
    return {
        "n_cases": n,
        "grid": truths[0]["grid"]["shape"] if truths else None,
        "spacing": truths[0]["grid"]["spacing"] if truths else None,
        "arms": arms,
        "future_net2_volume_mm3": _quantiles([ev["volume_mm3"] for ev in future]),
        "future_net2_nominal_volume_mm3": _quantiles([ev["nominal_volume_mm3"] for ev in future]),
        "future_event_kinds": {k: sum(ev["kind"] == k for ev in future) for k in ("new", "enlarging")},
        "net2_regions": regions,
        "past_net2_count": {**_quantiles(past_counts), "share_active": round(float((past_counts >= 1).mean()), 3)},
        "corr_past_vs_future_placebo_count": round(float(np.corrcoef(past_counts, placebo_counts)[0, 1]), 3)
        if n > 2 and past_counts.std() > 0 and placebo_counts.std() > 0
        else None,
        "baseline_t2_lesion_count": _quantiles([t["past"]["t2_lesion_count_0"] for t in truths]),
        "baseline_t2_volume_ml": _quantiles([t["past"]["t2_volume_mm3_0"] / 1000 for t in truths]),
        "baseline_t2_lesion_volume_mm3": _quantiles(baseline_volumes),
        "gd_count_visit0": {**_quantiles(gd0), "share_with_gd": round(float((gd0 >= 1).mean()), 3)},
        "gd_count_visit1": {**_quantiles(gd1), "share_with_gd": round(float((gd1 >= 1).mean()), 3)},
        "activity": _quantiles([t["activity"] for t in truths]),
        "ventricle_scale": _quantiles([t["patient"]["ventricle_scale"] for t in truths]),
    }


def main(
    out: str,
    n: int = 200,
    seed: int = 0,
    shape: int | Sequence[int] = 64,
    spacing: float | Sequence[float] = 3.0,
    horizon_weeks: float | Sequence[float] = 24.0,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    workers: int = 1,
    net2_rate: float = CohortConfig.net2_rate,
    activity_shape: float = CohortConfig.activity_shape,
    progress: bool = True,
    log_level: str = "INFO",
) -> str:
    """Write a synthetic cohort: ``python -m scripts.synthetic --out DIR --n N --seed S``.

    Args:
        out: output folder (``datalist.json``, ``images/``, ``labels/``, ``truth/``, ``cohort.json``).
        n: number of cases.
        seed: cohort seed; case ``i`` uses ``SeedSequence([seed, i])``.
        shape: grid size, one int or three.
        spacing: voxel size in mm, one number or three.
        horizon_weeks: forecast horizon after visit 1, a number or a list to draw from per case.
        split: training/validation/testing fractions.
        workers: processes generating cases in parallel.
        net2_rate: mean untreated NET2 count per 24 weeks at mean activity.
        activity_shape: gamma shape of patient activity (smaller: more overdispersed).
        progress: show a progress bar.
        log_level: logging level.
    """
    logging.basicConfig(
        level=getattr(logging, str(log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg = CohortConfig(net2_rate=float(net2_rate), activity_shape=float(activity_shape))
    path = generate_cohort(
        out,
        int(n),
        int(seed),
        shape=shape,
        spacing=spacing,
        horizon_weeks=horizon_weeks,
        split=tuple(float(s) for s in split),
        workers=int(workers),
        config=cfg,
        progress=progress,
    )
    return str(path)


if __name__ == "__main__":
    fire.Fire(main)
