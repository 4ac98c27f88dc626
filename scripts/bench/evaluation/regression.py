"""The count model a trial statistician would fit: a negative-binomial regression of the NET2 count.

Covariates are what the past visits show (no image model): the NET2 count between the visits, the Gd-enhancing and
T2 lesion counts of both visits (``log1p``) and the T2 lesion volumes (``log1p`` of millilitres), plus the treatment
arm (placebo the reference); the forecast horizon enters as an offset (``log`` weeks), so the model is a rate per
week. Fitted by maximum likelihood with statsmodels (NB2: variance ``mu + alpha mu^2``) on the training split only;
a case's forecast under an arm is the fitted distribution: its mean, ``P(active) = 1 - P(0)`` and the 5% and 95%
quantiles.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from scripts.bench.evaluation.baselines import ArmPrediction
from scripts.bench.evaluation.conventions import INTERVAL_LEVEL
from scripts.runtime.constants import ARMS
from scripts.runtime.lesions import count_lesions, load_mask, voxel_volume_mm3
from statsmodels.discrete.discrete_model import NegativeBinomial
from statsmodels.tools.sm_exceptions import ConvergenceWarning

COUNT_FEATURES: tuple[tuple[str, str], ...] = (
    ("net2_count_1", "net2_1"),
    ("gd_count_0", "gadles_0"),
    ("gd_count_1", "gadles_1"),
    ("t2_count_0", "t2les_0"),
    ("t2_count_1", "t2les_1"),
)
"""(feature, datalist key of the mask it is counted on); absent masks count 0."""
VOLUME_FEATURES: tuple[tuple[str, str], ...] = (("t2_volume_ml_0", "t2les_0"), ("t2_volume_ml_1", "t2les_1"))
FEATURES: tuple[str, ...] = tuple(f for f, _ in COUNT_FEATURES + VOLUME_FEATURES)


def observable_features(case: Mapping[str, Any]) -> dict[str, float]:
    """The past visits' lesion counts and T2 volumes of one datalist case (its mask files)."""
    out: dict[str, float] = {}
    masks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in {k for _, k in COUNT_FEATURES + VOLUME_FEATURES}:
        if case.get(key):
            masks[key] = load_mask(case[key])
    for feature, key in COUNT_FEATURES:
        out[feature] = float(count_lesions(masks[key][0])) if key in masks else 0.0
    for feature, key in VOLUME_FEATURES:
        out[feature] = float(masks[key][0].sum() * voxel_volume_mm3(masks[key][1]) / 1000.0) if key in masks else 0.0
    return out


def design_row(features: Mapping[str, float], arm: str) -> np.ndarray:
    """Intercept, ``log1p`` of every feature, and one indicator per non-placebo arm."""
    return np.array([1.0, *(math.log1p(float(features[f])) for f in FEATURES), *(float(arm == a) for a in ARMS[1:])])


@dataclass
class CountRegression:
    """A fitted NB2 regression: coefficients (in :func:`design_row` order) and dispersion ``alpha``."""

    coefficients: np.ndarray
    alpha: float
    n_training_cases: int

    @classmethod
    def fit(cls, rows: Sequence[tuple[Mapping[str, float], str, float, int]]) -> CountRegression:
        """Fit on ``(features, arm, horizon_weeks, observed count)`` rows.

        Raises:
            ValueError: too few rows for the coefficients, or the fit does not converge.
        """
        x = np.stack([design_row(f, arm) for f, arm, _, _ in rows]) if rows else np.zeros((0, 0))
        if len(rows) <= x.shape[1] + 1:
            raise ValueError(f"{len(rows)} training case(s) for {x.shape[1] + 1} parameters")
        y = np.array([count for *_, count in rows], float)
        offset = np.log([h for _, _, h, _ in rows])
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            try:
                result = NegativeBinomial(y, x, loglike_method="nb2", offset=offset).fit(disp=0, maxiter=200)
            except (ConvergenceWarning, np.linalg.LinAlgError) as err:
                raise ValueError(f"the negative-binomial fit failed: {err}") from None
        params = np.asarray(result.params, float)
        return cls(params[:-1], float(params[-1]), len(rows))

    def mean(self, features: Mapping[str, float], arm: str, horizon_weeks: float) -> float:
        """Expected NET2 count of a case under ``arm`` at ``horizon_weeks``."""
        return float(math.exp(design_row(features, arm) @ self.coefficients + math.log(horizon_weeks)))

    def predict(
        self, features: Mapping[str, float], arms: Sequence[str], horizon_weeks: float
    ) -> dict[str, ArmPrediction]:
        """The fitted distribution per arm: mean, ``P(active)`` and the central 90% interval."""
        out: dict[str, ArmPrediction] = {}
        tail = (1.0 - INTERVAL_LEVEL) / 2
        for arm in arms:
            mu = self.mean(features, arm, horizon_weeks)
            size = 1.0 / max(self.alpha, 1e-8)
            p = size / (size + mu)
            interval = [float(stats.nbinom.ppf(tail, size, p)), float(stats.nbinom.ppf(1 - tail, size, p))]
            out[arm] = ArmPrediction(mu, float(1.0 - stats.nbinom.pmf(0, size, p)), interval)
        return out

    def summary(self) -> dict[str, Any]:
        """Coefficients by name (log rate-ratio scale), ``alpha`` and the number of training cases."""
        names = ["intercept", *(f"log1p_{f}" for f in FEATURES), *(f"arm_{a}" for a in ARMS[1:])]
        return {
            "coefficients": dict(zip(names, map(float, self.coefficients), strict=True)),
            "alpha": self.alpha,
            "n_training_cases": self.n_training_cases,
        }
