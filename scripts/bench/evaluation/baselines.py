"""The compared methods' forecasts of one case as :class:`ArmPrediction` s, on the case's reference grid.

The diffusion model's come from the forecast runner's samples; the deterministic network and the treatment-unaware
model forecast the case themselves from the same preprocessed input; the population baseline and the oracle are
Poisson forecasts with the training-split arm rate and the generator's true expected count; the observable
reference is the generator's posterior-predictive count given the past lesion counts.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scripts.bench.evaluation.scores import poisson_interval
from scripts.bench.synthetic.reference import ObservableReference
from scripts.runtime.analysis import summarize_arm
from scripts.runtime.constants import arm_index
from scripts.runtime.grids import on_grid
from scripts.runtime.lesions import count_lesions, load_mask
from scripts.runtime.transforms import check_probability_map
from scripts.runtime.weights import load_weights


@dataclass
class ArmPrediction:
    """One method's forecast of one case under one arm (reference-grid arrays where the method has them)."""

    expected_count: float
    p_active: float
    interval_90: list[float] | None = None
    prob: np.ndarray | None = None
    mask: np.ndarray | None = None
    samples: np.ndarray | None = None  # (K, *reference shape) bool


def load_baseline(
    network: torch.nn.Module | None,
    ckpt: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    copy_network: bool = False,
) -> torch.nn.Module | None:
    """A baseline network with the weights of ``ckpt`` (None without checkpoint); ``copy_network`` loads into a copy."""
    if ckpt is None or network is None:
        return None
    net = copy.deepcopy(network) if copy_network else network
    load_weights(net, ckpt, device)
    return net.to(device).eval()


def null_treatment_inferer(inferer: Any) -> Any:
    """A copy of the forecast's ``ForecastInferer`` that samples under the null treatment token (no arms), for the
    treatment-unaware baseline: same steps, samples, guidance and seed as the evaluated model."""
    unaware = copy.deepcopy(inferer)
    unaware.arms = None
    if hasattr(unaware, "sampler") and hasattr(unaware.sampler, "progress"):
        unaware.sampler.progress = False  # the case progress bar is enough
    return unaware


def count_native(path: str | os.PathLike) -> int:
    """Lesion count of a binary NIfTI mask on its own grid (``scripts.runtime.lesions.load_mask``: 3D, finite)."""
    return count_lesions(load_mask(path)[0])


