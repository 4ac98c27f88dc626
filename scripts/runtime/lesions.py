"""Lesion analysis of binary masks: 26-connected lesions, volumes, world centroids and lesion-wise detection.

Command line (contract): ``python -m scripts.lesions MASK.nii.gz [--reference REF.nii.gz]`` prints one JSON object
with ``count``, ``total_volume_mm3``, ``lesions`` (``centroid_mm`` in world coordinates, ``volume_mm3``) and, with a
reference on the same grid, ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``, ``dice``.

Lesion-wise matching: a reference lesion is *detected* (tp) when at least one predicted lesion overlaps it by a
voxel; a predicted lesion is a false positive (fp) when it overlaps no reference lesion; a reference lesion that no
predicted lesion overlaps is a false negative (fn). One predicted lesion overlapping two reference lesions detects
both; two predicted lesions overlapping one reference lesion detect it once and neither is a false positive. Hence
precision = (predicted lesions overlapping a reference lesion) / (predicted lesions) and recall = tp / (reference
lesions). Empty conventions: precision is 1 with no predicted lesion, recall is 1 with no reference lesion, and F1
and Dice are 1 when both masks are empty.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of a binary 3D mask; returns (labels, count)."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"lesion masks must be 3D, got shape {mask.shape}")
    labels, count = ndimage.label(mask > 0, structure=CONNECTIVITY_26)
    return labels, int(count)


def count_lesions(mask: np.ndarray) -> int:
    """Number of 26-connected lesions in a binary 3D mask."""
    return label_lesions(mask)[1]


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3 from a 4x4 voxel-to-world affine."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def lesion_centroids(labels: np.ndarray, count: int, affine: np.ndarray) -> np.ndarray:
    """World centroids (mm, shape (count, 3)) of the lesions ``1..count`` of a label volume."""
    if count == 0:
        return np.zeros((0, 3))
    index = np.arange(1, count + 1)
    voxel = np.asarray(ndimage.center_of_mass(labels > 0, labels, index), dtype=np.float64).reshape(count, 3)
    affine = np.asarray(affine, dtype=np.float64)
    return voxel @ affine[:3, :3].T + affine[:3, 3]


def describe_lesions(mask: np.ndarray, affine: np.ndarray, prob: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per lesion: world centroid (mm), volume (mm^3) and, with a probability map, its mean probability."""
    labels, count = label_lesions(mask)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    voxels = ndimage.sum_labels(labels > 0, labels, index)
    world = lesion_centroids(labels, count, affine)
    unit = voxel_volume_mm3(affine)
    mean_prob = ndimage.mean(prob, labels, index) if prob is not None else None
    lesions = []
    for i in range(count):
        lesion: dict[str, Any] = {
            "centroid_mm": [round(float(c), 3) for c in world[i]],
            "volume_mm3": round(float(voxels[i]) * unit, 3),
        }
        if mean_prob is not None:
            lesion["probability"] = round(float(mean_prob[i]), 4)
        lesions.append(lesion)
    return lesions


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Voxel Dice of two binary masks; 1.0 when both are empty."""
    p, r = np.asarray(pred) > 0, np.asarray(ref) > 0
    denominator = p.sum() + r.sum()
    return 1.0 if denominator == 0 else float(2.0 * np.logical_and(p, r).sum() / denominator)


@dataclass(frozen=True)
class LesionMatch:
    """Lesion-wise overlap of a predicted and a reference mask (module docstring conventions)."""

    pred_labels: np.ndarray
    ref_labels: np.ndarray
    detected: np.ndarray  # (reference lesions,) bool: overlapped by a predicted lesion
    matched: np.ndarray  # (predicted lesions,) bool: overlaps a reference lesion

    @property
    def tp(self) -> int:
        return int(self.detected.sum())

    @property
    def fp(self) -> int:
        return int((~self.matched).sum())

    @property
    def fn(self) -> int:
        return int((~self.detected).sum())

    @property
    def precision(self) -> float:
        return float(self.matched.mean()) if self.matched.size else 1.0

    @property
    def recall(self) -> float:
        return float(self.detected.mean()) if self.detected.size else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def lesion_matching(pred: np.ndarray, ref: np.ndarray) -> LesionMatch:
    """Label both masks (same grid) and mark the reference lesions detected and the predicted lesions matched."""
    if np.shape(pred) != np.shape(ref):
        raise ValueError(f"mask shape {np.shape(pred)} differs from reference shape {np.shape(ref)}")
    pred_labels, n_pred = label_lesions(pred)
    ref_labels, n_ref = label_lesions(ref)
    both = (pred_labels > 0) & (ref_labels > 0)
    detected = np.zeros(n_ref, bool)
    detected[np.unique(ref_labels[both]) - 1] = True
    matched = np.zeros(n_pred, bool)
    matched[np.unique(pred_labels[both]) - 1] = True
    return LesionMatch(pred_labels, ref_labels, detected, matched)


def match_lesions(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Lesion-wise detection of ``pred`` against ``ref`` (same grid), with the conventions of the module docstring."""
    m = lesion_matching(pred, ref)
    return {
        "tp": m.tp,
        "fp": m.fp,
        "fn": m.fn,
        "precision": m.precision,
        "recall": m.recall,
        "f1": m.f1,
        "dice": dice(pred, ref),
    }


def analyze_mask(mask: np.ndarray, affine: np.ndarray, reference: np.ndarray | None = None) -> dict[str, Any]:
    """The contract's lesion analysis of one mask (optionally against a reference mask on the same grid)."""
    lesions = describe_lesions(mask, affine)
    result: dict[str, Any] = {
        "count": len(lesions),
        "total_volume_mm3": round(float((np.asarray(mask) > 0).sum()) * voxel_volume_mm3(affine), 3),
        "lesions": lesions,
    }
    if reference is not None:
        result.update(match_lesions(mask, reference))
    return result


def load_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A binary 3D NIfTI mask (voxels > 0.5) and its affine; refuses other shapes and NaN/Inf values."""
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D mask, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: mask holds NaN or Inf values")
    values = np.unique(data)
    if len(values) > 2:  # e.g. a probability map: say what is counted rather than count silently
        logger.warning(
            "%s is not a binary mask (%d distinct values in [%g, %g]): voxels > 0.5 count as lesion; for a "
            "forecast give its <arm>_mask.nii.gz, or threshold the probability map first",
            path,
            len(values),
            float(values[0]),
            float(values[-1]),
        )
    return data > 0.5, image.affine


def main(mask: str, reference: str | None = None) -> None:
    """Print the lesion analysis of MASK (and its detection against REFERENCE) as one JSON object."""
    data, affine = load_mask(mask)
    ref = None
    if reference is not None:
        ref, ref_affine = load_mask(reference)
        if ref.shape != data.shape or not np.allclose(ref_affine, affine, atol=1e-3):
            raise SystemExit(f"error: {reference} does not lie on the grid of {mask} (shape or affine differ)")
    print(json.dumps(analyze_mask(data, affine, ref)))
