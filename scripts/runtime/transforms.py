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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    CastToTyped,
    Compose,
    CopyItemsd,
    DeleteItemsd,
    LoadImaged,
    MapTransform,
    Randomizable,
    SpatialResample,
)
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scripts.runtime.constants import (
    AVAILABLE_CHANNEL,
    BINARY_KEYS,
    CONDITION_CHANNELS,
    DEFAULT_HORIZON_WEEKS,
    IMAGE_KEYS,
    LABEL_KEY,
    LOAD_CHANNEL,
    LOADED_KEYS,
    MAX_IMAGE_VOXELS,
    MRI_KEYS,
    VISIT0_KEYS,
    VISIT1_MRI_KEYS,
    VOLUME_CHANNEL,
    arm_index,
)
from scripts.runtime.datalist import find_reference_key
from scripts.runtime.errors import CaseError
from scripts.runtime.grids import (
    describe_box,
    fields_of_view_overlap,
    snap_to_voxel_centre,
    to_reference_grid,
    working_affine,
    world_bounding_box,
)
from scripts.runtime.headers import check_header
from scripts.runtime.lesions import count_lesions, voxel_volume_mm3

logger = logging.getLogger(__name__)


def lesion_load(mask: torch.Tensor | np.ndarray, voxel_mm3: float) -> list[float]:
    """:data:`LOAD_FEATURES` of a binary mask: [log(1 + lesion count), log(1 + volume in mL)]."""
    m = np.asarray(mask) > 0.5
    return [math.log1p(count_lesions(m)), math.log1p(float(m.sum()) * voxel_mm3 / 1000.0)]


