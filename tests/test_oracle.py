"""The synthetic generator's location oracle and independent outcome draws (scripts/bench/synthetic/oracle.py)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.bench.synthetic.case import generate_case
from scripts.bench.synthetic.cohort import generate_cohort
from scripts.bench.synthetic.oracle import draw_detection, pool_length
from scripts.runtime.constants import ARMS

SEED, INDEX = 3, 0  # case 0 of seed 3 at 32^3 x 6 mm: expected future pool of 2.65 events
GRID = {"shape": 32, "spacing": 6.0}
ORACLE_DRAWS, OUTCOME_DRAWS = 200, 400


@pytest.fixture(scope="module")
def case():
    return generate_case(INDEX, SEED, oracle_draws=ORACLE_DRAWS, outcome_draws=OUTCOME_DRAWS, **GRID)


def _blocks(volume: np.ndarray, k: int = 4) -> np.ndarray:
    s = volume.shape[0] // k
    return volume.reshape(s, k, s, k, s, k).sum((1, 3, 5))


def test_oracle_and_outcomes_change_nothing_else(case) -> None:
    plain = generate_case(INDEX, SEED, **GRID)
    assert all(np.array_equal(plain.images[k], case.images[k]) for k in plain.images)
    assert all(np.array_equal(plain.counterfactual[a], case.counterfactual[a]) for a in ARMS)
    extra = {"location_oracle", "outcome_draws"}  # the region prior is an attribute, written by the cohort
    assert {k: v for k, v in case.truth.items() if k not in extra} == plain.truth
    again = generate_case(INDEX, SEED, oracle_draws=ORACLE_DRAWS, outcome_draws=OUTCOME_DRAWS, **GRID)
    assert np.array_equal(again.location_oracle, case.location_oracle)  # deterministic given the seed


def test_oracle_mass_is_the_expected_lesion_volume(case) -> None:
    """sum_v P(v in NET2 | arm) = E[NET2 voxels | arm]; the outcome draws estimate the same expectation (400 draws:
    a standard error of ~3.5% here, so 15% is about four standard errors)."""
    keep = case.truth["location_oracle"]["keep_probability"]
    for arm in ("placebo", "laquinimod", "ocrelizumab"):
        expected_voxels = float(case.outcome_frequency[arm].sum())
        oracle_voxels = float(keep[arm] * case.location_oracle.sum())
        assert oracle_voxels == pytest.approx(expected_voxels, rel=0.15, abs=0.1), arm
    assert keep["placebo"] == 1.0 and keep["ocrelizumab"] < keep["laquinimod"] < 1.0


def test_oracle_agrees_with_sequential_draws_where_lesions_appear(case) -> None:
    """Block sums (4^3 voxels) of the oracle map against the frequency of 400 full sequential draws."""
    oracle, draws = _blocks(case.location_oracle), _blocks(case.outcome_frequency["placebo"])
    assert np.corrcoef(oracle.ravel(), draws.ravel())[0, 1] > 0.9
    heavy = draws > 0.05  # blocks where lesions appear in more than 5% of the draws
    assert heavy.sum() >= 5
    # 400 draws leave ~15% Monte-Carlo error on these blocks; a map without location skill is off by far more
    assert np.abs(oracle[heavy] - draws[heavy]).sum() / draws[heavy].sum() < 0.35


def test_oracle_respects_the_placement_rules(case) -> None:
    """No future event occupies a visit-1 lesion voxel or lies outside the parenchyma; stronger arms keep subsets."""
    tissue = case.tissue
    parenchyma = np.isin(tissue, (2, 3, 5, 6, 7))
    assert case.location_oracle[case.images["t2les_1"] > 0].max() == 0.0
    assert case.location_oracle[~parenchyma].max() == 0.0
    assert case.location_oracle.min() >= 0.0 and case.location_oracle.max() <= 1.0 + 1e-6
    freq = case.outcome_frequency
    assert np.all(freq["ocrelizumab"] <= freq["placebo"] + 1e-7)  # thinning of the same pool, draw by draw


def test_pool_length_covers_the_poisson_tail() -> None:
    assert pool_length(0.0) == 0
    assert pool_length(2.65) >= 13  # P(N > 12) < 1e-6 for lambda 2.65


def test_cohort_writes_the_oracle_and_outcome_files(tmp_path: Path) -> None:
    datalist = generate_cohort(tmp_path / "c", 1, SEED, progress=False, oracle_draws=8, outcome_draws=8, **GRID)
    root = datalist.parent
    truth = json.loads((root / "truth" / "syn0000.json").read_text())
    oracle = nib.load(root / truth["location_oracle"]["map"])
    frequency = nib.load(root / truth["outcome_draws"]["frequency"])
    label = nib.load(root / truth["counterfactual_labels"]["placebo"])
    assert oracle.shape == label.shape and np.allclose(oracle.affine, label.affine)
    assert frequency.shape == (*label.shape, len(ARMS)) and truth["outcome_draws"]["arms"] == list(ARMS)
    assert truth["location_oracle"]["draws"] == 8 and set(truth["location_oracle"]["keep_probability"]) == set(ARMS)
    prior = nib.load(root / truth["region_prior"]["map"])
    assert prior.shape == label.shape and np.allclose(prior.affine, label.affine)
    detection = truth["outcome_draws"]["factual_detection"]
    assert detection["n_samples"] == 8 and detection["tp"] + detection["fn"] == detection["n_true_lesions"]
    assert detection["n_true_lesions"] % 8 == 0  # the realised lesions, once per draw


def test_region_prior_knows_only_the_regions(case) -> None:
    """Mass equals the oracle's, it lies only in the placement's candidate white matter and brainstem, and is flat
    within a region."""
    prior, oracle = case.region_prior, case.location_oracle
    assert prior.sum(dtype=np.float64) == pytest.approx(oracle.sum(dtype=np.float64), rel=1e-4)
    tissue = case.tissue
    assert prior[~np.isin(tissue, (3, 5))].sum() == 0  # white matter and infratentorial white matter only
    inside = prior[tissue == 5]
    assert inside.size and np.allclose(inside, inside[0])  # infratentorial: one region, one value


def test_draw_detection_counts_overlaps() -> None:
    truth = np.zeros((8, 8, 8), bool)
    truth[1, 1, 1] = truth[5, 5, 5] = True
    hit, miss = np.zeros_like(truth), np.zeros_like(truth)
    hit[1, 1, 1] = hit[3, 3, 3] = True  # one true lesion found, one false lesion
    out = draw_detection(np.stack([hit, miss]), truth)
    assert out == {
        "tp": 1,
        "fp": 1,
        "fn": 3,
        "n_forecast_lesions": 2,
        "n_true_lesions": 4,
        "matched_forecast_lesions": 1,
        "n_samples": 2,
    }
