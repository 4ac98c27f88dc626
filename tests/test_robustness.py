"""Bad inputs and faults: every bad input is reported in one line naming case, key and reason, and leaves nothing;
interrupted writes leave no partial file; a killed training resumes; a re-run skips finished cases.

The forecast command is costly to start (~10 s), so one run forecasts a datalist holding every bad case and one good
case, and each bad input is then checked on that run's report.
"""

from __future__ import annotations

import csv
import errno
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.runtime import errors, files
from scripts.runtime import forecast as forecast_module
from scripts.runtime.constants import ARMS, CONDITION_CHANNELS, LOADED_KEYS, VISIT1_MRI_KEYS
from scripts.runtime.datalist import CaseDataset
from scripts.runtime.errors import ForecastFailed, ForecastInterrupted, InputError
from scripts.runtime.forecast import ForecastRunner
from scripts.runtime.grids import fields_of_view_overlap, world_bounding_box
from scripts.runtime.network import ForecastDiffusionUNet
from scripts.training.engines import (
    AtomicCheckpointSaver,
    AtomicDiskSaver,
    ResumeFromCheckpoint,
    TrainerCheckpointSaver,
    latest_checkpoint,
)

from tests.conftest import REPO_ROOT

SMALL = {
    "channels": (8, 16, 16, 16),
    "attention_levels": (False, False, False, True),
    "norm_num_groups": 8,
    "num_head_channels": 16,
}
FORECAST_FLAGS = [
    "--network_channels",
    "[8,16,16,16]",
    "--spatial_size",
    "[32,32,32]",
    "--spacing",
    "[6,6,6]",
    "--num_samples",
    "2",
    "--num_inference_steps",
    "2",
    "--device",
    "cpu",
    "--treatments",
    "['placebo']",
]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
GOOD = "good"


def _forecast(datalist: Path, out: Path, weights: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "bundle/configs/inference.json",
            "--datalist",
            str(datalist),
            "--output_dir",
            str(out),
            "--ckpt_path",
            str(weights),
            *FORECAST_FLAGS,
            *extra,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )


def _report(result: subprocess.CompletedProcess) -> list[str]:
    """The lines the command printed for bad inputs: from its last ``ERROR:`` line to the end of stderr."""
    lines = result.stderr.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("ERROR: ")]
    assert starts, f"no ERROR line; rc={result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[starts[-1] :]


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(ForecastDiffusionUNet(**SMALL).state_dict(), path)
    return path


def _absolute(case: dict[str, Any], folder: Path) -> dict[str, Any]:
    return {k: str(folder / v) if k in LOADED_KEYS else v for k, v in case.items()}


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# One forecast run over a datalist of bad cases and a good one
# ---------------------------------------------------------------------------------------------------------------

# case id -> (key the report must name, words the reason must hold); "{path}" is the case's bad file
BAD: dict[str, tuple[str, list[str]]] = {
    "missing_file": ("t1_1", ["file not found", "{path}"]),
    "unreadable": ("t2_1", ["cannot read", "{path}"]),
    "truncated_gz": ("flair_1", ["cannot read", "{path}"]),
    "truncated_nii": ("pd_1", ["cannot read", "{path}"]),
    "image_2d": ("t1_1", ["expected a 3D volume", "2D", "(32, 32)"]),
    "image_4d": ("t1_1", ["expected a 3D volume", "4D", "(32, 32, 32, 2)"]),
    "nan_voxels": ("t1_1", ["3 NaN", "0 infinite"]),
    "inf_voxels": ("t2_1", ["0 NaN", "2 infinite"]),
    "all_zero_mri": ("t1_1", ["all voxels are 0"]),
    "other_world_space": ("t1_1", ["does not overlap", "flair_1", "world space"]),
    "unknown_treatment": ("treatment", ["aspirin", *ARMS]),
    "horizon_too_long": ("horizon_weeks", ["60", "trained range", "[12, 48]"]),
    "horizon_too_short": ("horizon_weeks", ["4", "trained range", "[12, 48]"]),
    "#13": ("id", ["required key missing"]),
    "no_visit1_mri": ("flair_1", ["no MRI of visit 1"]),
    "label_elsewhere": ("label", ["does not overlap", "flair_1"]),
    "image_is_folder": ("t1_1", ["is a folder, not a file", "{path}"]),
    "image_is_fifo": ("t2_1", ["is a FIFO, not a regular file", "{path}"]),
    "image_is_device": ("pd_1", ["is a device, not a regular file", "/dev/zero"]),
    "mask_labels": ("t2les_1", ["expected a binary mask", "3 values: 0, 1, 2"]),
    "header_promises_more": ("t1_1", ["cannot read", "header promises", "{path}"]),
    "huge_image": ("t1_1", ["not read", "8,589,934,592 voxels", "max_image_voxels", "{path}"]),
    "zero_sform": ("t1_1", ["sform (code 1) is singular", "{path}"]),
    "no_orientation": ("flair_1", ["sform and qform codes are 0", "{path}"]),
    "flipped_qform": ("t2_1", ["orient the image differently", "{path}"]),
}