def mask_on_grid(mask: np.ndarray, own_affine: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A binary mask (on its grid ``own_affine``) on the grid (``affine``, ``shape``); nearest-neighbour resampled
    when the grids differ."""
    return on_grid(mask, own_affine, affine, shape, mode="nearest") > 0.5


def load_mask_on(path: str | os.PathLike, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A binary NIfTI mask on the grid (``affine``, ``shape``); nearest-neighbour resampled when on another grid."""
    return mask_on_grid(*load_mask(path), affine, shape)


ToReference = Callable[[np.ndarray, str], np.ndarray]
"""``to_ref(volume, mode)``: a working-grid volume on the case's reference grid (``nearest`` or ``bilinear``)."""


def diffusion_predictions(
    samples: np.ndarray,
    forecast: Mapping[str, Any],
    probs: Mapping[str, np.ndarray],
    arms: Sequence[str],
    to_ref: ToReference,
    sample_arms: set[str],
    masks: Mapping[str, np.ndarray] | None = None,
) -> dict[str, ArmPrediction]:
    """The evaluated model's forecast per arm, from the runner's binary samples (A, K, *working grid), figures,
    probability maps and forecast masks (reference grid; without ``masks``, the map at 0.5); reference-grid samples
    only for ``sample_arms`` (reference grids can be large)."""
    out: dict[str, ArmPrediction] = {}
    for a, arm in enumerate(arms):
        figures = forecast["arms"][arm]
        prob = np.asarray(probs[arm]) if arm in probs else None
        if masks is not None and arm in masks:
            mask = np.asarray(masks[arm]) > 0
        else:
            mask = None if prob is None else prob >= 0.5
        out[arm] = ArmPrediction(
            figures["expected_count"],
            figures["p_active"],
            list(figures["count_interval_90"]),
            prob,
            mask,
            to_ref(samples[a], "nearest") > 0.5 if arm in sample_arms else None,
        )
    return out


class DeterministicBaseline:
    """The deterministic network's forecast per arm: its probability map, thresholded at 0.5 (one mask, no samples).

    Args:
        network: a trained ``DeterministicForecastNet``.
        inferer: ``ThresholdInferer(return_probability=True)``.
        device: torch device of the network.
    """

    def __init__(self, network: torch.nn.Module, inferer: Any, device: str | torch.device = "cpu") -> None:
        self.network, self.inferer, self.device = network, inferer, torch.device(device)

    @torch.no_grad()
    def predict(
        self,
        cond: np.ndarray,
        horizon: float,
        arms: Sequence[str],
        to_ref: ToReference,
        allowed: np.ndarray | None = None,
    ) -> dict[str, ArmPrediction]:
        """Forecast per arm from the preprocessed ``cond``; ``allowed`` (working grid) restricts the map as the
        diffusion samples were restricted."""
        cond_t = torch.as_tensor(cond).float()[None].to(self.device)
        h = torch.tensor([horizon], device=self.device)
        out: dict[str, ArmPrediction] = {}
        for arm in arms:  # one arm at a time keeps the peak memory of one forward pass
            treatment = torch.tensor([arm_index(arm)], device=self.device)
            prob_w = self.inferer(cond_t, self.network, horizon=h, treatment=treatment)[0, 0].float().cpu().numpy()
            if allowed is not None:
                prob_w = np.where(allowed, prob_w, 0.0).astype(np.float32)
            prob = np.clip(to_ref(prob_w, "bilinear"), 0.0, 1.0)
            mask = prob >= 0.5
            out[arm] = ArmPrediction(
                float(count_lesions(prob_w >= 0.5)), float(prob_w.max()), None, prob, mask, mask[None]
            )
        return out


class UnawareBaseline:
    """The treatment-unaware diffusion model: one sampled forecast under the null treatment token, for every arm.

    Args:
        network: the diffusion network trained with the treatment always dropped.
        inferer: a ``ForecastInferer`` without arms (:func:`null_treatment_inferer`).
        device: torch device of the network.
        probability_map: its probability map, as the evaluated model's (``inference.json``'s ``probability_map``):
            ``"samples"`` (share of samples) or ``"conditional_mean"``; its mask is the samples' agreement either way.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: Any,
        device: str | torch.device = "cpu",
        probability_map: str = "samples",
    ) -> None:
        self.network, self.inferer, self.device = network, inferer, torch.device(device)
        self.probability_map = check_probability_map(probability_map)

    @torch.no_grad()
    def predict(
        self,
        cond: np.ndarray,
        horizon: float,
        arms: Sequence[str],
        working_affine: np.ndarray,
        to_ref: ToReference,
        with_samples: bool,
        allowed: np.ndarray | None = None,
    ) -> dict[str, ArmPrediction]:
        """The same prediction under every arm of ``arms``; reference-grid samples when ``with_samples``."""
        cond_t = torch.as_tensor(cond).float()[None].to(self.device)
        h = torch.tensor([horizon], device=self.device)
        draws = self.inferer.draw(cond_t, self.network, horizon=h)
        samples = draws.samples[0].cpu().numpy() > 0.5
        mean = draws.mean[0].cpu().numpy().astype(np.float32)
        if allowed is not None:
            samples &= allowed
            mean *= allowed
        figures = summarize_arm(samples, working_affine)
        agreement = np.clip(to_ref(figures["prob_working"], "bilinear"), 0.0, 1.0)
        prob = np.clip(to_ref(mean, "bilinear"), 0.0, 1.0) if self.probability_map == "conditional_mean" else agreement
        prediction = ArmPrediction(
            figures["expected_count"],
            figures["p_active"],
            figures["count_interval_90"],
            prob,
            agreement >= 0.5,
            to_ref(samples, "nearest") > 0.5 if with_samples else None,
        )
        return dict.fromkeys(arms, prediction)


def poisson_predictions(expected: Mapping[str, float], arms: Sequence[str]) -> dict[str, ArmPrediction]:
    """Count-only forecasts (population rate x horizon, or the oracle's true expected count): Poisson P(active)
    and 90% interval."""
    out: dict[str, ArmPrediction] = {}
    for arm in arms:
        mean = float(expected[arm])
        out[arm] = ArmPrediction(mean, 1.0 - math.exp(-mean), poisson_interval(mean))
    return out


def reference_predictions(
    reference: ObservableReference, features: Mapping[str, float], arms: Sequence[str], horizon: float
) -> dict[str, ArmPrediction]:
    """The observable reference's forecast per arm from a case's past NET2 count (``net2_count_1``) and visit-0
    Gd-enhancing count (``gd_count_0``), as counted on its masks."""
    forecasts = reference.predict(int(features["net2_count_1"]), int(features["gd_count_0"]), arms, horizon)
    return {arm: ArmPrediction(f.expected_count, f.p_active, list(f.interval_90)) for arm, f in forecasts.items()}
