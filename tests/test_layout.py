"""The layout of ``scripts/``: every module is placed in the layer order below and imports only modules below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LAYERS: tuple[str, ...] = (
    # the runtime that ships in the bundle, bottom first
    "runtime.constants",
    "runtime.errors",
    "runtime.options",
    "runtime.cli",
    "runtime.files",
    "runtime.grids",
    "runtime.lesions",
    "runtime.io",
    "runtime.headers",
    "runtime.datalist",
    "runtime.transforms",
    "runtime.regions",
    "runtime.network",
    "runtime.scheduler",
    "runtime.sampler",
    "runtime.inferer",
    "runtime.weights",
    "runtime.analysis",
    "runtime.figures",
    "runtime.forecast",
    "runtime.service",
    # training plumbing
    "training.engines",
    "training.metrics",
    # tools
    "tools.export",
    "tools.package",
    "tools.curves",
    "tools.readme_figures",
    # the bench: synthetic cohort, evaluation, benchmark
    "bench.synthetic.config",
    "bench.synthetic.anatomy",
    "bench.synthetic.disease",
    "bench.synthetic.oracle",
    "bench.synthetic.mri",
    "bench.synthetic.case",
    "bench.synthetic.reference",
    "bench.synthetic.cohort",
    "bench.evaluation.conventions",
    "bench.evaluation.scores",
    "bench.evaluation.location",
    "bench.evaluation.summary",
    "bench.evaluation.store",
    "bench.evaluation.report",
    "bench.evaluation.plots",
    "bench.evaluation.baselines",
    "bench.evaluation.regression",
    "bench.evaluation.evaluator",
    "bench.trajectory",
    "bench.speed",
    "bench.parity",
    "bench.benchmark",
    # the entry points (python -m scripts.<name>; the first five are the contract's)
    "synthetic",
    "lesions",
    "benchmark",
    "export",
    "package",
    "readme_figures",
)
"""Every module of ``scripts/`` (without the ``scripts.`` prefix), in the order data flows: bottom first."""

SCRIPTS = REPO_ROOT / "scripts"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SCRIPTS.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        out[".".join(path.relative_to(SCRIPTS).with_suffix("").parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(module, line, at top level) of every import of a ``scripts`` module in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "scripts":
            base = node.module.removeprefix("scripts").lstrip(".")
            # "from scripts.runtime import errors" imports the module scripts.runtime.errors
            names = [f"{base}.{a.name}".lstrip(".") for a in node.names if f"{base}.{a.name}".lstrip(".") in known]
            names = names or [base]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("scripts.") for a in node.names if a.name.startswith("scripts.")]
        found += [(name, node.lineno, id(node) in top) for name in names if name]
    return found


def test_every_module_has_a_place_in_the_layers() -> None:
    modules = set(_modules())
    assert len(LAYERS) == len(set(LAYERS))
    assert modules - set(LAYERS) == set(), "new modules: give them a place in LAYERS"
    assert set(LAYERS) - modules == set(), "LAYERS names modules that do not exist"


@pytest.mark.parametrize("module", LAYERS)
def test_module_imports_only_modules_below_it(module: str) -> None:
    modules = _modules()
    rank = {name: i for i, name in enumerate(LAYERS)}
    problems = []
    for imported, line, at_top in _imports(modules[module], set(modules)):
        if imported not in rank:
            continue  # a package (scripts.runtime, ...) holds no code
        if rank[imported] >= rank[module]:
            problems.append(f"line {line}: imports scripts.{imported}, which is not below it")
        if not at_top:
            problems.append(f"line {line}: imports scripts.{imported} inside a function (hides the dependency)")
    assert not problems, f"scripts.{module}:\n" + "\n".join(problems)


def test_the_layering_check_sees_a_violation(tmp_path: Path) -> None:
    """The check itself can fail: an upward and a function-level import are both found."""
    path = tmp_path / "m.py"
    path.write_text("from scripts.runtime.forecast import ForecastRunner\n\ndef f():\n    import scripts.runtime.io\n")
    found = _imports(path, set(_modules()))
    assert ("runtime.forecast", 1, True) in found and ("runtime.io", 4, False) in found