# bad ids: id -> (the id as the report shows it, words the reason must hold)
BAD_IDS: dict[str, tuple[str, list[str]]] = {
    "x" * 300: ("x" * 128 + "...", ["300 bytes long in UTF-8", "at most 128"]),
    "病例" * 30: ("病例" * 30, ["60 characters, 180 bytes long in UTF-8"]),
    "summary.csv": ("summary.csv", ["name of a file the command writes"]),
    "Report.MD": ("Report.MD", ["name of a file the command writes"]),
    ".keep.tmp-999999@vm-x": (".keep.tmp-999999@vm-x", ["must not start with '.'"]),
    "two\nlines": ("two\nlines", ["control or invisible characters (U+000A)"]),
    "nul\x00byte": ("nul\x00byte", ["U+0000"]),
    "zero\u200bwidth": ("zero\u200bwidth", ["U+200B"]),
    " padded": (" padded", ["white space"]),
}


def _huge_header(affine: np.ndarray, path: Path) -> str:
    """A 1 kB ``.nii.gz`` whose header declares 2048^3 float32 voxels (32 GiB once decompressed)."""
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1000))
    return str(path)


def _with_forms(
    image: np.ndarray, affine: np.ndarray, path: Path, sform: int, qform: int, qform_affine: np.ndarray | None = None
) -> str:
    """Save with the given sform and qform codes (and a qform of its own); nibabel keeps the header's forms as they
    are when the image has no affine of its own."""
    header = nib.Nifti1Header()
    header.set_data_shape(image.shape)
    header.set_data_dtype(image.dtype)
    header.set_sform(affine, code=sform)
    if qform:
        header.set_qform(affine if qform_affine is None else qform_affine, code=qform)
    nib.save(nib.Nifti1Image(image, None, header), path)
    return str(path)


def _bad_datalist(tiny_cohort: Path, folder: Path) -> tuple[Path, dict[str, str]]:
    """Datalist ``testing``: every case of :data:`BAD`, then the good case; returns it and each case's bad file."""
    good = _absolute(json.loads(tiny_cohort.read_text())["testing"][0], tiny_cohort.parent)
    flair = nib.load(good["flair_1"])
    image, affine = np.asarray(flair.dataobj, dtype=np.float32), flair.affine
    files: dict[str, str] = {"missing_file": str(folder / "no_such_t1.nii.gz")}
    (folder / "unreadable.nii.gz").write_bytes(b"this is not a NIfTI file")
    files["unreadable"] = str(folder / "unreadable.nii.gz")
    whole = Path(good["flair_1"]).read_bytes()
    (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    files["truncated_gz"] = str(folder / "truncated.nii.gz")
    full = _save(image, affine, folder / "full.nii")
    (folder / "truncated.nii").write_bytes(Path(full).read_bytes()[: 352 + image.nbytes // 3])
    files["truncated_nii"] = str(folder / "truncated.nii")
    files["image_2d"] = _save(image[:, :, 16], affine, folder / "image_2d.nii.gz")
    files["image_4d"] = _save(np.stack([image, image], -1), affine, folder / "image_4d.nii.gz")
    nan = image.copy()
    nan[1, 2, 3] = nan[4, 5, 6] = nan[7, 8, 9] = np.nan
    files["nan_voxels"] = _save(nan, affine, folder / "nan.nii.gz")
    inf = image.copy()
    inf[1, 2, 3], inf[4, 5, 6] = np.inf, -np.inf
    files["inf_voxels"] = _save(inf, affine, folder / "inf.nii.gz")
    files["all_zero_mri"] = _save(np.zeros_like(image), affine, folder / "zero.nii.gz")
    moved = affine.copy()
    moved[:3, 3] += (500.0, 0.0, 0.0)  # half a metre away: no overlap with the reference FLAIR
    files["other_world_space"] = _save(image, moved, folder / "moved.nii.gz")
    label = nib.load(good["label"])
    files["label_elsewhere"] = _save(np.asarray(label.dataobj), moved, folder / "moved_label.nii.gz")
    (folder / "folder.nii.gz").mkdir()
    files["image_is_folder"] = str(folder / "folder.nii.gz")
    os.mkfifo(folder / "fifo.nii.gz")
    files["image_is_fifo"] = str(folder / "fifo.nii.gz")
    files["image_is_device"] = "/dev/zero"
    labels = np.zeros(image.shape, np.uint8)
    labels[10:12, 10:12, 10:12], labels[20:22, 20:22, 20:22] = 1, 2
    files["mask_labels"] = _save(labels, affine, folder / "labels.nii.gz")
    (folder / "short.nii").write_bytes(Path(full).read_bytes()[: 352 + 100])  # a whole header, little data
    files["header_promises_more"] = str(folder / "short.nii")
    files["huge_image"] = _huge_header(affine, folder / "huge.nii.gz")
    files["zero_sform"] = _with_forms(image, np.zeros((4, 4)), folder / "zero_sform.nii.gz", sform=1, qform=0)
    files["no_orientation"] = _with_forms(image, affine, folder / "no_orientation.nii.gz", sform=0, qform=0)
    flipped = affine.copy()
    flipped[0] *= -1  # left-right mirrored
    files["flipped_qform"] = _with_forms(
        image, affine, folder / "flipped.nii.gz", sform=1, qform=1, qform_affine=flipped
    )
    cases: list[dict[str, Any]] = []
    for case_id, (key, _) in BAD.items():
        case = dict(good, id=case_id)
        if case_id in files:
            case[key] = files[case_id]
        cases.append(case)
    by_id = {c["id"]: c for c in cases}
    by_id["unknown_treatment"]["treatment"] = "aspirin"
    by_id["horizon_too_long"]["horizon_weeks"] = 60
    by_id["horizon_too_short"]["horizon_weeks"] = 4
    del by_id["#13"]["id"]
    for key in VISIT1_MRI_KEYS:
        by_id["no_visit1_mri"].pop(key, None)
    assert list(BAD).index("#13") == 13  # an entry without id is named by its position
    cases.extend(dict(good, id=case_id) for case_id in BAD_IDS)
    # an empty lesion mask is a valid input (no lesion seen): the good case has one
    empty = _save(
        np.zeros(nib.load(good["gadles_1"]).shape, np.uint8),
        nib.load(good["gadles_1"]).affine,
        folder / "empty_gadles.nii.gz",
    )
    cases.append(dict(good, id=GOOD, gadles_1=empty))
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"testing": cases}))
    return datalist, files


