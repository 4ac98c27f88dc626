"""Data pipeline (scripts.runtime datalist, transforms, grids, io): NIfTI phantoms on several grids, real LIT data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose
from monai.utils import set_determinism
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation
from scripts.runtime import errors
from scripts.runtime.constants import (
    ARMS,
    CONDITION_CHANNELS,
    IMAGE_KEYS,
    LOAD_CHANNELS,
    LOAD_FEATURES,
    MASK_KEYS,
    MRI_KEYS,
    NULL_TREATMENT,
    arm_index,
)
from scripts.runtime.datalist import load_datalist
from scripts.runtime.grids import snap_to_voxel_centre, to_reference_grid
from scripts.runtime.io import save_nifti
from scripts.runtime.transforms import (
    CropWeightsFromInputsd,
    LoadCased,
    RandDropInputsd,
    SoftMaskd,
    ToReferenceGridd,
    ToWorkingGridd,
    scale_foreground_percentiles,
    soft_mask,
)

from tests.conftest import config_preprocessing

SIZE = (24, 24, 24)
SPACING = (3.0, 3.0, 3.0)
N = len(IMAGE_KEYS)

# ---------------------------------------------------------------------------------------------------------------
# A world-space phantom sampled on differently shaped, spaced and rotated grids
# ---------------------------------------------------------------------------------------------------------------

HEAD_CENTRE = np.array([6.0, -4.0, 9.0])
HEAD_RADIUS = 30.0
# edges half-way between working voxel centres (grid centred on the head), so discretisation cannot flip them
CUBE_CENTRE = HEAD_CENTRE + np.array([3.0, -3.0, 3.0])
CUBE_HALF = 9.0


def phantom(world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MRI-like intensity (graded head, bright cube) and cube mask at world points ``(3, n)``."""
    rel = world - HEAD_CENTRE[:, None]
    head = np.linalg.norm(rel, axis=0) <= HEAD_RADIUS
    cube = np.all(np.abs(world - CUBE_CENTRE[:, None]) <= CUBE_HALF, axis=0)
    mri = np.where(head, 80.0 + 0.6 * rel[2] + 0.3 * rel[0], 0.0)
    mri[cube] = 300.0
    return mri, cube


def grid_affine(
    spacing: tuple[float, ...], shape: tuple[int, ...], rotation_deg: tuple[float, ...], centre
) -> np.ndarray:
    """Affine of a (possibly rotated, flipped) grid whose middle voxel lies at ``centre``."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("zyx", rotation_deg, degrees=True).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


GRIDS = {
    # LPS-like flips, anisotropic: the reference grid
    "ref": grid_affine((-2.5, -2.5, 3.0), (28, 28, 22), (0, 0, 0), HEAD_CENTRE + [1.0, 1.0, 0.0]),
    "iso": grid_affine((2.0, 2.0, 2.0), (32, 32, 32), (0, 0, 0), HEAD_CENTRE),
    "oblique": grid_affine((2.2, 2.0, 2.6), (30, 30, 26), (25, 0, 12), HEAD_CENTRE + [-1.0, 2.0, 0.0]),
}
SHAPES = {"ref": (28, 28, 22), "iso": (32, 32, 32), "oblique": (30, 30, 26)}


def sample_grid(name: str) -> tuple[np.ndarray, np.ndarray]:
    shape, affine = SHAPES[name], GRIDS[name]
    ijk = np.indices(shape).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    mri, cube = phantom(world)
    return mri.reshape(shape).astype(np.float32), cube.reshape(shape).astype(np.float32)


def write(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Phantom NIfTI files: MRI and cube masks on each grid, and a gain/offset-scaled reference MRI."""
    root = tmp_path_factory.mktemp("phantom")
    out = {}
    for name in GRIDS:
        mri, cube = sample_grid(name)
        out[f"mri_{name}"] = write(root / f"mri_{name}.nii.gz", mri, GRIDS[name])
        out[f"cube_{name}"] = write(root / f"cube_{name}.nii.gz", cube, GRIDS[name])
        if name == "ref":
            out["mri_ref_scaled"] = write(root / "mri_ref_scaled.nii.gz", mri * 37.0 + 500.0, GRIDS[name])
    return out


