"""The datalist: reading a split, validating every case and naming its reference grid.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import Dataset

from scripts.runtime.constants import (
    DEFAULT_HORIZON_WEEKS,
    LABEL_KEY,
    LOADED_KEYS,
    REFERENCE_KEY_PRIORITY,
    VISIT1_MRI_KEYS,
    arm_index,
)
from scripts.runtime.errors import CaseError, DatalistError

REQUIRED_KEYS: dict[str, tuple[str, ...]] = {"training": ("treatment", LABEL_KEY), "validation": (LABEL_KEY,)}
"""Keys every entry of a split must hold besides ``id`` and a visit-1 MRI (training learns from both; validation
scores against the label). Forecasting (``testing``) needs neither."""


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
    return _validate_entries(entries, path.parent, errors, horizon_range, required)


def _validate_entries(entries: Sequence[Any], base_dir: Path, errors: list[CaseError] | None,
                      horizon_range: Sequence[float] | None, required: Sequence[str]) -> list[dict[str, Any]]:
    """Validated entries with unique ids; invalid ones go to ``errors`` (raised when it is None)."""
    cases: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        try:
            case = validate_case(entry, base_dir, index, horizon_range=horizon_range, required=required)
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


class CaseDataset(Dataset):
    """The valid cases of one datalist split as a MONAI ``Dataset`` (items preprocessed by ``transform``).

    Invalid entries do not stop the others: they are kept in :attr:`errors` (one :class:`CaseError` each, naming
    the case, the input key and the reason) for the job to report once the good cases are done.

    Args:
        datalist: the datalist JSON file.
        split: the list to read (``training``, ``validation``, ``testing``).
        transform: preprocessing of one entry (``inference.json``'s ``preprocessing``).
        horizon_range: trained ``(low, high)`` horizon in weeks; cases outside are invalid (None: no limit).
        data: entries to use instead of the datalist's ``split`` (e.g. set by MONAI Label or Deploy as
            ``dataset#data``); relative paths are resolved against the datalist's folder.
    """

    def __init__(self, datalist: str | os.PathLike[str], split: str = "testing", transform: Callable | None = None,
                 horizon_range: Sequence[float] | None = None, data: Sequence[Mapping[str, Any]] | None = None) -> None:
        if horizon_range is not None:
            low, high = (float(v) for v in horizon_range)
            if not 0 < low <= high:
                raise ValueError(f"horizon_range must be (low, high) with 0 < low <= high, got {horizon_range!r}")
            horizon_range = (low, high)
        self.datalist, self.split, self.horizon_range = Path(datalist), split, horizon_range
        self.errors: list[CaseError] = []
        if data is None:
            cases = load_datalist(datalist, split, errors=self.errors, horizon_range=horizon_range)
        else:
            cases = _validate_entries(list(data), self.datalist.parent, self.errors, horizon_range,
                                      REQUIRED_KEYS.get(split, ()))
        super().__init__(cases, transform)
