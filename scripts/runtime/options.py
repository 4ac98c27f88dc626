"""Checks of the forecast command's options (arms, samples): a bad value is one line naming the option and the fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from scripts.runtime.constants import ARMS, MAX_NUM_SAMPLES, arm_index
from scripts.runtime.errors import InputError


def parse_arms(arms: str | Sequence[str] | None) -> list[str]:
    """The arms to forecast: a list of arm names, or one string of names separated by commas (``--treatments
    placebo`` reaches the bundle as a string); None gives all six.

    Raises:
        InputError: an unknown or repeated arm, or no arm at all.
    """
    if arms is None:
        return list(ARMS)
    names = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else list(arms)
    for name in names:
        if not isinstance(name, str):
            raise InputError(f"treatments: expected arm names, got {name!r}; valid arms are: {', '.join(ARMS)}")
        try:
            arm_index(name)
        except ValueError as err:
            raise InputError(f"treatments: {err}") from None
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"treatments: {', '.join(map(repr, repeated))} listed more than once")
    if not names:
        raise InputError(f"treatments: no treatment arm to forecast; valid arms are: {', '.join(ARMS)}")
    return names


def check_num_samples(value: Any, limit: int | None = MAX_NUM_SAMPLES) -> int:
    """``num_samples`` as an int in ``[1, limit]``.

    Raises:
        InputError: not a whole number, below 1, or above ``limit`` (which the message says how to raise).
    """
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and int(value) == value
    )
    if isinstance(value, bool) or not whole:
        raise InputError(f"num_samples: must be a whole number of samples, got {value!r}")
    value = int(value)
    if value < 1:
        raise InputError(f"num_samples: must be at least 1, got {value}")
    if limit is not None and value > int(limit):
        raise InputError(
            f"num_samples: {value} is above the limit of {int(limit)} samples per case and arm (all are "
            f"held in memory at once); raise it with --max_num_samples if the machine has the memory"
        )
    return value