@pytest.fixture(scope="module")
def bad_run(tiny_cohort: Path, small_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    datalist, files = _bad_datalist(tiny_cohort, folder)
    out = folder / "out"
    result = _forecast(datalist, out, small_weights)
    return {"result": result, "report": _report(result), "out": out, "files": files, "datalist": datalist}


def test_bad_run_finishes_the_good_case_and_fails(bad_run: dict[str, Any]) -> None:
    result, out = bad_run["result"], bad_run["out"]
    assert result.returncode != 0
    failed = len(BAD) + len(BAD_IDS)
    assert bad_run["report"][0] == f"ERROR: {failed} case(s) failed:", bad_run["report"]
    assert len(bad_run["report"]) == 1 + failed, bad_run["report"]
    assert (out / GOOD / "forecast.json").is_file() and (out / GOOD / "placebo_prob.nii.gz").is_file()
    # the umask decides who may read the results (0755 under the usual 022), as for any folder the user makes
    umask = os.umask(0)
    os.umask(umask)
    assert (out / GOOD).stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / GOOD / "forecast.json").stat().st_mode & 0o777 == 0o666 & ~umask
    # nothing of a bad case and no staging or temporary file is left: just the good case and the summary
    assert sorted(p.name for p in out.iterdir()) == [GOOD, "summary.csv"]
    with open(out / "summary.csv") as handle:
        assert [row["id"] for row in csv.DictReader(handle)] == [GOOD]


@pytest.mark.parametrize("case_id", list(BAD))
def test_bad_input_is_reported_in_one_line(bad_run: dict[str, Any], case_id: str) -> None:
    key, words = BAD[case_id]
    prefix = f"case {case_id!r}: {key}: "
    lines = [line for line in bad_run["report"][1:] if line.startswith(f"case {case_id!r}: ")]
    assert len(lines) == 1 and lines[0].startswith(prefix), (prefix, bad_run["report"])
    path = bad_run["files"].get(case_id, "")
    for word in words:
        assert word.replace("{path}", path) in lines[0], (word, lines[0])
    assert not (bad_run["out"] / case_id).exists()


@pytest.mark.parametrize("case_id", list(BAD_IDS))
def test_bad_id_is_reported_in_one_line(bad_run: dict[str, Any], case_id: str) -> None:
    shown, words = BAD_IDS[case_id]
    prefix = f"case {shown!r}: id: "
    lines = [line for line in bad_run["report"][1:] if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, bad_run["report"])
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_rerun_skips_finished_cases_and_clears_leftovers(bad_run: dict[str, Any], small_weights: Path) -> None:
    """Re-running over the output folder skips the finished case and removes what a killed run left behind."""
    out = bad_run["out"]
    done = out / GOOD / "forecast.json"
    before = done.stat().st_mtime_ns
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # a staging folder of that (now dead) process, named as the runner names its own
    stale = out / (files.temp_prefix(GOOD).replace(f"-{os.getpid()}@", f"-{int(dead.stdout)}@") + "staging")
    stale.mkdir()
    (stale / "placebo_prob.nii.gz").write_bytes(b"half written")
    result = _forecast(bad_run["datalist"], out, small_weights)
    assert result.returncode != 0 and _report(result) == bad_run["report"]
    assert "already forecast" in result.stderr + result.stdout
    assert done.stat().st_mtime_ns == before
    assert sorted(p.name for p in out.iterdir()) == [GOOD, "summary.csv"]


