"""Assemble a self-contained bundle folder in the MONAI Model Zoo layout.

``python -m scripts.package --out DIR`` writes ``DIR/<name>/`` with ``configs/``, ``models/``, ``docs/``,
``sample_data/`` (the cases the default forecast runs on), ``apps/`` (MONAI Label and MONAI Deploy), ``ci/`` (the
Model Zoo unit test), ``LICENSE`` and
``scripts/`` (a copy of this package: Model Zoo bundles keep their custom code in the bundle's ``scripts/`` and run
with the bundle folder on ``sys.path``). In the copied configs the repository-relative macros
(``%bundle/configs/...``) are replaced by their content and ``bundle_root`` becomes the folder that holds the
imported ``scripts`` package, so the packaged bundle finds its models and sample data from any working directory::

    cd /anywhere && PYTHONPATH=DIR/<name> python -m monai.bundle run \\
        --config_file DIR/<name>/configs/inference.json

(``--bundle_root`` still overrides it). ``models/model.ts`` is copied only when it was exported from the
``model.pt`` being shipped (``export.json`` records the checkpoint's SHA-256); ``--export_torchscript True``
traces a fresh one into the package instead. Nothing in the repository is modified.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from scripts.tools.export import export, matches_checkpoint

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NAME = "ms_mri_net2_forecast"
PACKAGED_BUNDLE_ROOT = "$os.path.dirname(os.path.dirname(os.path.abspath(scripts.__file__)))"
"""``bundle_root`` of the packaged configs: the bundle folder is the one holding the ``scripts`` package in use."""

BUNDLE_ITEMS = ("configs", "models", "docs", "sample_data", "apps", "ci", "LICENSE")


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n in ("__pycache__", ".pytest_cache") or n.endswith((".pyc", ".tmp"))}


def _rewrite_bundle_root(config_path: Path) -> bool:
    """Point ``bundle_root`` of one packaged config at the packaged folder; False if it defines none."""
    config = json.loads(config_path.read_text())
    if "bundle_root" not in config:
        return False
    imports = config.get("imports", [])
    for needed in ("$import os", "$import scripts"):
        if needed not in imports:
            raise ValueError(f"{config_path.name} defines bundle_root but lacks {needed!r} in imports")
    # a text edit of the one line keeps the config's layout as written
    line = re.compile(r'^(\s*"bundle_root"\s*:\s*)"[^"\n]*"', flags=re.MULTILINE)
    text, count = line.subn(lambda m: m.group(1) + json.dumps(PACKAGED_BUNDLE_ROOT), config_path.read_text())
    if count != 1 or json.loads(text)["bundle_root"] != PACKAGED_BUNDLE_ROOT:
        raise ValueError(f"{config_path.name}: cannot rewrite bundle_root (expected one string-valued line)")
    config_path.write_text(text)
    return True


REPOSITORY_PATHS = {
    "bundle/configs/": "configs/",
    "bundle/models/": "models/",
    "bundle/docs/": "docs/",
    "bundle/sample_data/": "sample_data/",
    "bundle/apps/": "apps/",
    "bundle/ci/": "ci/",
}
"""Paths of the bundle's parts in the repository, and where they are in the packaged bundle."""


def _rewrite_doc_paths(doc: Path) -> bool:
    """Make the repository paths of one packaged document (``bundle/configs/inference.json``) the packaged bundle's
    (``configs/inference.json``); False if it names none."""
    text = doc.read_text(encoding="utf-8")
    new = text
    for repo_path, packaged_path in REPOSITORY_PATHS.items():
        new = new.replace(repo_path, packaged_path)
    if new == text:
        return False
    doc.write_text(new, encoding="utf-8")
    return True


MACRO_PREFIX = "%bundle/configs/"
"""Macros of the repository's configs (``%bundle/configs/inference.json#network_def``): they resolve from the
repository root only, so the packaged configs hold their content instead."""


