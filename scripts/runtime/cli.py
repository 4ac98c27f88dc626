"""Command lines that behave like command lines: ``--help`` prints the options and exits, a misspelled option is an
error (with the nearest valid name) before any work starts.

Two kinds of command are checked here:

* the bundle's jobs, ``python -m monai.bundle run [help] --config_file ... [--key value ...]``: MONAI turns every
  ``--key`` into a config override, adding keys that do not exist, so ``--num_sampels 2`` would silently run with the
  default. :func:`check_bundle_command_line`, the first step of each config's ``initialize``, reads the same config
  files, refuses overrides that name no config id, and answers ``--help`` (or the run id ``help``) with
  :func:`bundle_help`;
* the ``python -m scripts.<name>`` entry points, built on fire, which would call the function first and complain about
  unknown options afterwards (``--num 3`` after generating 200 cases): :func:`strict_fire` checks the option names
  against the function's parameters, then hands the command to fire.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import pydoc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fire
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.config_item import ComponentLocator
from monai.bundle.scripts import create_workflow
from monai.bundle.scripts import run as bundle_run
from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS
from scripts.runtime.constants import ARMS
from scripts.runtime.errors import InputError, install_error_hook

HELP_FLAGS = ("help", "h")
COMPONENT_KEYS = ("_disabled_", "_requires_", "_mode_", "_desc_")
"""MONAI's own keys of a component (``--train#handlers#0#_disabled_ true``)."""
JOB_SECTIONS = ("imports", "initialize", "run", "finalize", "help")
"""Top-level config keys that are the job's steps, not its options."""


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _is_option(word: str) -> bool:
    """``--name`` or ``-name`` (fire takes both), not a negative number."""
    return word.startswith("-") and len(word) > 1 and word != "--" and not _is_number(word)


def parse_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str | bool]]:
    """Split ``argv`` into positional words and ``--name value`` / ``--name=value`` / ``--flag`` options as fire reads
    them: ``-name`` is an option too, ``-`` in a name is ``_``, a word after an option is its value unless it is an
    option itself, and a bare ``--`` ends the command (what follows is fire's own flags). ``-h`` counts as
    ``--help``."""
    positional: list[str] = []
    flags: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            break
        if _is_option(word):
            name, sep, value = word.lstrip("-").partition("=")
            name = name.replace("-", "_")
            if sep:
                flags[name] = value
            elif i + 1 < len(argv) and not _is_option(argv[i + 1]) and argv[i + 1] != "--":
                flags[name] = argv[i + 1]
                i += 1
            else:
                flags[name] = True
        else:
            positional.append(word)
        i += 1
    return positional, flags


