"""Anatomical region of forecast lesions (McDonald location classes), from the case's own conditioning images.

There is no atlas or segmentation at inference time, so :func:`region_map` derives a coarse region map from the
conditioning volume ``cond`` (channels ``CONDITION_CHANNELS``, on the RAS axis-aligned working grid: axis 0 points
right, axis 1 anterior, axis 2 superior). Per MRI modality it uses the visit-1 image, else the visit-0 image, as
the availability channels tell; intensities are the pipeline's (foreground median 0.5, clipped to [0, 2]). Steps:

1. **Brain mask.** Each available image votes "head tissue" (above air and skull; on T1 below scalp fat). The
   parenchyma (tissue that is not CSF, see 2) is opened by one voxel and reduced to its largest component: CSF and
   skull make a gap of two or more voxels between brain and scalp in every contrast, so this drops scalp, eyes and
   neck of unstripped scans. The core is grown back four voxels inside the head vote (the dark skull stops it) and
   one voxel into the partial-volume rim (FLAIR 0.2-0.3); appendages joined by necks under two voxels are cut off
   (orbits, temporal muscle); a closing and hole filling add sulci, ventricles and cisterns.
2. **CSF.** A fuzzy score, the mean of per-modality ramps: dark on FLAIR and T1/T1-Gd, bright on T2 (PD cannot
   tell CSF from grey matter and does not vote). CSF = score >= 0.5; lesion voxels of ``cond`` (``t2les``,
   ``net2_1``) never count, since T1 black holes look like CSF.
3. **Ventricles.** Cores are CSF voxels deeper than 0.55 of the brain's largest depth (distance to the mask
   surface): the lateral ventricles lie at 0.7-0.9, sulci, fissure and cisterns at 0.45 or less (synthetic cohort
   and LIT patient01). Core components of at least 300 mm^3 whose centroid is near the midline (0.3 of the half
   width) and the middle of the AP axis (0.33 of the half length) are kept, if the tissue two voxels around them
   is white-matter-like (T1 bright, T2/PD dark) for at least half of it, as around the ventricles and unlike the
   cortex around sulci and cisterns (FLAIR alone: not checked). They grow up to 9 mm into partial-volume CSF
   (score >= 0.15) that is at least a quarter of the largest depth deep (horns, third ventricle).
4. **Infratentorial.** A tentorium-like surface from the brain's extent: 0.47 of the AP length L below the
   vertex, 0.52 L at the occipital pole, lower laterally (Talairach anatomy and the synthetic phantom). Confident
   seeds are grown one voxel at a time through non-CSF tissue until the fronts meet: infratentorial seeds deep
   under the back (cerebellum) and deep in the midline (brainstem), supratentorial ones well above the surface,
   in front-lateral (temporal lobes) and frontal-basal. CSF gaps (tentorium, cisterns) stop a front, so the border
   follows them where visible and lies between the seeds elsewhere (midbrain); CSF voxels take the nearest label.
5. **Periventricular**: within ``PERIVENTRICULAR_MM`` (6 mm: McDonald's "touching the ventricles" with one to two
   3 mm voxels of slack) of the ventricles. **Juxtacortical**: within ``JUXTACORTICAL_MM`` (7.5 mm: the cortex
   voxel plus the white matter voxel touching it) of the outside of the brain or of CSF outside the ventricles
   (sulci). **Deep white matter**: the rest of the brain. Precedence: infratentorial > periventricular >
   juxtacortical > deep white matter.

How well the map agrees with the synthetic truth and a real brain mask is measured by ``tests/test_regions.py``
(figures in ``bundle/docs/training.md``).

Limits: the map is as coarse as the 3 mm grid. Sulci narrower than a voxel are invisible, so juxtacortical is
mostly "near the outer surface or a visible sulcus"; deep grey matter is not separated (lesions there count as
deep white matter). The tentorium surface is a population prior refined by visible CSF: a brain whose top lies
outside the field of view, a strongly tilted head or a very unusual anatomy shifts it. Small ventricles (under
300 mm^3 of deep CSF), ventricles off-centre (strong asymmetry) or FLAIR/T1/T2 all absent (PD alone) give no
ventricles, hence no periventricular region. Skull stripping is morphological: it may keep some dura or CSF rim
and lose a little cortex, and with T2 or PD alone it is unreliable on unstripped scans (scalp and CSF look alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from scripts.runtime.constants import CONDITION_CHANNELS, MRI_MODALITIES
from scripts.runtime.lesions import label_lesions

__all__ = [
    "JUXTACORTICAL_MM",
    "PERIVENTRICULAR_MM",
    "REGIONS",
    "anatomy_masks",
    "brain_mask",
    "csf_score",
    "lesion_regions",
    "region_map",
    "select_images",
    "ventricles",
    "white_score",
]

REGIONS: tuple[str, ...] = ("periventricular", "juxtacortical", "infratentorial", "deep_white_matter")
"""Lesion location classes; :func:`region_map` codes ``REGIONS[i]`` as ``i + 1`` (0 outside the brain)."""

PERIVENTRICULAR_MM: float = 6.0
"""Distance (mm) from the ventricles within which tissue is periventricular."""
JUXTACORTICAL_MM: float = 7.5
"""Distance (mm) from the outside of the brain or sulcal CSF within which tissue is juxtacortical."""

_PV, _JC, _IT, _DWM = (REGIONS.index(r) + 1 for r in REGIONS)
_PRECEDENCE: tuple[int, ...] = (_IT, _PV, _JC, _DWM)
_LESION_KEYS: tuple[str, ...] = ("t2les_1", "t2les_0", "net2_1")

# Per modality (score 0, score 1) of a linear CSF ramp on normalised intensities (decreasing when the first is
# larger). Measured medians: synthetic ventricles FLAIR 0.15-0.21, T1 0.29-0.43, T2 0.68-0.75 against parenchyma
# FLAIR >= 0.48, T1 >= 0.5, T2 <= 0.57; LIT patient01 ventricles FLAIR 0.23, T1 0.26, T2 1.16.
_CSF_RAMP: dict[str, tuple[float, float]] = {
    "flair": (0.42, 0.25),
    "t1": (0.48, 0.3),
    "t1gd": (0.48, 0.3),
    "t2": (0.58, 0.72),
}
_CSF_LEVEL = 0.5
_RIM_LEVEL = 0.15  # partial-volume CSF the ventricles may grow into
# Per modality (low, high) band of head tissue: above air and skull (about 0), below T1 scalp fat (LIT patient01
# 0.9-1.6; synthetic white matter on T1 is about 0.95). FLAIR from 0.2 counts in the partial-volume rim only.
_TISSUE_BAND: dict[str, tuple[float, float]] = {
    "flair": (0.3, np.inf),
    "t1": (0.2, 1.35),
    "t1gd": (0.2, 1.6),
    "t2": (0.15, np.inf),
    "pd": (0.15, np.inf),
}
_RIM_BAND_LOW: dict[str, float] = {"flair": 0.2}
_OPENING_MM = 3.0  # cuts bridges under two voxels at 3 mm
_REGROW_MM = 12.0
_NECK_MM = 6.0

_VENTRICLE_CORE_DEPTH = 0.55  # fraction of the brain's largest depth
_VENTRICLE_MIN_DEPTH = 0.25  # the grown ventricles stay at least this deep
_VENTRICLE_MIN_MM3 = 300.0
_VENTRICLE_GROW_MM = 9.0
_VENTRICLE_MIN_LINING = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Inputs and helpers
# ----------------------------------------------------------------------------------------------------------------


def _as_numpy(cond: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(cond, torch.Tensor):
        cond = cond.detach().cpu().numpy()
    cond = np.asarray(cond, dtype=np.float32)
    if cond.ndim != 4 or cond.shape[0] != len(CONDITION_CHANNELS):
        raise ValueError(f"expected cond of shape ({len(CONDITION_CHANNELS)}, X, Y, Z), got {cond.shape}")
    return cond


def _available(cond: np.ndarray, key: str) -> bool:
    return float(cond[CONDITION_CHANNELS.index(f"available_{key}")].max()) > 0.5


def select_images(cond: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Per MRI modality the visit-1 volume, else the visit-0 volume, where available (modality -> volume)."""
    cond = _as_numpy(cond)
    images: dict[str, np.ndarray] = {}
    for modality in MRI_MODALITIES:
        key = next((f"{modality}_{v}" for v in (1, 0) if _available(cond, f"{modality}_{v}")), None)
        if key is not None:
            images[modality] = cond[CONDITION_CHANNELS.index(key)]
    return images


def _spacing3(spacing_mm: float | Sequence[float]) -> np.ndarray:
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    if not np.all(spacing > 0):
        raise ValueError(f"spacing must be positive, got {spacing_mm!r}")
    return spacing


def _ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Structuring element: the voxels whose centre lies within ``radius_mm`` (at least the 6-neighbour cross)."""
    half = np.maximum(np.floor(radius_mm / spacing), 1).astype(int)
    axes = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.asarray(sum(g**2 for g in grids) <= max(radius_mm, float(spacing.min())) ** 2 + 1e-6)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """3D hole filling, then axial slice by slice (cisterns and the fourth ventricle open to the outside in 3D)."""
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return mask


def _vote(images: dict[str, np.ndarray], low: dict[str, float] | None = None) -> np.ndarray:
    """Majority vote of the images for "head tissue" (``low`` overrides lower band limits)."""
    votes = np.zeros(next(iter(images.values())).shape, np.float32)
    for modality, image in images.items():
        lo, hi = _TISSUE_BAND[modality]
        lo = (low or {}).get(modality, lo)
        votes += (image >= lo) & (image <= hi)
    return votes >= 0.5 * len(images)


# ----------------------------------------------------------------------------------------------------------------
# Tissue maps
# ----------------------------------------------------------------------------------------------------------------


def csf_score(images: dict[str, np.ndarray]) -> np.ndarray | None:
    """Fuzzy CSF likelihood in [0, 1] (mean of the per-modality ramps); ``None`` when no modality can tell (PD)."""
    ramps = [
        np.clip((image - _CSF_RAMP[m][0]) / (_CSF_RAMP[m][1] - _CSF_RAMP[m][0]), 0.0, 1.0)
        for m, image in images.items()
        if m in _CSF_RAMP
    ]
    return np.mean(ramps, axis=0) if ramps else None


def white_score(images: dict[str, np.ndarray], tissue: np.ndarray, lesion: np.ndarray) -> np.ndarray | None:
    """Share of the modalities with a clear grey/white contrast (T1, T1-Gd, T2, PD) calling a voxel white matter.

    White-matter-like on T1 means brighter than the median of ``tissue`` (non-CSF brain), on T2 and PD darker.
    FLAIR's grey/white contrast is too weak to vote: ``None`` without any of the four. Lesion voxels count as white
    matter (MS lesions sit in it but look grey).
    """
    if not tissue.any():
        return None
    votes = [
        image > np.median(image[tissue]) if m in ("t1", "t1gd") else image < np.median(image[tissue])
        for m, image in images.items()
        if m != "flair"
    ]
    if not votes:
        return None
    white = np.mean(votes, axis=0)
    white[lesion] = 1.0
    return white


def _steps(mm: float, spacing: np.ndarray) -> int:
    """Number of one-voxel dilation steps that cover ``mm``."""
    return max(1, int(round(mm / float(spacing.min()))))


def brain_mask(images: dict[str, np.ndarray], spacing: np.ndarray) -> np.ndarray:
    """Brain mask from the available normalised MRI (step 1 of the module docstring)."""
    head = _vote(images)
    score = csf_score(images)
    parenchyma = head & (score < _CSF_LEVEL) if score is not None else head
    step = _ball(float(spacing.min()), spacing)
    core = _largest_component(ndimage.binary_opening(parenchyma, _ball(_OPENING_MM, spacing)))
    if not core.any():
        return core
    # the cortex and CSF rim removed by the opening come back; the dark skull is not in ``head`` and stops them
    brain = ndimage.binary_dilation(core, step, iterations=_steps(_REGROW_MM, spacing), mask=head)
    # one voxel of darker partial-volume rim (cerebellar folia, sulcal CSF on FLAIR), not yet skull
    brain |= ndimage.binary_dilation(brain, step) & _vote(images, _RIM_BAND_LOW) & ~head
    # appendages joined by narrow necks (orbits, temporal muscle at the skull base) go
    neck = _ball(max(_NECK_MM, 2.0 * float(spacing.min())), spacing)
    wide = _largest_component(ndimage.binary_opening(brain, neck))
    if wide.any():
        brain = ndimage.binary_dilation(wide, step, iterations=_steps(_NECK_MM, spacing), mask=brain)
    return _fill_holes(ndimage.binary_closing(brain, neck))


def ventricles(
    csf: np.ndarray,
    rim: np.ndarray,
    brain: np.ndarray,
    depth: np.ndarray,
    spacing: np.ndarray,
    white: np.ndarray | None,
) -> np.ndarray:
    """Ventricles: deep, central CSF components lined by white matter, grown into ``rim`` (step 3).

    Args:
        csf: CSF voxels of the brain.
        rim: partial-volume CSF the ventricles may grow into.
        brain: brain mask.
        depth: distance (mm) of each voxel to the brain mask's surface.
        spacing: voxel size (mm).
        white: :func:`white_score`, or ``None`` (the lining is not checked).
    """
    max_depth = float(depth.max())
    core = csf & (depth >= _VENTRICLE_CORE_DEPTH * max_depth)
    labels, count = ndimage.label(core)
    if count == 0:
        return np.zeros_like(brain)
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(core, labels, index) * float(np.prod(spacing))
    centroids = np.asarray(ndimage.center_of_mass(core, labels, index)).reshape(-1, 3)
    # offset from the brain's bounding-box centre in half extents: bodies and atria of the lateral ventricles lie
    # within 0.3 of the half length, the cistern over the cerebellum and the frontal fissure beyond 0.36
    rel = np.abs(centroids - (lo + hi) / 2.0) / np.maximum((hi - lo) / 2.0, 1.0)
    keep = (sizes >= _VENTRICLE_MIN_MM3) & (rel[:, 0] <= 0.3) & (rel[:, 1] <= 0.33)
    if white is not None:
        # the lining two voxels out, past the partial-volume rim: white matter, thalamus and caudate around the
        # ventricles, cortex around sulci and cisterns
        cross = ndimage.generate_binary_structure(3, 1)
        first = ndimage.grey_dilation(labels, footprint=cross)
        ring = np.where(brain & ~csf & (first == 0), ndimage.grey_dilation(first, footprint=cross), 0)
        lining = np.nan_to_num(np.asarray(ndimage.mean(white, ring, index), dtype=np.float64), nan=1.0)
        keep &= lining >= _VENTRICLE_MIN_LINING
    found = np.isin(labels, index[keep])
    # horns and third ventricle are shallower than the cores; a few voxels of growth keep a leak into cisterns small
    steps = _steps(_VENTRICLE_GROW_MM, spacing)
    return ndimage.binary_dilation(found, iterations=steps, mask=rim & (depth >= _VENTRICLE_MIN_DEPTH * max_depth))


def _infratentorial(brain: np.ndarray, barrier: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Infratentorial brain: seeds either side of a tentorium-like surface, grown through tissue (step 4)."""
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    grid = np.indices(brain.shape, dtype=np.float32)
    length = max(float(hi[1] - lo[1]) * spacing[1], 1.0)
    # depth below the vertex and position from the occipital pole, as fractions of the AP length
    depth = (hi[2] - grid[2]) * np.float32(spacing[2] / length)
    p = (grid[1] - lo[1]) * np.float32(spacing[1] / length)
    # midline from the upper half of the brain (the cerebrum); lateral offset as a fraction of the half width
    upper = idx[idx[:, 2] >= (lo[2] + hi[2]) / 2]
    lateral = np.abs(grid[0] - float(upper[:, 0].mean())) / max((hi[0] - lo[0]) / 2.0, 1.0)
    del grid
    surface = 0.47 + 0.05 * np.clip((0.2 - p) / 0.2, 0.0, 1.0) + 0.04 * lateral
    below = depth > surface
    midline = lateral < 0.15
    free = brain & ~barrier
    infra = free & (depth > surface + 0.17) & ((p < 0.3) | (midline & (p < 0.45)))
    supra = free & ((depth < surface - 0.11) | ((p > 0.45) & (lateral > 0.3)) | ((p > 0.6) & ~(midline & below)))
    # one voxel per step for both fronts, so the border lies where they meet; a voxel both reach goes by the surface
    for _ in range(sum(brain.shape)):
        grow_infra = ndimage.binary_dilation(infra, mask=free) & ~infra & ~supra
        grow_supra = ndimage.binary_dilation(supra, mask=free) & ~infra & ~supra
        if not (grow_infra.any() or grow_supra.any()):
            break
        both = grow_infra & grow_supra
        infra |= grow_infra & (below | ~both)
        supra |= grow_supra & (~below | ~both)
    labelled = infra | supra
    if not labelled.any():
        return brain & below
    # CSF and unreached voxels take the label of the nearest labelled voxel
    nearest = ndimage.distance_transform_edt(~labelled, sampling=spacing, return_distances=False, return_indices=True)
    return brain & infra[tuple(nearest)]


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def anatomy_masks(cond: np.ndarray | torch.Tensor, spacing_mm: float | Sequence[float] = 3.0) -> dict[str, np.ndarray]:
    """The masks behind :func:`region_map` (steps 1-4): ``brain``, ``csf``, ``ventricles``, ``infratentorial``.

    Boolean arrays of the spatial shape of ``cond``; all empty when no MRI is available or no brain is found.
    """
    cond = _as_numpy(cond)
    spacing = _spacing3(spacing_mm)
    shape = cond.shape[1:]
    empty = np.zeros(shape, bool)
    masks = {"brain": empty, "csf": empty, "ventricles": empty, "infratentorial": empty}
    images = select_images(cond)
    if not images:
        return masks
    brain = brain_mask(images, spacing)
    if not brain.any():
        return masks
    lesion = np.zeros(shape, bool)
    for key in _LESION_KEYS:
        if _available(cond, key):
            lesion |= cond[CONDITION_CHANNELS.index(key)] > 0.5
    score = csf_score(images)
    if score is None:
        score = np.zeros(shape, np.float32)
    csf = brain & ~lesion & (score >= _CSF_LEVEL)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    white = white_score(images, brain & ~lesion & (score < 0.2), lesion)
    vent = ventricles(csf, brain & ~lesion & (score >= _RIM_LEVEL), brain, depth, spacing, white)
    return {"brain": brain, "csf": csf, "ventricles": vent, "infratentorial": _infratentorial(brain, csf, spacing)}


