"""Forecast analysis: the figures of one arm's K samples, and each arm's effect against placebo.

Used by the forecast runner for the model under test and by the evaluation for every baseline, so that every method
is summarised by the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scripts.runtime.lesions import count_lesions, voxel_volume_mm3


def summarize_arm(samples: np.ndarray, working_affine: np.ndarray) -> dict[str, Any]:
    """Figures of K binary samples (K, *S) of one arm on the working grid, and its voxel probability map."""
    samples = np.asarray(samples) > 0
    counts = [count_lesions(s) for s in samples]
    voxel = voxel_volume_mm3(working_affine)
    volumes = samples.reshape(samples.shape[0], -1).sum(1) * voxel
    return {
        "expected_count": float(np.mean(counts)),
        "count_interval_90": [float(np.percentile(counts, 5)), float(np.percentile(counts, 95))],
        "p_active": float(np.mean([c > 0 for c in counts])),
        "expected_volume_mm3": float(np.mean(volumes)),
        "count_samples": [int(c) for c in counts],
        "prob_working": samples.mean(0).astype(np.float32),
    }


def effects_vs_placebo(arms: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per arm: ratio and difference of expected counts and difference of P(active) against placebo.

    The count ratio is None where the placebo forecast expects no lesion at all (undefined ratio).
    """
    if "placebo" not in arms:
        return {}
    base = arms["placebo"]
    effects = {}
    for arm, figures in arms.items():
        ratio = figures["expected_count"] / base["expected_count"] if base["expected_count"] > 0 else None
        effects[arm] = {
            "count_ratio": ratio,
            "count_difference": figures["expected_count"] - base["expected_count"],
            "p_active_difference": figures["p_active"] - base["p_active"],
        }
    return effects
