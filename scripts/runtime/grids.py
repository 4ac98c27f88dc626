"""Grid geometry: fields of view in world space, the working grid and the way back to a case's reference grid.

Geometry: the bundle uses the NIfTI affines only (contract: all images of one case lie in one world space). Each
image is resampled directly from its own (possibly oblique) voxel grid to the working grid, an axis-aligned RAS grid
of ``spacing`` mm centred on the centroid of the reference image's foreground. MRI is anti-aliased with a Gaussian
whose width matches the downsampling factor, then linearly interpolated; masks are interpolated linearly and
thresholded at 0.5. Outside an image's field of view the working grid holds 0 (the normalised air level).
The check on real data that supports this is in ``bundle/docs/training.md`` (co-registration of the LIT data).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample


def world_bounding_box(affine: np.ndarray | torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """World (mm) axis-aligned box ``[[x0, y0, z0], [x1, y1, z1]]`` around a grid's field of view (voxel edges)."""
    corners = _grid_corners(shape)
    world = corners @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine, dtype=np.float64)[:3, 3]
    return np.stack([world.min(0), world.max(0)])


def _grid_corners(shape: Sequence[int]) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of a grid's field of view in voxel coordinates (outer voxel edges)."""
    return np.array(list(itertools.product(*[(-0.5, int(n) - 0.5) for n in list(shape)[:3]])), dtype=np.float64)


def _overlaps_in_grid_of(
    affine_a: np.ndarray, shape_a: Sequence[int], affine_b: np.ndarray, shape_b: Sequence[int], tolerance: float
) -> bool:
    """Whether b's field of view, boxed in a's voxel axes, overlaps a's by more than ``tolerance`` voxels per axis."""
    b_in_a = np.linalg.inv(np.asarray(affine_a, dtype=np.float64)) @ np.asarray(affine_b, dtype=np.float64)
    corners = _grid_corners(shape_b) @ b_in_a[:3, :3].T + b_in_a[:3, 3]
    low = np.maximum(corners.min(0), -0.5)
    high = np.minimum(corners.max(0), np.asarray(list(shape_a)[:3], dtype=np.float64) - 0.5)
    return bool(np.all(high - low > tolerance))


def fields_of_view_overlap(
    affine_a: np.ndarray | torch.Tensor,
    shape_a: Sequence[int],
    affine_b: np.ndarray | torch.Tensor,
    shape_b: Sequence[int],
    tolerance: float = 1e-3,
) -> bool:
    """Whether two grids' fields of view (parallelepipeds in world space) overlap.

    Each box is tested in the other's voxel axes (the separating-axis test on both boxes' face normals): exact for
    grids with parallel axes, and for oblique ones it may call boxes that only nearly touch overlapping, never the
    reverse, so a co-registered case is never refused.
    """
    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    return _overlaps_in_grid_of(a, shape_a, b, shape_b, tolerance) and _overlaps_in_grid_of(
        b, shape_b, a, shape_a, tolerance
    )


def describe_box(box: np.ndarray) -> str:
    """A world box as ``[x0..x1, y0..y1, z0..z1] mm`` (one line)."""
    return "[" + ", ".join(f"{lo:.0f}..{hi:.0f}" for lo, hi in zip(box[0], box[1], strict=True)) + "] mm"


def working_affine(centre_mm: Sequence[float], spatial_size: Sequence[int], spacing: Sequence[float]) -> torch.Tensor:
    """RAS axis-aligned affine (float64 (4, 4)) of a ``spatial_size`` grid, ``spacing`` mm, centred at ``centre_mm``."""
    spacing_ = np.asarray(spacing, dtype=np.float64)
    affine = np.diag([*spacing_, 1.0])
    affine[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - spacing_ * (np.asarray(spatial_size) - 1) / 2.0
    return torch.from_numpy(affine)


def snap_to_voxel_centre(point_mm: Sequence[float], affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """The voxel centre of the grid ``affine`` nearest to ``point_mm``, when that grid is axis-aligned (any axis order
    and flips); ``point_mm`` unchanged for an oblique grid."""
    a = np.asarray(affine, dtype=np.float64)
    point = np.asarray(point_mm, dtype=np.float64)
    m = a[:3, :3]
    if np.count_nonzero(np.abs(m) > 1e-6 * np.abs(m).max()) != 3:  # oblique: no common lattice
        return point
    voxel = np.linalg.solve(m, point - a[:3, 3])
    return m @ np.rint(voxel) + a[:3, 3]


def to_reference_grid(
    volume: torch.Tensor | np.ndarray,
    working_affine: torch.Tensor | np.ndarray,
    reference_affine: torch.Tensor | np.ndarray,
    reference_shape: Sequence[int] | torch.Tensor | np.ndarray,
    mode: str = "bilinear",
    threshold: float | None = None,
) -> np.ndarray:
    """Resample a working-grid volume ``(C, *S)`` or ``(*S)`` onto the reference grid (float32 numpy).

    The result has shape ``(C, *reference_shape)`` or ``reference_shape`` and lies on ``reference_affine`` (write it
    with that affine). ``mode``: ``"bilinear"`` for probability maps; ``"nearest"`` for binary masks: it keeps each
    working voxel's volume and the 26-connectivity of lesions, whereas linear-then-``threshold`` (0.5) gives smoother
    borders but shrinks one-voxel lesions to a third and can split diagonal neighbours. ``threshold`` binarises the
    interpolated result (``>= threshold``), e.g. a probability map at 0.5.
    """
    vol = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    vol = vol.detach().cpu().float()
    squeeze = vol.ndim == 3
    if squeeze:
        vol = vol[None]
    if vol.ndim != 4:
        raise ValueError(f"expected a (C, X, Y, Z) or (X, Y, Z) volume, got shape {tuple(vol.shape)}")
    src = torch.as_tensor(np.asarray(working_affine, dtype=np.float64))
    dst = torch.as_tensor(np.asarray(reference_affine, dtype=np.float64))
    shape = [int(s) for s in np.asarray(reference_shape).reshape(-1)]
    resample = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)
    out = np.asarray(resample(MetaTensor(vol, affine=src), dst_affine=dst, spatial_size=shape).as_tensor())
    if threshold is not None:
        out = (out >= threshold).astype(np.float32)
    return out[0] if squeeze else out


def on_grid(
    volume: np.ndarray, own_affine: np.ndarray, affine: np.ndarray, shape: Sequence[int], mode: str = "bilinear"
) -> np.ndarray:
    """``volume`` (lying on ``own_affine``) on the grid (``affine``, ``shape``): the volume itself when it already
    lies there, else resampled with :func:`to_reference_grid` (``nearest`` for labels, ``bilinear`` for maps)."""
    if tuple(np.shape(volume)) == tuple(int(s) for s in shape) and np.allclose(own_affine, affine, atol=1e-3):
        return np.asarray(volume)
    return to_reference_grid(np.asarray(volume, dtype=np.float32), own_affine, affine, shape, mode=mode)
