"""Data pipeline: a datalist case -> the network's input on a fixed working grid, and back to the case's reference grid.

The bundle configs compose the transforms in this order (``preprocessing`` of ``inference.json``)::

    LoadCased()                  # image keys + label -> float32 MetaTensor (1, *native) with its affine;
                                 # writes reference_key, reference_path, reference_affine, reference_shape,
                                 # reference_centre
    ScaleForegroundPercentilesd()  # MRI keys: foreground p1 -> 0, median -> 0.5, on each image's own grid
    ToWorkingGridd(spatial_size=(64, 64, 64), spacing=(3.0, 3.0, 3.0))
                                 # every image key + label -> working grid, one interpolation each;
                                 # writes working_affine
    StackConditiond()            # -> cond (40, *S), label (1, *S), treatment (int64), horizon (float32)
    RandDropInputsd(...)         # training only, last: random modality / visit-0 / net2_1 dropout

Everything before ``RandDropInputsd`` is deterministic, so a ``CacheDataset`` caches its output. Forecasts go back
with :func:`to_reference_grid` (or :class:`ToReferenceGridd`) and are written with :func:`save_nifti`.

Geometry: the bundle uses the NIfTI affines only (contract: all images of one case lie in one world space). Each
image is resampled directly from its own (possibly oblique) voxel grid to the working grid, an axis-aligned RAS grid
of ``spacing`` mm centred on the centroid of the reference image's foreground. MRI is anti-aliased with a Gaussian
whose width matches the downsampling factor, then linearly interpolated; masks are interpolated linearly and
thresholded at 0.5. Outside an image's field of view the working grid holds 0 (the normalised air level).

Real data check (tests/test_data.py, LIT longitudinal MS database, patient01/raw): the ITK transforms there map
points of the fixed space (LPS mm) to the moving raw image, x_raw = A (x - c) + c + t. Within one study they are
near identities: over the head the T1W/T2W-to-FLAIR displacement is at most 0.8/1.6 mm (study 1) and 2.2 mm
(study 2), under the 3 mm working voxel, so the raw images of one study are co-registered by their NIfTI affines
alone (same scanner session) and need no resampling beforehand. Between studies (and to the archive's common space)
the displacement reaches 10 mm: raw images of two visits are NOT in one world space and must be registered first,
or the registration folded into their affines, before they form one case.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, Randomizable, SpatialResample
from scipy.ndimage import gaussian_filter

from scripts.constants import (
    CONDITION_CHANNELS,
    DEFAULT_HORIZON_WEEKS,
    IMAGE_KEYS,
    LABEL_KEY,
    LOAD_FEATURES,
    MASK_KEYS,
    MRI_KEYS,
    REFERENCE_KEY_PRIORITY,
    arm_index,
)
from scripts.errors import CaseError, DatalistError
from scripts.files import atomic_path
from scripts.lesions import count_lesions, voxel_volume_mm3

__all__ = [
    "LoadCased",
    "CropWeightsFromInputsd",
    "RandDropInputsd",
    "ScaleForegroundPercentilesd",
    "StackConditiond",
    "ToReferenceGridd",
    "ToWorkingGridd",
    "fields_of_view_overlap",
    "find_reference_key",
    "foreground_mask",
    "load_datalist",
    "save_nifti",
    "scale_foreground_percentiles",
    "to_reference_grid",
    "validate_case",
    "working_affine",
    "world_bounding_box",
]

LOADED_KEYS: tuple[str, ...] = IMAGE_KEYS + (LABEL_KEY,)
"""Keys holding a NIfTI path in a datalist entry."""
BINARY_KEYS: tuple[str, ...] = MASK_KEYS + (LABEL_KEY,)
"""Keys holding binary masks (interpolated linearly, then thresholded at 0.5)."""
VISIT1_MRI_KEYS: tuple[str, ...] = tuple(k for k in MRI_KEYS if k.endswith("_1"))
VISIT0_KEYS: tuple[str, ...] = tuple(k for k in IMAGE_KEYS if k.endswith("_0"))
# channel of each image key's volume and of its availability indicator in ``cond``
VOLUME_CHANNEL: dict[str, int] = {k: CONDITION_CHANNELS.index(k) for k in IMAGE_KEYS}
AVAILABLE_CHANNEL: dict[str, int] = {k: CONDITION_CHANNELS.index(f"available_{k}") for k in IMAGE_KEYS}
LOAD_CHANNEL: dict[str, list[int]] = {k: [CONDITION_CHANNELS.index(f"{f}_{k}") for f in LOAD_FEATURES]
                                      for k in MASK_KEYS}


def lesion_load(mask: torch.Tensor | np.ndarray, voxel_mm3: float) -> list[float]:
    """:data:`LOAD_FEATURES` of a binary mask: [log(1 + lesion count), log(1 + volume in mL)]."""
    m = np.asarray(mask) > 0.5
    return [math.log1p(count_lesions(m)), math.log1p(float(m.sum()) * voxel_mm3 / 1000.0)]


REQUIRED_KEYS: dict[str, tuple[str, ...]] = {"training": ("treatment", LABEL_KEY), "validation": (LABEL_KEY,)}
"""Keys every entry of a split must hold besides ``id`` and a visit-1 MRI (training learns from both; validation
scores against the label). Forecasting (``testing``) needs neither."""


# ----------------------------------------------------------------------------------------------------------------
# Datalist
# ----------------------------------------------------------------------------------------------------------------


def find_reference_key(case: Mapping[Hashable, Any]) -> str | None:
    """The key whose grid is the case's reference grid: first present key of ``REFERENCE_KEY_PRIORITY``."""
    return next((k for k in REFERENCE_KEY_PRIORITY if case.get(k) is not None), None)