# ---------------------------------------------------------------------------------------------------------------
# Bad datalist files and a checkpoint of another network: one line naming the file and the problem
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"testing": [{"id": "a",}]}', ["not valid JSON", "line 1"]),
        ('{"training": [], "validation": []}', ["no list 'testing'", "'training'"]),
    ],
    ids=["not_json", "no_testing_list"],
)
def test_bad_datalist_file(small_weights: Path, tmp_path: Path, content: str, words: list[str]) -> None:
    datalist = tmp_path / "datalist.json"
    datalist.write_text(content)
    result = _forecast(datalist, tmp_path / "out", small_weights)
    assert result.returncode != 0
    (line,) = _report(result)
    assert line.startswith(f"ERROR: datalist {datalist}: ") and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--num_samples", "0"], "ERROR: num_samples: must be at least 1, got 0"),
        (["--treatments", "placebo,placebo"], "ERROR: treatments: 'placebo' listed more than once"),
    ],
    ids=["no_samples", "repeated_arm"],
)
def test_bad_option_is_reported_before_any_case(
    tiny_cohort: Path, small_weights: Path, tmp_path: Path, flags: list[str], words: str
) -> None:
    result = _forecast(tiny_cohort, tmp_path / "out", small_weights, *flags)
    assert result.returncode != 0
    assert _report(result) == [words]
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_network(tiny_cohort: Path, tmp_path: Path) -> None:
    other = ForecastDiffusionUNet(**dict(SMALL, channels=(8, 16, 16, 32)))
    weights = tmp_path / "other.pt"
    torch.save({"model": other.state_dict()}, weights)
    own, theirs = ForecastDiffusionUNet(**SMALL).state_dict(), other.state_dict()
    differ = sorted(k for k in own if k in theirs and own[k].shape != theirs[k].shape)
    assert differ
    result = _forecast(tiny_cohort, tmp_path / "out", weights)
    assert result.returncode != 0
    (line,) = _report(result)
    assert line.startswith(f"ERROR: checkpoint {weights} does not match the network (ForecastDiffusionUNet"), line
    assert "shape differs" in line and differ[0] in line, line
    assert f"checkpoint {tuple(theirs[differ[0]].shape)}, network {tuple(own[differ[0]].shape)}" in line, line
    assert not (tmp_path / "out").exists()


def test_unknown_requested_arm_lists_the_valid_ones(tiny_cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(errors.InputError, match="treatments: unknown treatment 'aspirin'; valid arms are: placebo, "):
        ForecastRunner(
            CaseDataset(tiny_cohort, "testing", _stub_preprocessing),
            tmp_path,
            torch.nn.Identity(),
            _StubInferer(),
            arms=["placebo", "aspirin"],
        )


def test_horizon_range_is_the_trained_range() -> None:
    configs = REPO_ROOT / "bundle" / "configs"
    inference = json.loads((configs / "inference.json").read_text())
    metadata = json.loads((configs / "metadata.json").read_text())
    assert inference["horizon_range"] == metadata["forecast_horizon"]["trained_range"]
    assert inference["dataset"]["horizon_range"] == "@horizon_range"


# ---------------------------------------------------------------------------------------------------------------
# Interrupted writes (in-process: the forecast runner with a stub sampler, and the checkpoint saver)
# ---------------------------------------------------------------------------------------------------------------

SIZE = 8


class _StubInferer:
    """Random binary samples ``(1, A, K, *S)`` in place of the diffusion sampler."""

    num_samples = 2

    def __call__(self, cond: torch.Tensor, network: Any, horizon: torch.Tensor, arms: list[str]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        shape = (1, len(arms), self.num_samples, *cond.shape[2:])
        return (torch.rand(shape, generator=generator) > 0.95).float()


def _stub_preprocessing(case: dict) -> dict:
    cond = torch.zeros((len(CONDITION_CHANNELS), SIZE, SIZE, SIZE))
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    return {
        "cond": cond,
        "horizon": torch.tensor(24.0),
        "working_affine": affine,
        "reference_affine": affine,
        "reference_shape": (SIZE, SIZE, SIZE),
    }


def _runner(tiny_cohort: Path, tmp_path: Path, **kwargs: Any) -> ForecastRunner:
    flair = tiny_cohort.parent / json.loads(tiny_cohort.read_text())["testing"][0]["flair_1"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"id": "a", "flair_1": str(flair)}]}))
    return ForecastRunner(
        CaseDataset(datalist, "testing", _stub_preprocessing),
        tmp_path / "out",
        torch.nn.Identity(),
        _StubInferer(),
        arms=["placebo", "ocrelizumab"],
        figure=False,
        **kwargs,
    )


