"""One synthetic patient: the draws, the lesion history, the counterfactual thinning, the visits' images and
the truth record (:func:`generate_case`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scripts.bench.synthetic.anatomy import Anatomy, Grid, as_triple, build_anatomy, plane_wave_field
from scripts.bench.synthetic.config import GENERATOR_VERSION, TISSUE_LABELS, VISIT_INTERVAL_WEEKS, CohortConfig
from scripts.bench.synthetic.disease import Lesion, LesionPlacer, lesion_maps, patient_efficacy
from scripts.bench.synthetic.mri import synthesize_mri
from scripts.bench.synthetic.oracle import coverage_map, draw_detection, draw_outcomes, region_prior_map
from scripts.runtime.constants import ARMS, IMAGE_KEYS, MRI_MODALITIES, VISITS
from scripts.runtime.lesions import count_lesions


@dataclass
class SyntheticCase:
    """Everything generated for one case, in memory."""

    case_id: str
    grid: Grid
    images: dict[str, np.ndarray]  # IMAGE_KEYS -> array (int16 MRI, uint8 masks)
    counterfactual: dict[str, np.ndarray]  # arm -> uint8 NET2 mask at the forecast visit
    tissue: np.ndarray
    treatment: str
    horizon_weeks: float
    truth: dict[str, Any] = field(default_factory=dict)
    location_oracle: np.ndarray | None = None  # c(v): P(NET2 at v | arm) = (1 - e_p(arm)) c(v), see oracle.py
    outcome_frequency: dict[str, np.ndarray] | None = None  # arm -> share of independent outcome draws with NET2 at v
    region_prior: np.ndarray | None = None  # the generator's region weights only, scaled like c(v), see oracle.py


def case_id_of(index: int) -> str:
    return f"syn{index:04d}"


def horizon_choices(horizon_weeks: float | Sequence[float] | str) -> list[float]:
    if isinstance(horizon_weeks, str):
        horizon_weeks = [v for v in horizon_weeks.strip("[]()").split(",") if v.strip()]
    values = [float(horizon_weeks)] if isinstance(horizon_weeks, (int, float)) else [float(v) for v in horizon_weeks]
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"horizon_weeks must be positive, got {horizon_weeks!r}")
    return values


def as_number(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


@dataclass
class PatientDraws:
    """The grid-independent draws of one patient (stream ``patient``): age, disease duration, hidden activity,
    efficacy, and the event counts and times of the Poisson processes (before visit 0, past interval, future)."""

    age: float
    duration: float
    activity: float
    activity_future: float
    atrophy: float
    efficacy_exponent: float
    efficacy: dict[str, float]
    n_chronic: int
    recent_onset: np.ndarray
    recent_gd: np.ndarray
    lam_past: float
    past_onset: np.ndarray
    past_gd: np.ndarray
    past_kinds: np.ndarray
    lam_future: float
    future_u: np.ndarray
    future_kinds: np.ndarray


def draw_patient(
    rng: np.random.Generator, cfg: CohortConfig, arm_eff: dict[str, float], horizon: float
) -> PatientDraws:
    """Draw one patient's hidden activity, efficacy and lesion-event processes."""
    age = float(rng.uniform(18, 55))
    duration = float(rng.gamma(2.0, 0.5))  # disease duration factor, mean 1
    activity = float(rng.gamma(cfg.activity_shape, 1.0 / cfg.activity_shape))
    drift = cfg.activity_drift_sd
    activity_future = activity * math.exp(drift * rng.normal() - drift**2 / 2)
    atrophy = float(
        np.clip(
            0.35 * (age - 18) / 37 + 0.3 * min(duration, 2.5) / 2.5 + 0.15 * min(activity, 3) / 3 + rng.normal(0, 0.08),
            0.0,
            1.0,
        )
    )
    k_p = float(
        np.clip(
            (activity_future / cfg.efficacy_reference_activity) ** cfg.efficacy_gamma
            * math.exp(cfg.efficacy_sd * rng.normal()),
            0.25,
            4.0,
        )
    )
    efficacy = patient_efficacy(arm_eff, k_p)
    rate_per_week = cfg.net2_rate / 24.0
    n_chronic = int(rng.poisson(cfg.baseline_lesions * duration * (0.35 + 0.65 * min(activity, 4.0))))
    # Recent lesions before visit 0, the past interval (visit 0 -> 1) and the future pool: Poisson processes.
    n_recent = int(rng.poisson(rate_per_week * activity * cfg.recent_window_weeks))
    recent_onset = -rng.uniform(0, cfg.recent_window_weeks, n_recent)
    recent_gd = rng.gamma(2.0, cfg.gd_duration_mean_weeks / 2, n_recent)
    lam_past = rate_per_week * activity * VISIT_INTERVAL_WEEKS
    n_past = int(rng.poisson(lam_past))
    past_onset = rng.uniform(0, VISIT_INTERVAL_WEEKS, n_past)
    past_gd = rng.gamma(2.0, cfg.gd_duration_mean_weeks / 2, n_past)
    past_kinds = np.where(rng.uniform(size=n_past) < cfg.enlarging_fraction, "enlarging", "new")
    lam_future = rate_per_week * activity_future * horizon
    n_future = int(rng.poisson(lam_future))
    future_u = rng.uniform(size=n_future)
    future_kinds = np.where(rng.uniform(size=n_future) < cfg.enlarging_fraction, "enlarging", "new")
    return PatientDraws(
        age,
        duration,
        activity,
        activity_future,
        atrophy,
        k_p,
        efficacy,
        n_chronic,
        recent_onset,
        recent_gd,
        lam_past,
        past_onset,
        past_gd,
        past_kinds,
        lam_future,
        future_u,
        future_kinds,
    )


