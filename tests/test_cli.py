"""The command lines: --help prints the options and exits; a misspelled option fails before any work, naming the
nearest valid one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from scripts.runtime.cli import check_bundle_command_line, parse_flags, strict_fire
from scripts.runtime.constants import ARMS
from scripts.runtime.errors import InputError

from tests.conftest import REPO_ROOT

RUN = ["/somewhere/site-packages/monai/bundle/__main__.py", "run"]
INFERENCE = ["--config_file", "bundle/configs/inference.json"]


def test_parse_flags() -> None:
    assert parse_flags(["help", "--a", "1", "--b=x y", "--flag", "--c", "-2", "-h"]) == (
        ["help"],
        {"a": "1", "b": "x y", "flag": True, "c": "-2", "h": True},
    )


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["help"], ["--run_id", "help"]])
def test_bundle_help_lists_options_defaults_and_arms(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as raised:
        check_bundle_command_line([*RUN, *argv, *INFERENCE])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("python -m monai.bundle run --config_file bundle/configs/inference.json [--OPTION VALUE")
    assert "Forecast the NET2 lesion masks" in out  # the config's own help
    lines = out.splitlines()
    assert any(line.split() == ["--num_samples", "8"] for line in lines), out
    assert any(line.split() == ["--output_dir", '"outputs/forecast"'] for line in lines), out
    assert not any(line.split()[:1] == ["--preprocessing"] for line in lines)  # components are not options
    assert f"Treatment arms (--treatments, a list or names separated by commas): {', '.join(ARMS)}" in out


def test_layered_configs_help_is_the_last_ones(capsys: pytest.CaptureFixture) -> None:
    files = "['bundle/configs/inference.json','bundle/configs/evaluate.json']"
    with pytest.raises(SystemExit):
        check_bundle_command_line([*RUN, "--help", "--config_file", files])
    out = capsys.readouterr().out
    assert "score the forecasts against them" in out and any(
        line.split()[:1] == ["--population_datalist"] for line in out.splitlines()
    )


@pytest.mark.parametrize(
    ("option", "close"),
    [("num_sampels", "num_samples"), ("inferer#precison", "inferer#precision"), ("ouput_dir", "output_dir")],
)
def test_misspelled_bundle_option_names_the_nearest(option: str, close: str) -> None:
    with pytest.raises(InputError) as raised:
        check_bundle_command_line([*RUN, *INFERENCE, f"--{option}", "2"])
    assert str(raised.value).startswith(
        f"unknown option --{option} (did you mean --{close}?) for bundle/configs/inference.json"
    ), str(raised.value)


def test_valid_bundle_options_pass() -> None:
    check_bundle_command_line(
        [
            *RUN,
            *INFERENCE,
            "--num_samples",
            "2",
            "--inferer#precision",
            "float32",
            "--inferer::chunk_size",
            "4",
            "--meta_file",
            "bundle/configs/metadata.json",
            "--logging_file",
            "bundle/configs/logging.conf",
        ]
    )
    check_bundle_command_line(["/usr/bin/monailabel", "start_server", "--whatever", "1"])  # not a bundle run


def test_strict_fire(capsys: pytest.CaptureFixture) -> None:
    calls = []

    def main(out: str, n: int = 200, overwrite: bool = False) -> None:
        """Write n cases into out."""
        calls.append((out, n, overwrite))

    strict_fire(main, "scripts.x", ["--out", "d", "--n", "3", "--nooverwrite"])
    assert calls == [("d", 3, False)]
    with pytest.raises(SystemExit) as raised:
        strict_fire(main, "scripts.x", ["--out", "d", "--num", "3"])
    assert raised.value.code == 2 and calls == [("d", 3, False)]  # refused before main runs
    assert capsys.readouterr().err.strip() == (
        "ERROR: unknown option --num (did you mean --n?) for python -m scripts.x; --help lists the options"
    )
    with pytest.raises(SystemExit) as raised:
        strict_fire(main, "scripts.x", ["--help"])
    out = capsys.readouterr().out
    assert raised.value.code == 0 and "Write n cases into out." in out
    assert [line.split() for line in out.splitlines()[-3:]] == [
        ["--out", "(required)"],
        ["--n", "200"],
        ["--overwrite", "false"],
    ]


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["--progress", "false"], False),
        (["--progress=FALSE"], False),
        (["--progress", "no"], False),
        (["--progress", "0"], False),
        (["--progress", "true"], True),
        (["--noprogress"], False),
        (["--progress"], True),
        ([], True),
    ],
)
def test_strict_fire_reads_yes_no_words(words: list[str], expected: bool) -> None:
    """``--help`` shows a yes/no default as ``true``/``false``: written so on the command line it must mean that."""
    seen = []

    def main(out: str = "x", progress: bool = True) -> None:
        seen.append((out, progress))

    strict_fire(main, "scripts.x", [*words, "--out", "y"])
    assert seen == [("y", expected)]


def test_strict_fire_refuses_a_yes_no_option_with_another_value(capsys: pytest.CaptureFixture) -> None:
    def main(progress: bool = True) -> None:
        raise AssertionError("must not run")

    with pytest.raises(SystemExit) as raised:
        strict_fire(main, "scripts.x", ["--progress", "maybe"])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == "ERROR: --progress takes true or false, not 'maybe' for python -m scripts.x"


def test_strict_fire_passes_any_option_to_a_function_taking_kwargs() -> None:
    seen = {}

    def main(out: str = "x", **overrides: object) -> None:
        seen.update(overrides, out=out)

    strict_fire(main, "scripts.x", ["--spatial_size", "[16,16,16]", "--out", "y"])
    assert seen == {"spatial_size": [16, 16, 16], "out": "y"}


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_bundle_help_starts_no_forecast(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _command("-m", "monai.bundle", "run", *INFERENCE, "--output_dir", str(out), "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--num_samples" in result.stdout and "placebo, laquinimod" in result.stdout
    assert not out.exists() and "forecasting" not in result.stderr


def test_misspelled_bundle_option_fails_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = _command("-m", "monai.bundle", "run", *INFERENCE, "--output_dir", str(out), "--num_sampels", "2")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("ERROR: unknown option --num_sampels (did you mean --num_samples?)")
    ), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out.exists()


def test_scripts_entry_points_refuse_unknown_options_first(tmp_path: Path) -> None:
    result = _command("-m", "scripts.synthetic", "--out", str(tmp_path / "cohort"), "--num", "3")
    assert result.returncode == 2 and "unknown option --num (did you mean --n?)" in result.stderr
    assert not (tmp_path / "cohort").exists()


def test_scripts_help_does_not_run_the_command() -> None:
    model = REPO_ROOT / "bundle" / "models" / "model.ts"
    before = model.stat().st_mtime_ns
    result = _command("-m", "scripts.export", "--help")
    assert result.returncode == 0 and result.stdout.startswith("python -m scripts.export [OPTIONS]")
    assert "--ckpt" in result.stdout and model.stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "extra",
    [
        ["--tracking", "mlflow", "--experiment_name", "e", "--tracking_uri", "file:/tmp/m"],  # MLflow settings
        ["--workflow_type", "infer"],  # passed on to ConfigWorkflow
        ["--evaluator#_disabled_", "true"],  # MONAI's own keys of a component
        ["--num-samples", "2"],  # fire reads - as _
        ["-num_samples", "2"],  # and one dash as two
        ["--num_samples", "2", "--", "--trace"],  # fire's own flags after a bare --
        ["--brain_margin", "-1"],  # a negative value is not an option
    ],
    ids=["mlflow", "workflow_type", "disabled", "hyphen", "one_dash", "fire_flags", "negative_value"],
)
def test_legitimate_bundle_command_lines_pass(extra: list[str]) -> None:
    check_bundle_command_line([*RUN, *INFERENCE, *extra])


def test_args_file_gives_config_file_and_is_checked(tmp_path: Path) -> None:
    args = tmp_path / "args.json"
    args.write_text('{"config_file": "bundle/configs/inference.json", "num_samples": 2}')
    check_bundle_command_line([*RUN, "--args_file", str(args)])
    args.write_text('{"config_file": ["bundle/configs/inference.json"], "num_sampels": 2}')
    with pytest.raises(InputError, match="unknown option --num_sampels"):
        check_bundle_command_line([*RUN, "--args_file", str(args)])


def test_one_dash_misspelling_is_caught() -> None:
    with pytest.raises(InputError, match="unknown option --num_sampels"):
        check_bundle_command_line([*RUN, *INFERENCE, "-num_sampels", "2"])


def test_strict_fire_one_letter_shortcut() -> None:
    calls = []

    def main(out: str, n: int = 200) -> None:
        calls.append((out, n))

    strict_fire(main, "scripts.x", ["-o", "d", "--n", "3"])
    assert calls == [("d", 3)]


def test_readme_figures_fail_when_they_drift(tmp_path: Path) -> None:
    """The README's sample-case sentence parses, and the check fails on a forecast that gives other figures."""
    from scripts.tools.readme_figures import drift, measured_figures, quoted_figures

    quoted = quoted_figures((REPO_ROOT / "README.md").read_text())
    assert set(quoted) == {"placebo", "ocrelizumab", "truth_placebo", "truth_ocrelizumab"}
    truth_dir = REPO_ROOT / "bundle" / "sample_data" / "truth"
    cases = sorted(p.stem for p in truth_dir.glob("*.json"))

    def summary(placebo: float, ocrelizumab: float) -> Path:
        out = tmp_path / f"run_{placebo}_{ocrelizumab}"
        out.mkdir()
        rows = ["id,arm,expected_count"] + [f"{c},placebo,{placebo}" for c in cases]
        rows += [f"{c},ocrelizumab,{ocrelizumab}" for c in cases]
        (out / "summary.csv").write_text("\n".join(rows) + "\n")
        return out

    same = measured_figures(summary(quoted["placebo"], quoted["ocrelizumab"]), truth_dir)
    assert drift(quoted, same) == []  # the truth the README quotes is the sample cases' truth
    other = measured_figures(summary(quoted["placebo"] + 0.4, quoted["ocrelizumab"]), truth_dir)
    assert [line.split(":")[0] for line in drift(quoted, other)] == ["placebo"]
    result = subprocess.run(
        [sys.executable, "-m", "scripts.readme_figures", "--forecast_dir", str(summary(99.0, 0.0))],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "README figures drifted" in result.stderr