@pytest.fixture
def interrupt_forecast_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing ``forecast.json`` stops half-way with a KeyboardInterrupt (as Ctrl-C would)."""
    write_text = Path.write_text

    def interrupted(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        if self.name != "forecast.json":
            return write_text(self, text, *args, **kwargs)
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)


def test_interrupted_forecast_json_leaves_nothing(
    tiny_cohort: Path, tmp_path: Path, interrupt_forecast_json: None
) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _runner(tiny_cohort, tmp_path).run()
    # no case folder, no staging folder, no half-written JSON or NIfTI: the summary of no finished case
    assert [p.name for p in out.iterdir()] == ["summary.csv"] and _summary_ids(out) == []


def test_interrupted_overwrite_keeps_the_previous_forecast(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _runner(tiny_cohort, tmp_path).run()
    previous = {p.name: p.read_bytes() for p in (out / "a").iterdir()}
    write_text = Path.write_text

    def interrupted(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        if self.name == "forecast.json":
            raise KeyboardInterrupt
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _runner(tiny_cohort, tmp_path, overwrite=True).run()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (out / "a").iterdir()} == previous
    assert sorted(p.name for p in out.iterdir()) == ["a", "summary.csv"]
    # a completed overwrite replaces the folder as a whole
    (out / "a" / "stale.txt").write_text("from the previous run")
    _runner(tiny_cohort, tmp_path, overwrite=True).run()
    assert not (out / "a" / "stale.txt").exists() and (out / "a" / "forecast.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["a", "summary.csv"]


def _cases_runner(
    tiny_cohort: Path, tmp_path: Path, ids: list[str], inferer: Any = None, out: Path | None = None
) -> ForecastRunner:
    """The runner with the stub sampler over cases ``ids`` (all the same image)."""
    flair = tiny_cohort.parent / json.loads(tiny_cohort.read_text())["testing"][0]["flair_1"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"id": i, "flair_1": str(flair)} for i in ids]}))
    return ForecastRunner(
        CaseDataset(datalist, "testing", _stub_preprocessing),
        out or tmp_path / "out",
        torch.nn.Identity(),
        inferer or _StubInferer(),
        arms=["placebo"],
        figure=False,
    )


def _summary_ids(out: Path) -> list[str]:
    with open(out / "summary.csv") as handle:
        return [row["id"] for row in csv.DictReader(handle)]


def test_summary_floats_are_rounded(tiny_cohort: Path, tmp_path: Path) -> None:
    _cases_runner(tiny_cohort, tmp_path, ["a"]).run()
    with open(tmp_path / "out" / "summary.csv") as handle:
        row = next(csv.DictReader(handle))
    for key in ("expected_count", "p_active", "expected_volume_mm3"):
        assert len(re.sub(r"[^0-9]", "", row[key].split("e")[0]).lstrip("0")) <= 6, (key, row[key])
    assert float(row["p_active"]) == pytest.approx(
        json.loads((tmp_path / "out" / "a" / "forecast.json").read_text())["arms"]["placebo"]["p_active"], rel=1e-5
    )


def test_output_path_that_is_a_file(tiny_cohort: Path, tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(InputError, match=f"output_dir {tmp_path / 'out'}: is a file, not a folder"):
        _cases_runner(tiny_cohort, tmp_path, ["a"]).run()


def test_unwritable_output_folder_is_found_before_any_case(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Tests run as root, whom file modes do not stop: the refusal is simulated where the runner writes.)"""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir")))

    class Counting(_StubInferer):
        calls = 0

        def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            Counting.calls += 1
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(forecast_module.tempfile, "mkstemp", refuse)
    with pytest.raises(InputError, match=r"output_dir .*out: cannot write there \(Permission denied\)"):
        _cases_runner(tiny_cohort, tmp_path, ["a", "b"], Counting()).run()
    assert Counting.calls == 0
    monkeypatch.undo()
    _cases_runner(tiny_cohort, tmp_path, ["a", "b"], Counting()).run()  # the same, writable: both cases
    assert Counting.calls == 2


