"""The voxel grid and the brain phantom: a tissue label map defined in millimetres (grid independent)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from scripts.bench.synthetic.config import PARENCHYMA_LABELS


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


def as_triple(value: Any, kind: type, name: str) -> tuple:
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


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A small random rotation (independent angles about x, y, z, normal with SD max_deg/2, clipped)."""
    ang = np.deg2rad(np.clip(rng.normal(0.0, max_deg / 2, 3), -max_deg, max_deg))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def plane_wave_field(
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
    outline, _ = plane_wave_field(rng, axes, rotation, head_offset, 12, (50.0, 120.0))
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
    fold, fold_grad = plane_wave_field(rng, axes, rotation, head_offset, 48, (14.0, 30.0), with_gradient_norm=True)
    depth_mod, _ = plane_wave_field(rng, axes, rotation, head_offset, 8, (30.0, 80.0))
    sulcus_w = max(1.2 + 2.5 * atrophy, 0.9 * s_min)
    sulcal_depth = (20.0 + 5.0 * depth_mod) * size
    sulci = (np.abs(fold) < 0.5 * sulcus_w * fold_grad) & (depth_cerebrum < sulcal_depth)
    del fold, fold_grad, depth_mod
    cerebral_tissue = cerebrum & ~fissure & ~sulci
    # Cortical GM: cerebral tissue within the cortical thickness of non-tissue (outside, sulci, fissure); the
    # thickness is modulated by a noise field so the grey/white boundary is irregular (gyral crowns, fundi).
    thickness = float(rng.uniform(2.6, 3.4)) * (1 - 0.1 * atrophy)
    ribbon, _ = plane_wave_field(rng, axes, rotation, head_offset, 24, (8.0, 24.0))
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
    folia, folia_grad = plane_wave_field(
        rng, axes, rotation, head_offset, 24, (8.0, 16.0), direction_scale=(0.3, 0.6, 1.0), with_gradient_norm=True
    )
    folia_csf = (np.abs(folia) < 0.5 * max(1.0, 0.9 * s_min) * folia_grad) & (depth_cb < 12.0 * size)
    core, _ = plane_wave_field(rng, axes, rotation, head_offset, 10, (15.0, 40.0))
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
    texture, _ = plane_wave_field(rng, axes, rotation, head_offset, 24, (5.0, 20.0))
    params["cortical_thickness_mm"] = thickness
    params["sulcus_width_mm"] = sulcus_w
    return Anatomy(tissue, parenchyma, dist_ventricle, dist_cortex, texture, params)