def place_head(
    rng: np.random.Generator, shape3: tuple[int, ...], spacing3: tuple[float, ...], atrophy: float
) -> tuple[Grid, np.ndarray, Anatomy]:
    """The case's grid (random translation), head position and anatomy (stream ``anatomy``)."""
    translation = rng.uniform(-5.0, 5.0, 3)
    grid = Grid(
        shape3, spacing3, tuple(float(v) for v in -(np.asarray(shape3) - 1) / 2 * np.asarray(spacing3) + translation)
    )
    # Head centre in the grid frame: 14 mm above the grid centre so the cerebrum and cerebellum fit, plus jitter.
    head_offset = (np.asarray(shape3) - 1) / 2 * np.asarray(spacing3) + np.array([0.0, 0.0, 14.0])
    head_offset = head_offset + rng.uniform(-3, 3, 3)
    return grid, head_offset, build_anatomy(rng, grid, atrophy, head_offset)


def _union(lesions: Sequence[Lesion], n_vox: int) -> np.ndarray:
    mask = np.zeros(n_vox, bool)
    for les in lesions:
        mask[les.voxels] = True
    return mask


@dataclass
class LesionHistory:
    """The lesions of one patient up to the forecast visit (flat masks over the grid's voxels)."""

    chronic: list[Lesion]
    recent: list[Lesion]  # formed shortly before visit 0
    past: list[Lesion]  # NET2 events between visit 0 and visit 1
    future: list[Lesion]  # the pool of candidate future NET2 events (placebo rate)
    t2_0: np.ndarray
    t2_1: np.ndarray
    net2_1: np.ndarray
    enhancing_0: set[int]  # indices into chronic + recent of the lesions enhancing at visit 0
    enhancing_1: set[int]  # indices into chronic + recent + past of those enhancing at visit 1

    @property
    def baseline(self) -> list[Lesion]:
        return self.chronic + self.recent