def test_full_disk_stops_the_run_with_a_summary(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first case written to a full disk fails naming the file; the others are not computed in vain."""
    save = forecast_module.save_nifti
    written = []

    def full(array: Any, affine: Any, path: Path, *args: Any) -> None:
        if len(written) >= 2:  # case "a" (prob and mask) fits
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        save(array, affine, path, *args)

    monkeypatch.setattr(forecast_module, "save_nifti", full)
    with pytest.raises(ForecastFailed) as raised:
        _cases_runner(tiny_cohort, tmp_path, ["a", "b", "c"]).run()
    lines = str(raised.value).split("\n")
    assert lines[0] == "2 case(s) failed:"
    assert lines[1].startswith("case 'b': output: cannot write ") and "No space left on device" in lines[1]
    assert "placebo_prob.nii.gz" in lines[1]
    assert lines[2] == "case 'c': case: not forecast: the output disk is full"
    out = tmp_path / "out"
    assert _summary_ids(out) == ["a"] and sorted(p.name for p in out.iterdir()) == ["a", "summary.csv"]


class _InterruptedInferer(_StubInferer):
    """Ctrl-C while the second case is sampled."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().__call__(*args, **kwargs)


def test_ctrl_c_writes_the_summary_of_the_finished_cases(tiny_cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(ForecastInterrupted, match=r"stopped by the user; 1 case\(s\) finished are listed in "):
        _cases_runner(tiny_cohort, tmp_path, ["a", "b", "c"], _InterruptedInferer()).run()
    out = tmp_path / "out"
    assert _summary_ids(out) == ["a"] and sorted(p.name for p in out.iterdir()) == ["a", "summary.csv"]


def test_case_claimed_by_a_live_run_is_left_to_it(tiny_cohort: Path, tmp_path: Path) -> None:
    """A claim of a running process is respected; one of a dead process (killed run) is taken over."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = files._HOST
    files.claim_path(out, "a").write_text(f"1@{host}")  # pid 1 lives as long as the machine
    files.claim_path(out, "b").write_text(f"{int(dead.stdout)}@{host}")
    files.claim_path(out, "c").write_text(f"{os.getpid()}@{host}")  # a restarted container reusing this pid
    files.claim_path(out, "e").write_text("4242@otherhost")  # another machine's: cannot be checked from here
    with pytest.raises(ForecastFailed) as raised:
        _cases_runner(tiny_cohort, tmp_path, ["a", "b", "c", "e"]).run()
    assert str(raised.value).split("\n")[1:] == [  # the live claim of this host is left to its run, silently
        "case 'e': case: not forecast: claimed by another run (4242@otherhost); rerun once it has finished, or "
        f"delete {files.claim_path(out, 'e')} if that run is dead"
    ]
    assert sorted(p.name for p in out.iterdir()) == [".a.claim", ".e.claim", "b", "c", "summary.csv"]
    assert _summary_ids(out) == ["b", "c"]
    assert files.claim(out, "a") == f"1@{host}" and files.claim(out, "d") is None
    assert files.claim_path(out, "d").read_text() == f"{os.getpid()}@{host}"
    files.release(out, "d")
    assert not files.claim_path(out, "d").exists()


_SPLIT_RUN = """
import json, sys, time
import torch
from tests.test_robustness import _StubInferer, _cases_runner

class Slow(_StubInferer):
    def __call__(self, *args, **kwargs):
        time.sleep(0.5)
        return super().__call__(*args, **kwargs)

from pathlib import Path
tmp = Path(sys.argv[2])
print("ready", flush=True)
while not (tmp.parent / "go").exists():  # both runs start together
    time.sleep(0.05)
runner = _cases_runner(Path(sys.argv[1]), tmp, [f"c{i}" for i in range(8)], Slow(), out=Path(sys.argv[3]))
forecast_case = runner.forecast_case
done = []
runner.forecast_case = lambda case, listeners=(): done.append(case["id"]) or forecast_case(case, listeners)
runner.run()
print(json.dumps(done))
"""


def test_two_runs_on_one_output_folder_split_the_cases(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    runs = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        runs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SPLIT_RUN, str(tiny_cohort), str(tmp_path / name), str(out)],
                cwd=REPO_ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
        )
    for run in runs:
        assert run.stdout.readline() == "ready\n", run.stderr.read()[-2000:]
    (tmp_path / "go").touch()
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [o[1][-2000:] for o in outputs]
    done = [json.loads(o[0].strip().splitlines()[-1]) for o in outputs]
    assert sorted(done[0] + done[1]) == [f"c{i}" for i in range(8)]  # every case once, none twice
    assert done[0] and done[1]  # and both runs took a share
    assert sorted(p.name for p in out.iterdir()) == [*(f"c{i}" for i in range(8)), "summary.csv"]


def test_stale_temporaries_of_live_processes_are_kept(tmp_path: Path) -> None:
    mine = tmp_path / f"{files.temp_prefix('a')}staging"
    mine.mkdir()
    other_host = tmp_path / f".a.tmp-1@{'x' * 41}-staging"
    other_host.mkdir()
    assert files.remove_stale_temporaries(tmp_path) == [] and mine.is_dir() and other_host.is_dir()


def test_checkpoint_savers_are_atomic(tmp_path: Path) -> None:
    """Every file the bundle's savers write (interval checkpoints, the best model) goes through AtomicDiskSaver."""
    network = torch.nn.Linear(2, 2)
    trainer_saver = TrainerCheckpointSaver(str(tmp_path), {"network": network}, save_interval=1, n_saved=1)
    assert isinstance(trainer_saver._interval_checkpoint.save_handler, AtomicDiskSaver)
    best = AtomicCheckpointSaver(
        str(tmp_path), {"model": network}, save_key_metric=True, key_metric_filename="model.pt"
    )
    handler = best._key_metric_checkpoint.save_handler
    assert isinstance(handler, AtomicDiskSaver) and handler.filename == "model.pt"


def test_resumed_run_counts_earlier_checkpoints(tmp_path: Path) -> None:
    """With ``n_saved=1`` the checkpoint a run resumed from is deleted once the next one is written."""
    from ignite.engine import Engine, Events

    torch.save({"w": torch.zeros(1)}, tmp_path / "checkpoint_epoch=1.pt")
    engine = Engine(lambda engine, batch: None)

    def resume(engine: Engine) -> None:  # what ResumeFromCheckpoint's loader does at STARTED
        engine.state.epoch, engine.state.iteration = 1, 2

    engine.add_event_handler(Events.STARTED, resume)
    TrainerCheckpointSaver(str(tmp_path), {"network": torch.nn.Linear(2, 2)}, save_interval=1, n_saved=1).attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"]


def test_interrupted_checkpoint_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saver = AtomicDiskSaver(tmp_path)
    saver({"w": torch.zeros(3)}, "checkpoint_epoch=1.pt")
    save = torch.save

    def interrupted(obj: Any, handle: Any, **kwargs: Any) -> None:
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saver({"w": torch.ones(3)}, "checkpoint_epoch=2.pt")
    monkeypatch.setattr(torch, "save", save)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_epoch=1.pt"]
    assert torch.equal(torch.load(tmp_path / "checkpoint_epoch=1.pt")["w"], torch.zeros(3))


# a training process whose second save is killed (SIGKILL) in the middle of writing the file
_KILLED_SAVE = """
import sys, time
import torch
from ignite.engine import Engine, Events
from scripts.training.engines import AtomicCheckpointSaver, TrainerCheckpointSaver

folder, kind = sys.argv[1], sys.argv[2]
network = torch.nn.Linear(2, 2)
engine = Engine(lambda engine, batch: None)
engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(score=float(e.state.epoch)))
if kind == "trainer":
    TrainerCheckpointSaver(folder, {"network": network}, save_interval=1, n_saved=1).attach(engine)
else:
    AtomicCheckpointSaver(folder, {"model": network}, save_key_metric=True, key_metric_name="score",
                          key_metric_filename="model.pt").attach(engine)
save = torch.save

def slow_save(obj, handle, **kwargs):
    if engine.state.epoch < 2:
        return save(obj, handle, **kwargs)
    handle.write(b"half a checkpoint")
    handle.flush()
    print("saving", flush=True)
    time.sleep(600)

torch.save = slow_save
engine.run([0], max_epochs=2)
"""


@pytest.mark.parametrize(("kind", "name"), [("trainer", "checkpoint_epoch=1.pt"), ("best", "model.pt")])
def test_kill_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, kind: str, name: str) -> None:
    """ignite removes the file a save replaces before writing the new one; a kill at that moment must still leave the
    previous checkpoint whole."""
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path), kind],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert process.stdout.readline() == "saving\n", process.stderr.read()
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    checkpoints = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert checkpoints == [name]
    state = torch.load(tmp_path / name, weights_only=False)
    assert "weight" in (state["network"] if kind == "trainer" else state)
    if kind == "trainer":
        assert _epoch_of(tmp_path / name) == 1
        # the rerun resumes from epoch 1 and deletes the killed save's temporary file
        from ignite.engine import Engine, Events

        network = torch.nn.Linear(2, 2)
        engine = Engine(lambda engine, batch: None)
        epochs = []
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
        ResumeFromCheckpoint(str(tmp_path), {"network": network}).attach(engine)
        TrainerCheckpointSaver(str(tmp_path), {"network": network}, save_interval=1, n_saved=1).attach(engine)
        engine.run([0], max_epochs=2)
        assert epochs == [2]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]


