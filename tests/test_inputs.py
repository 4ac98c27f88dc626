"""Input checks that need no forecast: case ids, datalist files, options, NIfTI headers, and the exit status of an
interrupted command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.runtime.constants import ARMS
from scripts.runtime.datalist import _read_datalist, display_id, id_problem, load_datalist
from scripts.runtime.errors import CaseError, DatalistError, InputError
from scripts.runtime.headers import geometry_warning, header_problem
from scripts.runtime.options import check_num_samples, parse_arms
from scripts.runtime.transforms import LoadCased

from tests.conftest import REPO_ROOT


def _image(path: Path, affine: np.ndarray, qform: np.ndarray | None = None) -> str:
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.float32)
    header.set_sform(affine, code=1)
    if qform is not None:
        header.set_qform(qform, code=1)
    data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, None, header), path)
    return str(path)


def test_ids_naming_the_same_folder_are_refused(tmp_path: Path) -> None:
    """Two ids that look alike to a file system (Unicode normalisation, letter case) would share one folder."""
    flair = _image(tmp_path / "flair.nii.gz", np.diag([3.0, 3.0, 3.0, 1.0]))
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    ids = [nfc, nfd, "Case1", "case1", "other"]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"id": i, "flair_1": flair} for i in ids]}))
    errors: list[CaseError] = []
    cases = load_datalist(datalist, "testing", errors=errors)
    assert [c["id"] for c in cases] == [nfc, "Case1", "other"]
    assert [(e.case_id, e.key) for e in errors] == [(nfd, "id"), ("case1", "id")]
    assert "names the same folder as entry #0 ('café')" in errors[0].reason
    assert "names the same folder as entry #2 ('Case1')" in errors[1].reason


def test_id_rules() -> None:
    assert id_problem("syn0001") is None and id_problem("patient 01 (2019)") is None and id_problem("é") is None
    assert display_id("a" * 129) == "a" * 128 + "..." and display_id("a" * 128) == "a" * 128
    for bad in (
        ".",
        "..",
        "a/b",
        "a\\b",
        ".hidden",
        "tab\there",
        "summary.CSV",
        "evaluation_cases",
        "a" * 129,
        "trailing ",
    ):
        assert id_problem(bad) is not None, bad


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "too_large"])
def test_datalist_that_is_not_a_regular_file_or_too_large(tmp_path: Path, kind: str) -> None:
    """A FIFO would block and /dev/zero never end: both are refused before anything is read."""
    path = {
        "fifo": tmp_path / "fifo.json",
        "device": Path("/dev/zero"),
        "folder": tmp_path,
        "too_large": tmp_path / "big.json",
    }[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "too_large":
        path.write_text(json.dumps({"testing": [{"id": f"case{i}"} for i in range(100)]}))
    with pytest.raises(DatalistError) as raised:
        _read_datalist(path, "testing", max_bytes=1000)
    reason = {
        "fifo": "is a FIFO, not a regular file",
        "device": "is a device, not a regular file",
        "folder": "is a folder, not a file",
        "too_large": "larger than the 0.000953674 MiB",
    }[kind]
    assert str(raised.value).startswith(f"datalist {path}: ") and reason in str(raised.value), str(raised.value)


def test_treatments_option() -> None:
    assert parse_arms(None) == list(ARMS)
    assert parse_arms("placebo") == ["placebo"]  # what `--treatments placebo` hands the bundle
    assert parse_arms("placebo, ocrelizumab") == ["placebo", "ocrelizumab"]
    assert parse_arms(["ocrelizumab", "placebo"]) == ["ocrelizumab", "placebo"]
    with pytest.raises(InputError, match="treatments: 'placebo' listed more than once"):
        parse_arms(["placebo", "ocrelizumab", "placebo"])
    with pytest.raises(InputError, match="treatments: unknown treatment 'aspirin'; valid arms are: placebo, "):
        parse_arms("placebo,aspirin")
    with pytest.raises(InputError, match="treatments: no treatment arm"):
        parse_arms([])


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (0, "must be at least 1, got 0"),
        (-1, "must be at least 1, got -1"),
        (2.5, "whole number"),
        (True, "whole number"),
        ("8", "whole number"),
        (10000, "above the limit of 256 samples"),
    ],
)
def test_num_samples_option(value: object, words: str) -> None:
    with pytest.raises(InputError, match="num_samples: ") as raised:
        check_num_samples(value)
    assert words in str(raised.value)


def test_num_samples_limit_can_be_raised() -> None:
    assert check_num_samples(8) == 8 and check_num_samples(8.0) == 8
    assert check_num_samples(10000, limit=20000) == 10000 and check_num_samples(10000, limit=None) == 10000


def test_sform_and_qform_apart_is_logged_with_the_affine_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    moved = affine.copy()
    moved[:3, 3] = (40.0, 0.0, 0.0)
    path = _image(tmp_path / "flair.nii.gz", affine, qform=moved)
    assert header_problem(path) is None
    assert geometry_warning(path) == "its sform and qform place the image up to 40.0 mm apart; the sform is used"
    with caplog.at_level(logging.WARNING):
        loaded = LoadCased()({"id": "a", "flair_1": path})
    assert np.allclose(loaded["flair_1"].affine.numpy(), affine)  # the sform
    assert any(r.getMessage() == f"case a: flair_1: {geometry_warning(path)} ({path})" for r in caplog.records)
    agreeing = _image(tmp_path / "agree.nii.gz", affine, qform=affine)
    assert header_problem(agreeing) is None and geometry_warning(agreeing) is None


def test_voxel_limit_is_checked_on_the_header(tmp_path: Path) -> None:
    path = _image(tmp_path / "flair.nii.gz", np.diag([3.0, 3.0, 3.0, 1.0]))
    assert header_problem(path, max_voxels=512) is None
    assert "declares 512 voxels (8, 8, 8), more than the limit of 511" in header_problem(path, max_voxels=511)
    with pytest.raises(CaseError, match="more than the limit of 100"):
        LoadCased(max_voxels=100)({"id": "a", "flair_1": path})


def test_interrupted_command_exits_130() -> None:
    code = (
        "from scripts.runtime.errors import ForecastInterrupted, install_error_hook\n"
        "install_error_hook()\nraise ForecastInterrupted('stopped by the user; 3 case(s) finished')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "INTERRUPTED: stopped by the user; 3 case(s) finished"


@pytest.mark.parametrize(
    ("values", "outcome"),
    [
        ((0, 1), "ok"),
        ((0, 255), "ok"),
        ((0,), "ok"),
        ((0.0, 0.25, 0.5, 1.0), "warning"),
        ((0, 1, 2), "binary mask (0 and one label value), found 3 values: 0, 1, 2"),
        ((0, 0.3), "no voxel reaches 0.5"),
        ((-1, 0, 1), "negative values"),
    ],
)
def test_mask_values(tmp_path: Path, values: tuple[float, ...], outcome: str, caplog: pytest.LogCaptureFixture) -> None:
    """0 and one label pass; fractions in [0, 1] (linear resampling) pass with a warning; label maps do not."""
    flair = _image(tmp_path / "flair.nii.gz", np.diag([3.0, 3.0, 3.0, 1.0]))
    mask = np.zeros((8, 8, 8), np.float32)
    mask.flat[: len(values)] = values
    nib.save(nib.Nifti1Image(mask, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "mask.nii.gz")
    case = {"id": "a", "flair_1": flair, "t2les_1": str(tmp_path / "mask.nii.gz")}
    if outcome in ("ok", "warning"):
        with caplog.at_level(logging.WARNING):
            LoadCased()(case)
        warned = [r.getMessage() for r in caplog.records if "fractional mask values" in r.getMessage()]
        assert bool(warned) == (outcome == "warning"), warned
    else:
        with pytest.raises(CaseError, match="t2les_1") as raised:
            LoadCased()(case)
        assert outcome in str(raised.value), str(raised.value)