def place_lesions(placer: LesionPlacer, patient: PatientDraws, shape3: tuple[int, ...]) -> LesionHistory:
    """Place the chronic, recent, past and future lesions in order (stream ``lesions``, through ``placer``)."""
    n_vox = int(np.prod(shape3))
    chronic = placer.chronic(patient.n_chronic)
    chronic_mask = _union(chronic, n_vox)
    recent = placer.place_events(["new"] * patient.recent_onset.size, chronic_mask.reshape(shape3))
    for les, onset, gd in zip(recent, patient.recent_onset, patient.recent_gd, strict=True):
        les.kind, les.onset_week, les.gd_duration_weeks = "recent", float(onset), float(gd)
    t2_0 = chronic_mask | _union(recent, n_vox)
    enh0 = {len(chronic) + i for i, les in enumerate(recent) if -les.onset_week < les.gd_duration_weeks}
    recent_mask = _union(recent, n_vox)
    past = placer.place_events(list(patient.past_kinds), t2_0.reshape(shape3), recent_mask.reshape(shape3))
    for les, onset, gd in zip(past, patient.past_onset, patient.past_gd, strict=True):
        les.onset_week, les.gd_duration_weeks = float(onset), float(gd)
    net2_1 = _union(past, n_vox)
    t2_1 = t2_0 | net2_1
    n_baseline = len(chronic) + len(recent)
    enh1 = {
        n_baseline + i for i, les in enumerate(past) if VISIT_INTERVAL_WEEKS - les.onset_week < les.gd_duration_weeks
    }
    future = placer.place_events(list(patient.future_kinds), t2_1.reshape(shape3), net2_1.reshape(shape3))
    return LesionHistory(chronic, recent, past, future, t2_0, t2_1, net2_1, enh0, enh1)