def region_map(cond: np.ndarray | torch.Tensor, spacing_mm: float | Sequence[float] = 3.0) -> np.ndarray:
    """Region map (uint8, spatial shape of ``cond``): 0 outside the brain, ``i + 1`` for ``REGIONS[i]``.

    Args:
        cond: conditioning volume ``(len(CONDITION_CHANNELS), X, Y, Z)`` on the RAS axis-aligned working grid.
        spacing_mm: voxel size in mm, one number or three.

    All zeros when no MRI is available or no brain is found.
    """
    masks = anatomy_masks(cond, spacing_mm)
    spacing = _spacing3(spacing_mm)
    brain, vent = masks["brain"], masks["ventricles"]
    out = np.zeros(brain.shape, np.uint8)
    if not brain.any():
        return out
    # step 5: distances to the ventricles and to the outside or sulcal CSF (CSF not in or next to the ventricles)
    outer = ~brain | (masks["csf"] & ~ndimage.binary_dilation(vent))
    near_cortex = ndimage.distance_transform_edt(~outer, sampling=spacing) <= JUXTACORTICAL_MM
    near_ventricle = np.zeros(brain.shape, bool)
    if vent.any():
        near_ventricle = ndimage.distance_transform_edt(~vent, sampling=spacing) <= PERIVENTRICULAR_MM
    out[brain] = _DWM
    out[brain & near_cortex] = _JC
    out[brain & near_ventricle] = _PV
    out[masks["infratentorial"]] = _IT
    return out