def test_resume_removes_a_superseded_checkpoint(tmp_path: Path) -> None:
    """A kill after a checkpoint is written but before the one it replaces is deleted leaves both; the resumed run
    keeps ``n_saved`` of them."""
    from ignite.engine import Engine, Events

    for epoch in (1, 2):
        torch.save({"w": torch.zeros(1)}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    engine = Engine(lambda engine, batch: None)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", 2))
    TrainerCheckpointSaver(str(tmp_path), {"network": torch.nn.Linear(2, 2)}, save_interval=5, n_saved=1).attach(engine)
    engine.add_event_handler(Events.STARTED, lambda e: e.terminate())
    engine.run([0], max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt"]


def test_last_epoch_is_always_checkpointed(tmp_path: Path) -> None:
    """With ``save_interval`` 5, a 7-epoch run saves epoch 5 and then its last epoch, 7 (``n_saved`` 1: only 7)."""
    from ignite.engine import Engine, Events

    engine = Engine(lambda engine, batch: None)
    TrainerCheckpointSaver(str(tmp_path), {"network": torch.nn.Linear(2, 2)}, save_interval=5, n_saved=1).attach(engine)
    engine.run([0], max_epochs=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=7.pt"]
    before = (tmp_path / "checkpoint_epoch=7.pt").stat().st_mtime_ns
    # a run resumed at its last epoch has nothing left to train: it saves nothing
    resumed = Engine(lambda engine, batch: None)
    resumed.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "epoch", 7))
    TrainerCheckpointSaver(str(tmp_path), {"network": torch.nn.Linear(2, 2)}, save_interval=5, n_saved=1).attach(
        resumed
    )
    resumed.run([0], max_epochs=7)
    assert (tmp_path / "checkpoint_epoch=7.pt").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------------------------
# Training killed with SIGKILL mid-epoch resumes from the last checkpoint
# ---------------------------------------------------------------------------------------------------------------

TRAIN_FLAGS = [
    "--spatial_size",
    "[32,32,32]",
    "--spacing",
    "[6,6,6]",
    "--batch_size",
    "1",
    "--val_interval",
    "100",
    "--num_inference_steps",
    "2",
    "--val_num_samples",
    "2",
    "--network_channels",
    "[8,16,16,16]",
    "--device",
    "cpu",
    "--checkpoint_interval",
    "1",
    "--train#trainer#max_epochs",
    "3",
]


def _train_command(datalist: Path, out: Path, flags: list[str]) -> list[str]:
    """The training command of ``train.json`` on ``datalist`` into ``out``."""
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "bundle/configs/train.json",
        "--datalist",
        str(datalist),
        "--output_dir",
        str(out),
        *flags,
    ]


