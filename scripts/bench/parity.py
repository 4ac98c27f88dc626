"""Quality parity of the fast sampler against a many-step reference sampler on a synthetic cohort."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scripts.bench.speed import precision_error
from scripts.bench.synthetic.cohort import generate_cohort
from scripts.runtime.analysis import summarize_arm
from scripts.runtime.constants import arm_index
from scripts.runtime.datalist import load_datalist
from scripts.runtime.sampler import ForecastSampler, resolve_precision
from sklearn.metrics import roc_auc_score
from torch import nn


def activity_auc(scores: Sequence[float], active: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``active`` (ties count half); None with a single class."""
    s, y = np.asarray(scores, float), np.asarray(active, bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


def quality_parity(network: nn.Module, parser: Any, args: argparse.Namespace, weights: str) -> dict[str, Any]:
    """Count MAE and activity AUC of the fast sampler and a many-step reference on a synthetic cohort.

    Every sampler starts from the same noise per case (seed ``parity_seed + case index``). When the fast sampler
    runs in reduced precision, the same sampler in float32 is added (``fast_float32``) to isolate its effect.
    """
    size = [int(s) for s in parser.get_parsed_content("spatial_size")]
    spacing = [float(s) for s in parser.get_parsed_content("spacing")]
    fast = parser.get_parsed_content("inferer").sampler
    device = torch.device(args.device)
    scheduler = parser.get_parsed_content("noise_scheduler")

    def like_fast(steps: int) -> ForecastSampler:
        return ForecastSampler(
            scheduler,
            steps,
            fast.guidance_scale,
            fast.chunk_size,
            channels_last=fast.channels_last,
            precision="float32",
        )

    samplers = {"fast": fast, "reference": like_fast(args.reference_steps)}
    if resolve_precision(fast.precision, device) != "float32":
        samplers["fast_float32"] = like_fast(fast.num_inference_steps)
    k = args.parity_samples
    preprocessing = parser.get_parsed_content("preprocessing")
    counts: dict[str, list[float]] = {name: [] for name in samplers}
    active: dict[str, list[float]] = {name: [] for name in samplers}
    agreement: dict[str, list[float]] = {name: [] for name in samplers if name != "fast"}
    observed, expected = [], []
    precision_errors: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="benchmark_parity_") as tmp:
        datalist = generate_cohort(
            tmp,
            n=args.parity_cases,
            seed=args.parity_seed,
            shape=size,
            spacing=spacing,
            split=(0.0, 0.0, 1.0),
            progress=False,
        )
        for index, case in enumerate(load_datalist(datalist, "testing")):
            data = preprocessing(dict(case))
            cond = torch.as_tensor(data["cond"]).float()[None].to(device)
            truth = json.loads((Path(tmp) / "truth" / f"{case['id']}.json").read_text())
            arm = truth["treatment"]
            observed.append(float(truth["counts"][arm]))
            expected.append(float(truth["expected_count"][arm]))
            treatment = torch.full((k,), arm_index(arm), device=device)
            horizon = torch.full((k,), float(torch.as_tensor(data["horizon"])), device=device)
            generator = torch.Generator().manual_seed(args.parity_seed + index)
            noise = torch.randn((k, 1, *size), generator=generator).to(device)
            masks = {}
            for name, sampler in samplers.items():
                sample = sampler.sample(network, cond.expand(k, *cond.shape[1:]), treatment, horizon, noise=noise)
                masks[name] = sample[:, 0].cpu().numpy() > 0.5
                summary = summarize_arm(masks[name], np.asarray(data["working_affine"], float))
                counts[name].append(summary["expected_count"])
                active[name].append(summary["p_active"])
            for name in agreement:
                agreement[name].append(float((masks["fast"] == masks[name]).mean()))
            if index == 0 and "fast_float32" in samplers:
                precision_errors = precision_error(
                    network,
                    scheduler,
                    resolve_precision(fast.precision, device),
                    cond.expand(k, *cond.shape[1:]),
                    treatment,
                    horizon,
                )
    obs, exp = np.asarray(observed), np.asarray(expected)
    result: dict[str, Any] = {
        "cohort": f"scripts.bench.synthetic.cohort.generate_cohort(n={args.parity_cases}, seed={args.parity_seed}, "
        f"shape={size}, spacing={spacing}), factual arm of each case",
        "cases": args.parity_cases,
        "samples_per_case": k,
        "weights": weights,
        "observed_mean_count": float(obs.mean()),
        "observed_share_active": float((obs >= 1).mean()),
    }
    for name, sampler in samplers.items():
        c = np.asarray(counts[name])
        result[name] = {
            "sampler": f"deterministic DDIM, {sampler.num_inference_steps} steps (trailing), "
            f"{resolve_precision(sampler.precision, device)}",
            "network_evaluations_per_sample": sampler.network_evaluations_per_sample,
            "count_mae": float(np.abs(c - obs).mean()),
            "count_mae_vs_expected": float(np.abs(c - exp).mean()),
            "activity_auc": activity_auc(active[name], obs >= 1),
            "mean_expected_count": float(c.mean()),
        }
        if name != "fast":
            result[f"count_mae_fast_vs_{name}"] = float(np.abs(np.asarray(counts["fast"]) - c).mean())
            result[f"voxel_agreement_fast_vs_{name}"] = float(np.mean(agreement[name]))
    if "fast_float32" in samplers:
        result["reduced_precision_error_first_case"] = precision_errors
    if all(result[name]["mean_expected_count"] == 0 for name in samplers):
        result["note"] = (
            "these weights forecast no lesion on these cases with any sampler: parity holds trivially "
            "and says nothing about the fast sampler's quality; rerun with weights that forecast lesions"
        )
    result["seconds"] = time.perf_counter() - start
    return result