def thin_counterfactuals(
    future: Sequence[Lesion], future_u: np.ndarray, efficacy: dict[str, float], shape3: tuple[int, ...]
) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Per arm, the NET2 mask of the future events that happen under it (``u_i < 1 - e_p(arm)``) and their indices."""
    n_vox = int(np.prod(shape3))
    counterfactual: dict[str, np.ndarray] = {}
    kept: dict[str, list[int]] = {}
    for arm in ARMS:
        keep = [i for i in range(len(future)) if future_u[i] < 1.0 - efficacy[arm]]
        mask = np.zeros(n_vox, np.uint8)
        for i in keep:
            mask[future[i].voxels] = 1
        counterfactual[arm] = mask.reshape(shape3)
        kept[arm] = keep
    return counterfactual, kept


def render_visits(
    rng: np.random.Generator, grid: Grid, anatomy: Anatomy, history: LesionHistory, head_offset: np.ndarray
) -> dict[str, np.ndarray]:
    """The images of both past visits, :data:`IMAGE_KEYS` (stream ``imaging``): MRI with scanner gains and bias
    fields, the T2 and Gd lesion masks, and the past NET2 mask."""
    shape3 = grid.shape
    n_vox = int(np.prod(shape3))
    rotation = np.eye(3)  # bias fields are defined in the scanner frame
    gains = {m: float(math.exp(rng.uniform(math.log(100.0), math.log(3000.0)))) for m in MRI_MODALITIES}
    axes = grid.axes_mm()
    bias_base = {}
    for m in MRI_MODALITIES:
        field_m, _ = plane_wave_field(rng, axes, rotation, head_offset, 6, (150.0, 400.0))
        bias_base[m] = float(rng.uniform(0.05, 0.15)) * field_m
    images: dict[str, np.ndarray] = {}
    visit_lesions = {
        0: (history.baseline, history.enhancing_0, history.t2_0),
        1: (history.baseline + history.past, history.enhancing_1, history.t2_1),
    }
    for v in VISITS:
        lesions, enh, t2 = visit_lesions[v]
        maps = lesion_maps(lesions, n_vox, enh)
        visit_gains = {m: g * math.exp(rng.normal(0, 0.08)) for m, g in gains.items()}
        mri = synthesize_mri(rng, grid, anatomy, maps, visit_gains, bias_base, rotation, head_offset)
        for m in MRI_MODALITIES:
            images[f"{m}_{v}"] = mri[m]
        images[f"t2les_{v}"] = t2.reshape(shape3).astype(np.uint8)
        images[f"gadles_{v}"] = (maps["gd"] > 0).reshape(shape3).astype(np.uint8)
    images["net2_1"] = history.net2_1.reshape(shape3).astype(np.uint8)
    assert set(images) == set(IMAGE_KEYS)
    return images


def describe_lesion(les: Lesion, idx: int, grid: Grid) -> dict[str, Any]:
    """The truth record of one lesion (kind, region, volume, centroid in world mm, onset, parent)."""
    ijk = np.stack(np.unravel_index(les.voxels, grid.shape), 1)
    d = {
        "index": idx,
        "kind": les.kind,
        "region": les.region,
        "volume_mm3": round(les.voxels.size * grid.voxel_volume, 3),
        "nominal_volume_mm3": round(les.nominal_volume_mm3, 3),
        "n_voxels": int(les.voxels.size),
        "centroid_mm": [round(float(c), 3) for c in ijk.mean(0) * np.asarray(grid.spacing) + np.asarray(grid.origin)],
    }
    if les.onset_week is not None:
        d["onset_week"] = round(les.onset_week, 3)
    if les.parent is not None:
        d["parent_component"] = les.parent
    return d


def generate_case(
    case_index: int,
    seed: int,
    *,
    shape: int | Sequence[int] = 64,
    spacing: float | Sequence[float] = 3.0,
    horizon_weeks: float | Sequence[float] = 24.0,
    config: CohortConfig | None = None,
    treatment: str | None = None,
    oracle_draws: int = 0,
    outcome_draws: int = 0,
) -> SyntheticCase:
    """Generate one patient from ``SeedSequence([seed, case_index])`` (independent of the cohort size).

    ``treatment`` forces the factual arm (else drawn uniformly, as in a randomized trial); forcing it changes
    nothing but the factual label, because every random stream is separate. ``oracle_draws`` > 0 adds the location
    oracle (:func:`scripts.bench.synthetic.oracle.coverage_map`, that many Monte-Carlo sequences) and
    ``outcome_draws`` > 0 that many independent outcome draws (:func:`scripts.bench.synthetic.oracle.draw_outcomes`),
    each from a stream of its own, so neither changes anything else of the case.
    """
    cfg = config or CohortConfig()
    shape3 = as_triple(shape, int, "shape")
    spacing3 = as_triple(spacing, float, "spacing")
    arm_eff = cfg.arm_efficacy()
    # Independent streams, so e.g. the grid (which changes lesion placement) never changes the patient draws.
    s_patient, s_anatomy, s_lesions, s_imaging, s_arm, s_horizon, s_oracle, s_outcomes = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, case_index]).spawn(8)
    )
    case_id = case_id_of(case_index)
    horizons = horizon_choices(horizon_weeks)
    horizon = horizons[int(s_horizon.integers(len(horizons)))]
    if treatment is None:
        treatment = ARMS[int(s_arm.integers(len(ARMS)))]
    elif treatment not in ARMS:
        raise ValueError(f"unknown treatment {treatment!r}; valid arms are: {', '.join(ARMS)}")

    patient = draw_patient(s_patient, cfg, arm_eff, horizon)
    grid, head_offset, anatomy = place_head(s_anatomy, shape3, spacing3, patient.atrophy)
    history = place_lesions(LesionPlacer(grid, anatomy, cfg, s_lesions), patient, shape3)
    counterfactual, kept = thin_counterfactuals(history.future, patient.future_u, patient.efficacy, shape3)
    images = render_visits(s_imaging, grid, anatomy, history, head_offset)
    truth = case_truth(
        case_id, seed, case_index, treatment, horizon, patient, grid, anatomy, history, kept, images, arm_eff
    )
    case = SyntheticCase(case_id, grid, images, counterfactual, anatomy.tissue, treatment, horizon, truth)
    prior, recent = history.t2_1.reshape(shape3), history.net2_1.reshape(shape3)
    keep = {arm: 1.0 - patient.efficacy[arm] for arm in ARMS}
    if oracle_draws > 0:
        case.location_oracle = coverage_map(
            LesionPlacer(grid, anatomy, cfg, s_oracle),
            prior,
            recent,
            patient.lam_future,
            cfg.enlarging_fraction,
            int(oracle_draws),
        )
        truth["location_oracle"] = {"draws": int(oracle_draws), "keep_probability": keep}
        case.region_prior = region_prior_map(
            LesionPlacer(grid, anatomy, cfg, s_oracle), float(case.location_oracle.sum(dtype=np.float64))
        )
    if outcome_draws > 0:
        outcomes = draw_outcomes(
            LesionPlacer(grid, anatomy, cfg, s_outcomes),
            prior,
            recent,
            patient.lam_future,
            cfg.enlarging_fraction,
            keep,
            int(outcome_draws),
        )
        case.outcome_frequency = {
            arm: masks.mean(0, dtype=np.float64).astype(np.float32) for arm, masks in outcomes.items()
        }
        truth["outcome_draws"] = {
            "draws": int(outcome_draws),
            "arms": list(ARMS),
            "factual_detection": draw_detection(outcomes[treatment], counterfactual[treatment]),
        }
    return case


def case_truth(
    case_id: str,
    seed: int,
    case_index: int,
    treatment: str,
    horizon: float,
    patient: PatientDraws,
    grid: Grid,
    anatomy: Anatomy,
    history: LesionHistory,
    kept: dict[str, list[int]],
    images: dict[str, np.ndarray],
    arm_eff: dict[str, float],
) -> dict[str, Any]:
    """The content of ``truth/<id>.json``: true expected counts and counts of every arm, the patient's hidden
    draws, the past lesion figures and every lesion event."""
    vv = grid.voxel_volume
    future_desc = []
    for i, les in enumerate(history.future):
        d = describe_lesion(les, i, grid)
        d["u"] = round(float(patient.future_u[i]), 6)
        d["arms"] = [arm for arm in ARMS if i in kept[arm]]
        future_desc.append(d)
    n_t2_0, n_t2_1 = count_lesions(images["t2les_0"]), count_lesions(images["t2les_1"])
    efficacy, lam_future = patient.efficacy, patient.lam_future
    return {
        "id": case_id,
        "treatment": treatment,
        "horizon_weeks": as_number(horizon),
        "activity": round(patient.activity, 6),
        "activity_future": round(patient.activity_future, 6),
        "expected_count": {arm: lam_future * (1.0 - efficacy[arm]) for arm in ARMS},
        "counts": {arm: len(kept[arm]) for arm in ARMS},
        "efficacy": efficacy,
        "efficacy_exponent": patient.efficacy_exponent,
        "arm_efficacy": arm_eff,
        "lambda_placebo": lam_future,
        "past": {
            "expected_net2_count": patient.lam_past,
            "net2_count": len(history.past),
            "t2_lesion_count_0": int(n_t2_0),
            "t2_lesion_count_1": int(n_t2_1),
            "t2_volume_mm3_0": float(history.t2_0.sum() * vv),
            "t2_volume_mm3_1": float(history.t2_1.sum() * vv),
            "gd_count_0": len(history.enhancing_0),
            "gd_count_1": len(history.enhancing_1),
            "chronic_lesions_drawn": patient.n_chronic,
            "recent_lesions": [describe_lesion(les, i, grid) for i, les in enumerate(history.recent)],
            "net2_events": [describe_lesion(les, i, grid) for i, les in enumerate(history.past)],
        },
        "future_events": future_desc,
        "patient": {
            "age": round(patient.age, 2),
            "disease_duration_factor": round(patient.duration, 4),
            "atrophy": round(patient.atrophy, 4),
            **{k: round(v, 4) for k, v in anatomy.params.items()},
        },
        "tissue_labels": {str(k): v for k, v in TISSUE_LABELS.items()},
        "grid": {"shape": list(grid.shape), "spacing": list(grid.spacing), "affine": grid.affine.tolist()},
        "mri_dtype": "int16",
        "seed": int(seed),
        "case_index": int(case_index),
        "generator_version": GENERATOR_VERSION,
    }
