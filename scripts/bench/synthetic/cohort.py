"""Synthetic longitudinal MS cohort with exactly known counterfactual NET2 truth.

Every case is one patient with two past visits (visit 0 = week 0, visit 1 = week 24) and a forecast visit at
week ``24 + horizon_weeks``. The generator draws, per patient,

* an anatomy: a brain-shaped phantom defined in millimetres (so it does not depend on the voxel grid) with
  cortex, folded grey/white boundary, sulci, interhemispheric fissure, lateral/third/fourth ventricles, deep grey
  nuclei, cerebellum and brainstem. The tissue label map uses the codes in :data:`TISSUE_LABELS`;
* a hidden disease activity (gamma distributed across patients, so counts are overdispersed) that drives the
  baseline lesion load, gadolinium-enhancing (Gd) lesions and the rate of new/enlarging T2 (NET2) lesions in
  the past and the future interval;
* lesions (ovoids, lognormal volumes, mostly white matter with a periventricular preference) and from them the
  T2 lesion and Gd masks of both visits and the NET2 mask between visit 0 and visit 1;
* MRI contrasts FLAIR, T1, T2, PD and T1-Gd from the tissue map and the lesions, with partial-volume smoothing,
  a smooth multiplicative bias field, Rician noise and a raw-scanner gain; stored as int16 "scanner units";
* one pool of candidate future NET2 events at the placebo rate. Under arm ``a`` the event ``i`` happens iff
  ``u_i < 1 - e_p(a)`` (Poisson thinning with the patient's efficacy ``e_p``), so a stronger arm's future lesions
  are a subset of a weaker arm's and the true expected count is ``lambda_placebo * (1 - e_p(a))``.

Simplification (documented in ``bundle/docs/synthetic_cohort.md``): treatment acts only in the forecast
interval; the past interval is untreated natural history, so the observed past is identical across arms. In the
trials treatment started at week 0.

Run ``python -m scripts.synthetic --out DIR --n N --seed S``; see :func:`main`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scripts.bench.synthetic.anatomy import as_triple
from scripts.bench.synthetic.case import SyntheticCase, as_number, generate_case, horizon_choices
from scripts.bench.synthetic.config import GENERATOR_VERSION, TISSUE_LABELS, CohortConfig
from scripts.runtime.constants import ARMS, IMAGE_KEYS
from scripts.runtime.files import write_text_atomic
from scripts.runtime.io import save_nifti
from scripts.runtime.lesions import label_lesions
from tqdm import tqdm

logger = logging.getLogger("scripts.synthetic")


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def write_case(case: SyntheticCase, out: str | os.PathLike) -> dict[str, Any]:
    """Write one case under ``out`` and return its datalist entry (paths relative to ``out``)."""
    out = Path(out)
    cid = case.case_id
    img_dir, lab_dir, truth_dir = out / "images" / cid, out / "labels" / cid, out / "truth"
    for d in (img_dir, lab_dir, truth_dir):
        d.mkdir(parents=True, exist_ok=True)
    affine = case.grid.affine
    entry: dict[str, Any] = {"id": cid}
    for key in IMAGE_KEYS:
        save_nifti(case.images[key], affine, img_dir / f"{key}.nii.gz", case.images[key].dtype)
        entry[key] = f"images/{cid}/{key}.nii.gz"
    labels = {}
    for arm in ARMS:
        save_nifti(case.counterfactual[arm], affine, lab_dir / f"net2_{arm}.nii.gz", np.uint8)
        labels[arm] = f"labels/{cid}/net2_{arm}.nii.gz"
    save_nifti(case.tissue, affine, truth_dir / f"{cid}_tissue.nii.gz", case.tissue.dtype)
    truth = dict(case.truth)
    truth["counterfactual_labels"] = labels
    truth["tissue"] = f"truth/{cid}_tissue.nii.gz"
    truth["images"] = {k: entry[k] for k in IMAGE_KEYS}
    if case.location_oracle is not None:
        save_nifti(case.location_oracle, affine, truth_dir / f"{cid}_location_oracle.nii.gz", np.float32)
        truth["location_oracle"] = {**truth["location_oracle"], "map": f"truth/{cid}_location_oracle.nii.gz"}
    if case.region_prior is not None:
        save_nifti(case.region_prior, affine, truth_dir / f"{cid}_region_prior.nii.gz", np.float32)
        truth["region_prior"] = {
            "map": f"truth/{cid}_region_prior.nii.gz",
            "keep_probability": truth["location_oracle"]["keep_probability"],
        }
    if case.outcome_frequency is not None:
        frequency = np.stack([case.outcome_frequency[arm] for arm in ARMS], -1)
        save_nifti(frequency, affine, truth_dir / f"{cid}_outcome_frequency.nii.gz", np.float32, volumes_last=True)
        truth["outcome_draws"] = {**truth["outcome_draws"], "frequency": f"truth/{cid}_outcome_frequency.nii.gz"}
    _write_json(truth_dir / f"{cid}.json", truth)
    entry["treatment"] = case.treatment
    entry["horizon_weeks"] = as_number(case.horizon_weeks)
    entry["label"] = labels[case.treatment]
    return entry


def split_indices(n: int, fractions: Sequence[float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Deterministic random split of ``range(n)`` into training/validation/testing by the given fractions."""
    fr = np.asarray(list(fractions), float)
    if fr.size != 3 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {fractions!r}")
    cum = np.cumsum(fr / fr.sum())
    b1, b2 = round(float(n * cum[0])), round(float(n * cum[1]))
    order = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1])).permutation(n)
    return sorted(order[:b1].tolist()), sorted(order[b1:b2].tolist()), sorted(order[b2:].tolist())