def phantom_case(files: dict[str, str], **extra: Any) -> dict[str, Any]:
    """Visit-1 MRI on three different grids, masks on three grids, no visit 0."""
    case = {
        "id": "phantom",
        "flair_1": files["mri_ref"],
        "t1_1": files["mri_iso"],
        "t2_1": files["mri_oblique"],
        "t2les_1": files["cube_oblique"],
        "net2_1": files["cube_iso"],
        "label": files["cube_ref"],
        "treatment": "ocrelizumab",
        "horizon_weeks": 48,
    }
    case.update(extra)
    return case


def run(case: dict[str, Any], train: bool = False) -> dict[str, Any]:
    return Compose(config_preprocessing(SIZE, SPACING, train=train))(case)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.array([*np.argwhere(mask).mean(axis=0), 1.0]))[:3]


# ---------------------------------------------------------------------------------------------------------------
# Working grid
# ---------------------------------------------------------------------------------------------------------------


def test_modalities_on_different_grids_align(files):
    out = run(phantom_case(files))
    cond, waff = out["cond"].numpy(), out["working_affine"].numpy()
    assert cond.shape == (len(CONDITION_CHANNELS), *SIZE) and cond.dtype == np.float32
    np.testing.assert_allclose(np.diag(waff)[:3], SPACING)
    assert np.count_nonzero(waff[:3, :3] - np.diag(np.diag(waff)[:3])) == 0  # RAS, axis-aligned
    # centred on the head (the reference foreground), not on the reference field of view
    np.testing.assert_allclose(waff[:3, :3] @ ((np.array(SIZE) - 1) / 2) + waff[:3, 3], HEAD_CENTRE, atol=1.5)

    world = waff[:3, :3] @ np.indices(SIZE).reshape(3, -1) + waff[:3, 3:4]
    expected = phantom(world)[1].reshape(SIZE)
    cubes = {k: cond[IMAGE_KEYS.index(k)] > 1.5 for k in ("flair_1", "t1_1", "t2_1")}  # cube clips at 2, head <~1
    cubes |= {k: cond[IMAGE_KEYS.index(k)] > 0.5 for k in ("t2les_1", "net2_1")}
    cubes["label"] = out["label"].numpy()[0] > 0.5
    for key, cube in cubes.items():
        assert dice(cube, expected) > 0.95, key
        # a half-voxel (1.5 mm) slip anywhere in the geometry would show here
        np.testing.assert_allclose(centroid_mm(cube, waff), CUBE_CENTRE, atol=0.5, err_msg=key)
    for key in cubes:
        assert dice(cubes[key], cubes["flair_1"]) > 0.95, key


def test_outputs_channels_and_scalars(files):
    out = run(phantom_case(files))
    cond = out["cond"]
    present = {"flair_1", "t1_1", "t2_1", "t2les_1", "net2_1"}
    for i, name in enumerate(CONDITION_CHANNELS):
        key = name.removeprefix("available_")
        if name in LOAD_CHANNELS:
            feature, key = name.split("_", 1)
            # the cube is one lesion of 6 x 6 x 6 working voxels of 27 mm^3
            value = 0.0 if key not in present else np.log1p(1.0) if feature == "lesions" else np.log1p(216 * 0.027)
            assert torch.allclose(cond[i], torch.tensor(value, dtype=torch.float32)), name
        elif name.startswith("available_"):
            assert torch.all(cond[i] == float(key in present)), name
        elif key not in present:
            assert torch.all(cond[i] == 0), name
        else:
            assert cond[i].abs().sum() > 0, name
    for key in ("t2les_1", "net2_1"):
        assert set(torch.unique(cond[CONDITION_CHANNELS.index(key)]).tolist()) <= {0.0, 1.0}
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0} and out["label"].shape == (1, *SIZE)
    for key in MRI_KEYS:
        channel = cond[CONDITION_CHANNELS.index(key)]
        assert channel.min() >= 0 and channel.max() <= 2 + 1e-5  # interpolation rounding
    assert out["treatment"].dtype == torch.int64 and out["treatment"].item() == arm_index("ocrelizumab")
    assert out["horizon"].dtype == torch.float32 and out["horizon"].item() == 48.0
    assert out["id"] == "phantom" and out["reference_key"] == "flair_1"
    assert out["reference_shape"].tolist() == list(SHAPES["ref"]) and out["reference_shape"].dtype == torch.int64
    assert out["reference_affine"].dtype == torch.float64 and out["reference_centre"].shape == (3,)
    np.testing.assert_allclose(out["reference_affine"].numpy(), nib.load(files["mri_ref"]).affine, atol=1e-6)
    assert not set(IMAGE_KEYS) & set(out) and "horizon_weeks" not in out


