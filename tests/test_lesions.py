"""Lesion analysis against hand-built masks with known answers, the CLI, and the real change masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scripts.runtime.lesions import analyze_mask, count_lesions, describe_lesions, match_lesions

from tests.conftest import REPO_ROOT


def _mask(shape=(20, 20, 20)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_26_connectivity_counts_diagonal_neighbours_as_one() -> None:
    m = _mask()
    m[2, 2, 2] = m[3, 3, 3] = 1  # corner-touching: one lesion under 26-connectivity
    m[10, 10, 10] = m[10, 12, 10] = 1  # a gap of one voxel: two lesions
    assert count_lesions(m) == 3


def test_volumes_and_centroids_with_anisotropic_spacing() -> None:
    m = _mask()
    m[4:6, 4:7, 4:8] = 1  # 2 x 3 x 4 = 24 voxels, centre (4.5, 5, 5.5)
    affine = np.diag([0.5, 1.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    (lesion,) = describe_lesions(m, affine)
    assert lesion["volume_mm3"] == pytest.approx(24 * 1.5)
    assert lesion["centroid_mm"] == pytest.approx([10 + 4.5 * 0.5, -20 + 5.0, 5 + 5.5 * 3.0])
    result = analyze_mask(m, affine)
    assert result["count"] == 1 and result["total_volume_mm3"] == pytest.approx(36.0)


def test_detection_counts_with_one_to_many_overlaps() -> None:
    ref, pred = _mask(), _mask()
    ref[2:4, 2:4, 2:4] = 1  # A
    ref[2:4, 6:8, 2:4] = 1  # B
    ref[12:14, 12:14, 12:14] = 1  # C, missed
    pred[3, 2:8, 3] = 1  # one predicted lesion spanning A and B
    pred[16:18, 2:4, 2:4] = 1  # false positive
    got = match_lesions(pred, ref)
    assert (got["tp"], got["fp"], got["fn"]) == (2, 1, 1)
    assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    overlap = 4  # pred voxels inside A or B: (3,2..3,3) and (3,6..7,3)
    assert got["dice"] == pytest.approx(2 * overlap / (pred.sum() + ref.sum()))


def test_two_predictions_on_one_reference_lesion() -> None:
    ref, pred = _mask(), _mask()
    ref[5:10, 5:10, 5:10] = 1
    pred[5, 5, 5] = pred[9, 9, 9] = 1
    got = match_lesions(pred, ref)
    assert (got["tp"], got["fp"], got["fn"]) == (1, 0, 0)
    assert got["precision"] == 1.0 and got["recall"] == 1.0


def test_empty_conventions() -> None:
    empty = _mask()
    got = match_lesions(empty, empty)
    assert got["precision"] == got["recall"] == got["f1"] == got["dice"] == 1.0
    one = _mask()
    one[1, 1, 1] = 1
    assert match_lesions(one, empty)["precision"] == 0.0
    assert match_lesions(empty, one)["recall"] == 0.0


def test_cli_prints_the_contract_fields(tmp_path: Path) -> None:
    m, ref = _mask(), _mask()
    m[2:4, 2:4, 2:4] = 1
    ref[3:5, 3:5, 3:5] = 1
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(m, affine), tmp_path / "m.nii.gz")
    nib.save(nib.Nifti1Image(ref, affine), tmp_path / "r.nii.gz")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.lesions",
            str(tmp_path / "m.nii.gz"),
            "--reference",
            str(tmp_path / "r.nii.gz"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout)
    expected_fields = {"count", "total_volume_mm3", "lesions", "tp", "fp", "fn", "precision", "recall", "f1", "dice"}
    assert expected_fields <= set(result)
    assert result["count"] == 1 and result["total_volume_mm3"] == 16.0
    assert set(result["lesions"][0]) == {"centroid_mm", "volume_mm3"}


def test_real_change_masks_match_scipy(shared_data: Path) -> None:
    masks = sorted((shared_data / "lesjak2016_longitudinal" / "change_masks").glob("patient*/gt.nii.gz"))
    assert len(masks) == 20
    total = 0
    for path in masks:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj) > 0
        expected = ndimage.label(data, structure=np.ones((3, 3, 3)))[1]
        result = analyze_mask(data, image.affine)
        assert result["count"] == expected, path
        voxel = abs(np.linalg.det(image.affine[:3, :3]))
        assert result["total_volume_mm3"] == pytest.approx(data.sum() * voxel, rel=1e-6)
        assert sum(les["volume_mm3"] for les in result["lesions"]) == pytest.approx(data.sum() * voxel, rel=1e-4)
        total += result["count"]
    assert total == 833  # as documented in ../shared/data/README.md


def test_centroids_and_volumes_with_flipped_permuted_anisotropic_affine() -> None:
    """LPS-like flips, permuted axes and 0.7 x 1.2 x 3 mm voxels: world centroids follow the affine exactly."""
    m = _mask()
    m[1:3, 5, 7:10] = 1  # 2 x 1 x 3 = 6 voxels, voxel centre (1.5, 5, 8)
    m[15, 15, 15] = 1  # one voxel
    affine = np.array(
        [
            [0.0, -0.7, 0.0, 90.0],  # voxel axis 1 runs towards world -x
            [-1.2, 0.0, 0.0, 120.0],  # voxel axis 0 towards world -y
            [0.0, 0.0, 3.0, -60.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    first, second = describe_lesions(m, affine)
    assert first["volume_mm3"] == pytest.approx(6 * 0.7 * 1.2 * 3.0)
    assert first["centroid_mm"] == pytest.approx([90.0 - 0.7 * 5, 120.0 - 1.2 * 1.5, -60.0 + 3.0 * 8])
    assert second["volume_mm3"] == pytest.approx(0.7 * 1.2 * 3.0)
    assert second["centroid_mm"] == pytest.approx([90.0 - 0.7 * 15, 120.0 - 1.2 * 15, -60.0 + 3.0 * 15])


def test_real_change_masks_per_lesion_volumes_and_centroids(shared_data: Path) -> None:
    """Per lesion on three real masks (0.72 x 0.72 x 3 mm, LPS): volumes and world centroids equal scipy's
    26-connected components mapped through the affine; a mask against itself detects every lesion."""
    masks = sorted((shared_data / "lesjak2016_longitudinal" / "change_masks").glob("patient*/gt.nii.gz"))[:3]
    assert masks
    for path in masks:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj) > 0
        labels, n = ndimage.label(data, structure=np.ones((3, 3, 3)))
        index = np.arange(1, n + 1)
        voxel = abs(np.linalg.det(image.affine[:3, :3]))
        sizes = ndimage.sum_labels(data, labels, index) * voxel
        centres = np.asarray(ndimage.center_of_mass(data, labels, index)).reshape(n, 3)
        world = centres @ image.affine[:3, :3].T + image.affine[:3, 3]
        lesions = describe_lesions(data, image.affine)
        assert len(lesions) == n, path
        np.testing.assert_allclose([les["volume_mm3"] for les in lesions], sizes, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose([les["centroid_mm"] for les in lesions], world, atol=2e-3)
        self_match = match_lesions(data, data)
        assert (self_match["tp"], self_match["fp"], self_match["fn"], self_match["dice"]) == (n, 0, 0, 1.0)


def test_probability_map_given_as_mask_is_named(tmp_path, caplog) -> None:
    """``python -m scripts.lesions`` on a probability map says what it counts instead of counting silently."""
    import logging

    import nibabel as nib
    from scripts.runtime.lesions import load_mask

    prob = np.zeros((8, 8, 8), np.float32)
    prob[2:4, 2:4, 2:4] = 0.3
    prob[5, 5, 5] = 0.7
    nib.save(nib.Nifti1Image(prob, np.eye(4)), tmp_path / "p.nii.gz")
    with caplog.at_level(logging.WARNING):
        mask, _ = load_mask(tmp_path / "p.nii.gz")
    assert int(mask.sum()) == 1
    assert any("is not a binary mask (3 distinct values in [0, 0.7])" in r.getMessage() for r in caplog.records)