def _inline(value: Any, sources: dict[str, ConfigParser], configs: Path) -> Any:
    if isinstance(value, dict):
        return {k: _inline(v, sources, configs) for k, v in value.items()}
    if isinstance(value, list):
        return [_inline(v, sources, configs) for v in value]
    if isinstance(value, str) and value.startswith(MACRO_PREFIX):
        path, ids = ConfigParser.split_path_id(value[len(MACRO_PREFIX) :])
        if path not in sources:
            sources[path] = ConfigParser(ConfigParser.load_config_file(configs / path))
        return copy.deepcopy(sources[path][ids])
    return value


def _inline_macros(config_path: Path, configs: Path) -> bool:
    """Replace the repository-relative macros of one packaged config by their content; False if it has none."""
    config = json.loads(config_path.read_text())
    inlined = _inline(config, {}, configs)
    if inlined == config:
        return False
    config_path.write_text(json.dumps(inlined, indent=4) + "\n")
    return True


def package(
    out: str | os.PathLike,
    name: str = DEFAULT_NAME,
    bundle_dir: str | os.PathLike = REPO_ROOT / "bundle",
    scripts_dir: str | os.PathLike = REPO_ROOT / "scripts",
    export_torchscript: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the packaged bundle to ``out/name`` and return its path.

    Args:
        out: parent folder of the packaged bundle.
        name: folder name of the bundle (Model Zoo style, lowercase with underscores).
        bundle_dir: the bundle to package (``configs``, ``models``, ``docs``, ``sample_data``, ``LICENSE``).
        scripts_dir: the bundle's Python package, copied to ``scripts/``.
        export_torchscript: trace ``models/model.ts`` from the shipped ``model.pt`` into the package.
        overwrite: replace an existing ``out/name``.

    Raises:
        FileExistsError: ``out/name`` exists and ``overwrite`` is False.
        FileNotFoundError: a required part of the bundle is missing.
        ValueError: ``models/model.ts`` was not exported from the shipped ``models/model.pt``.
    """
    bundle_dir, scripts_dir = Path(bundle_dir), Path(scripts_dir)
    dest = Path(out) / name
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists (overwrite=True to replace it)")
    for required in ("configs/metadata.json", "configs/inference.json", "LICENSE", "models/model.pt"):
        if not (bundle_dir / required).exists():
            raise FileNotFoundError(f"{bundle_dir / required} is missing")
    ts, pt = bundle_dir / "models" / "model.ts", bundle_dir / "models" / "model.pt"
    if ts.exists() and not export_torchscript and not matches_checkpoint(ts, pt):
        # MONAI Deploy loads model.ts before model.pt: a stale one would silently serve old weights
        raise ValueError(
            f"{ts} was not exported from {pt}: run python -m scripts.export --ckpt {pt} --out {ts}, "
            "or package with --export_torchscript True"
        )

    Path(out).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    staging.chmod(0o755)  # mkdtemp makes it private; the bundle is meant to be shared
    try:
        for item in BUNDLE_ITEMS:
            src = bundle_dir / item
            if src.is_dir():
                shutil.copytree(src, staging / item, ignore=_ignore)
            elif src.is_file():
                shutil.copy2(src, staging / item)
        shutil.copytree(scripts_dir, staging / "scripts", ignore=_ignore)
        inlined = [
            p.name for p in sorted((staging / "configs").glob("*.json")) if _inline_macros(p, bundle_dir / "configs")
        ]
        rewritten = [p.name for p in sorted((staging / "configs").glob("*.json")) if _rewrite_bundle_root(p)]
        for doc in sorted((staging / "docs").glob("*.md")):
            _rewrite_doc_paths(doc)
        if export_torchscript:
            export(
                pt,
                staging / "models" / "model.ts",
                config_file=str(bundle_dir / "configs" / "inference.json"),
                meta_file=str(bundle_dir / "configs" / "metadata.json"),
            )
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "packaged bundle in %s (bundle_root rewritten in %s; macros inlined in %s; model.ts %s)",
        dest,
        ", ".join(rewritten),
        ", ".join(inlined) or "none",
        "included" if (dest / "models" / "model.ts").exists() else "absent",
    )
    return dest


def main(out: str, name: str = DEFAULT_NAME, export_torchscript: bool = False, overwrite: bool = False) -> None:
    """``python -m scripts.package --out DIR``: print the packaged bundle's path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(package(out, name, export_torchscript=export_torchscript, overwrite=overwrite))