def test_reference_priority_and_null_treatment(files):
    case = {"id": "no-flair", "t2_1": files["mri_oblique"], "t1_1": files["mri_iso"], "flair_1": None}
    out = run(case)
    assert out["reference_key"] == "t1_1"
    assert out["reference_shape"].tolist() == list(SHAPES["iso"])
    assert out["treatment"].item() == NULL_TREATMENT and out["horizon"].item() == 24.0
    assert "label" not in out


def test_normalisation_invariant_to_gain_and_offset(files):
    a = run(phantom_case(files))
    b = run(phantom_case(files, flair_1=files["mri_ref_scaled"]))
    np.testing.assert_allclose(a["working_affine"].numpy(), b["working_affine"].numpy(), atol=1e-9)
    np.testing.assert_allclose(a["cond"].numpy(), b["cond"].numpy(), atol=1e-4, rtol=0)
    raw = np.random.default_rng(0).gamma(2.0, 100.0, size=(20, 21, 22)).astype(np.float32)
    np.testing.assert_allclose(
        scale_foreground_percentiles(raw), scale_foreground_percentiles(raw * 37 + 500), atol=1e-4, rtol=0
    )


def test_dataloader_collates_cases_with_different_inputs(files):
    other = {
        "id": "other",
        "flair_1": files["mri_iso"],
        "flair_0": files["mri_oblique"],
        "t2les_0": files["cube_ref"],
        "label": files["cube_oblique"],
        "treatment": "placebo",
    }
    dataset = CacheDataset([phantom_case(files), other], Compose(config_preprocessing(SIZE, SPACING, True)))
    batch = next(iter(DataLoader(dataset, batch_size=2, num_workers=0)))
    assert batch["cond"].shape == (2, len(CONDITION_CHANNELS), *SIZE)
    assert batch["label"].shape == (2, 1, *SIZE)
    assert batch["treatment"].tolist() == [arm_index("ocrelizumab"), arm_index("placebo")]
    assert batch["treatment"].dtype == torch.int64
    assert batch["horizon"].tolist() == [48.0, 24.0]
    assert batch["reference_affine"].shape == (2, 4, 4) and batch["working_affine"].shape == (2, 4, 4)
    assert batch["reference_shape"].tolist() == [list(SHAPES["ref"]), list(SHAPES["iso"])]
    assert batch["id"] == ["phantom", "other"] and batch["reference_key"] == ["flair_1", "flair_1"]


# ---------------------------------------------------------------------------------------------------------------
# Datalist
# ---------------------------------------------------------------------------------------------------------------


def write_datalist(folder: Path, cases: list[dict[str, Any]], split: str = "testing") -> Path:
    path = folder / "datalist.json"
    path.write_text(json.dumps({split: cases}))
    return path


def test_datalist_resolves_relative_paths_and_defaults(files):
    folder = Path(files["mri_ref"]).parent
    cases = [{"id": "a", "flair_1": "mri_ref.nii.gz", "t1_1": None, "label": "cube_ref.nii.gz", "note": 1}]
    (case,) = load_datalist(write_datalist(folder, cases), "testing")
    assert case["flair_1"] == files["mri_ref"] and case["label"] == files["cube_ref"]
    assert "t1_1" not in case and "treatment" not in case and case["note"] == 1
    assert case["horizon_weeks"] == 24.0