class LoadCased(LoadImaged):
    """Load every present image key and ``label`` as a float32 MetaTensor ``(1, *native)`` carrying its affine.

    Absent or null keys are removed from the sample. Writes ``reference_key`` (str), ``reference_path`` (str),
    ``reference_affine`` (float64 (4, 4) tensor), ``reference_shape`` (int64 (3,) tensor) and ``reference_centre``
    (float64 (3,) tensor: world mm of the centroid of the reference image's foreground, found on the raw
    intensities; the field-of-view centre when there is none).

    The image keys go in as file paths; a sample without ``label`` (a forecast request) is fine. MONAI Label turns
    ``image_only`` off on every ``LoadImaged``: the image of the ``(image, meta)`` pair is kept (the meta travels
    on the MetaTensor).

    Every header is checked before its voxels are read (:func:`scripts.runtime.headers.check_header`): size
    against ``max_voxels``, truncation, and a missing or broken orientation; an sform and qform that disagree by more
    than a millimetre are logged (the sform is used).

    Raises:
        CaseError: a file that cannot be read (missing, truncated, not NIfTI, larger than ``max_voxels``), is not a 3D
            volume, has no orientation, a singular affine, or NaN / infinite voxels; a mask (``mask_keys``) with more
            than one label value; an MRI (``mri_keys``) whose voxels are all equal (e.g. all zero: masks may be
            empty, an MRI may not); an image whose field of view does not overlap the reference image's (not in the
            case's world space); no visit-1 MRI.
    """

    def __init__(
        self,
        keys: KeysCollection = LOADED_KEYS,
        allow_missing_keys: bool = True,
        mri_keys: Sequence[str] = MRI_KEYS,
        mask_keys: Sequence[str] = BINARY_KEYS,
        max_voxels: int | None = MAX_IMAGE_VOXELS,
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
        self.mask_keys = tuple(mask_keys)
        self.max_voxels = max_voxels

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        d = {k: v for k, v in data.items() if not (k in self.keys and v is None)}
        case_id = d.get("id", "?")
        reference_key = find_reference_key(d)
        if reference_key is None:
            raise CaseError(case_id, VISIT1_MRI_KEYS[0], f"no MRI of visit 1; need one of {', '.join(VISIT1_MRI_KEYS)}")
        reference_path = str(d[reference_key])
        for key in self.key_iterator(d):
            problem, warning = check_header(d[key], self.max_voxels)
            if problem is not None:
                raise CaseError(case_id, str(key), f"{d[key]}: {problem}")
            if warning is not None:
                logger.warning("case %s: %s: %s (%s)", case_id, key, warning, d[key])
            try:
                img = self._loader(d[key], reader)
            except Exception as err:  # any reader failure is a bad input of this case
                raise CaseError(case_id, str(key), f"cannot read {d[key]}: {_read_problem(d[key], err)}") from err
            if isinstance(img, tuple):  # MONAI Label sets image_only=False on every LoadImaged: (image, meta)
                img = img[0]
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
            if key != reference_key and not fields_of_view_overlap(
                img.affine.numpy(), img.shape[1:], ref_affine, ref_shape
            ):
                raise CaseError(
                    case_id,
                    str(key),
                    f"its field of view {describe_box(world_bounding_box(img.affine.numpy(), img.shape[1:]))} does not "
                    f"overlap that of {reference_key} {describe_box(world_bounding_box(ref_affine, ref_shape))}: the "
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
        if key in self.mask_keys:
            self._check_mask(case_id, key, array)
        # masks may be empty (no lesion), but an MRI with a single value carries no image at all
        if key in self.mri_keys and array.size and float(array.min()) == float(array.max()):
            value = float(array.flat[0])
            raise CaseError(
                case_id,
                key,
                (
                    "all voxels are 0 (an empty image)"
                    if value == 0
                    else f"all voxels equal {value:g} (an image without contrast)"
                ),
            )

    @staticmethod
    def _check_mask(case_id: str, key: str, array: np.ndarray) -> None:
        """A mask is 0 and one label value (0/1, 0/255, ...), or values in [0, 1] (a mask resampled with linear
        interpolation: thresholded at 0.5, logged); several labels above 1 (a label map) or negative values are
        refused: binarising them would merge or lose structures silently."""
        values = np.unique(array)
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
        if values[0] < 0:
            raise CaseError(case_id, key, f"a mask cannot hold negative values; found {len(values)} values: {shown}")
        if len(values) <= 2 or values[-1] <= 1.0:
            if len(values) > 2:
                logger.warning(
                    "case %s: %s: fractional mask values (%s), e.g. from linear resampling: voxels "
                    ">= 0.5 count as lesion",
                    case_id,
                    key,
                    shown,
                )
            elif len(values) == 2 and values[0] == 0 and values[1] < 0.5:
                raise CaseError(
                    case_id,
                    key,
                    f"a mask of 0 and {values[1]:g}: no voxel reaches 0.5, the lesion threshold; save the lesions as 1",
                )
            return
        raise CaseError(
            case_id,
            key,
            f"expected a binary mask (0 and one label value), found {len(values)} values: "
            f"{shown} (a label map: select the lesion label first)",
        )


def _read_problem(path: Any, error: Exception) -> str:
    """Why ``path`` cannot be read, in nibabel's words.

    When nibabel fails, MONAI's ``LoadImage`` tries its other readers and raises "cannot find a suitable reader ...
    please install the reader libraries" with every reader's traceback: long, and misleading for a broken file.
    """
    try:
        image = nib.load(str(path))
        np.asanyarray(image.dataobj)
    except Exception as nib_error:  # the message is all that is wanted
        return str(nib_error) or f"{type(nib_error).__name__} (the file may end before the data its header promises)"
    return str(error) or type(error).__name__


def _file_shape(path: Any, img: torch.Tensor) -> tuple[int, ...]:
    """Shape of the image as stored in the file (the loaded one has a channel first)."""
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:  # only for a message: fall back to the loaded shape
        return tuple(int(s) for s in img.shape)


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
                for channel, value in zip(
                    LOAD_CHANNEL[key], lesion_load(cond[VOLUME_CHANNEL[key]], voxel_mm3), strict=True
                ):
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


def soft_mask(mask: np.ndarray, softness: float) -> np.ndarray:
    """A binary mask smoothed across its boundary: ``sigmoid(d / softness)`` with d the signed distance (voxels) from
    a voxel's centre to the mask's boundary, positive inside.

    d is half a voxel less than the distance to the nearest voxel of the other class, so a voxel of the mask has
    d >= 1/2 and a voxel outside d <= -1/2: the soft mask is above 1/2 exactly on the mask (thresholding it at 1/2
    gives the mask back) and falls off smoothly around it, e.g. softness 0.7 gives 0.67 on a lesion's rim, 0.33 on
    the voxels touching it and 0.03 two voxels further out. ``softness`` 0 returns the binary mask. An empty mask
    stays empty.
    """
    binary = np.asarray(mask) >= 0.5
    if softness < 0:
        raise ValueError(f"softness must be >= 0, got {softness}")
    if softness == 0 or not binary.any():
        return binary.astype(np.float32)
    if binary.all():
        return np.ones(binary.shape, dtype=np.float32)
    signed = np.where(binary, distance_transform_edt(binary), -distance_transform_edt(~binary))
    signed = signed - 0.5 * np.sign(signed)
    return (1.0 / (1.0 + np.exp(-signed / softness))).astype(np.float32)


class SoftMaskd(MapTransform):
    """Training target: replace binary masks ``keys`` ((C, *S), any array) by :func:`soft_mask` (float32 tensors).

    For the diffusion model's training only (the loss takes targets in [0, 1]); validation and evaluation compare
    with the binary mask. Applied on the whole working grid, before cropping, so a crop's edge does not change
    the distances.
    """

    def __init__(self, keys: KeysCollection, softness: float = 0.7, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if softness < 0:
            raise ValueError(f"softness must be >= 0, got {softness}")
        self.softness = float(softness)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = np.asarray(_plain(d[key]).detach().cpu())
            d[key] = torch.from_numpy(np.stack([soft_mask(channel, self.softness) for channel in mask]))
        return d


PROBABILITY_MAPS = ("samples", "conditional_mean")
"""Where a forecast's voxel probability map comes from (:class:`ForecastMapsd`)."""


def check_probability_map(probability_map: str) -> str:
    """``probability_map`` if it is one of :data:`PROBABILITY_MAPS`, else a ``ValueError`` naming them."""
    if probability_map not in PROBABILITY_MAPS:
        raise ValueError(f"probability_map must be one of {list(PROBABILITY_MAPS)}, got {probability_map!r}")
    return probability_map


class ForecastMapsd(MapTransform):
    """Post-processing: one arm's voxel probability map and the samples' agreement map, on the working grid.

    ``keys``: the K binary samples (K, *S). Writes ``agreement`` (1, *S), the share of samples holding each voxel
    (the forecast mask is where at least half of them do), and ``prob`` (1, *S): with ``probability="samples"`` the
    agreement itself, with ``"conditional_mean"`` the network's conditional mean forecast read from ``mean_key``
    (1, *S): E[mask | inputs] per voxel, the limit of the agreement over infinitely many samples, without their
    Monte-Carlo noise (8 samples of even the true generator place lesions no better than chance; see
    ``bundle/docs/training.md``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        probability: str = "samples",
        mean_key: str = "mean",
        prob_key: str = "prob",
        agreement_key: str = "agreement",
    ) -> None:
        super().__init__(keys)
        self.probability, self.mean_key = check_probability_map(probability), mean_key
        self.prob_key, self.agreement_key = prob_key, agreement_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            samples = d[key].detach().cpu().numpy() if isinstance(d[key], torch.Tensor) else np.asarray(d[key])
            agreement = torch.from_numpy((samples > 0.5).mean(0, keepdims=True).astype(np.float32))
            d[self.agreement_key] = agreement
            if self.probability == "samples":
                d[self.prob_key] = agreement.clone()
            else:
                if d.get(self.mean_key) is None:
                    raise ValueError(f"probability_map 'conditional_mean' needs {self.mean_key!r} in the data")
                mean = torch.as_tensor(_plain(d[self.mean_key])).float().reshape(agreement.shape)
                d[self.prob_key] = mean.clamp(0.0, 1.0)
        return d


class ToReferenceGridd(MapTransform):
    """Post-processing: put ``keys`` (working-grid volumes of one sample) onto the sample's reference grid.

    Reads ``working_affine``, ``reference_affine`` and ``reference_shape``; writes a MetaTensor whose affine is the
    reference affine (see :func:`to_reference_grid` for ``mode`` and ``threshold``). ``value_range`` clips the
    result (a probability map: linear interpolation may overshoot [0, 1] by rounding).
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "bilinear",
        threshold: float | None = None,
        value_range: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode, self.threshold = mode, threshold
        self.value_range = None if value_range is None else tuple(float(v) for v in value_range)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reference_affine = torch.as_tensor(np.asarray(d["reference_affine"]), dtype=torch.float64)
        for key in self.key_iterator(d):
            out = to_reference_grid(
                d[key], d["working_affine"], reference_affine, d["reference_shape"], self.mode, self.threshold
            )
            if self.value_range is not None:
                out = np.clip(out, *self.value_range).astype(np.float32)
            d[key] = MetaTensor(torch.from_numpy(out), affine=reference_affine.clone())
        return d


def forecast_postprocessing(probability_map: str = "samples") -> Compose:
    """``postprocessing`` of ``inference.json`` (the forecast's default): binary samples of one arm ``pred`` (K, *S)
    and its conditional mean ``mean`` (1, *S) on the working grid -> ``prob`` (1, *reference) float32 in [0, 1]
    (:class:`ForecastMapsd`) and ``mask`` (1, *reference) uint8 (the voxels at least half of the samples hold) on
    the case's reference grid."""
    return Compose(
        [
            ForecastMapsd(keys="pred", probability=probability_map),
            ToReferenceGridd(keys=["prob", "agreement"], mode="bilinear", value_range=(0.0, 1.0)),
            CopyItemsd(keys="agreement", names="mask"),
            AsDiscreted(keys="mask", threshold=0.5),
            CastToTyped(keys="mask", dtype=np.uint8),
            DeleteItemsd(keys="agreement"),
        ]
    )