def nearest(name: str, choices: Sequence[str]) -> str | None:
    """The valid name closest to a misspelled one, if any is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    if found:
        return found[0]
    # a short option and its spelled-out form (--n and --num)
    related = [c for c in choices if c and (name.startswith(c) or c.startswith(name))]
    return min(related, key=lambda c: abs(len(c) - len(name))) if related else None


def _unknown(names: Sequence[str], choices: Sequence[str], where: str) -> str:
    parts = []
    for name in names:
        close = nearest(name, choices)
        parts.append(f"--{name}" + (f" (did you mean --{close}?)" if close else ""))
    return f"unknown option{'s' if len(names) > 1 else ''} {', '.join(parts)} for {where}; --help lists the options"


# ---------------------------------------------------------------------------------------------------------------
# python -m monai.bundle run
# ---------------------------------------------------------------------------------------------------------------


def _is_bundle_run(argv: Sequence[str]) -> bool:
    script = Path(argv[0]) if argv else Path()
    return (
        script.name == "__main__.py"
        and script.parent.name == "bundle"
        and script.parent.parent.name == "monai"
        and len(argv) > 1
        and argv[1] == "run"
    )


def _run_parameters(tracking: str | bool | None) -> set[str]:
    """What ``monai.bundle run`` takes besides config ids: its own arguments, those it passes on to the workflow, and
    the settings of the experiment tracking it is asked for (``--tracking mlflow --experiment_name ...``)."""
    names = set()
    for fn in (bundle_run, create_workflow, ConfigWorkflow.__init__):
        names |= {
            n for n, p in inspect.signature(fn).parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
    if isinstance(tracking, str):
        settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking)
        if settings is None and Path(tracking).is_file():
            settings = ConfigParser.load_config_file(tracking)
        names |= set((settings or {}).get("configs", {}))
    return names - {"self"}


def _config_files(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)) and value:  # from an args file
        return [str(f) for f in value]
    if not isinstance(value, str):
        raise InputError("config_file: give the job's config file(s), e.g. --config_file bundle/configs/inference.json")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return [str(f) for f in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]


def _read_configs(files: Sequence[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(list(files))
    return parser


def _target_parameters(target: Any, locator: ComponentLocator) -> list[str] | None:
    """The keyword parameters a component's ``_target_`` takes (its constructor's); None when it takes any
    (``**kwargs``) or cannot be resolved here (MONAI then reports it when it instantiates the component)."""
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return None
    module = locator.get_component_module_name(target)
    name = f"{module[0] if isinstance(module, list) else module}.{target}" if module else target
    found = pydoc.locate(name)
    if found is None:
        return None
    try:
        params = inspect.signature(found).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _option_ids(config: Any, prefix: str = "", locator: ComponentLocator | None = None) -> tuple[list[str], list[str]]:
    """Every id of a config (``a``, ``a#b``, ``a#0#c``, ...), and the ids of components that take any keyword (an
    override may add any key under them)."""
    locator = locator or ComponentLocator()
    ids: list[str] = []
    open_ended: list[str] = []
    if isinstance(config, dict) and "_target_" in config:
        ids.extend(f"{prefix}{key}" for key in COMPONENT_KEYS if key not in config)
        params = _target_parameters(config["_target_"], locator)
        if params is None:
            open_ended.append(prefix.rstrip("#"))
        else:  # a constructor argument left at its default is an option too (e.g. inferer#precision)
            ids.extend(f"{prefix}{p}" for p in params if p not in config)
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        ids.append(name)
        more, more_open = _option_ids(value, f"{name}#", locator)
        ids.extend(more)
        open_ended.extend(more_open)
    return ids, open_ended


def _shown(value: Any, width: int = 70) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def bundle_help(config: dict[str, Any], files: Sequence[str]) -> str:
    """The ``--help`` text of a bundle job: what it does (the configs' ``help``), its options with their defaults,
    the treatment arms."""
    shown = files[0] if len(files) == 1 else '"[' + ",".join(repr(f) for f in files) + ']"'
    lines = [f"python -m monai.bundle run --config_file {shown} [--OPTION VALUE ...]", ""]
    if isinstance(config.get("help"), str):
        lines += [config["help"], ""]
    options = {
        k: v
        for k, v in config.items()
        if k not in JOB_SECTIONS
        and not k.startswith("_")
        and not isinstance(v, dict)
        and not (isinstance(v, list) and any(isinstance(x, dict) for x in v))
    }
    lines.append(
        "Options (default in the config; an expression starting with $ is computed; any nested id can be set "
        "too, e.g. --inferer#precision float32):"
    )
    width = max((len(k) for k in options), default=0) + 4
    lines += [f"  --{key.ljust(width)}{_shown(value)}" for key, value in options.items()]
    lines += ["", f"Treatment arms (--treatments, a list or names separated by commas): {', '.join(ARMS)}"]
    return "\n".join(lines)


def check_bundle_command_line(argv: Sequence[str] | None = None) -> None:
    """Check the command line of ``python -m monai.bundle run``; nothing to do when the bundle is run otherwise
    (MONAI Label, Deploy, a Python caller).

    Prints :func:`bundle_help` and exits 0 for ``--help``, ``-h`` or the run id ``help``.

    Raises:
        InputError: an option that names no id of the configs (with the nearest valid one).
    """
    argv = list(sys.argv if argv is None else argv)
    if not _is_bundle_run(argv):
        return
    install_error_hook()
    positional, flags = parse_flags(argv[2:])
    args_file = flags.get("args_file")
    if isinstance(args_file, str):  # defaults for every argument, the command line's win (as MONAI reads them)
        flags = {**{str(k): v for k, v in ConfigParser.load_config_file(args_file).items()}, **flags}
    files = _config_files(flags.get("config_file"))
    parser = _read_configs(files)
    if any(f in flags for f in HELP_FLAGS) or "help" in positional[:1] or flags.get("run_id") == "help":
        print(bundle_help(parser.get(), files), flush=True)
        sys.exit(0)
    ids, open_ended = _option_ids(parser.get())
    known = set(ids) | _run_parameters(flags.get("tracking"))

    def valid(name: str) -> bool:
        name = name.replace("::", "#")
        return name in known or name.startswith("_meta_") or any(name.startswith(f"{o}#") for o in open_ended)

    unknown = [name for name in flags if not valid(name)]
    if unknown:
        raise InputError(_unknown(unknown, sorted(known), " + ".join(files)))


# ---------------------------------------------------------------------------------------------------------------
# python -m scripts.<name> (fire)
# ---------------------------------------------------------------------------------------------------------------


def function_help(fn: Callable[..., Any], prog: str) -> str:
    """The ``--help`` text of a fire entry point: its docstring and its options with their defaults."""
    lines = [f"python -m {prog} [OPTIONS]", ""]
    doc = inspect.getdoc(fn)
    if doc:
        lines += [doc, ""]
    lines.append("Options:")
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is p.VAR_KEYWORD:
            lines.append(f"  --{'KEY VALUE'.ljust(24)}any other option, passed on as {name}")
            continue
        default = "(required)" if p.default is p.empty else _shown(p.default)
        lines.append(f"  --{name.ljust(24)}{default}")
    return "\n".join(lines)


def strict_fire(fn: Callable[..., Any], prog: str, argv: Sequence[str] | None = None) -> Any:
    """Run ``fn`` with fire after checking the option names against its parameters.

    ``--help`` / ``-h`` prints :func:`function_help` and exits 0; an unknown option prints one ``ERROR:`` line with the
    nearest valid name and exits 2 (argparse's status for a usage error), before ``fn`` runs. A function taking
    ``**kwargs`` accepts any option (it checks them itself).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _, flags = parse_flags(argv)
    if any(f in flags for f in HELP_FLAGS):
        print(function_help(fn, prog), flush=True)
        sys.exit(0)
    params = inspect.signature(fn).parameters
    names = set(params) | {n.replace("_", "-") for n in params}
    names |= {f"no{n}" for n, p in params.items() if isinstance(p.default, bool)}
    initials = [n[0] for n in params]
    names |= {c for c in initials if initials.count(c) == 1}  # fire's one-letter shortcuts (-o for --out)
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())  # e.g. export's config overrides
    unknown = [] if open_ended else [name for name in flags if name not in names]
    if unknown:
        print(f"ERROR: {_unknown(unknown, list(params), f'python -m {prog}')}", file=sys.stderr, flush=True)
        sys.exit(2)
    switches = {n for n, p in params.items() if isinstance(p.default, bool)}
    try:
        argv = _booleans_spelled_out(argv, switches)
    except ValueError as err:
        print(f"ERROR: {err} for python -m {prog}", file=sys.stderr, flush=True)
        sys.exit(2)
    return fire.Fire(fn, command=argv, name=prog)


BOOLEAN_WORDS = {**dict.fromkeys(("true", "yes", "on", "1"), True), **dict.fromkeys(("false", "no", "off", "0"), False)}
"""How a yes/no option may be written (any case); fire itself reads only ``True``/``False``, and would take
``--progress false`` as the non-empty, so true, string ``"false"``."""


def _booleans_spelled_out(argv: Sequence[str], switches: set[str]) -> list[str]:
    """``argv`` with the value of every yes/no option in ``switches`` written as fire reads it (``True``/``False``);
    a value that is no yes/no word raises ``ValueError`` naming the option."""
    out = list(argv)
    i = 0
    while i < len(out):
        word = out[i]
        if word == "--":
            break
        if _is_option(word):
            name, sep, value = word.lstrip("-").partition("=")
            key = name.replace("-", "_")
            has_next = not sep and i + 1 < len(out) and not _is_option(out[i + 1]) and out[i + 1] != "--"
            if key in switches and (sep or has_next):
                text = value if sep else out[i + 1]
                if text.lower() not in BOOLEAN_WORDS:
                    raise ValueError(f"--{key} takes true or false, not {text!r}")
                spelled = str(BOOLEAN_WORDS[text.lower()])
                if sep:
                    out[i] = f"{word.partition('=')[0]}={spelled}"
                else:
                    out[i + 1] = spelled
            i += 1 if sep or not has_next else 2
            continue
        i += 1
    return out