def validate_case(
    case: Any,
    base_dir: str | os.PathLike[str],
    index: int = 0,
    horizon_range: Sequence[float] | None = None,
    required: Sequence[str] = (),
) -> dict[str, Any]:
    """Check one datalist entry and return a normalised copy.

    Null image keys are dropped, image paths become absolute (relative ones are resolved against ``base_dir``),
    ``horizon_weeks`` is filled with its default. Other keys are kept unchanged.

    Args:
        case: the datalist entry.
        base_dir: folder that relative image paths start from.
        index: position of the entry (names a case without an id).
        horizon_range: ``(low, high)`` weeks the model was trained on; a horizon outside is refused (None: any
            positive horizon).
        required: keys the entry must hold (e.g. ``treatment`` and ``label`` for training).

    Raises:
        CaseError: naming the case id (``#index`` when it has none), the offending key and the reason.
    """
    if not isinstance(case, Mapping):
        raise CaseError(f"#{index}", "entry", f"expected a JSON object, got {type(case).__name__}")
    case_id = case.get("id")
    if case_id is None:
        raise CaseError(f"#{index}", "id", "required key missing (a non-empty string naming the case)")
    if not isinstance(case_id, str) or not case_id.strip():
        raise CaseError(str(case_id), "id", "must be a non-empty string")
    # the id names the case's output folder, so it must not escape or alias it
    if case_id in (".", "..") or "/" in case_id or "\\" in case_id:
        raise CaseError(case_id, "id", "must be usable as a folder name (no '/', '\\', '.' or '..')")
    for key in required:
        if case.get(key) is None:
            raise CaseError(case_id, key, "required key missing")
    out: dict[str, Any] = {k: v for k, v in case.items() if k not in LOADED_KEYS}
    for key in LOADED_KEYS:
        value = case.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise CaseError(case_id, key, f"expected a file path, got {value!r}")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        if not path.is_file():
            raise CaseError(case_id, key, f"file not found: {path}")
        out[key] = os.path.normpath(path)
    if find_reference_key(out) is None:
        raise CaseError(case_id, VISIT1_MRI_KEYS[0], f"no MRI of visit 1; need one of {', '.join(VISIT1_MRI_KEYS)}")
    treatment = case.get("treatment")
    if treatment is None:
        out.pop("treatment", None)
    else:
        try:
            arm_index(treatment if isinstance(treatment, str) else repr(treatment))
        except ValueError as err:
            raise CaseError(case_id, "treatment", str(err)) from None
    horizon = case.get("horizon_weeks")
    if horizon is None:
        horizon = DEFAULT_HORIZON_WEEKS
    # bool is an int subclass in Python, but "true weeks" is certainly a mistake
    if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or not math.isfinite(horizon) or horizon <= 0:
        raise CaseError(case_id, "horizon_weeks", f"must be a positive number of weeks, got {horizon!r}")
    if horizon_range is not None:
        low, high = (float(v) for v in horizon_range)
        # the network has never seen other horizons: its forecast there is an extrapolation nobody validated
        if not low <= float(horizon) <= high:
            raise CaseError(case_id, "horizon_weeks",
                            f"{horizon:g} weeks is outside the trained range [{low:g}, {high:g}] weeks")
    out["horizon_weeks"] = float(horizon)
    return out


