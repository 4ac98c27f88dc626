"""The observable reference: exact posterior, predictive distribution, calibration on held-out simulated patients."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats
from scripts.bench.synthetic.config import CohortConfig
from scripts.bench.synthetic.reference import ObservableReference, mixture_cdf, simulate_past_and_outcomes
from scripts.runtime.constants import ARMS


def test_posterior_matches_numerical_bayes():
    """The conjugate Gamma equals prior x Poisson likelihoods normalised by quadrature."""
    cfg = CohortConfig()
    ref = ObservableReference(cfg, draws=64)
    n, g0 = 4, 2
    r = cfg.net2_rate / 24.0

    def unnormalised(a: float) -> float:
        prior = stats.gamma.pdf(a, cfg.activity_shape, scale=1.0 / cfg.activity_shape)
        return prior * stats.poisson.pmf(n, r * 24.0 * a) * stats.poisson.pmf(g0, r * ref.gd_exposure_weeks * a)

    z = integrate.quad(unnormalised, 0, 60, limit=200)[0]
    mean = integrate.quad(lambda a: a * unnormalised(a), 0, 60, limit=200)[0] / z
    shape, rate = ref.activity_posterior(n, g0)
    assert shape / rate == pytest.approx(mean, rel=1e-6)
    # E[min(D, 16)] for D ~ Gamma(2, 3 weeks): below the mean duration 6, above 0
    assert 4.0 < ref.gd_exposure_weeks < 6.0


def test_mixture_cdf_equals_scipy():
    lam = np.array([0.3, 2.0, 7.5])
    cdf = mixture_cdf(lam, 0.05)
    k = np.arange(cdf.size)
    expected = stats.poisson.cdf(k[:, None], lam[None]).mean(1)
    np.testing.assert_allclose(cdf, expected, rtol=1e-10, atol=1e-12)
    assert cdf[-1] >= 1 - 0.005


def test_forecast_is_monotone_and_deterministic():
    ref = ObservableReference(draws=2048)
    low = ref.predict(0, 0, ARMS, 24.0)
    high = ref.predict(6, 1, ARMS, 24.0)
    for arm in ARMS:
        assert high[arm].expected_count > low[arm].expected_count
        assert high[arm].p_active > low[arm].p_active
    means = [high[arm].expected_count for arm in ARMS]
    assert means[0] == max(means) and means[-1] == min(means)  # placebo highest, ocrelizumab lowest
    assert ObservableReference(draws=2048).predict(6, 1, ARMS, 24.0) == high
    longer = ref.predict(6, 1, ["placebo"], 48.0)["placebo"]
    assert longer.expected_count == pytest.approx(2 * high["placebo"].expected_count)
    with pytest.raises(ValueError, match="unknown arm"):
        ref.predict(1, 0, ["aspirin"], 24.0)
    with pytest.raises(ValueError, match=">= 0"):
        ref.activity_posterior(-1, 0)


def test_calibrated_on_held_out_patients():
    """Mean forecast equals the mean realised count within 3 standard errors in every arm, P(active) matches the
    active share, and the 90% interval holds at least 90% of the counts (held-out seed, 3000 patients)."""
    patients = simulate_past_and_outcomes(3000, seed=99)
    ref = ObservableReference(draws=2048)
    cache: dict[tuple[int, int, float], dict] = {}
    for arm in ("placebo", "interferon_beta_1a", "ocrelizumab"):
        forecast, outcome, active, covered = [], [], [], []
        for p in patients:
            key = (p.net2_count, p.gd_count_0, p.horizon_weeks)
            if key not in cache:
                cache[key] = ref.predict(*key[:2], ARMS, key[2])
            f = cache[key][arm]
            forecast.append(f.expected_count)
            outcome.append(p.counts[arm])
            active.append(f.p_active)
            covered.append(f.interval_90[0] <= p.counts[arm] <= f.interval_90[1])
        outcome_arr = np.asarray(outcome, float)
        se = outcome_arr.std() / np.sqrt(outcome_arr.size)
        assert abs(np.mean(forecast) - outcome_arr.mean()) < 3 * se, arm
        share = np.mean(outcome_arr > 0)
        assert abs(np.mean(active) - share) < 3 * np.sqrt(share * (1 - share) / outcome_arr.size), arm
        assert np.mean(covered) >= 0.9, arm
        # the reference ranks patients: its top half holds more lesions than its bottom half
        order = np.argsort(forecast)
        assert (
            outcome_arr[order[outcome_arr.size // 2 :]].mean() > 2 * outcome_arr[order[: outcome_arr.size // 2]].mean()
        )
