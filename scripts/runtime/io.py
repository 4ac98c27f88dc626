"""NIfTI files: binary masks in, volumes out on a given affine, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scripts.runtime.files import atomic_path


def save_nifti(
    array: torch.Tensor | np.ndarray,
    affine: torch.Tensor | np.ndarray,
    path: str | os.PathLike[str],
    dtype: Any = np.float32,
    volumes_last: bool = False,
) -> Path:
    """Write a 3D volume (a leading channel of 1 is dropped) as NIfTI with ``affine`` in sform and qform, atomically;
    with ``volumes_last`` a 4D array (X, Y, Z, volumes), e.g. one map per arm.

    The file is written to a temporary name in the same folder and moved into place with ``os.replace``, so readers
    never see a partial file and a failure leaves no file behind.
    """
    data = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    if volumes_last:
        if data.ndim != 4:
            raise ValueError(f"expected volumes (X, Y, Z, N), got shape {data.shape}")
    else:
        if data.ndim == 4 and data.shape[0] == 1:
            data = data[0]
        if data.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    affine_ = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    image = nib.Nifti1Image(data.astype(dtype), affine_)
    image.header.set_sform(affine_, code=1)
    image.header.set_qform(affine_, code=1)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    # keep the final suffix on the temporary name: nibabel picks gzip from ".gz"
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, tmp)
    return path