def _read_datalist(path: Path, split: str) -> list[Any]:
    """The ``split`` list of the JSON datalist at ``path``; :class:`DatalistError` for any problem with the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatalistError(path, "file not found") from None
    except UnicodeDecodeError as err:
        raise DatalistError(path, f"not a JSON text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DatalistError(path, f"cannot be read: {err.strerror or err}") from None
    try:
        datalist = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatalistError(path, f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(datalist, dict):
        raise DatalistError(path, f"expected a JSON object with a list {split!r}, got a {type(datalist).__name__}")
    if split not in datalist:
        found = ", ".join(repr(k) for k in datalist) or "none"
        raise DatalistError(path, f"no list {split!r} in the datalist (top-level keys: {found})")
    if not isinstance(datalist[split], list):
        raise DatalistError(path, f"{split!r} must be a list of cases, got a {type(datalist[split]).__name__}")
    return datalist[split]


def load_datalist(
    path: str | os.PathLike[str],
    split: str,
    errors: list[CaseError] | None = None,
    horizon_range: Sequence[float] | None = None,
    required: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Read the ``split`` list (``training``/``validation``/``testing``) of a JSON datalist and validate each case.

    Relative image paths are resolved against the datalist file's folder (see :func:`validate_case`).

    Args:
        path: the datalist JSON file.
        split: top-level list to read.
        errors: when given, invalid cases are appended to it and skipped instead of raising, so a command can
            process the good cases and report the bad ones.
        horizon_range: trained ``(low, high)`` horizon in weeks; cases outside are invalid (None: no limit).
        required: keys every entry must hold; None: :data:`REQUIRED_KEYS` of the split.

    Raises:
        DatalistError: the file is missing, not JSON or has no list ``split`` (a ValueError).
        CaseError: for the first invalid case (unless ``errors`` is given).
    """
    path = Path(path)
    entries = _read_datalist(path, split)
    required = REQUIRED_KEYS.get(split, ()) if required is None else tuple(required)
    cases: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        try:
            case = validate_case(entry, path.parent, index, horizon_range=horizon_range, required=required)
            if case["id"] in seen:
                raise CaseError(case["id"], "id", f"duplicate id (entries #{seen[case['id']]} and #{index})")
        except CaseError as err:
            if errors is None:
                raise
            errors.append(err)
            continue
        seen[case["id"]] = index
        cases.append(case)
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


