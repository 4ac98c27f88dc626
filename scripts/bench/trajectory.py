"""The reverse process step by step: where the forecast's location skill goes between the first and the last step.

    python -m scripts.bench.trajectory --datalist data/synthetic/datalist.json --split validation --cases 4 \\
        [--arm placebo|factual] [--num_samples 8] [--ckpt_path W.pt] [--exact_draws 8] [--out trajectory.json] \\
        [--overrides "{'head_cond_channels': 15}"]

For each synthetic case (a cohort of ``python -m scripts.synthetic``, whose ``truth/`` holds the tissue map and the
true NET2 mask of every arm) the bundle's own forecast (``inference.json``: preprocessing, inferer, seed) runs
under one arm, and after every denoising step two maps are scored on the case's grid against the realised NET2 mask
of that arm: the network's predicted clean mask, ``p0 = (x0 + 1) / 2`` averaged over the K rows (at the first step,
from pure noise, it is the network's conditional mean forecast), and the share of rows whose current state is a
lesion. Scores: within-case voxel AUROC and AP inside the head (the tissue map's non-background), the map's mass
and maximum, and the shares of its mass outside the parenchyma and in white matter; the sampled lesions' sizes
close each case. A few cases take minutes on a CPU, where the evaluation of 120 takes hours, so a change to the
model or the sampler can be looked at before it is evaluated; the figures are diagnostics, not the evaluation.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scripts.bench.evaluation.location import ORACLE, outcome_frequency, reference_map
from scripts.bench.evaluation.scores import lesion_sizes, mass_share, voxel_average_precision
from scripts.bench.synthetic.case import generate_case
from scripts.bench.synthetic.config import PARENCHYMA_LABELS, TISSUE_LABELS, CohortConfig
from scripts.runtime.cli import strict_fire
from scripts.runtime.datalist import load_datalist
from scripts.runtime.grids import to_reference_grid
from scripts.runtime.service import BundleForecaster
from sklearn.metrics import roc_auc_score

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
WHITE_MATTER = next(code for code, name in TISSUE_LABELS.items() if name == "white_matter")


def score_step_map(
    prob: np.ndarray, label: np.ndarray, tissue: np.ndarray, outcomes: np.ndarray | None = None
) -> dict[str, Any]:
    """Location diagnostics of one probability map against one realised NET2 mask (all on one grid), and with
    ``outcomes`` (the share of independent outcome draws with a lesion at each voxel) its AP against them."""
    prob = np.clip(np.asarray(prob, np.float64), 0.0, 1.0)
    label = np.asarray(label) > 0
    head = np.asarray(tissue) > 0
    has_both = label[head].any() and not label[head].all()
    parenchyma = mass_share(prob, np.isin(tissue, PARENCHYMA_LABELS))
    return {
        "mass": float(prob.sum()),
        "max": float(prob.max()),
        "auroc": float(roc_auc_score(label[head], prob[head])) if has_both else None,
        "ap": voxel_average_precision(prob, label, head),
        "ap_outcomes": None if outcomes is None else voxel_average_precision(prob, outcomes, head),
        "mass_outside_parenchyma": None if parenchyma is None else 1.0 - parenchyma,
        "mass_in_white_matter": mass_share(prob, tissue == WHITE_MATTER),
    }


def _truth(case: Mapping[str, Any], datalist: Path) -> dict[str, Any]:
    path = datalist.parent / "truth" / f"{case['id']}.json"
    if not path.is_file():
        raise FileNotFoundError(f"case {case['id']}: no truth file {path} (a synthetic cohort is needed)")
    return json.loads(path.read_text())


def exact_draws_map(truth: Mapping[str, Any], datalist: Path, arm: str, draws: int) -> np.ndarray:
    """The share of ``draws`` independent outcome draws of the generator with a lesion at each voxel: the map an
    exact sampler's ``draws`` samples would give (the case is generated again from its seed and checked against the
    cohort's label of ``arm``)."""
    cohort = json.loads((datalist.parent / "cohort.json").read_text())
    case = generate_case(
        int(truth["case_index"]),
        int(truth["seed"]),
        shape=truth["grid"]["shape"],
        spacing=truth["grid"]["spacing"],
        horizon_weeks=float(truth["horizon_weeks"]),
        config=CohortConfig(**cohort["config"]),
        treatment=str(truth["treatment"]),
        outcome_draws=int(draws),
    )
    label = np.asarray(nib.load(str(datalist.parent / truth["counterfactual_labels"][arm])).dataobj) > 0
    if not np.array_equal(case.counterfactual[arm] > 0, label):
        raise ValueError(
            f"case {truth['id']}: generated again from its seed, its {arm} label differs from the cohort's"
        )
    return case.outcome_frequency[arm]


