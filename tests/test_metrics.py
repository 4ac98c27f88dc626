"""The validation metrics of train.json on hand-built forecasts with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scripts.training.metrics import ActivityBrier, CountAbsoluteError, CountCRPS, count_crps, poisson_count_crps


def _lesions(n: int, shape: tuple[int, int, int] = (16, 16, 16)) -> np.ndarray:
    """A mask with ``n`` separate single-voxel lesions (26-connectivity: 2 voxels apart)."""
    mask = np.zeros(shape, dtype=np.float32)
    for i in range(n):
        mask[2 * (i % 8), 2 * (i // 8), 0] = 1
    return mask


def test_count_crps_point_forecast_is_the_absolute_error() -> None:
    assert count_crps([3], 1) == 2.0
    assert count_crps([0, 0, 0, 0], 2) == 2.0  # identical samples: no spread term


def test_count_crps_rewards_the_right_spread() -> None:
    # samples {0, 2}, truth 1: mean |X - y| = 1, fair spread term = (2 + 2) / (2 * 2 * 1) = 1 -> 0
    assert count_crps([0, 2], 1) == pytest.approx(0.0)
    assert count_crps([0, 0, 2, 6], 1) == pytest.approx(
        np.mean([1, 1, 1, 5]) - sum(abs(a - b) for a, b in itertools.permutations([0, 0, 2, 6], 2)) / (2 * 4 * 3)
    )


def test_count_crps_fair_estimator_matches_the_exact_score() -> None:
    # many samples of Poisson(2.5) against y = 1 approach the exact Poisson CRPS
    rng = np.random.default_rng(0)
    draws = rng.poisson(2.5, size=4000)
    assert count_crps(draws, 1) == pytest.approx(poisson_count_crps(2.5, 1), abs=0.03)
    with pytest.raises(ValueError, match="at least one sample"):
        count_crps([], 1)


def test_poisson_count_crps_known_values() -> None:
    # mean 0: a certain 0, so the score is the absolute error
    assert poisson_count_crps(0.0, 0) == 0.0
    assert poisson_count_crps(0.0, 3) == pytest.approx(3.0)
    # mean m, y = 0: sum_k (1 - F(k))^2; for k = 0 the term is (1 - e^-m)^2, the rest is small for small m
    m = 0.1
    assert poisson_count_crps(m, 0) == pytest.approx((1 - math.exp(-m)) ** 2, rel=0.01)
    with pytest.raises(ValueError, match="mean"):
        poisson_count_crps(-1.0, 0)


def test_ignite_metrics_on_sampled_masks() -> None:
    # case 1: samples with 0, 2 lesions, truth 1; case 2: samples 3, 3, truth 3
    samples = torch.from_numpy(np.stack([np.stack([_lesions(0), _lesions(2)]), np.stack([_lesions(3), _lesions(3)])]))
    label = torch.from_numpy(np.stack([_lesions(1)[None], _lesions(3)[None]]))
    results = {}
    for name, metric in {"crps": CountCRPS(), "mae": CountAbsoluteError(), "brier": ActivityBrier()}.items():
        metric.reset()
        metric.update((samples, label))
        results[name] = metric.compute()
    assert results["crps"] == pytest.approx(0.0)  # both cases scored 0 (see above)
    assert results["mae"] == pytest.approx(0.0)  # expected counts 1 and 3 are exact
    assert results["brier"] == pytest.approx(((0.5 - 1) ** 2 + 0.0) / 2)


def test_reference_scores_on_the_tiny_cohort(tiny_cohort) -> None:
    import json

    import nibabel as nib
    from scripts.runtime.datalist import load_datalist
    from scripts.runtime.lesions import count_lesions
    from scripts.training.metrics import reference_scores

    cases = load_datalist(tiny_cohort, "validation")
    counts = [count_lesions(np.asarray(nib.load(c["label"]).dataobj) > 0.5) for c in cases]
    truth = {c["id"]: json.loads((tiny_cohort.parent / "truth" / f"{c['id']}.json").read_text()) for c in cases}
    means = [truth[c["id"]]["expected_count"][c["treatment"]] for c in cases]
    scores = reference_scores(tiny_cohort, "validation")
    assert scores["val_count_crps"]["empty forecast"] == pytest.approx(np.mean(counts))
    assert scores["val_activity_brier"]["empty forecast"] == pytest.approx(np.mean([n > 0 for n in counts]))
    assert scores["val_count_mae"]["oracle"] == pytest.approx(np.mean(np.abs(np.subtract(means, counts))))
    assert scores["val_count_crps"]["oracle"] == pytest.approx(
        np.mean([poisson_count_crps(m, n) for m, n in zip(means, counts, strict=True)])
    )

    # through a transform: the label it returns is the one counted
    def emptied(case: dict) -> dict:
        return {"label": torch.zeros((1, 4, 4, 4))}

    assert reference_scores(tiny_cohort, "validation", emptied)["val_count_crps"]["empty forecast"] == 0.0