def _generate_and_write(args: tuple[int, int, dict[str, Any], CohortConfig, str]) -> dict[str, Any]:
    index, seed, grid_kw, config, out = args
    case = generate_case(index, seed, config=config, **grid_kw)
    return write_case(case, out)


def generate_cohort(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    *,
    shape: int | Sequence[int] = 64,
    spacing: float | Sequence[float] = 3.0,
    horizon_weeks: float | Sequence[float] = 24.0,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    workers: int = 1,
    config: CohortConfig | None = None,
    progress: bool = True,
    oracle_draws: int = 0,
    outcome_draws: int = 0,
) -> Path:
    """Generate ``n`` cases into ``out`` and return the path of ``out/datalist.json`` (written last); with
    ``oracle_draws`` / ``outcome_draws`` > 0 every case also gets its location oracle / outcome frequencies."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cfg = config or CohortConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid_kw = {
        "shape": as_triple(shape, int, "shape"),
        "spacing": as_triple(spacing, float, "spacing"),
        "horizon_weeks": horizon_choices(horizon_weeks),
        "oracle_draws": int(oracle_draws),
        "outcome_draws": int(outcome_draws),
    }
    logger.info(
        "generating %d synthetic cases into %s (seed %d, grid %s at %s mm, horizon %s weeks, %d worker(s))",
        n,
        out,
        seed,
        grid_kw["shape"],
        grid_kw["spacing"],
        grid_kw["horizon_weeks"],
        workers,
    )
    jobs = [(i, seed, grid_kw, cfg, str(out)) for i in range(n)]
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            entries = list(tqdm(pool.map(_generate_and_write, jobs), total=n, desc="cases", disable=not progress))
    else:
        entries = [_generate_and_write(j) for j in tqdm(jobs, desc="cases", disable=not progress)]
    elapsed = time.perf_counter() - start
    logger.info("generated %d cases in %.1f s (%.2f s per case)", n, elapsed, elapsed / n)
    train, val, test = split_indices(n, split, seed)
    cohort = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        **{k: list(v) for k, v in grid_kw.items() if k not in ("oracle_draws", "outcome_draws")},
        **{k: grid_kw[k] for k in ("oracle_draws", "outcome_draws") if grid_kw[k] > 0},
        "split": list(split),
        "config": {k: (dict(v) if k == "efficacy" else v) for k, v in asdict(cfg).items()},
        "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "mri_dtype": "int16",
    }
    _write_json(out / "cohort.json", cohort)
    datalist = {
        "training": [entries[i] for i in train],
        "validation": [entries[i] for i in val],
        "testing": [entries[i] for i in test],
    }
    path = out / "datalist.json"
    _write_json(path, datalist)  # last, so a crash never leaves a datalist pointing at missing files
    logger.info("wrote %s (%d training, %d validation, %d testing)", path, len(train), len(val), len(test))
    return path


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, float)
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, [10, 25, 50, 75, 90])
    keys = ("p10", "p25", "median", "p75", "p90")
    return {
        "n": int(v.size),
        "mean": round(float(v.mean()), 3),
        **{k: round(float(x), 3) for k, x in zip(keys, q, strict=True)},
    }


def summarize_cohort(root: str | os.PathLike) -> dict[str, Any]:
    """Cohort figures measured from a written cohort (truth files and masks), for the realism documentation.

    Run ``python -c "import json, sys; from scripts.synthetic import summarize_cohort;
    print(json.dumps(summarize_cohort(sys.argv[1]), indent=2))" DIR``.
    """
    root = Path(root)
    datalist = json.loads((root / "datalist.json").read_text())
    entries = [e for split in ("training", "validation", "testing") for e in datalist[split]]
    truths = [json.loads((root / "truth" / f"{e['id']}.json").read_text()) for e in entries]
    n = len(truths)
    arms: dict[str, Any] = {}
    for arm in ARMS:
        counts = np.array([t["counts"][arm] for t in truths])
        factual = np.array([t["counts"][arm] for t in truths if t["treatment"] == arm])
        arms[arm] = {
            "mean_expected_count": round(float(np.mean([t["expected_count"][arm] for t in truths])), 3),
            "mean_count": round(float(counts.mean()), 3),
            "share_active": round(float((counts >= 1).mean()), 3),
            "rate_ratio_vs_placebo": None,
            "factual_n": int(factual.size),
            "factual_mean_count": round(float(factual.mean()), 3) if factual.size else None,
            "factual_share_active": round(float((factual >= 1).mean()), 3) if factual.size else None,
        }
    placebo_mean = arms["placebo"]["mean_count"]
    for arm in ARMS:
        arms[arm]["rate_ratio_vs_placebo"] = round(arms[arm]["mean_count"] / placebo_mean, 3) if placebo_mean else None
    future = [ev for t in truths for ev in t["future_events"]]
    past_events = [ev for t in truths for ev in t["past"]["net2_events"]]
    regions: dict[str, int] = {}
    for ev in future + past_events:
        regions[ev["region"]] = regions.get(ev["region"], 0) + 1
    baseline_volumes: list[float] = []
    for e in entries:
        img = nib.load(str(root / e["t2les_0"]))
        labels, k = label_lesions(np.asanyarray(img.dataobj))
        vv = float(np.prod(img.header.get_zooms()[:3]))
        baseline_volumes += (np.bincount(labels.ravel())[1:] * vv).tolist() if k else []
    past_counts = np.array([t["past"]["net2_count"] for t in truths])
    placebo_counts = np.array([t["counts"]["placebo"] for t in truths])
    gd0 = np.array([t["past"]["gd_count_0"] for t in truths])
    gd1 = np.array([t["past"]["gd_count_1"] for t in truths])
    return {
        "n_cases": n,
        "grid": truths[0]["grid"]["shape"] if truths else None,
        "spacing": truths[0]["grid"]["spacing"] if truths else None,
        "arms": arms,
        "future_net2_volume_mm3": _quantiles([ev["volume_mm3"] for ev in future]),
        "future_net2_nominal_volume_mm3": _quantiles([ev["nominal_volume_mm3"] for ev in future]),
        "future_event_kinds": {k: sum(ev["kind"] == k for ev in future) for k in ("new", "enlarging")},
        "net2_regions": regions,
        "past_net2_count": {**_quantiles(past_counts), "share_active": round(float((past_counts >= 1).mean()), 3)},
        "corr_past_vs_future_placebo_count": (
            round(float(np.corrcoef(past_counts, placebo_counts)[0, 1]), 3)
            if n > 2 and past_counts.std() > 0 and placebo_counts.std() > 0
            else None
        ),
        "baseline_t2_lesion_count": _quantiles([t["past"]["t2_lesion_count_0"] for t in truths]),
        "baseline_t2_volume_ml": _quantiles([t["past"]["t2_volume_mm3_0"] / 1000 for t in truths]),
        "baseline_t2_lesion_volume_mm3": _quantiles(baseline_volumes),
        "gd_count_visit0": {**_quantiles(gd0), "share_with_gd": round(float((gd0 >= 1).mean()), 3)},
        "gd_count_visit1": {**_quantiles(gd1), "share_with_gd": round(float((gd1 >= 1).mean()), 3)},
        "activity": _quantiles([t["activity"] for t in truths]),
        "ventricle_scale": _quantiles([t["patient"]["ventricle_scale"] for t in truths]),
    }


def main(
    out: str,
    n: int = 200,
    seed: int = 0,
    shape: int | Sequence[int] = 64,
    spacing: float | Sequence[float] = 3.0,
    horizon_weeks: float | Sequence[float] = 24.0,
    split: Sequence[float] = (0.7, 0.15, 0.15),
    workers: int = 1,
    net2_rate: float = CohortConfig.net2_rate,
    activity_shape: float = CohortConfig.activity_shape,
    progress: bool = True,
    log_level: str = "INFO",
    oracle_draws: int = 0,
    outcome_draws: int = 0,
) -> str:
    """Write a synthetic cohort: ``python -m scripts.synthetic --out DIR --n N --seed S``.

    Args:
        out: output folder (``datalist.json``, ``images/``, ``labels/``, ``truth/``, ``cohort.json``).
        n: number of cases.
        seed: cohort seed; case ``i`` uses ``SeedSequence([seed, i])``.
        shape: grid size, one int or three.
        spacing: voxel size in mm, one number or three.
        horizon_weeks: forecast horizon after visit 1, a number or a list to draw from per case.
        split: training/validation/testing fractions.
        workers: processes generating cases in parallel.
        net2_rate: mean untreated NET2 count per 24 weeks at mean activity.
        activity_shape: gamma shape of patient activity (smaller: more overdispersed).
        progress: show a progress bar.
        log_level: logging level.
        oracle_draws: Monte-Carlo sequences of the location oracle (``truth/<id>_location_oracle.nii.gz``; 0: none).
        outcome_draws: independent outcome draws per case (``truth/<id>_outcome_frequency.nii.gz``; 0: none).
    """
    logging.basicConfig(
        level=getattr(logging, str(log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg = CohortConfig(net2_rate=float(net2_rate), activity_shape=float(activity_shape))
    path = generate_cohort(
        out,
        int(n),
        int(seed),
        shape=shape,
        spacing=spacing,
        horizon_weeks=horizon_weeks,
        split=tuple(float(s) for s in split),
        workers=int(workers),
        config=cfg,
        progress=progress,
        oracle_draws=int(oracle_draws),
        outcome_draws=int(outcome_draws),
    )
    return str(path)