class LoadCased(LoadImaged):
    """Load every present image key and ``label`` as a float32 MetaTensor ``(1, *native)`` carrying its affine.

    Absent or null keys are removed from the sample. Writes ``reference_key`` (str), ``reference_path`` (str),
    ``reference_affine`` (float64 (4, 4) tensor), ``reference_shape`` (int64 (3,) tensor) and ``reference_centre``
    (float64 (3,) tensor: world mm of the centroid of the reference image's foreground, found on the raw
    intensities; the field-of-view centre when there is none).

    Raises:
        CaseError: a file that cannot be read (missing, truncated, not NIfTI), is not a 3D volume, has a singular
            affine or NaN / infinite voxels; an MRI (``mri_keys``) whose voxels are all equal (e.g. all zero: masks
            may be empty, an MRI may not); an image whose field of view does not overlap the reference image's
            (not in the case's world space); no visit-1 MRI.
    """

    def __init__(
        self,
        keys: KeysCollection = LOADED_KEYS,
        allow_missing_keys: bool = True,
        mri_keys: Sequence[str] = MRI_KEYS,
    ) -> None:
        super().__init__(
            keys,
            reader="NibabelReader",
            dtype=np.float32,
            image_only=True,
            ensure_channel_first=True,
            allow_missing_keys=allow_missing_keys,
        )
        self.mri_keys = tuple(mri_keys)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = {k: v for k, v in data.items() if not (k in self.keys and v is None)}
        case_id = d.get("id", "?")
        reference_key = find_reference_key(d)
        if reference_key is None:
            raise CaseError(case_id, VISIT1_MRI_KEYS[0], f"no MRI of visit 1; need one of {', '.join(VISIT1_MRI_KEYS)}")
        reference_path = str(d[reference_key])
        for key in self.key_iterator(d):
            try:
                img = self._loader(d[key], reader)
            except Exception as err:  # any reader failure is a bad input of this case
                raise CaseError(case_id, str(key), f"cannot read {d[key]}: {_read_problem(d[key], err)}") from err
            if img.ndim != 4 or img.shape[0] != 1:
                shape = _file_shape(d[key], img)
                raise CaseError(case_id, str(key), f"expected a 3D volume, got a {len(shape)}D image of shape {shape}")
            affine = img.affine.numpy()
            if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-8:
                raise CaseError(case_id, str(key), "the NIfTI affine is singular or not finite")
            self._check_voxels(case_id, str(key), img.as_tensor().numpy())
            d[key] = img
        ref = d[reference_key]
        ref_affine, ref_shape = ref.affine.numpy(), tuple(ref.shape[1:])
        for key in self.key_iterator(d):
            img = d[key]
            if key != reference_key and not fields_of_view_overlap(img.affine.numpy(), img.shape[1:], ref_affine,
                                                                   ref_shape):
                raise CaseError(
                    case_id, str(key),
                    f"its field of view {_box_text(world_bounding_box(img.affine.numpy(), img.shape[1:]))} does not "
                    f"overlap that of {reference_key} {_box_text(world_bounding_box(ref_affine, ref_shape))}: the "
                    "images of a case must lie in one world space (co-registered)",
                )
        d["reference_key"] = reference_key
        d["reference_path"] = reference_path
        d["reference_affine"] = ref.affine.detach().clone().to(torch.float64)
        d["reference_shape"] = torch.tensor(ref.shape[1:], dtype=torch.int64)
        d["reference_centre"] = torch.from_numpy(_foreground_centre_mm(np.asarray(ref[0]), affine=ref.affine.numpy()))
        return d

    def _check_voxels(self, case_id: str, key: str, array: np.ndarray) -> None:
        """Refuse NaN / infinite voxels (they would spread through interpolation) and MRI without any contrast."""
        finite = np.isfinite(array)
        if not finite.all():
            n_nan = int(np.isnan(array).sum())
            n_inf = int(array.size - finite.sum()) - n_nan
            raise CaseError(case_id, key, f"{n_nan} NaN and {n_inf} infinite voxel(s) of {array.size}")
        # masks may be empty (no lesion), but an MRI with a single value carries no image at all
        if key in self.mri_keys and array.size and float(array.min()) == float(array.max()):
            value = float(array.flat[0])
            raise CaseError(case_id, key, "all voxels are 0 (an empty image)" if value == 0 else
                            f"all voxels equal {value:g} (an image without contrast)")


def _read_problem(path: Any, error: Exception) -> str:
    """Why ``path`` cannot be read, in nibabel's words.

    When nibabel fails, MONAI's ``LoadImage`` tries its other readers and raises "cannot find a suitable reader ...
    please install the reader libraries" with every reader's traceback: long, and misleading for a broken file.
    """
    try:
        image = nib.load(str(path))
        np.asanyarray(image.dataobj)
    except Exception as nib_error:  # the message is all that is wanted
        return str(nib_error)
    return str(error)


def _file_shape(path: Any, img: torch.Tensor) -> tuple[int, ...]:
    """Shape of the image as stored in the file (the loaded one has a channel first)."""
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:  # only for a message: fall back to the loaded shape
        return tuple(int(s) for s in img.shape)


def world_bounding_box(affine: np.ndarray | torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """World (mm) axis-aligned box ``[[x0, y0, z0], [x1, y1, z1]]`` around a grid's field of view (voxel edges)."""
    corners = _grid_corners(shape)
    world = corners @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine, dtype=np.float64)[:3, 3]
    return np.stack([world.min(0), world.max(0)])


def _grid_corners(shape: Sequence[int]) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of a grid's field of view in voxel coordinates (outer voxel edges)."""
    return np.array(list(itertools.product(*[(-0.5, int(n) - 0.5) for n in list(shape)[:3]])), dtype=np.float64)


