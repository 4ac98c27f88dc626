"""What an image's header says before its voxels are read: its size (refused above a limit, or when the file holds
less data than the header promises) and its voxel-to-world geometry (refused when it is missing or broken).

A NIfTI file carries two voxel-to-world matrices, the sform and the qform, each with a code saying whether it is set.
nibabel and MONAI use the sform when its code is set, else the qform, else a fallback built from the voxel sizes
alone, which carries no orientation and mirrors the image left-right against any properly oriented one. A forecast
made from a mirrored or misplaced image is wrong without any sign of it, so such files are refused here, naming the
case, the key and what to fix.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from scripts.runtime.constants import MAX_IMAGE_VOXELS

logger = logging.getLogger(__name__)

GEOMETRY_TOLERANCE_MM: float = 1.0
"""sform and qform that place a corner of the grid more than this far apart disagree (logged)."""


def _grid_corners(shape: tuple[int, ...]) -> np.ndarray:
    """(8, 4) homogeneous voxel coordinates of the corners of a 3D grid."""
    n = [max(int(s) - 1, 0) for s in shape[:3]]
    return np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])


def _invertible(matrix: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(matrix)) and abs(np.linalg.det(matrix[:3, :3])) > 1e-8)


def check_header(path: str | os.PathLike, max_voxels: int | None = MAX_IMAGE_VOXELS) -> tuple[str | None, str | None]:
    """``(problem, warning)`` of the image at ``path``, from one read of its header alone.

    The problem (None when the image may be read): more voxels than ``max_voxels`` (checked before anything is
    decompressed), an uncompressed file shorter than its header promises, or broken NIfTI geometry (see the module's
    docstring): no sform or qform set, a set sform or qform that is singular, or an sform and qform of opposite
    orientations. The warning (:func:`geometry_warning`), only when there is no problem. Files nibabel cannot open
    are left to the reader, whose message says why.
    """
    try:
        image = nib.load(str(path))
    except Exception:  # not an image nibabel knows: the reader reports it
        return None, None
    shape = tuple(int(s) for s in image.shape)
    voxels = math.prod(shape) if shape else 0
    if max_voxels is not None and voxels > int(max_voxels):
        return (
            f"not read: its header declares {voxels:,} voxels {shape}, more than the limit of "
            f"{int(max_voxels):,} (max_image_voxels in inference.json raises it)"
        ), None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        return None, None
    header = image.header
    if not _is_compressed(path):
        expected = int(header.get_data_offset()) + voxels * np.dtype(header.get_data_dtype()).itemsize
        size = Path(path).stat().st_size
        if size < expected:
            return f"cannot read: the file holds {size:,} bytes but its header promises {expected:,} (truncated?)", None
    problem = _geometry_problem(header)
    return problem, None if problem else _geometry_gap(header, shape)


def header_problem(path: str | os.PathLike, max_voxels: int | None = MAX_IMAGE_VOXELS) -> str | None:
    """Why the image at ``path`` must not be read, from its header alone (:func:`check_header`); None when it may."""
    return check_header(path, max_voxels)[0]


def geometry_warning(path: str | os.PathLike) -> str | None:
    """A note when the sform and qform of a NIfTI file are both set, agree in orientation, but place the grid more
    than :data:`GEOMETRY_TOLERANCE_MM` apart: the sform is used (as nibabel, MONAI and FSL do)."""
    return check_header(path, None)[1]


def _is_compressed(path: str | os.PathLike) -> bool:
    """gzip, bzip2 or zstd (what nibabel decompresses): its size says nothing of the data's."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    return magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\x28\xb5\x2f\xfd"


def _geometry_problem(header: nib.Nifti1Header) -> str | None:
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if sform_code == 0 and qform_code == 0:
        return (
            "its header sets no orientation (sform and qform codes are 0): where the image lies, and which side is "
            "left, are unknown; set its sform or qform (e.g. copy them from an image of the same scan)"
        )
    sform, qform = header.get_sform(), header.get_qform()
    if sform_code > 0 and not _invertible(sform):
        return f"its sform (code {sform_code}) is singular or not finite (e.g. all zero): set a valid sform or code 0"
    if sform_code == 0 and qform_code > 0 and not _invertible(qform):  # beside a valid sform it is not used
        return f"its qform (code {qform_code}) is singular or not finite: set a valid qform or code 0"
    if sform_code > 0 and qform_code > 0 and _invertible(qform):
        s_axes, q_axes = nib.aff2axcodes(sform), nib.aff2axcodes(qform)
        if s_axes != q_axes:
            return (
                f"its sform ({''.join(s_axes)}) and qform ({''.join(q_axes)}) orient the image differently, so "
                "it is unknown which is right; make them agree (or set one code to 0)"
            )
    return None


def _geometry_gap(header: nib.Nifti1Header, shape: tuple[int, ...]) -> str | None:
    """The warning of :func:`geometry_warning` for a header whose geometry has no problem."""
    if int(header["sform_code"]) == 0 or int(header["qform_code"]) == 0 or not _invertible(header.get_qform()):
        return None
    corners = _grid_corners(shape)
    gap = float(np.max(np.linalg.norm((corners @ (header.get_sform() - header.get_qform()).T)[:, :3], axis=1)))
    if gap <= GEOMETRY_TOLERANCE_MM:
        return None
    return f"its sform and qform place the image up to {gap:.1f} mm apart; the sform is used"