@pytest.mark.parametrize(
    ("entry", "key", "words"),
    [
        ({"treatment": "aspirin"}, "treatment", ["aspirin", *ARMS]),
        ({"flair_1": None, "t1_0": "mri_iso.nii.gz"}, "flair_1", ["visit 1"]),
        ({"horizon_weeks": -3}, "horizon_weeks", ["positive"]),
        ({"horizon_weeks": "24"}, "horizon_weeks", ["positive"]),
        ({"t2_1": "missing.nii.gz"}, "t2_1", ["not found", "missing.nii.gz"]),
        ({"id": "a/b"}, "id", ["folder"]),
    ],
)
def test_datalist_errors_name_case_and_key(files, entry, key, words):
    folder = Path(files["mri_ref"]).parent
    case = {"id": "case7", "flair_1": "mri_ref.nii.gz", **entry}
    with pytest.raises(errors.CaseError) as info:
        load_datalist(write_datalist(folder, [case]), "testing")
    message = str(info.value)
    assert "\n" not in message and info.value.key == key and key in message
    assert case["id"] in message and all(word in message for word in words), message


def test_datalist_duplicate_id_and_error_collection(files):
    folder = Path(files["mri_ref"]).parent
    good = {"id": "dup", "flair_1": "mri_ref.nii.gz"}
    bad = {"id": "bad", "t1_0": "mri_iso.nii.gz"}
    path = write_datalist(folder, [good, dict(good), bad, {"id": "ok", "t1_1": "mri_iso.nii.gz"}])
    with pytest.raises(errors.CaseError, match=r"'dup'.*id.*duplicate"):
        load_datalist(path, "testing")
    failures: list[errors.CaseError] = []
    cases = load_datalist(path, "testing", errors=failures)
    assert [c["id"] for c in cases] == ["dup", "ok"]
    assert [(e.case_id, e.key) for e in failures] == [("dup", "id"), ("bad", "flair_1")]
    with pytest.raises(ValueError, match="training"):
        load_datalist(path, "training")


def test_unreadable_image_names_case_and_key(tmp_path, files):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(RuntimeError) as info:  # Compose wraps transform errors
        run(phantom_case(files, t1_1=str(broken)))
    error = errors.find_case_error(info.value)
    assert error is not None and (error.case_id, error.key) == ("phantom", "t1_1") and "cannot read" in str(error)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)  # survives DataLoader workers / process pools
    with pytest.raises(errors.CaseError, match=r"'phantom'.*flair_1.*visit 1"):
        LoadCased()({"id": "phantom", "t1_0": files["mri_iso"]})


# ---------------------------------------------------------------------------------------------------------------
# Random input dropout
# ---------------------------------------------------------------------------------------------------------------


def make_cond(present: list[str]) -> torch.Tensor:
    cond = torch.zeros((len(CONDITION_CHANNELS), 3, 3, 3))
    for key in present:
        cond[IMAGE_KEYS.index(key)] = IMAGE_KEYS.index(key) + 1.0
        cond[N + IMAGE_KEYS.index(key)] = 1.0
        if key in MASK_KEYS:
            for feature in LOAD_FEATURES:
                cond[CONDITION_CHANNELS.index(f"{feature}_{key}")] = 0.5
    return cond


PRESENT = ["flair_0", "t1_0", "t2les_0", "flair_1", "t1_1", "t2_1", "t2les_1", "net2_1"]
VISIT1_MRI = [k for k in MRI_KEYS if k.endswith("_1")]


def kept(cond: torch.Tensor) -> list[str]:
    return [k for i, k in enumerate(IMAGE_KEYS) if cond[N + i, 0, 0, 0] > 0.5]


def test_rand_drop_is_seeded_and_consistent():
    cond = make_cond(PRESENT)
    runs = []
    for _ in range(2):
        drop = RandDropInputsd(prob_modality=0.4, prob_visit0=0.3, prob_net2=0.3)
        drop.set_random_state(seed=123)
        runs.append([drop({"cond": cond, "id": "x"})["cond"] for _ in range(30)])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert len({tuple(kept(c)) for c in runs[0]}) > 3  # it does vary
    for out in runs[0]:
        for i, key in enumerate(IMAGE_KEYS):
            available = bool(out[N + i, 0, 0, 0] > 0.5)
            assert torch.all(out[N + i] == float(available))
            assert torch.all(out[i] == (cond[i] if available else 0.0)), key  # volume goes with its indicator
            if key in MASK_KEYS:  # and so does its lesion load
                for feature in LOAD_FEATURES:
                    channel = CONDITION_CHANNELS.index(f"{feature}_{key}")
                    assert torch.all(out[channel] == (cond[channel] if available else 0.0)), (feature, key)
    # through Compose and set_determinism too
    set_determinism(seed=5)
    first = [Compose([RandDropInputsd(prob_modality=0.5)])({"cond": cond})["cond"] for _ in range(5)]
    set_determinism(seed=5)
    second = [Compose([RandDropInputsd(prob_modality=0.5)])({"cond": cond})["cond"] for _ in range(5)]
    set_determinism(seed=None)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.all(cond == make_cond(PRESENT))  # input untouched