def _epoch_of(checkpoint: Path) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["trainer"]
    return int(state["iteration"]) // int(state["epoch_length"])


def test_training_killed_mid_epoch_resumes(tiny_cohort: Path, tmp_path: Path) -> None:
    command = _train_command(tiny_cohort, tmp_path, TRAIN_FLAGS)
    models, log = tmp_path / "models", tmp_path / "first.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, env=ENV)
    try:
        # kill once the first checkpoint is written and a later epoch is half done (4 iterations each)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if (models / "checkpoint_epoch=1.pt").is_file() or (models / "checkpoint_epoch=2.pt").is_file():
                if re.search(r"Epoch \[[23]/3\]: \[2/4\]", log.read_text(errors="replace")):
                    break
            time.sleep(0.05)
        assert process.poll() is None, "training ended before it could be killed:\n" + log.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    last = latest_checkpoint(str(models))
    assert last is not None
    epoch = _epoch_of(Path(last))
    assert epoch in (1, 2)
    # what a kill in the middle of a save leaves: the hidden temporary file, never a truncated checkpoint
    killed = files.temp_prefix("checkpoint_epoch=3.pt").replace(f"-{os.getpid()}@", f"-{process.pid}@")
    (models / f"{killed}k1ll3d").write_bytes(b"half a checkpoint")

    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"resuming from {last}" in output and f"resumed at epoch {epoch}," in output, output[-3000:]
    assert f"Epoch [{epoch}/3]" not in output and f"Epoch [{epoch + 1}/3]" in output  # continues at epoch + 1
    # the last epoch is validated although val_interval is 100: the best weights and the EMA weights of epoch 3
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=3.pt", "ema_model_epoch=3.pt", "model.pt"]
    assert _epoch_of(models / "checkpoint_epoch=3.pt") == 3  # whole
    shutil.rmtree(tmp_path / "tensorboard", ignore_errors=True)


def test_one_epoch_training_leaves_weights_and_a_checkpoint(tiny_cohort: Path, tmp_path: Path) -> None:
    """A run shorter than ``checkpoint_interval`` and ``val_interval`` still ends with ``model.pt`` and a checkpoint
    to resume from."""
    flags = list(TRAIN_FLAGS)
    flags[flags.index("--checkpoint_interval") + 1] = "5"
    flags[flags.index("--train#trainer#max_epochs") + 1] = "1"
    result = subprocess.run(
        _train_command(tiny_cohort, tmp_path, flags),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=1.pt", "ema_model_epoch=1.pt", "model.pt"]
    assert _epoch_of(models / "checkpoint_epoch=1.pt") == 1
    weights = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert any(name.endswith(".weight") for name in weights)  # a network's state dict


def test_fields_of_view_overlap() -> None:
    """Overlap of grid boxes: shifted, touching, partly overlapping, and a rotated (oblique) grid."""
    grid = np.diag([2.0, 2.0, 2.0, 1.0])  # 10 voxels of 2 mm: field of view [-1, 19] mm per axis
    shifted = grid.copy()
    shifted[:3, 3] = (20.0, 0.0, 0.0)  # [19, 39] mm in x: touches, no volume in common
    assert not fields_of_view_overlap(grid, (10, 10, 10), shifted, (10, 10, 10))
    shifted[0, 3] = 15.0  # [14, 34] mm: 5 mm in common
    assert fields_of_view_overlap(grid, (10, 10, 10), shifted, (10, 10, 10))
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) * 3.0
    oblique[:3, 3] = (9.0, -10.0, 5.0)  # a rotated 3 mm grid reaching into the first box
    assert fields_of_view_overlap(grid, (10, 10, 10), oblique, (8, 8, 8))
    oblique[:3, 3] = (9.0, -60.0, 5.0)
    assert not fields_of_view_overlap(grid, (10, 10, 10), oblique, (8, 8, 8))
    box = world_bounding_box(grid, (10, 10, 10))
    np.testing.assert_allclose(box, [[-1, -1, -1], [19, 19, 19]])