def _overlaps_in_grid_of(affine_a: np.ndarray, shape_a: Sequence[int], affine_b: np.ndarray,
                         shape_b: Sequence[int], tolerance: float) -> bool:
    """Whether b's field of view, boxed in a's voxel axes, overlaps a's by more than ``tolerance`` voxels per axis."""
    b_in_a = np.linalg.inv(np.asarray(affine_a, dtype=np.float64)) @ np.asarray(affine_b, dtype=np.float64)
    corners = _grid_corners(shape_b) @ b_in_a[:3, :3].T + b_in_a[:3, 3]
    low = np.maximum(corners.min(0), -0.5)
    high = np.minimum(corners.max(0), np.asarray(list(shape_a)[:3], dtype=np.float64) - 0.5)
    return bool(np.all(high - low > tolerance))


def fields_of_view_overlap(affine_a: np.ndarray | torch.Tensor, shape_a: Sequence[int],
                           affine_b: np.ndarray | torch.Tensor, shape_b: Sequence[int],
                           tolerance: float = 1e-3) -> bool:
    """Whether two grids' fields of view (parallelepipeds in world space) overlap.

    Each box is tested in the other's voxel axes (the separating-axis test on both boxes' face normals): exact for
    grids with parallel axes, and for oblique ones it may call boxes that only nearly touch overlapping, never the
    reverse, so a co-registered case is never refused.
    """
    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    return (_overlaps_in_grid_of(a, shape_a, b, shape_b, tolerance)
            and _overlaps_in_grid_of(b, shape_b, a, shape_a, tolerance))


def _box_text(box: np.ndarray) -> str:
    """A world box as ``[x0..x1, y0..y1, z0..z1] mm`` (one line)."""
    return "[" + ", ".join(f"{lo:.0f}..{hi:.0f}" for lo, hi in zip(box[0], box[1], strict=True)) + "] mm"


# ----------------------------------------------------------------------------------------------------------------
# Intensities
# ----------------------------------------------------------------------------------------------------------------


