"""Tests of the synthetic cohort generator (tiny grids so the module runs in seconds)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scripts.bench.synthetic.case import generate_case
from scripts.bench.synthetic.cohort import generate_cohort, split_indices
from scripts.bench.synthetic.config import ARM_EFFICACY, TISSUE_LABELS
from scripts.runtime.constants import ARMS, IMAGE_KEYS, MRI_MODALITIES

REPO = Path(__file__).resolve().parents[1]
N_CASES = 7
SEED = 3
GRID = {"shape": 32, "spacing": 6.0}
STRUCT26 = np.ones((3, 3, 3), bool)
# Arms from weakest to strongest default efficacy (glatiramer 0.54 just below interferon 0.55).
ARMS_BY_EFFICACY = sorted(ARMS, key=lambda a: ARM_EFFICACY[a])


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(_load(path).dataobj)


def _entries(datalist: dict) -> list[dict]:
    return [e for split in ("training", "validation", "testing") for e in datalist[split]]


def _truth(root: Path, case_id: str) -> dict:
    return json.loads((root / "truth" / f"{case_id}.json").read_text())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    path = generate_cohort(out, N_CASES, SEED, progress=False, **GRID)
    assert path == out / "datalist.json"
    return out


@pytest.fixture(scope="module")
def cohort_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort_again")
    generate_cohort(out, N_CASES, SEED, progress=False, **GRID)
    return out


@pytest.fixture(scope="module")
def datalist(cohort: Path) -> dict:
    return json.loads((cohort / "datalist.json").read_text())


def test_datalist_structure(cohort: Path, datalist: dict) -> None:
    assert set(datalist) == {"training", "validation", "testing"}
    entries = _entries(datalist)
    ids = [e["id"] for e in entries]
    assert len(ids) == N_CASES and len(set(ids)) == N_CASES  # every case in exactly one split, ids unique
    assert sorted(ids) == [f"syn{i:04d}" for i in range(N_CASES)]
    for e in entries:
        assert e["treatment"] in ARMS
        assert e["horizon_weeks"] == 24
        for key in (*IMAGE_KEYS, "label"):
            rel = Path(e[key])
            assert not rel.is_absolute(), (key, rel)
            assert (cohort / rel).is_file(), (key, rel)
        assert e["label"] == f"labels/{e['id']}/net2_{e['treatment']}.nii.gz"
    assert len(datalist["training"]) > len(datalist["testing"]) >= 1


def test_split_is_deterministic_partition() -> None:
    a = split_indices(20, (0.7, 0.15, 0.15), 5)
    assert a == split_indices(20, (0.7, 0.15, 0.15), 5)
    assert sorted(i for part in a for i in part) == list(range(20))
    assert [len(p) for p in a] == [14, 3, 3]
    assert a != split_indices(20, (0.7, 0.15, 0.15), 6)


def test_truth_files(cohort: Path, datalist: dict) -> None:
    for e in _entries(datalist):
        t = _truth(cohort, e["id"])
        assert t["id"] == e["id"]
        assert t["treatment"] == e["treatment"]
        assert t["horizon_weeks"] == e["horizon_weeks"]
        assert t["activity"] > 0
        for key in ("expected_count", "counterfactual_labels", "counts", "efficacy"):
            assert set(t[key]) == set(ARMS), key
        assert all(isinstance(v, float) and v >= 0 for v in t["expected_count"].values())
        assert all(isinstance(v, int) and v >= 0 for v in t["counts"].values())
        for path in t["counterfactual_labels"].values():
            assert (cohort / path).is_file()
        assert t["counterfactual_labels"][t["treatment"]] == e["label"]
        tissue = _array(cohort / t["tissue"])
        assert tissue.dtype == np.uint8 and set(np.unique(tissue)) <= set(TISSUE_LABELS)
        assert len(t["future_events"]) >= t["counts"]["placebo"]
        assert all(ev["region"] and ev["volume_mm3"] > 0 for ev in t["future_events"])


def test_expected_counts_fall_with_efficacy(cohort: Path, datalist: dict) -> None:
    truths = [_truth(cohort, e["id"]) for e in _entries(datalist)]
    for t in truths:
        exp = [t["expected_count"][a] for a in ARMS_BY_EFFICACY]
        assert all(a > b for a, b in itertools.pairwise(exp)), exp  # analytic, so strict
        eff = [t["efficacy"][a] for a in ARMS_BY_EFFICACY]
        assert eff[0] == 0.0 and all(a < b for a, b in itertools.pairwise(eff))
        lam = t["lambda_placebo"]
        for arm in ARMS:
            assert t["expected_count"][arm] == pytest.approx(lam * (1 - t["efficacy"][arm]))
    mean = {a: np.mean([t["expected_count"][a] for t in truths]) for a in ARMS}
    ifn, ga = mean["interferon_beta_1a"], mean["glatiramer_acetate"]
    assert mean["placebo"] > mean["laquinimod"] > max(ifn, ga)
    assert min(ifn, ga) > mean["dimethyl_fumarate"] > mean["ocrelizumab"]
    assert abs(ifn - ga) < 0.1 * max(ifn, ga)  # near-equal pair


def test_counterfactual_masks_nest_and_match_counts(cohort: Path, datalist: dict) -> None:
    for e in _entries(datalist):
        t = _truth(cohort, e["id"])
        masks = {a: _array(cohort / t["counterfactual_labels"][a]) for a in ARMS}
        for a in ARMS:
            assert masks[a].dtype == np.uint8 and set(np.unique(masks[a])) <= {0, 1}
            _, n = ndimage.label(masks[a], structure=STRUCT26)
            assert n == t["counts"][a], (e["id"], a)
        order = sorted(ARMS, key=lambda a: t["efficacy"][a])  # weakest first, per patient
        for i, weak in enumerate(order):
            for strong in order[i + 1 :]:
                assert not (masks[strong] > masks[weak]).any(), (e["id"], strong, weak)
                assert t["counts"][strong] <= t["counts"][weak]
        assert np.array_equal(_array(cohort / e["label"]), masks[e["treatment"]])
        # NET2 lesions are new: none lies in a lesion already present at visit 1.
        t2_1 = _array(cohort / e["t2les_1"])
        assert not (masks["placebo"] & t2_1).any()


def test_past_masks_are_consistent(cohort: Path, datalist: dict) -> None:
    for e in _entries(datalist):
        t = _truth(cohort, e["id"])
        t2_0, t2_1, net2_1 = (_array(cohort / e[k]) for k in ("t2les_0", "t2les_1", "net2_1"))
        assert np.array_equal(t2_1, t2_0 | net2_1)
        assert not (t2_0 & net2_1).any()
        _, n = ndimage.label(net2_1, structure=STRUCT26)
        assert n == t["past"]["net2_count"]
        for v in (0, 1):
            gad = _array(cohort / e[f"gadles_{v}"])
            assert not (gad & ~_array(cohort / e[f"t2les_{v}"]).astype(bool)).any()  # Gd lesions are T2 lesions


def test_past_is_identical_whatever_the_arm() -> None:
    a = generate_case(1, SEED, treatment="placebo", **GRID)
    b = generate_case(1, SEED, treatment="ocrelizumab", **GRID)
    assert a.treatment == "placebo" and b.treatment == "ocrelizumab"
    for key in IMAGE_KEYS:
        assert np.array_equal(a.images[key], b.images[key]), key
    for arm in ARMS:
        assert np.array_equal(a.counterfactual[arm], b.counterfactual[arm]), arm
    ta = {k: v for k, v in a.truth.items() if k != "treatment"}
    tb = {k: v for k, v in b.truth.items() if k != "treatment"}
    assert ta == tb


def test_case_does_not_depend_on_cohort_size(cohort: Path, datalist: dict) -> None:
    case = generate_case(2, SEED, **GRID)
    entry = next(e for e in _entries(datalist) if e["id"] == "syn0002")
    for key in IMAGE_KEYS:
        assert np.array_equal(case.images[key], _array(cohort / entry[key])), key


def test_deterministic_given_seed(cohort: Path, cohort_again: Path, datalist: dict) -> None:
    assert (cohort / "datalist.json").read_text() == (cohort_again / "datalist.json").read_text()
    for e in _entries(datalist):
        assert _truth(cohort, e["id"]) == _truth(cohort_again, e["id"])
        paths = [e[k] for k in IMAGE_KEYS] + list(_truth(cohort, e["id"])["counterfactual_labels"].values())
        for rel in paths:
            assert np.array_equal(_array(cohort / rel), _array(cohort_again / rel)), rel


def test_different_seed_differs(cohort: Path) -> None:
    other = generate_case(0, SEED + 1, **GRID)
    assert not np.array_equal(other.images["flair_1"], _array(cohort / "images/syn0000/flair_1.nii.gz"))
    assert other.truth["activity"] != _truth(cohort, "syn0000")["activity"]


def test_affines_shapes_and_dtypes(cohort: Path, datalist: dict) -> None:
    for e in _entries(datalist):
        t = _truth(cohort, e["id"])
        paths = [e[k] for k in IMAGE_KEYS] + list(t["counterfactual_labels"].values()) + [t["tissue"]]
        ref = _load(cohort / e["flair_1"])
        assert ref.shape == (32, 32, 32)
        assert np.allclose(ref.header.get_zooms(), (6.0, 6.0, 6.0))
        assert np.allclose(np.diag(ref.affine)[:3], 6.0) and nib.aff2axcodes(ref.affine) == ("R", "A", "S")
        centre = ref.affine @ np.array([15.5, 15.5, 15.5, 1.0])
        assert np.all(np.abs(centre[:3]) < 10.0)  # centred near world 0, small translation
        for rel in paths:
            img = _load(cohort / rel)
            assert img.shape == ref.shape and np.allclose(img.affine, ref.affine), rel
            modality = Path(rel).name.split("_")[0]
            expected = np.int16 if modality in MRI_MODALITIES else np.uint8
            assert img.get_data_dtype() == expected, rel


def test_mri_contrasts_are_plausible() -> None:
    case = generate_case(0, SEED, shape=48, spacing=4.0)
    tissue = case.tissue
    for v in (0, 1):
        flair = case.images[f"flair_{v}"].astype(float)
        t1 = case.images[f"t1_{v}"].astype(float)
        t2 = case.images[f"t2_{v}"].astype(float)

        def mean(img: np.ndarray, label: int) -> float:
            return float(img[tissue == label].mean())

        assert mean(t1, 3) > mean(t1, 2) > mean(t1, 4)  # T1: WM > GM > CSF
        assert mean(t2, 4) > mean(t2, 2) > mean(t2, 3)  # T2: CSF brightest
        assert mean(flair, 2) > mean(flair, 4)  # FLAIR: CSF dark
        lesion = case.images[f"t2les_{v}"].astype(bool) & (tissue == 3)
        if lesion.sum() >= 3:
            normal = (tissue == 3) & ~ndimage.binary_dilation(case.images[f"t2les_{v}"].astype(bool), STRUCT26)
            assert flair[lesion].mean() > flair[normal].mean()
            assert t1[lesion].mean() < t1[normal].mean()


def test_horizon_list_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "scripts.synthetic",
        "--out",
        str(out),
        "--n",
        "2",
        "--seed",
        "1",
        "--shape",
        "24",
        "--spacing",
        "6",
        "--horizon_weeks",
        "[12,48]",
        "--progress",
        "False",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=120)
    datalist = json.loads((out / "datalist.json").read_text())
    entries = _entries(datalist)
    assert len(entries) == 2
    for e in entries:
        assert e["horizon_weeks"] in (12, 48)
        assert _truth(out, e["id"])["horizon_weeks"] == e["horizon_weeks"]
        assert _load(out / e["flair_1"]).shape == (24, 24, 24)