def trace_case(
    forecaster: BundleForecaster, case: Mapping[str, Any], datalist: Path, arm: str = "placebo", exact_draws: int = 0
) -> dict[str, Any]:
    """One case's reverse process under ``arm`` (``"factual"``: the case's own treatment): the scores of every step
    and of the final samples. When the cohort holds the location oracle (``--oracle_draws``) it is scored too, as the
    reference; with outcome draws (``--outcome_draws``) every map is also scored against those of the arm. With
    ``exact_draws`` > 0 the empirical map of that many fresh outcome draws is scored too: what an exact sampler's
    K-sample map reaches."""
    truth = _truth(case, datalist)
    arm = str(case["treatment"]) if arm == "factual" else arm
    root = datalist.parent
    tissue = np.asarray(nib.load(str(root / truth["tissue"])).dataobj)
    label_image = nib.load(str(root / truth["counterfactual_labels"][arm]))
    label = np.asarray(label_image.dataobj) > 0
    grid = (label_image.affine, list(label.shape))
    outcomes = outcome_frequency(truth, root, arm, *grid)
    oracle_map = reference_map(truth, root, ORACLE, arm, *grid)
    oracle = None if oracle_map is None else score_step_map(oracle_map, label, tissue, outcomes)
    data = forecaster.preprocessing(dict(case))
    working, reference = np.asarray(data["working_affine"]), np.asarray(data["reference_affine"])
    shape = [int(s) for s in np.asarray(data["reference_shape"]).reshape(-1)]

    def on_reference(volume: np.ndarray) -> np.ndarray:
        return np.clip(to_reference_grid(volume.astype(np.float32), working, reference, shape), 0.0, 1.0)

    steps: list[dict[str, Any]] = []

    def record(step: int, timestep: int, x0: torch.Tensor, x: torch.Tensor) -> None:
        p0 = ((x0.float() + 1) / 2).mean(0)[0].cpu().numpy()
        state = (x > 0).float().mean(0)[0].cpu().numpy()
        steps.append(
            {
                "step": step,
                "timestep": timestep,
                "p0": score_step_map(on_reference(p0), label, tissue, outcomes),
                "state": score_step_map(on_reference(state), label, tissue, outcomes),
            }
        )

    cond = torch.as_tensor(data["cond"]).float()[None].to(forecaster.device)
    horizon = torch.tensor([float(data["horizon"])], device=forecaster.device)
    with torch.no_grad():
        samples = forecaster.inferer(cond, forecaster.network, horizon=horizon, arms=[arm], callback=record)
    samples = samples[0, 0].cpu().numpy() > 0.5
    return {
        "id": str(case["id"]),
        "arm": arm,
        "true_expected_count": float(truth["expected_count"][arm]),
        "true_lesions": lesion_sizes([label]),
        "steps": steps,
        "samples": score_step_map(on_reference(samples.mean(0)), label, tissue, outcomes),
        "location_oracle": oracle,
        "exact_draws": None
        if exact_draws <= 0
        else {
            "draws": int(exact_draws),
            **score_step_map(exact_draws_map(truth, datalist, arm, exact_draws), label, tissue, outcomes),
        },
        "sampled_lesions": lesion_sizes(list(samples)),
    }


def _row(name: str, scores: Mapping[str, Any]) -> str:
    def cell(value: Any, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    return (
        f"  {name:22s} mass {cell(scores['mass'], '8.2f')}  max {cell(scores['max'], '.3f')}  "
        f"AUROC {cell(scores['auroc'], '.3f')}  AP {cell(scores['ap'], '.4f')}  "
        f"AP vs draws {cell(scores.get('ap_outcomes'), '.4f')}  "
        f"outside parenchyma {cell(scores['mass_outside_parenchyma'], '.2f')}  "
        f"white matter {cell(scores['mass_in_white_matter'], '.2f')}"
    )


def main(
    datalist: str,
    split: str = "validation",
    cases: int = 4,
    arm: str = "placebo",
    num_samples: int = 8,
    ckpt_path: str | None = None,
    device: str = "cpu",
    exact_draws: int = 0,
    out: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> None:
    """Trace the reverse process of the first ``cases`` cases of ``split`` under ``arm`` (an arm name, or
    ``factual`` for each case's own treatment) and print (and with ``out`` save) the scores of every step; with
    ``exact_draws`` K also those of K exact outcome draws of the generator. ``overrides``: further
    ``inference.json`` settings, e.g. ``--overrides "{'head_cond_channels': 15, 'debias_weight': 100}"``."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(f"--overrides must be a mapping of inference.json keys to values, got {overrides!r}")
    overrides = {**dict(overrides or {}), "num_samples": num_samples, "device": device}
    if ckpt_path:
        overrides["ckpt_path"] = os.path.abspath(ckpt_path)
    forecaster = BundleForecaster(REPO_ROOT / "bundle", overrides=overrides)
    path = Path(datalist)
    results = []
    for case in load_datalist(path, split)[: int(cases)]:
        result = trace_case(forecaster, case, path, arm, exact_draws)
        results.append(result)
        sizes = result["sampled_lesions"]
        print(
            f"case {result['id']} ({result['arm']}): true expected count {result['true_expected_count']:.2f}, "
            f"true lesions {result['true_lesions']['lesions']} (median {result['true_lesions']['median_voxels']} "
            f"voxels); sampled {sizes['lesions'] / num_samples:.1f} lesions per sample, median "
            f"{sizes['median_voxels']} voxels, single-voxel share {sizes['single_voxel_share']}"
        )
        for step in result["steps"]:
            print(_row(f"step {step['step']} t={step['timestep']} p0", step["p0"]))
        print(_row("samples", result["samples"]))
        if result["location_oracle"] is not None:
            print(_row("location oracle", result["location_oracle"]))
        if result["exact_draws"] is not None:
            print(_row(f"{exact_draws} exact draws", result["exact_draws"]))
    if out:
        Path(out).write_text(json.dumps({"arm": arm, "num_samples": num_samples, "cases": results}, indent=2))
        print(f"written {out}")


if __name__ == "__main__":
    strict_fire(main, "scripts.bench.trajectory")