def foreground_mask(image: np.ndarray, fraction: float = 0.1, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Voxels brighter than ``p_lower + fraction * (p_upper - p_lower)`` of the whole image (head or brain).

    Built from percentiles only, so it is unchanged by a positive gain and an offset of the intensities; it finds the
    head in non-skull-stripped scans (air is far darker) as well as the brain in skull-stripped ones.
    """
    lo, hi = np.percentile(image, (lower, upper))
    if not hi > lo:
        return np.zeros(image.shape, dtype=bool)
    return image > lo + fraction * (hi - lo)


def scale_foreground_percentiles(
    image: np.ndarray,
    lower: float = 1.0,
    upper: float = 50.0,
    target: tuple[float, float] = (0.0, 0.5),
    fraction: float = 0.1,
    clip: tuple[float, float] = (0.0, 2.0),
) -> np.ndarray:
    """Map the ``lower``/``upper`` percentiles of the foreground linearly to ``target`` and clip to ``clip`` (float32).

    Invariant to a positive gain and an offset of the raw units. The default upper anchor is the foreground median:
    whether or not the skull is stripped, the median voxel of the head (or brain) is brain tissue, whereas high
    percentiles of an unstripped T1 are scalp fat (LIT patient01: median brain T1 0.51 with the skull vs 0.50
    stripped here, but 0.23 vs 0.73 when p99 maps to 1). The lower clip at 0 sends air to 0, the value the working
    grid holds outside an image's field of view. A constant image maps to zeros.
    """
    image = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    foreground = foreground_mask(image, fraction)
    if not foreground.any():
        return np.zeros_like(image)
    lo, hi = np.percentile(image[foreground], (lower, upper))
    if not hi > lo:
        return np.zeros_like(image)
    # float64 arithmetic: raw units of 1e4 with an offset would lose digits of the 1e-4 invariance in float32
    scaled = target[0] + (image.astype(np.float64) - lo) * ((target[1] - target[0]) / (hi - lo))
    return np.clip(scaled, *clip).astype(np.float32)


class ScaleForegroundPercentilesd(MapTransform):
    """Scale each MRI key with :func:`scale_foreground_percentiles` on its own grid (keeps the MetaTensor affine).

    Run before resampling: statistics come from the full-resolution image, and the 0 filled outside the field of
    view by the resampler then equals the normalised air level whatever the raw units.
    """

    def __init__(
        self,
        keys: KeysCollection = MRI_KEYS,
        lower: float = 1.0,
        upper: float = 50.0,
        target: Sequence[float] = (0.0, 0.5),
        fraction: float = 0.1,
        clip: Sequence[float] = (0.0, 2.0),
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.lower, self.upper, self.fraction = lower, upper, fraction
        self.target = (float(target[0]), float(target[1]))
        self.clip = (float(clip[0]), float(clip[1]))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            array = np.asarray(img.detach().cpu()) if isinstance(img, torch.Tensor) else np.asarray(img)
            scaled = scale_foreground_percentiles(array, self.lower, self.upper, self.target, self.fraction, self.clip)
            d[key] = MetaTensor(torch.from_numpy(scaled), meta=img.meta) if isinstance(img, MetaTensor) else scaled
        return d


# ----------------------------------------------------------------------------------------------------------------
# Working grid
# ----------------------------------------------------------------------------------------------------------------


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


def _foreground_centre_mm(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position of the foreground centroid; the field-of-view centre when there is no foreground."""
    mask = foreground_mask(image)
    if mask.any():
        # centroid from the three axis projections: cheaper than listing millions of voxel indices
        centre = [
            float(np.dot(np.arange(n), mask.sum(axis=tuple(a for a in range(3) if a != axis))) / mask.sum())
            for axis, n in enumerate(mask.shape)
        ]
    else:
        centre = [(n - 1) / 2.0 for n in mask.shape]
    return (affine @ np.array([*centre, 1.0]))[:3]


def _anti_alias_sigma(affine: np.ndarray, spacing: Sequence[float]) -> list[float]:
    """Gaussian sigma (source voxels) per source axis for downsampling to ``spacing``; 0 where not downsampling."""
    sigmas = []
    for axis in range(3):
        column = affine[:3, axis]
        voxel = float(np.linalg.norm(column))
        # extent of one working voxel along this (possibly oblique) source axis
        target = float(np.linalg.norm(np.asarray(spacing) * column / voxel))
        sigmas.append(max(0.0, (target / voxel - 1.0) / 2.0))  # skimage's rule for anti-aliasing before resizing
    return sigmas


class ToWorkingGridd(MapTransform):
    """Resample every present image key and ``label`` directly from its own grid to the working grid.

    The working grid is RAS, axis-aligned, ``spacing`` mm, ``spatial_size`` voxels, centred on ``reference_centre``
    (the reference image's foreground centroid; computed here when absent). One interpolation per image, through the
    affines: MRI is Gaussian anti-aliased then linear; masks are binarised, linear, thresholded at 0.5. Outside the
    field of view: 0.
    Writes ``working_affine`` (float64 (4, 4) tensor); images stay MetaTensors ``(1, *spatial_size)``.

    ``snap_to_reference``: move the grid (by at most half a reference voxel) so that its first voxel centre is a
    voxel centre of the reference image (``reference_affine``, axis-aligned grids only). Inputs whose spacing equals
    the working spacing (or divides it) are then sampled without interpolation: without it, a sub-voxel offset
    blurs the MRI and erodes masks, and lesions of one or two voxels can vanish (3 of 32 NET2 lesions of the
    synthetic validation labels at 3 mm). Off by default, since the shipped weights were trained without it;
    training and inference must use the same setting.
    """

    def __init__(
        self,
        spatial_size: Sequence[int] = (64, 64, 64),
        spacing: Sequence[float] = (3.0, 3.0, 3.0),
        keys: KeysCollection = LOADED_KEYS,
        mask_keys: Sequence[str] = BINARY_KEYS,
        anti_alias: bool = True,
        allow_missing_keys: bool = True,
        snap_to_reference: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.snap_to_reference = bool(snap_to_reference)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.spacing = tuple(float(s) for s in spacing)
        self.mask_keys = tuple(mask_keys)
        self.anti_alias = anti_alias
        self.resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if d.get("reference_centre") is not None:
            centre = np.asarray(d["reference_centre"], dtype=np.float64)
        else:
            reference_key = d.get("reference_key") or find_reference_key(d)
            if reference_key is None or not isinstance(d.get(reference_key), MetaTensor):
                raise CaseError(d.get("id", "?"), VISIT1_MRI_KEYS[0], "no loaded MRI of visit 1 (run LoadCased first)")
            ref = d[reference_key]
            centre = _foreground_centre_mm(np.asarray(ref[0].detach().cpu()), ref.affine.numpy())
        dst_affine = working_affine(centre, self.spatial_size, self.spacing)
        if self.snap_to_reference and d.get("reference_affine") is not None:
            dst_affine[:3, 3] = torch.from_numpy(snap_to_voxel_centre(dst_affine[:3, 3].numpy(), d["reference_affine"]))
        for key in self.key_iterator(d):
            img = d[key]
            if key in self.mask_keys:
                img = MetaTensor((img >= 0.5).float().as_tensor(), meta=img.meta)
            elif self.anti_alias:
                sigma = _anti_alias_sigma(img.affine.numpy(), self.spacing)
                if max(sigma) > 0:
                    smooth = gaussian_filter(np.asarray(img[0].detach().cpu()), sigma, mode="nearest")
                    img = MetaTensor(torch.from_numpy(smooth)[None], meta=img.meta)
            out = self.resample(img, dst_affine=dst_affine, spatial_size=self.spatial_size)
            if key in self.mask_keys:
                out = (out >= 0.5).float()
            d[key] = out
        d["working_affine"] = dst_affine
        return d


# ----------------------------------------------------------------------------------------------------------------
# Stacking
# ----------------------------------------------------------------------------------------------------------------


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor (MetaTensor meta would ride along into the batch and the network otherwise)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class StackConditiond(MapTransform):
    """Build the network's input from working-grid images.

    Writes ``cond`` (float32 (len(CONDITION_CHANNELS), *S), channels in ``CONDITION_CHANNELS`` order: each image key,
    zeros if absent, then one constant availability volume per image key, then the constant lesion-load channels of
    each lesion mask, measured on the whole working grid (:func:`lesion_load`; voxel volume from ``working_affine``)),
    ``label`` (float32 (1, *S) in {0, 1},
    when present), ``treatment`` (int64 scalar, ``arm_index``; absent -> ``NULL_TREATMENT``) and ``horizon``
    (float32 scalar weeks, from ``horizon_weeks``). Removes the per-key images and ``horizon_weeks`` so samples with
    different available keys collate; keeps ``id`` and the reference/working grid entries.
    """

    def __init__(self) -> None:
        super().__init__(IMAGE_KEYS, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case_id = d.get("id", "?")
        present = {k: d.pop(k) for k in IMAGE_KEYS if d.get(k) is not None}
        shapes = {tuple(v.shape[1:]) for v in present.values()}
        if len(shapes) != 1:
            raise CaseError(case_id, ",".join(present) or "images", f"images are not on one grid: {sorted(shapes)}")
        spatial = shapes.pop()
        cond = torch.zeros((len(CONDITION_CHANNELS), *spatial), dtype=torch.float32)
        voxel_mm3 = voxel_volume_mm3(np.asarray(d["working_affine"])) if "working_affine" in d else 1.0
        for key, volume in present.items():
            cond[VOLUME_CHANNEL[key]] = _plain(volume)[0].float()
            cond[AVAILABLE_CHANNEL[key]] = 1.0
            if key in LOAD_CHANNEL:
                for channel, value in zip(LOAD_CHANNEL[key], lesion_load(cond[VOLUME_CHANNEL[key]], voxel_mm3),
                                          strict=True):
                    cond[channel] = value
        d["cond"] = cond
        if d.get(LABEL_KEY) is not None:
            label = _plain(d[LABEL_KEY]).float()
            if tuple(label.shape[1:]) != spatial:
                raise CaseError(case_id, LABEL_KEY, f"not on the images' grid: {tuple(label.shape)}")
            d[LABEL_KEY] = (label >= 0.5).float().reshape(1, *spatial)
        else:
            d.pop(LABEL_KEY, None)
        try:
            index = arm_index(d.get("treatment"))
        except ValueError as err:
            raise CaseError(case_id, "treatment", str(err)) from None
        d["treatment"] = torch.tensor(index, dtype=torch.int64)
        horizon = d.pop("horizon_weeks", None)
        d["horizon"] = torch.tensor(DEFAULT_HORIZON_WEEKS if horizon is None else float(horizon), dtype=torch.float32)
        return d


class CropWeightsFromInputsd(MapTransform):
    """Crop-sampling weights for training from the inputs alone: 1 everywhere, ``1 + lesion_weight`` on past lesions.

    Writes ``weight_key`` (1, *S) from the past lesion channels of ``cond``. With MONAI's ``RandWeightedCropd`` the
    training crops then centre more often on past lesions, near which new ones appear, so crops hold more NET2
    voxels. The weights depend on the inputs only, never on the label, so the distribution of the label given the
    crop's inputs, which the model learns, is not biased (only how often each kind of surroundings is seen).
    """

    def __init__(
        self,
        key: str = "cond",
        weight_key: str = "crop_weight",
        channels: Sequence[str] = ("t2les_0", "t2les_1", "gadles_1", "net2_1"),
        lesion_weight: float = 10.0,
    ) -> None:
        super().__init__([key])
        self.key, self.weight_key = key, weight_key
        self.channels = [CONDITION_CHANNELS.index(c) for c in channels]
        self.lesion_weight = float(lesion_weight)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        cond = _plain(d[self.key])
        lesions = (cond[self.channels] > 0.5).any(dim=0, keepdim=True).float()
        d[self.weight_key] = 1.0 + self.lesion_weight * lesions
        return d


class RandDropInputsd(Randomizable, MapTransform):
    """Training augmentation on ``cond``: drop inputs by zeroing their volume, availability and lesion-load channels.

    Independently: each present image key with ``prob_modality``; all of visit 0 with ``prob_visit0``; ``net2_1``
    with ``prob_net2``. If every present visit-1 MRI would go, one of them (drawn at random) is kept. Draws the same
    amount of random numbers per call, so a seed (``set_random_state`` / ``monai.utils.set_determinism`` through
    ``Compose``) fixes the sequence of drops.
    """

    def __init__(
        self,
        keys: KeysCollection = ("cond",),
        prob_modality: float = 0.1,
        prob_visit0: float = 0.2,
        prob_net2: float = 0.2,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=False)
        self.prob_modality, self.prob_visit0, self.prob_net2 = prob_modality, prob_visit0, prob_net2
        self._draws = np.zeros(len(IMAGE_KEYS) + 3)

    def randomize(self, data: Any = None) -> None:
        """Draw per-key, visit-0, net2_1 and keep-which uniforms."""
        self._draws = self.R.uniform(size=len(IMAGE_KEYS) + 3)

    def dropped_keys(self, present: Sequence[str]) -> list[str]:
        """Keys to drop among ``present`` for the last :meth:`randomize` draw."""
        n = len(IMAGE_KEYS)
        drop = {k for k, u in zip(IMAGE_KEYS, self._draws[:n], strict=True) if u < self.prob_modality}
        if self._draws[n] < self.prob_visit0:
            drop.update(VISIT0_KEYS)
        if self._draws[n + 1] < self.prob_net2:
            drop.add("net2_1")
        visit1 = [k for k in present if k in VISIT1_MRI_KEYS]
        if visit1 and all(k in drop for k in visit1):
            drop.discard(visit1[min(int(self._draws[n + 2] * len(visit1)), len(visit1) - 1)])
        return [k for k in present if k in drop]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            cond = _plain(d[key]).clone()
            present = [k for k in IMAGE_KEYS if float(cond[AVAILABLE_CHANNEL[k]].flatten()[0]) > 0.5]
            for k in self.dropped_keys(present):
                cond[VOLUME_CHANNEL[k]] = 0.0
                cond[AVAILABLE_CHANNEL[k]] = 0.0
                cond[LOAD_CHANNEL.get(k, [])] = 0.0
            d[key] = cond
        return d


# ----------------------------------------------------------------------------------------------------------------
# Back to the reference grid
# ----------------------------------------------------------------------------------------------------------------


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


class ToReferenceGridd(MapTransform):
    """Post-processing: put ``keys`` (working-grid volumes of one sample) onto the sample's reference grid.

    Reads ``working_affine``, ``reference_affine`` and ``reference_shape``; writes a MetaTensor whose affine is the
    reference affine (see :func:`to_reference_grid` for ``mode`` and ``threshold``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "bilinear",
        threshold: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode, self.threshold = mode, threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference_affine = torch.as_tensor(d["reference_affine"], dtype=torch.float64)
        for key in self.key_iterator(d):
            out = to_reference_grid(
                d[key], d["working_affine"], reference_affine, d["reference_shape"], self.mode, self.threshold
            )
            d[key] = MetaTensor(torch.from_numpy(out), affine=reference_affine.clone())
        return d


def save_nifti(
    array: torch.Tensor | np.ndarray,
    affine: torch.Tensor | np.ndarray,
    path: str | os.PathLike[str],
    dtype: Any = np.float32,
) -> Path:
    """Write a 3D volume (a leading channel of 1 is dropped) as NIfTI with ``affine`` in sform and qform, atomically.

    The file is written to a temporary name in the same folder and moved into place with ``os.replace``, so readers
    never see a partial file and a failure leaves no file behind.
    """
    data = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
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
