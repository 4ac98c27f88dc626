"""The location oracle: each voxel's true probability of a future NET2 lesion given everything up to visit 1.

The generator places one pool of future events (Poisson count with mean ``lambda_placebo``, each ``new`` or
``enlarging``) sequentially, every event blocked from touching the earlier ones, and an arm keeps event ``i`` iff
``u_i < 1 - e_p(arm)`` with ``u_i`` uniform and independent of the placement. Events never overlap, so

    P(v in NET2 | arm) = (1 - e_p(arm)) * c(v),   c(v) = sum_i P(N > i) P(v in E_i),

where ``E_i`` is the i-th event of the pool and ``N`` the pool size. :func:`coverage_map` estimates ``c`` by
Monte-Carlo draws of whole event sequences with the generator's own placement code and fresh random streams
(Rao-Blackwellised over ``N``: event ``i`` of a draw counts with weight ``P(N > i)``). :func:`draw_outcomes` draws
independent realisations of the future NET2 masks of the same case (pool size, kinds, placement and thinning), for
scoring forecasts against the outcome distribution instead of one noisy realisation.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from scripts.bench.synthetic.disease import LesionPlacer


def pool_length(lam: float, tail: float = 1e-6) -> int:
    """Events per Monte-Carlo sequence: enough that ``P(N > length) < tail`` for ``N ~ Poisson(lam)``."""
    return int(stats.poisson.ppf(1.0 - tail, lam)) + 1 if lam > 0 else 0


def coverage_map(placer: LesionPlacer, prior_mask: np.ndarray, recent_mask: np.ndarray, lam: float,
                 enlarging_fraction: float, draws: int) -> np.ndarray:
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


def draw_outcomes(placer: LesionPlacer, prior_mask: np.ndarray, recent_mask: np.ndarray, lam: float,
                  enlarging_fraction: float, keep_probability: dict[str, float], draws: int) -> dict[str, np.ndarray]:
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
