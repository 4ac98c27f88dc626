"""The datalist: reading a split, validating every case and naming its reference grid."""

from __future__ import annotations

import json
import math
import os
import stat
import unicodedata
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.data import Dataset
from scripts.runtime.constants import (
    DEFAULT_HORIZON_WEEKS,
    LABEL_KEY,
    LOADED_KEYS,
    MAX_DATALIST_BYTES,
    MAX_ID_LENGTH,
    REFERENCE_KEY_PRIORITY,
    RESERVED_OUTPUT_NAMES,
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


def display_id(case_id: str) -> str:
    """The id as reports show it: cut to :data:`MAX_ID_LENGTH` characters (a 10,000-character id would fill the
    screen)."""
    return case_id if len(case_id) <= MAX_ID_LENGTH else case_id[:MAX_ID_LENGTH] + "..."


def id_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot name the case's output folder, or None when it can.

    The id becomes ``O/<id>``: it must not leave ``O`` or alias it (``/``, ``\\``, ``.``, ``..``), hide (a leading
    ``.`` is the runs' own temporary-file scheme, which a rerun deletes), take a name the commands write themselves
    (``summary.csv``, ``report.md``, ...), exceed what file systems allow, or hold characters that forge log lines or
    hide in a listing (control and format characters: newline, NUL, zero-width space, ...).
    """
    if case_id != case_id.strip():
        return "must not start or end with white space"
    size = len(case_id.encode("utf-8"))
    if size > MAX_ID_LENGTH:
        chars = f"{len(case_id)} characters, " if size != len(case_id) else ""
        return (
            f"is {chars}{size} bytes long in UTF-8; at most {MAX_ID_LENGTH} are allowed (it names a folder, and "
            "file systems allow 255 bytes for a name with the runs' temporary suffixes)"
        )
    if case_id in (".", "..") or "/" in case_id or "\\" in case_id:
        return "must be usable as a folder name (no '/', '\\', '.' or '..')"
    if case_id.startswith("."):
        return "must not start with '.' (hidden names are the runs' temporary files)"
    odd = [c for c in case_id if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")]
    if odd:
        codes = ", ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(odd))
        return f"holds control or invisible characters ({codes})"
    reserved = {name.casefold() for name in RESERVED_OUTPUT_NAMES}
    if case_id.casefold() in reserved:
        return f"{case_id!r} is the name of a file the command writes itself ({', '.join(RESERVED_OUTPUT_NAMES)})"
    return None


def folder_key(case_id: str) -> str:
    """What two ids that name the same folder share: Unicode normalisation (``café`` typed two ways) and case
    (macOS and Windows file systems ignore it)."""
    return unicodedata.normalize("NFC", case_id).casefold()


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file (without the path), or None; a folder, FIFO or device would fail,
    block or never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if not stat.S_ISREG(mode):
        return "is a socket or another special file, not a regular file"
    return None


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
        raise CaseError(display_id(str(case_id)), "id", "must be a non-empty string")
    problem = id_problem(case_id)
    if problem is not None:
        raise CaseError(display_id(case_id), "id", problem)
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
        problem = file_problem(path)
        if problem is not None:
            raise CaseError(case_id, key, f"{problem}: {path}")
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
            raise CaseError(
                case_id, "horizon_weeks", f"{horizon:g} weeks is outside the trained range [{low:g}, {high:g}] weeks"
            )
    out["horizon_weeks"] = float(horizon)
    return out


def _read_datalist(path: Path, split: str, max_bytes: int = MAX_DATALIST_BYTES) -> list[Any]:
    """The ``split`` list of the JSON datalist at ``path``; :class:`DatalistError` for any problem with the file."""
    problem = file_problem(path)
    if problem is not None:
        raise DatalistError(path, problem)
    size = path.stat().st_size
    if size > max_bytes:
        raise DatalistError(
            path,
            f"{size / 2**20:.1f} MiB is larger than the {max_bytes / 2**20:g} MiB a datalist may "
            "be (split it into several datalists)",
        )
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


def _validate_entries(
    entries: Sequence[Any],
    base_dir: Path,
    errors: list[CaseError] | None,
    horizon_range: Sequence[float] | None,
    required: Sequence[str],
) -> list[dict[str, Any]]:
    """Validated entries with unique ids; invalid ones go to ``errors`` (raised when it is None)."""
    cases: list[dict[str, Any]] = []
    seen: dict[str, tuple[int, str]] = {}
    for index, entry in enumerate(entries):
        try:
            case = validate_case(entry, base_dir, index, horizon_range=horizon_range, required=required)
            earlier = seen.get(folder_key(case["id"]))
            if earlier is not None and earlier[1] == case["id"]:
                raise CaseError(case["id"], "id", f"duplicate id (entries #{earlier[0]} and #{index})")
            if earlier is not None:
                raise CaseError(
                    case["id"],
                    "id",
                    f"names the same folder as entry #{earlier[0]} ({earlier[1]!r}): ids "
                    "may not differ only in letter case or Unicode normalisation",
                )
        except CaseError as err:
            if errors is None:
                raise
            errors.append(err)
            continue
        seen[folder_key(case["id"])] = (index, case["id"])
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

    def __init__(
        self,
        datalist: str | os.PathLike[str],
        split: str = "testing",
        transform: Callable | None = None,
        horizon_range: Sequence[float] | None = None,
        data: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
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
            cases = _validate_entries(
                list(data), self.datalist.parent, self.errors, horizon_range, REQUIRED_KEYS.get(split, ())
            )
        super().__init__(cases, transform)