def brain_restriction(regions: np.ndarray, margin_voxels: int = 1) -> np.ndarray | None:
    """Where a forecast lesion may lie: the brain of ``regions`` (:func:`region_map`) grown by ``margin_voxels``.

    NET2 lesions are brain lesions, yet a sampled forecast can hold isolated voxels in the scalp or the air; a margin
    keeps lesions at the brain's edge (juxtacortical, partial volume) whole where the brain mask is a voxel short.
    None when ``regions`` holds no brain (no MRI, or none found): then nothing should be restricted.
    """
    brain = np.asarray(regions) > 0
    if not brain.any():
        return None
    if margin_voxels > 0:
        brain = ndimage.binary_dilation(brain, structure=np.ones((3, 3, 3), bool), iterations=int(margin_voxels))
    return brain


def lesion_regions(mask: np.ndarray, regions: np.ndarray) -> list[str]:
    """Region of each 26-connected component of ``mask``, in ``scipy.ndimage.label`` order (3x3x3 structure).

    The region holding most of the component's voxels inside the brain map; ties go to the earlier region in the
    precedence infratentorial > periventricular > juxtacortical > deep white matter; ``"deep_white_matter"`` when
    no voxel lies in the brain map.
    """
    mask = np.asarray(mask)
    regions = np.asarray(regions)
    if mask.shape != regions.shape or mask.ndim != 3:
        raise ValueError(f"expected 3D mask and region map of one shape, got {mask.shape} and {regions.shape}")
    labels, count = label_lesions(mask)
    if count == 0:
        return []
    codes = regions.astype(np.int64)
    inside = (labels > 0) & (codes >= 1) & (codes <= len(REGIONS))
    votes = np.zeros((count + 1, len(REGIONS) + 1), np.int64)  # [component, region code]
    np.add.at(votes, (labels[inside], codes[inside]), 1)
    out = []
    for row in votes[1:]:
        if row.sum() == 0:
            out.append("deep_white_matter")
            continue
        # max() keeps the first maximum, so iterating in precedence order breaks ties by precedence
        best = max(_PRECEDENCE, key=lambda code, row=row: row[code])
        out.append(REGIONS[best - 1])
    return out
