"""The location oracle: each voxel's true probability of a future NET2 lesion given everything up to visit 1.

The generator places one pool of future events (Poisson count with mean ``lambda_placebo``, each ``new`` or
``enlarging``) sequentially, every event blocked from touching the earlier ones, and an arm keeps event ``i`` iff
``u_i < 1 - e_p(arm)`` with ``u_i`` uniform and independent of the placement. Events never overlap, so

    P(v in NET2 | arm) = (1 - e_p(arm)) * c(v),   c(v) = sum_i P(N > i) P(v in E_i),

where ``E_i`` is the i-th event of the pool and ``N`` the pool size. :func:`coverage_map` estimates ``c`` by
Monte-Carlo draws of whole event sequences with the generator's own placement code and fresh random streams
(Rao-Blackwellised over ``N``: event ``i`` of a draw counts with weight ``P(N > i)``). :func:`draw_outcomes` draws
independent realisations of the future NET2 masks of the same case (pool size, kinds, placement and thinning), for
scoring forecasts against the outcome distribution instead of one noisy realisation; :func:`draw_detection` scores
those draws lesion by lesion against the realised mask (the per-sample lesion F1 a perfect sampler would reach).
:func:`region_prior_map` is the weaker reference that knows only the generator's region weights.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from scripts.bench.synthetic.disease import NEW_REGION_WEIGHTS, LesionPlacer
from scripts.runtime.lesions import lesion_matching


def pool_length(lam: float, tail: float = 1e-6) -> int:
    """Events per Monte-Carlo sequence: enough that ``P(N > length) < tail`` for ``N ~ Poisson(lam)``."""
    return int(stats.poisson.ppf(1.0 - tail, lam)) + 1 if lam > 0 else 0


def coverage_map(
    placer: LesionPlacer,
    prior_mask: np.ndarray,
    recent_mask: np.ndarray,
    lam: float,
    enlarging_fraction: float,
    draws: int,
) -> np.ndarray:
    """``c(v)``, the expected number of future-pool events covering each voxel (float32, the grid's shape).

    Args:
        placer: a :class:`LesionPlacer` of the case's grid and anatomy with its own random stream.
        prior_mask: the T2 lesions at visit 1 (new events never touch them).
        recent_mask: the NET2 lesions of the past interval (enlargements prefer them).
        lam: the expected size of the future pool (``lambda_placebo``).
        enlarging_fraction: share of events that are enlargements.
        draws: Monte-Carlo sequences.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    total = np.zeros(prior_mask.size, np.float64)
    length = pool_length(lam)
    if length == 0:
        return total.reshape(prior_mask.shape).astype(np.float32)
    weights = stats.poisson.sf(np.arange(length), lam)  # P(N > i)
    context = placer.prepare(prior_mask, recent_mask)
    for _ in range(draws):
        kinds = np.where(placer.rng.uniform(size=length) < enlarging_fraction, "enlarging", "new")
        for i, event in enumerate(placer.place_events(list(kinds), prior_mask, recent_mask, context=context)):
            total[event.voxels] += weights[i]
    return (total / draws).reshape(prior_mask.shape).astype(np.float32)


def draw_outcomes(
    placer: LesionPlacer,
    prior_mask: np.ndarray,
    recent_mask: np.ndarray,
    lam: float,
    enlarging_fraction: float,
    keep_probability: dict[str, float],
    draws: int,
) -> dict[str, np.ndarray]:
    """Per arm, ``draws`` independent future NET2 masks of the case (bool, (draws, *grid shape)): pool size, kinds,
    placement and thinning drawn afresh each time, with the generator's own code and order."""
    out = {arm: np.zeros((draws, prior_mask.size), bool) for arm in keep_probability}
    context = placer.prepare(prior_mask, recent_mask)
    for d in range(draws):
        n = int(placer.rng.poisson(lam))
        u = placer.rng.uniform(size=n)
        kinds = np.where(placer.rng.uniform(size=n) < enlarging_fraction, "enlarging", "new")
        events = placer.place_events(list(kinds), prior_mask, recent_mask, context=context)
        for arm, keep in keep_probability.items():
            for i, event in enumerate(events):
                if u[i] < keep:
                    out[arm][d, event.voxels] = True
    return {arm: masks.reshape(draws, *prior_mask.shape) for arm, masks in out.items()}


def region_prior_map(placer: LesionPlacer, total: float) -> np.ndarray:
    """The generator's region weights only: each region's new-lesion weight spread evenly over its candidate voxels
    (no prior lesions, so no near-lesion share and no enlargements), scaled so the map sums to ``total`` (the
    expected number of NET2 voxels, e.g. the location oracle's sum) and clipped to 1 (float32, the grid's shape)."""
    density = np.zeros(placer.grid.shape, np.float64).ravel()
    names = [k for k in NEW_REGION_WEIGHTS if k != "near_lesion" and placer.candidates[k].size]
    if not names:
        names, weights = ["any"], np.ones(1)
    else:
        weights = np.array([NEW_REGION_WEIGHTS[k] for k in names])
    for name, w in zip(names, weights / weights.sum(), strict=True):
        density[placer.candidates[name]] += w / placer.candidates[name].size
    return np.clip(total * density, 0.0, 1.0).reshape(placer.grid.shape).astype(np.float32)


def draw_detection(draws: np.ndarray, realised: np.ndarray) -> dict[str, int]:
    """Lesion-wise detection of every outcome draw (``(draws, *grid)`` bool) against the realised mask, summed over
    the draws with the evaluation's conventions (a true lesion is detected, a drawn lesion matched, when they
    share a voxel): the per-sample lesion detection of a sampler that draws from the true distribution."""
    keys = ("tp", "fp", "fn", "n_forecast_lesions", "n_true_lesions", "matched_forecast_lesions")
    out = dict.fromkeys(keys, 0)
    for draw in draws:
        m = lesion_matching(draw, realised)
        for key, value in zip(
            keys, (m.tp, m.fp, m.fn, m.matched.size, m.detected.size, int(m.matched.sum())), strict=True
        ):
            out[key] += int(value)
    out["n_samples"] = int(draws.shape[0])
    return out
