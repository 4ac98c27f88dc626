"""Strict JSON and the digests the evaluation's resume key is made of."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scripts.bench.evaluation.scores import finite
from scripts.runtime.files import file_sha256


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def strict_json(value: Any) -> Any:
    """Recursively replace NaN/Inf by None so the JSON is strict."""
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return finite(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def file_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file (None for None; the path itself when it is not a file)."""
    if path is None:
        return None
    return file_sha256(path) if Path(path).is_file() else str(path)
