"""Error types of the bundle and how a command reports them: every bad input names what is wrong in one line."""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any


def _one_line(text: object) -> str:
    """``text`` on one line: reader and OS messages may span several, but a report holds one line per failure."""
    return " ".join(str(text).splitlines())


class InputError(ValueError):
    """A bad input the user must fix (datalist, image, checkpoint); commands report it in one line, no traceback."""


class CaseError(InputError):
    """A bad input of one case; ``str()`` is one line naming the case id, the input key and the reason."""

    def __init__(self, case_id: str, key: str, reason: str) -> None:  # noqa: B042 (pickled by __reduce__)
        self.case_id, self.key, self.reason = str(case_id), _one_line(key), _one_line(reason)
        super().__init__(f"case {self.case_id!r}: {self.key}: {self.reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # keeps the error intact across processes (pickle would call __init__ with the message alone)
        return (type(self), (self.case_id, self.key, self.reason))


class DatalistError(InputError):
    """A datalist file that cannot be used at all (missing, not JSON, no such split); names the file."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:  # noqa: B042 (pickled by __reduce__)
        self.path, self.reason = str(path), _one_line(reason)
        super().__init__(f"datalist {self.path}: {self.reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.path, self.reason))


def find_error(error: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]) -> Any:
    """The first exception of type ``kind`` in the cause / context chain of ``error`` (itself included), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def find_case_error(error: BaseException | None) -> CaseError | None:
    """The :class:`CaseError` behind ``error``, if any (MONAI's ``Compose`` re-raises as ``RuntimeError``)."""
    return find_error(error, CaseError)


class ForecastFailed(RuntimeError):
    """Raised after all cases are done when at least one case failed; the message lists every failure."""


class ForecastInterrupted(KeyboardInterrupt):
    """The user stopped a run (Ctrl-C); raised after the summary of the finished cases is written. Commands exit 130
    (128 + SIGINT), as a shell expects of an interrupted program."""


class CheckpointError(InputError):
    """A checkpoint that cannot be used with the configured network (missing, unreadable, other architecture)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


def install_error_hook() -> None:
    """Report a bad input (:class:`InputError`, :class:`ForecastFailed`) as its message alone, without a traceback.

    MONAI's config parser wraps every error of an expression in ``RuntimeError("Failed to evaluate ...")``, so the
    uncaught error's last line would not say what is wrong. The exit status stays 1; other errors keep their traceback.
    A :class:`ForecastInterrupted` prints its message and exits 130.
    """
    previous = sys.excepthook
    if getattr(previous, "reports_input_errors", False):
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        interrupted = find_error(error, ForecastInterrupted)
        if interrupted is not None:
            print(f"INTERRUPTED: {interrupted}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)  # from inside the hook: sys.exit would be reported as one more uncaught exception
        found = find_error(error, (InputError, ForecastFailed))
        if found is None:
            previous(kind, error, traceback)
        else:
            print(f"ERROR: {found}", file=sys.stderr, flush=True)

    hook.reports_input_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook
