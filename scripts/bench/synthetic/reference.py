"""The observable reference: the best NET2 count forecast the past visits allow under the generator's own model.

A model sees the images and masks of visits 0 and 1, never the hidden activity ``A`` (Gamma, shape ``s``, mean 1).
Two of the things it sees have exact likelihoods in the generator:

- the NET2 count between the visits, ``n ~ Poisson(r * 24 * A)`` (``r = net2_rate / 24`` per week; past events never
  touch, so the NET2 mask's lesion count is the event count);
- the Gd-enhancing lesion count at visit 0, the recent lesions (onset uniform over the ``W = 16`` weeks before
  visit 0) still enhancing: ``g0 ~ Poisson(r * A * E[min(D, W)])`` with ``D ~ Gamma(2, gd_duration_mean / 2)``.

Both are Poisson in ``A``, so the posterior is conjugate: ``A | n, g0 ~ Gamma(s + n + g0, s + r * 24 +
r * E[min(D, W)])``. The Gd count at visit 1 is a thinning of the ``n`` past events and adds nothing about ``A``. The
future follows the generator: ``A_f = A exp(sigma Z - sigma^2 / 2)``, the patient's efficacy exponent ``k = clip((A_f /
a_ref)^gamma exp(tau Z'), 0.25, 4)``, and the count under an arm is ``Poisson(r * A_f * horizon * (1 - e_arm)^k)``;
the forecast is that Poisson mixed over Monte-Carlo draws of ``(A, Z, Z')`` (common random numbers for every case, so
it is deterministic). What it leaves out: the T2 lesion counts and volumes also depend on ``A`` (the chronic load
scales with ``0.35 + 0.65 min(A, 4)``), but through the unobserved disease duration and confluent lesions that merge
in the masks, without a tractable likelihood; and the age- and activity-dependent atrophy. A model could in
principle beat the reference by that information; the regression baseline uses the T2 figures.

:func:`simulate_past_and_outcomes` is the generator's fast path (patient draws only, no anatomy, placement or MRI)
for checking the reference's calibration on many held-out patients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import integrate, stats
from scripts.bench.synthetic.case import draw_patient
from scripts.bench.synthetic.config import VISIT_INTERVAL_WEEKS, CohortConfig

INTERVAL_LEVEL = 0.9
"""Central probability of the reference's count interval."""


@dataclass(frozen=True)
class ReferenceForecast:
    """The observable reference's forecast of one case under one arm."""

    expected_count: float
    p_active: float
    interval_90: list[float]


@dataclass
class ObservableReference:
    """Posterior-predictive NET2 count given the past NET2 and visit-0 Gd-enhancing lesion counts.

    Args:
        config: the generator's rates (the cohort's own; default :class:`CohortConfig`).
        draws: Monte-Carlo draws of (activity, drift, efficacy noise).
        seed: seed of the draws (common to every case).
    """

    config: CohortConfig = field(default_factory=CohortConfig)
    draws: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")
        cfg = self.config
        rng = np.random.default_rng(self.seed)
        self._uniform = rng.uniform(size=self.draws)
        self._drift = rng.standard_normal(self.draws)
        self._efficacy_noise = rng.standard_normal(self.draws)
        self.rate_per_week = cfg.net2_rate / 24.0
        theta = cfg.gd_duration_mean_weeks / 2.0
        self.gd_exposure_weeks = float(
            integrate.quad(lambda t: stats.gamma.sf(t, 2.0, scale=theta), 0.0, cfg.recent_window_weeks)[0]
        )
        self.arm_efficacy = cfg.arm_efficacy()
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def activity_posterior(self, net2_count: int, gd_count_0: int) -> tuple[float, float]:
        """``(shape, rate)`` of the Gamma posterior of the past activity given the two counts."""
        if net2_count < 0 or gd_count_0 < 0:
            raise ValueError(f"lesion counts must be >= 0, got net2_count={net2_count}, gd_count_0={gd_count_0}")
        s = self.config.activity_shape
        shape = s + net2_count + gd_count_0
        rate = s + self.rate_per_week * (VISIT_INTERVAL_WEEKS + self.gd_exposure_weeks)
        return float(shape), float(rate)

    def future_activity(self, net2_count: int, gd_count_0: int) -> np.ndarray:
        """Monte-Carlo draws of the forecast interval's activity ``A_f`` (the same quantiles for every case)."""
        key = (int(net2_count), int(gd_count_0))
        if key not in self._cache:
            shape, rate = self.activity_posterior(*key)
            activity = stats.gamma.ppf(self._uniform, shape, scale=1.0 / rate)  # inverse CDF: common numbers
            sd = self.config.activity_drift_sd
            self._cache[key] = activity * np.exp(sd * self._drift - sd**2 / 2)
        return self._cache[key]

    def rates(self, net2_count: int, gd_count_0: int, arm: str, horizon_weeks: float) -> np.ndarray:
        """Draws of the Poisson mean of the count under ``arm`` at ``horizon_weeks``."""
        if arm not in self.arm_efficacy:
            raise ValueError(f"unknown arm {arm!r}; valid arms are: {', '.join(self.arm_efficacy)}")
        cfg = self.config
        a_f = self.future_activity(net2_count, gd_count_0)
        k = np.clip(
            (a_f / cfg.efficacy_reference_activity) ** cfg.efficacy_gamma
            * np.exp(cfg.efficacy_sd * self._efficacy_noise),
            0.25,
            4.0,
        )
        return self.rate_per_week * a_f * float(horizon_weeks) * (1.0 - self.arm_efficacy[arm]) ** k

    def predict(
        self, net2_count: int, gd_count_0: int, arms: Sequence[str], horizon_weeks: float
    ) -> dict[str, ReferenceForecast]:
        """Per arm: the expected count, ``P(count > 0)`` and the central 90% interval of the predictive count."""
        out: dict[str, ReferenceForecast] = {}
        tail = (1.0 - INTERVAL_LEVEL) / 2
        for arm in arms:
            lam = self.rates(net2_count, gd_count_0, arm, horizon_weeks)
            cdf = mixture_cdf(lam, tail)
            interval = [float(np.searchsorted(cdf, tail)), float(np.searchsorted(cdf, 1.0 - tail))]
            out[arm] = ReferenceForecast(float(lam.mean()), float(1.0 - np.exp(-lam).mean()), interval)
        return out


def mixture_cdf(lam: np.ndarray, tail: float) -> np.ndarray:
    """CDF over 0, 1, ... of the Poisson mixture with means ``lam`` (equal weights), up to where it exceeds
    ``1 - tail / 10``; the pmf by the recursion ``p(k) = p(k - 1) lam / k`` (cheaper than special functions)."""
    pmf = np.exp(-lam)
    cdf = [float(pmf.mean())]
    k = 0
    while cdf[-1] < 1.0 - tail / 10 and k < 100_000:
        k += 1
        pmf = pmf * lam / k
        cdf.append(cdf[-1] + float(pmf.mean()))
    return np.asarray(cdf)


@dataclass(frozen=True)
class SimulatedPatient:
    """One patient of the fast path: what the past shows, the horizon and the true counts under every arm."""

    net2_count: int
    gd_count_0: int
    horizon_weeks: float
    counts: dict[str, int]
    expected_count: dict[str, float]


def simulate_past_and_outcomes(
    n: int, seed: int, horizon_weeks: Sequence[float] = (12.0, 24.0, 36.0, 48.0), config: CohortConfig | None = None
) -> list[SimulatedPatient]:
    """``n`` patients drawn with the generator's :func:`draw_patient` (no anatomy, placement or images), each with
    the past counts the reference conditions on and the realised future count under every arm."""
    cfg = config or CohortConfig()
    arm_eff = cfg.arm_efficacy()
    rng = np.random.default_rng(seed)
    out: list[SimulatedPatient] = []
    for _ in range(n):
        horizon = float(horizon_weeks[int(rng.integers(len(horizon_weeks)))])
        p = draw_patient(rng, cfg, arm_eff, horizon)
        gd0 = int(np.sum(-p.recent_onset < p.recent_gd))
        counts = {arm: int(np.sum(p.future_u < 1.0 - p.efficacy[arm])) for arm in arm_eff}
        expected = {arm: p.lam_future * (1.0 - p.efficacy[arm]) for arm in arm_eff}
        out.append(SimulatedPatient(int(p.past_onset.size), gd0, horizon, counts, expected))
    return out
