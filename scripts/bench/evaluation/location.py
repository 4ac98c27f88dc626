"""Where the forecast puts its probability: per-case location scores of every method that outputs a voxel map.

For one case and its factual arm, each map (the diffusion model's, the baseline networks', and with a synthetic
truth file the generator's location oracle and region prior) is scored on the brain domain: the parenchyma of the
generator's tissue map, or for real data the brain the region map finds in the case's own images. Scores: voxel
average precision and the summed log-likelihood against the realised NET2 mask and, with outcome draws, against the
share of independent outcome draws with a lesion at each voxel (with binned histograms for the pooled AP); the share
of the map's mass outside the domain, and its mass by tissue and by region. The sizes of the sampled and the true
lesions complete the picture, and the outcome draws scored as samples give the per-sample lesion detection's
ceiling.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scripts.bench.evaluation.scores import (
    bernoulli_log_likelihood,
    mass_share,
    probability_histogram,
    voxel_auroc,
    voxel_average_precision,
)
from scripts.bench.synthetic.config import PARENCHYMA_LABELS, TISSUE_LABELS
from scripts.runtime.constants import ARMS
from scripts.runtime.grids import on_grid
from scripts.runtime.regions import REGIONS

ORACLE = "location_oracle"
"""Name of the generator's location oracle among the scored maps."""
REGION_PRIOR = "region_prior"
"""Name of the generator's region-weights-only map among the scored maps."""


def volume_on_grid(
    path: str | os.PathLike, affine: np.ndarray, shape: list[int], mode: str, index: int | None = None
) -> np.ndarray:
    """A NIfTI volume (of a 4D file: volume ``index``) on the grid (``affine``, ``shape``), resampled with ``mode``
    (``nearest`` for labels, ``bilinear`` for maps) when it lies on another grid."""
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    return on_grid(data[..., index] if index is not None else data, image.affine, affine, shape, mode=mode)


def reference_map(
    truth: Mapping[str, Any], truth_root: Path, name: str, arm: str, affine: np.ndarray, shape: list[int]
) -> np.ndarray | None:
    """The generator's map ``name`` (:data:`ORACLE` or :data:`REGION_PRIOR`) of ``arm`` on the grid: the placebo map
    written with the cohort times the arm's keep probability; None when the cohort was written without it."""
    reference = truth.get(name, {})
    if "map" not in reference:
        return None
    coverage = volume_on_grid(truth_root / reference["map"], affine, shape, "bilinear")
    return np.clip(float(reference["keep_probability"][arm]) * coverage, 0.0, 1.0)


def outcome_frequency(
    truth: Mapping[str, Any], truth_root: Path, arm: str, affine: np.ndarray, shape: list[int]
) -> np.ndarray | None:
    """The share of the cohort's independent outcome draws of ``arm`` with a lesion at each voxel, on the grid; None
    when the cohort was written without outcome draws."""
    draws = truth.get("outcome_draws", {})
    if "frequency" not in draws:
        return None
    index = list(draws.get("arms", ARMS)).index(arm)
    return np.clip(volume_on_grid(truth_root / draws["frequency"], affine, shape, "bilinear", index=index), 0.0, 1.0)


def score_map(
    prob: np.ndarray,
    label: np.ndarray,
    domain: np.ndarray,
    outcomes: np.ndarray | None,
    tissue: np.ndarray | None,
    regions: np.ndarray,
) -> dict[str, Any]:
    """Location scores of one probability map (all arrays on the same grid; see the module docstring)."""
    prob = np.clip(np.asarray(prob, np.float64), 0.0, 1.0)
    inside = prob[domain]
    out: dict[str, Any] = {
        "ap_truth": voxel_average_precision(prob, label, domain),
        "auroc_truth": voxel_auroc(prob, label, domain),
        "histogram_truth": probability_histogram(prob, label, domain),
        "ll_truth_sum": float(bernoulli_log_likelihood(inside, label[domain]).sum()),
        "voxels": int(domain.sum()),
        "mass_outside_domain": None if (share := mass_share(prob, domain)) is None else 1.0 - share,
        "mass_by_region": {name: mass_share(prob, regions == code) for code, name in enumerate(REGIONS, start=1)},
    }
    if outcomes is not None:
        out["ap_outcomes"] = voxel_average_precision(prob, outcomes, domain)
        out["auroc_outcomes"] = voxel_auroc(prob, outcomes, domain)
        out["histogram_outcomes"] = probability_histogram(prob, outcomes, domain)
        out["ll_outcomes_sum"] = float(bernoulli_log_likelihood(inside, outcomes[domain]).sum())
    if tissue is not None:
        out["mass_by_tissue"] = {
            name: mass_share(prob, tissue == code) for code, name in TISSUE_LABELS.items() if code > 0
        }
    return out


def case_location(
    maps: Mapping[str, np.ndarray],
    label: np.ndarray,
    regions: np.ndarray,
    factual: str,
    truth: Mapping[str, Any] | None,
    truth_root: Path,
    affine: np.ndarray,
    shape: list[int],
) -> dict[str, Any]:
    """Location scores of every map of one case under its factual arm; with a synthetic truth file the domain is
    the generator's parenchyma and the oracle and outcome draws join (when the cohort was written with them)."""
    tissue = None
    truth = truth or {}
    if "tissue" in truth:
        tissue = np.rint(volume_on_grid(truth_root / truth["tissue"], affine, shape, "nearest")).astype(np.int16)
        domain, domain_name = np.isin(tissue, PARENCHYMA_LABELS), "parenchyma (generator's tissue map)"
    else:
        domain, domain_name = regions > 0, "brain found in the case's own images (region map)"
    scored = dict(maps)
    for name in (ORACLE, REGION_PRIOR):
        if (reference := reference_map(truth, truth_root, name, factual, affine, shape)) is not None:
            scored[name] = reference
    outcomes = outcome_frequency(truth, truth_root, factual, affine, shape)
    draws = truth.get("outcome_draws", {})
    out: dict[str, Any] = {
        "domain": domain_name,
        "outcome_draws": draws.get("draws") if outcomes is not None else None,
        "methods": {name: score_map(prob, label, domain, outcomes, tissue, regions) for name, prob in scored.items()},
    }
    if "factual_detection" in draws and truth.get("treatment") == factual:
        out["oracle_sample_lesions"] = draws["factual_detection"]
    return out