def test_rand_drop_never_drops_all_visit1_mri():
    cond = make_cond(PRESENT)
    drop = RandDropInputsd(prob_modality=1.0, prob_visit0=1.0, prob_net2=1.0)
    drop.set_random_state(seed=0)
    survivors = set()
    for _ in range(40):
        remaining = kept(drop({"cond": cond})["cond"])
        assert len(remaining) == 1 and remaining[0] in VISIT1_MRI
        survivors.add(remaining[0])
    assert survivors == {"flair_1", "t1_1", "t2_1"}
    only_visit0 = RandDropInputsd(prob_modality=0.0, prob_visit0=1.0, prob_net2=0.0)
    assert kept(only_visit0({"cond": cond})["cond"]) == [k for k in PRESENT if not k.endswith("_0")]
    only_net2 = RandDropInputsd(prob_modality=0.0, prob_visit0=0.0, prob_net2=1.0)
    assert kept(only_net2({"cond": cond})["cond"]) == [k for k in PRESENT if k != "net2_1"]
    never = RandDropInputsd(prob_modality=0.0, prob_visit0=0.0, prob_net2=0.0)
    assert kept(never({"cond": cond})["cond"]) == PRESENT


# ---------------------------------------------------------------------------------------------------------------
# Back to the reference grid
# ---------------------------------------------------------------------------------------------------------------


def test_inverse_shapes_types_and_round_trip(files, tmp_path):
    out = run(phantom_case(files))
    args = (out["working_affine"], out["reference_affine"], out["reference_shape"])
    prob = torch.rand(2, *SIZE)
    assert to_reference_grid(prob, *args).shape == (2, *SHAPES["ref"])
    back_np = to_reference_grid(prob[0].numpy(), *(np.asarray(a) for a in args))
    assert back_np.shape == SHAPES["ref"] and back_np.dtype == np.float32
    assert 0.0 <= back_np.min() and back_np.max() <= 1.0
    mask = to_reference_grid(out["label"], *args, threshold=0.5)
    assert set(np.unique(mask).tolist()) == {0.0, 1.0}
    assert dice(mask[0], nib.load(files["cube_ref"]).get_fdata()) > 0.85

    post = ToReferenceGridd(keys="pred", threshold=0.5)({**out, "pred": out["label"]})
    assert torch.equal(post["pred"].affine, out["reference_affine"]) and post["pred"].shape == (1, *SHAPES["ref"])

    path = save_nifti(mask, out["reference_affine"], tmp_path / "sub" / "mask.nii.gz", np.uint8)
    saved, ref = nib.load(path), nib.load(files["mri_ref"])
    assert saved.shape == ref.shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved.affine, ref.affine, atol=1e-6, rtol=0)
    np.testing.assert_allclose(saved.header.get_qform(), ref.affine, atol=1e-4)
    assert [p.name for p in path.parent.iterdir()] == ["mask.nii.gz"]


