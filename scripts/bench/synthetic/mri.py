"""MRI contrasts (FLAIR, T1, T2, PD, T1-Gd) from the tissue map and the lesion maps of one visit."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scripts.bench.synthetic.anatomy import Anatomy, Grid, plane_wave_field
from scripts.runtime.constants import MRI_MODALITIES

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
        visit_bias, _ = plane_wave_field(rng, axes, rotation, head_offset, 4, (200.0, 400.0))
        img *= np.exp(bias_base[m] + 0.04 * visit_bias)
        # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
        sigma = float(rng.uniform(0.015, 0.035))
        real = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
        imag = rng.normal(0.0, sigma, img.shape).astype(np.float32)
        img = np.sqrt(real**2 + imag**2)
        out[m] = np.clip(np.rint(img * gains[m]), 0, np.iinfo(np.int16).max).astype(np.int16)
    return out
