"""One forecast request at a time, as an application serving the bundle runs it (MONAI Label, MONAI Deploy).

An application holds one :class:`BundleForecaster`: it reads the bundle's ``inference.json`` once (the same
preprocessing, network, inferer and brain restriction as ``python -m monai.bundle run``), loads the weights once,
and answers each request (a case, the arms, the horizon) with the files the forecast command writes for that case
(``<arm>_prob.nii.gz``, ``<arm>_mask.nii.gz``, ``forecast.json``, ``forecast.png``), so a served forecast and a
command-line forecast of the same case, arms, samples and seed are identical.

A request names its case in one of two ways (:func:`resolve_case`):

- a folder holding the case's images under their datalist key names (``flair_1.nii.gz``, ``t2les_0.nii.gz``,
  ...; the layout of ``sample_data/images/<id>/``), or any image inside such a folder;
- a case id (or the path of one of its images) of a datalist given to the application.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from scripts.runtime.constants import IMAGE_KEYS, LOADED_KEYS
from scripts.runtime.datalist import CaseDataset, load_datalist
from scripts.runtime.errors import CaseError, InputError
from scripts.runtime.forecast import ForecastRunner
from scripts.runtime.io import save_nifti
from scripts.runtime.options import parse_arms
from scripts.runtime.weights import load_weights

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


def _key_of(path: Path) -> str | None:
    """The image key a file is named after (``flair_1.nii.gz`` -> ``flair_1``), or None."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            stem = path.name[: -len(suffix)]
            return stem if stem in LOADED_KEYS else None
    return None


def case_from_folder(folder: str | os.PathLike[str], case_id: str | None = None) -> dict[str, Any]:
    """A datalist entry from a folder of images named by their keys (``flair_1.nii.gz``, ``t2les_0.nii``, ...).

    The id is the folder's name unless ``case_id`` is given; paths are absolute; files with other names are ignored.

    Raises:
        InputError: the folder does not exist, or holds no image named after a key.
    """
    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise InputError(f"case folder {folder}: not a folder")
    case: dict[str, Any] = {"id": case_id or folder.name}
    for path in sorted(folder.iterdir()):
        key = _key_of(path)
        if key is not None and key in IMAGE_KEYS:
            if key in case:
                raise InputError(f"case folder {folder}: {key} is there twice ({Path(case[key]).name}, {path.name})")
            case[key] = str(path)
    if len(case) == 1:
        raise InputError(
            f"case folder {folder}: no image named after a datalist key ({', '.join(IMAGE_KEYS[:3])}, ... with "
            f"{' or '.join(NIFTI_SUFFIXES)})"
        )
    return case


def resolve_case(
    image: str | os.PathLike[str], datalist: str | os.PathLike[str] | None = None, split: str = "testing"
) -> dict[str, Any]:
    """The datalist entry a request's ``image`` names (see the module's docstring for the two ways).

    Raises:
        InputError: ``image`` names no case: neither a case folder (or an image inside one) nor a case id or
            image of ``datalist``.
    """
    path = Path(image)
    if datalist is not None:
        wanted = os.path.normpath(os.path.abspath(path)) if path.exists() else None
        for case in load_datalist(datalist, split, errors=[]):
            if str(case["id"]) in (str(image), _stem(path)):
                return case
            if wanted is not None and wanted in (os.path.normpath(case[k]) for k in IMAGE_KEYS if k in case):
                return case
    if path.is_dir():
        return case_from_folder(path)
    if path.is_file() and _key_of(path) is not None:
        return case_from_folder(path.parent)
    where = f" nor a case of {datalist}" if datalist is not None else " (no datalist given to look ids up in)"
    raise InputError(
        f"image {image!s}: names no case: not a folder of images named by datalist keys, nor an image in one{where}"
    )