def test_save_nifti_is_atomic(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.zeros((4, 4, 4)), np.eye(4), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Real data (LIT longitudinal MS database, patient01)
# ---------------------------------------------------------------------------------------------------------------

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def itk_affine_ras(path: Path) -> np.ndarray:
    """ITK MatrixOffsetTransformBase text file -> 4x4 RAS map from fixed-space points to moving-image points."""
    fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    params = np.array(fields["Parameters"].split(), float)
    centre = np.array(fields["FixedParameters"].split(), float)
    matrix, translation = params[:9].reshape(3, 3), params[9:]
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = matrix, centre + translation - matrix @ centre
    return LPS_TO_RAS @ lps @ LPS_TO_RAS


def round_trip(out: dict[str, Any], mask: torch.Tensor, path: Path) -> nib.Nifti1Image:
    """Working-grid mask -> reference grid, written and read back as the bundle does."""
    back = to_reference_grid(mask, out["working_affine"], out["reference_affine"], out["reference_shape"], "nearest")
    return nib.load(save_nifti(back, out["reference_affine"], path, np.uint8))


def test_real_patient_round_trip(shared_data, patient01_study1, tmp_path):
    p = shared_data / "lesjak2016_longitudinal" / "patient01"
    case = {
        **patient01_study1,
        "t2les_1": str(p / "gt.nii.gz"),  # a real lesion mask through the mask path
        "label": str(p / "brainmask.nii.gz"),
    }
    out = Compose(config_preprocessing())(case)
    cond = out["cond"].numpy()
    flair = nib.load(case["flair_1"])
    for key in ("flair_1", "t1_1", "t2_1"):
        channel = cond[IMAGE_KEYS.index(key)]
        assert 0.15 < (channel > 0.1).mean() < 0.6, key  # the head fills a good part of the 192 mm grid
        assert 0.3 < np.median(channel[out["label"][0].numpy() > 0]) < 1.0, key  # brain near the 0.5 median anchor
    brain_ml = float(nib.load(case["label"]).get_fdata().sum()) * np.prod(flair.header.get_zooms()) / 1000
    assert out["label"].sum().item() * 27 / 1000 == pytest.approx(brain_ml, rel=0.05)

    dices = {}
    for name, volume, original in (
        ("brainmask", out["label"], case["label"]),
        ("gt", out["cond"][IMAGE_KEYS.index("t2les_1")], case["t2les_1"]),
    ):
        saved = round_trip(out, volume, tmp_path / f"{name}.nii.gz")
        assert np.array_equal(saved.shape, flair.shape)
        np.testing.assert_allclose(saved.affine, flair.affine, atol=1e-6, rtol=0)
        dices[name] = dice(saved.get_fdata(), nib.load(original).get_fdata() > 0)
    print(f"real patient01 round-trip Dice: {dices}")
    # gt lesions are small (median 45 mm^3, under two 27 mm^3 working voxels), so 3 mm costs Dice there
    assert dices["brainmask"] > 0.95 and dices["gt"] > 0.6


def test_real_raw_oblique_grids(shared_data, tmp_path):
    p = shared_data / "lesjak2016_longitudinal" / "patient01"
    raw = p / "raw"
    # the common-space images and masks, carried into raw study-1 world space by folding the archive's
    # FLAIR->common registration into their affines (contract: co-registration through affines only)
    to_raw = itk_affine_ras(raw / "study1_FLAIR_to_common_space.txt")
    moved = {}
    for name in ("study1_T2W", "brainmask"):
        image = nib.load(p / f"{name}.nii.gz")
        moved[name] = str(save_nifti(np.asarray(image.dataobj), to_raw @ image.affine, tmp_path / f"{name}.nii.gz"))
    case = {
        "id": "patient01_raw",
        "flair_1": str(raw / "study1_FLAIR.nii.gz"),
        "t1_1": str(raw / "study1_T1W.nii.gz"),
        "t2_1": str(raw / "study1_T2W.nii.gz"),
        "t2_0": moved["study1_T2W"],  # the archive's ITK-registered T2, as a second T2 to compare with
        "pd_0": str(p / "study1_T2W.nii.gz"),  # negative control: same T2 in common space, transform not applied
        "label": moved["brainmask"],
    }
    out = Compose(config_preprocessing())(case)
    flair = nib.load(case["flair_1"])
    assert out["reference_shape"].tolist() == list(flair.shape)

    # affines alone put the raw T2 where the archive's registration puts it; without the transform, they differ
    cond = out["cond"].numpy()
    t2_affine_only, t2_registered, t2_unmoved = (cond[IMAGE_KEYS.index(k)] for k in ("t2_1", "t2_0", "pd_0"))
    both = (t2_affine_only > 0.05) & (t2_registered > 0.05)
    assert np.corrcoef(t2_affine_only[both], t2_registered[both])[0, 1] > 0.9
    both = (t2_affine_only > 0.05) & (t2_unmoved > 0.05)
    assert np.corrcoef(t2_affine_only[both], t2_unmoved[both])[0, 1] < 0.8

    saved = round_trip(out, out["label"], tmp_path / "brainmask_back.nii.gz")
    assert np.array_equal(saved.shape, flair.shape)
    np.testing.assert_allclose(saved.affine, flair.affine, atol=1e-6, rtol=0)
    # the mask resampled straight onto the raw FLAIR grid (independent scipy implementation)
    mask = nib.load(moved["brainmask"])
    ijk = np.indices(flair.shape).reshape(3, -1)
    xform = np.linalg.inv(mask.affine) @ flair.affine
    direct = map_coordinates(mask.get_fdata(), xform[:3, :3] @ ijk + xform[:3, 3:4], order=1) >= 0.5
    value = dice(saved.get_fdata(), direct.reshape(flair.shape))
    print(f"real patient01 raw (oblique) brain-mask round-trip Dice: {value:.4f}")
    assert value > 0.95


def test_real_raw_study_is_coregistered_by_affines(shared_data):
    """Within one study the ITK corrections are sub-voxel at 3 mm; between studies they are not."""
    p = shared_data / "lesjak2016_longitudinal" / "patient01"
    brain = nib.load(p / "brainmask.nii.gz")
    ijk = np.argwhere(np.asarray(brain.dataobj) > 0)[::20].T
    head = brain.affine[:3, :3] @ ijk + brain.affine[:3, 3:4]  # brain points, common space (mm)
    to_raw = itk_affine_ras(p / "raw" / "study1_FLAIR_to_common_space.txt")
    flair_world = to_raw[:3, :3] @ head + to_raw[:3, 3:4]  # the same points in raw study-1 FLAIR world

    def displacement(transform: np.ndarray, points: np.ndarray) -> float:
        return float(np.linalg.norm(transform[:3, :3] @ points + transform[:3, 3:4] - points, axis=0).max())

    for name in ("study1_T1W_intrastudy_to_FLAIR", "study1_T2W_intrastudy_to_FLAIR"):
        assert displacement(itk_affine_ras(p / "raw" / f"{name}.txt"), flair_world) < 2.0, name
    for study in (1, 2):
        assert displacement(itk_affine_ras(p / "raw" / f"study{study}_FLAIR_to_common_space.txt"), head) > 5.0


def test_crop_weights_come_from_inputs_only():
    cond = torch.zeros((len(CONDITION_CHANNELS), 8, 8, 8))
    cond[CONDITION_CHANNELS.index("t2les_1"), 2, 2, 2] = 1.0
    cond[CONDITION_CHANNELS.index("net2_1"), 5, 5, 5] = 1.0
    label = torch.ones((1, 8, 8, 8))
    out = CropWeightsFromInputsd(lesion_weight=10.0)({"cond": cond, "label": label})
    weights = out["crop_weight"]
    assert weights.shape == (1, 8, 8, 8)
    assert weights[0, 2, 2, 2] == 11.0 and weights[0, 5, 5, 5] == 11.0
    assert int((weights == 1.0).sum()) == 8**3 - 2
    same = CropWeightsFromInputsd(lesion_weight=10.0)({"cond": cond, "label": torch.zeros_like(label)})
    assert torch.equal(same["crop_weight"], weights)  # the label plays no part


def test_soft_mask_known_values_and_threshold_round_trip() -> None:
    mask = np.zeros((9, 9, 9), dtype=np.float32)
    mask[4, 4, 4] = 1.0
    soft = soft_mask(mask, 0.7)
    sigmoid = lambda d: 1.0 / (1.0 + np.exp(-d / 0.7))  # noqa: E731
    assert soft[4, 4, 4] == pytest.approx(sigmoid(0.5), abs=1e-6)  # the lesion voxel: half a voxel inside
    assert soft[4, 4, 5] == pytest.approx(sigmoid(-0.5), abs=1e-6)  # a face neighbour: half a voxel outside
    assert soft[4, 5, 5] == pytest.approx(sigmoid(0.5 - np.sqrt(2.0)), abs=1e-6)
    assert soft[4, 4, 7] == pytest.approx(sigmoid(-2.5), abs=1e-6)
    # deeper inside a lesion is closer to 1; thresholding at 1/2 gives any mask back
    block = np.zeros((9, 9, 9), dtype=np.float32)
    block[2:7, 2:7, 2:7] = 1.0
    assert soft_mask(block, 0.7)[4, 4, 4] == pytest.approx(sigmoid(2.5), abs=1e-6)
    random_mask = (np.random.default_rng(0).random((12, 12, 12)) > 0.8).astype(np.float32)
    for softness in (0.3, 0.7, 1.5):
        assert np.array_equal(soft_mask(random_mask, softness) > 0.5, random_mask > 0.5)
    assert np.array_equal(soft_mask(random_mask, 0.0), random_mask)
    assert not soft_mask(np.zeros((4, 4, 4)), 0.7).any() and soft_mask(np.ones((4, 4, 4)), 0.7).min() == 1.0
    out = SoftMaskd("label", softness=0.7)({"label": torch.from_numpy(mask[None])})["label"]
    assert out.shape == (1, 9, 9, 9) and out.dtype == torch.float32
    assert np.allclose(out[0].numpy(), soft)
    with pytest.raises(ValueError, match="softness"):
        SoftMaskd("label", softness=-1.0)


def test_snapped_working_grid_keeps_one_voxel_lesions() -> None:
    """An input on a 3 mm grid offset by a fraction of a voxel from the brain-centred working grid: linear resampling
    erodes single-voxel lesions away; snapping the working grid to the input lattice keeps every voxel."""
    from monai.data import MetaTensor
    from scripts.runtime.lesions import count_lesions

    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-47.3, -46.6, -44.9]  # not a multiple of the centre's lattice: a sub-voxel offset
    mask = np.zeros((32, 32, 32), np.float32)
    lesions = [(10, 12, 14), (20, 20, 9), (15, 25, 22)]
    for ijk in lesions:
        mask[ijk] = 1.0
    mri = np.random.default_rng(0).uniform(0.2, 1.0, (32, 32, 32)).astype(np.float32)
    centre = np.array([0.4, -0.7, 1.1])  # the brain's centroid, anywhere in the field of view

    def run(snap: bool) -> dict:
        case = {
            "flair_1": MetaTensor(torch.from_numpy(mri)[None], affine=torch.from_numpy(affine)),
            "label": MetaTensor(torch.from_numpy(mask)[None], affine=torch.from_numpy(affine)),
            "reference_centre": centre,
            "reference_affine": torch.from_numpy(affine),
        }
        return ToWorkingGridd(
            spatial_size=(32, 32, 32), spacing=(3.0, 3.0, 3.0), anti_alias=False, snap_to_reference=snap
        )(case)

    plain, snapped = run(False), run(True)
    assert count_lesions(np.asarray(plain["label"][0]) > 0.5) < len(lesions)
    assert count_lesions(np.asarray(snapped["label"][0]) > 0.5) == len(lesions)
    # the snapped grid is the input lattice, shifted by whole voxels: the MRI is copied, not interpolated
    shift = np.linalg.solve(affine[:3, :3], np.asarray(snapped["working_affine"])[:3, 3] - affine[:3, 3])
    np.testing.assert_allclose(shift, np.rint(shift), atol=1e-9)
    moved = np.asarray(snapped["working_affine"])[:3, 3] - np.asarray(plain["working_affine"])[:3, 3]
    assert np.abs(moved).max() <= 1.5  # at most half a voxel
    s = np.rint(shift).astype(int)
    out = np.asarray(snapped["flair_1"][0])
    np.testing.assert_allclose(
        out[2:-2, 2:-2, 2:-2], mri[2 + s[0] : 30 + s[0], 2 + s[1] : 30 + s[1], 2 + s[2] : 30 + s[2]], atol=1e-5
    )


def test_snap_to_voxel_centre_leaves_oblique_grids() -> None:
    flipped = np.diag([-2.0, 2.0, 3.0, 1.0])
    flipped[:3, 3] = [10.0, -5.0, 1.0]
    np.testing.assert_allclose(snap_to_voxel_centre([5.1, -0.8, 2.4], flipped), [6.0, -1.0, 1.0])
    theta = 0.3
    oblique = np.eye(4)
    oblique[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    np.testing.assert_allclose(snap_to_voxel_centre([0.3, 0.4, 0.5], oblique), [0.3, 0.4, 0.5])