def _stem(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


class BundleForecaster:
    """The bundle's forecast job for one case at a time.

    Args:
        bundle_root: the bundle folder (``configs/``, ``models/``).
        config_file: the inference config (default ``<bundle_root>/configs/inference.json``).
        overrides: config values to replace, by id (e.g. ``{"num_samples": 4, "device": "cpu", "ckpt_path": ...}``).
    """

    def __init__(
        self,
        bundle_root: str | os.PathLike[str],
        config_file: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.bundle_root = Path(bundle_root).resolve()
        if config_file is None:
            config_file = self.bundle_root / "configs" / "inference.json"
        files = [str(f) for f in config_file] if isinstance(config_file, (list, tuple)) else [str(config_file)]
        parser = ConfigParser()
        parser.read_config(files)
        parser.update({"bundle_root": str(self.bundle_root), **dict(overrides or {})})
        parser.parse()
        self.parser = parser
        self.device = torch.device(parser.get_parsed_content("device"))
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.horizon_range = parser.get_parsed_content("horizon_range")
        self.brain_margin = parser.get_parsed_content("evaluator#brain_margin")
        self.max_num_samples = parser.get_parsed_content("max_num_samples")
        self.network = parser.get_parsed_content("network")
        if "ts_path" not in parser:  # a TorchScript network (inference_ts.json) comes with its weights
            load_weights(self.network, parser.get_parsed_content("ckpt_path"), self.device)
        self.network.eval()
        logger.info("bundle %s ready on %s: %s", self.bundle_root, self.device, self.inferer.settings())

    @property
    def version(self) -> str:
        """The bundle's version (``configs/metadata.json``), or ``unknown``."""
        meta = self.bundle_root / "configs" / "metadata.json"
        try:
            return str(ConfigParser.load_config_file(meta).get("version", "unknown"))
        except Exception:  # a bundle without metadata still forecasts
            return "unknown"

    def forecast(
        self,
        case: Mapping[str, Any],
        output_dir: str | os.PathLike[str],
        arms: str | Sequence[str] | None = None,
        horizon_weeks: float | None = None,
    ) -> tuple[dict[str, Any], Path]:
        """Forecast one case under ``arms`` (default all six) at ``horizon_weeks`` (default the case's own, else 24).

        The outputs go to ``output_dir/<id>/`` (replacing an earlier forecast of the case there).

        Returns:
            the case's ``forecast.json`` content and its folder.

        Raises:
            CaseError: the case, one of its images or the horizon is invalid (names the case, key and reason).
            InputError: an unknown or repeated arm.
        """
        entry = dict(case)
        if horizon_weeks is not None:
            entry["horizon_weeks"] = horizon_weeks
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        # a request has no datalist folder for relative image paths to start from: they start from the working folder
        dataset = CaseDataset(
            Path.cwd() / "request.json",
            "testing",
            transform=self.preprocessing,
            horizon_range=self.horizon_range,
            data=[entry],
        )
        if dataset.errors:
            raise dataset.errors[0]
        runner = ForecastRunner(
            dataset,
            output_dir,
            self.network,
            self.inferer,
            arms=parse_arms(arms),
            device=self.device,
            overwrite=True,
            brain_margin=self.brain_margin,
            max_num_samples=self.max_num_samples,
            postprocessing=self.postprocessing,
        )
        forecast = runner.forecast_case(dataset.data[0])
        return forecast, output_dir / str(dataset.data[0]["id"])


def stack_arm_maps(case_dir: str | os.PathLike[str], forecast: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the arms' probability maps of one forecast as one NIfTI (X, Y, Z, arm), arms in ``forecast["arms"]``
    order, on the case's reference grid; a single arm gives a 3D file."""
    case_dir = Path(case_dir)
    volumes, affine = [], None
    for figures in forecast["arms"].values():
        img = nib.load(str(case_dir / figures["prob"]))
        volumes.append(np.asarray(img.dataobj, dtype=np.float32))
        affine = img.affine if affine is None else affine
    if affine is None:
        raise CaseError(str(forecast.get("id", "?")), "arms", "the forecast holds no arm")
    if len(volumes) == 1:
        return save_nifti(volumes[0], affine, path, np.float32)
    return save_nifti(np.stack(volumes, axis=-1), affine, path, np.float32, volumes_last=True)
