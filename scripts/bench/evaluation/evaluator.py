"""Evaluation of NET2 forecasts on a datalist split: metrics, baselines, ``metrics.json``, ``report.md`` and plots.

Command (contract)::

    python -m monai.bundle run --config_file "['bundle/configs/inference.json','bundle/configs/evaluate.json']" \\
        --datalist D --output_dir O [--deterministic_ckpt DET.pt] [--unaware_ckpt UNAWARE.pt]

forecasts the ``testing`` cases with :class:`scripts.runtime.forecast.ForecastRunner` (its usual per-case outputs) and
evaluates them from the same samples: :class:`Evaluator` listens to the runner (one
:class:`~scripts.runtime.forecast.CaseForecast` per case), so it sees the K binary samples of every arm without them
being saved. At the end it writes ``O/metrics.json``, ``O/report.md`` and the
plots ``O/reliability.png``, ``O/count_scatter.png``, ``O/effects.png`` and ``O/roc.png`` (each atomically).

What is compared (everything on the case's reference grid, the grid of ``flair_1``; working-grid samples are put
there with nearest-neighbour resampling, probability maps with linear interpolation):

* the *factual* forecast (the case's ``treatment`` arm) against the observed NET2 mask ``label``;
* with a synthetic truth file ``<datalist folder>/truth/<id>.json``: every forecast arm against the generator's
  true expected count and true counterfactual mask of that arm, the effects against placebo and the arm ranking.

Methods: the diffusion model; the deterministic network (``DeterministicForecastNet`` thresholded at 0.5); the
diffusion model trained without treatment (forecast with the null treatment token, so every arm gets the same
forecast); the population baseline (the arm's NET2 rate in the training split); the negative-binomial regression on
the past lesion counts; the observable reference (the generator's posterior-predictive count given the past counts);
the oracle (the generator's true expected count). The conventions (:data:`CONVENTIONS`) are written into
``metrics.json`` and the report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scripts.bench.evaluation.baselines import (
    ArmPrediction,
    DeterministicBaseline,
    ToReference,
    UnawareBaseline,
    count_native,
    diffusion_predictions,
    load_mask_on,
    mask_on_grid,
    poisson_predictions,
    reference_predictions,
)
from scripts.bench.evaluation.conventions import CONVENTIONS, COUNTERFACTUAL_METHODS, DISTANCE_MM, METHOD_LABELS
from scripts.bench.evaluation.location import ORACLE, REGION_PRIOR, case_location
from scripts.bench.evaluation.plots import evaluation_figures
from scripts.bench.evaluation.regression import CountRegression, observable_features
from scripts.bench.evaluation.report import fmt, render_report
from scripts.bench.evaluation.scores import (
    ReliabilityAccumulator,
    generalized_energy_distance,
    lesion_table,
    lesion_voxel_counts,
    paired_comparison,
    population_rates,
    ranking_agreement,
)
from scripts.bench.evaluation.store import file_digest, json_default, strict_json
from scripts.bench.evaluation.summary import (
    case_summary,
    summarize_counterfactual,
    summarize_factual,
    summarize_location,
)
from scripts.bench.synthetic.reference import ObservableReference
from scripts.runtime.constants import ARMS
from scripts.runtime.datalist import load_datalist
from scripts.runtime.errors import CaseError, ForecastFailed
from scripts.runtime.files import write_text_atomic
from scripts.runtime.forecast import CaseForecast, ForecastRunner
from scripts.runtime.grids import to_reference_grid
from scripts.runtime.inferer import ThresholdInferer
from scripts.runtime.lesions import count_lesions, load_mask, voxel_volume_mm3
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class Evaluator:
    """Listener of :meth:`~scripts.runtime.forecast.ForecastRunner.run`: scores forecasts and baselines, then writes
    ``metrics.json``, ``report.md`` and the plots (module docstring; conventions in :data:`CONVENTIONS`).

    Args:
        datalist: the datalist (its ``training`` split feeds the population baseline unless ``population_datalist``
            is given; ``truth/<id>.json`` next to it, when present, the counterfactual and oracle sections).
        output_dir: where the forecasts and the evaluation go.
        split: the evaluated split.
        device: torch device of the baseline networks.
        deterministic_network: trained ``DeterministicForecastNet`` (None: baseline not provided).
        deterministic_inferer: ``ThresholdInferer(return_probability=True)``.
        unaware_network: diffusion network trained with the treatment always dropped (None: not provided).
        unaware_inferer: a ``ForecastInferer`` without arms (samples under the null treatment token).
        truth_dir: folder of the truth files (default ``<datalist folder>/truth``).
        num_bins: reliability bins.
        distance_mm: the "within" distance of the location summary.
        model: a name for the evaluated weights (shown in the report).
        figures: write the PNG plots.
        checkpoints: method -> checkpoint file of the networks (``diffusion``, ``deterministic``, ``unaware``), shown
            in the report; their SHA-256 are part of the resume key.
        resume: read back the cases a previous run with the same key already scored (``O/evaluation_cases/<id>.json``)
            instead of forecasting them again, so a long evaluation that was stopped continues where it stopped.
        resume_key: further settings that change the forecasts (e.g. working grid); the key also holds the datalist,
            split, arms, samples, steps, guidance, seed and the checkpoints' digests.
        population_datalist: datalist whose ``training`` split feeds the population baseline (default ``datalist``;
            set it when the evaluated cohort is a separate test-only datalist).
        probability_map: the probability map of the treatment-unaware baseline, as the evaluated model's
            (``inference.json``'s ``probability_map``; the evaluated model's own comes with its forecast).
    """

    CASES_FOLDER = "evaluation_cases"

    def __init__(
        self,
        datalist: str | os.PathLike,
        output_dir: str | os.PathLike,
        split: str = "testing",
        device: str | torch.device = "cpu",
        deterministic_network: torch.nn.Module | None = None,
        deterministic_inferer: Any = None,
        unaware_network: torch.nn.Module | None = None,
        unaware_inferer: Any = None,
        truth_dir: str | os.PathLike | None = None,
        num_bins: int = 10,
        distance_mm: float = DISTANCE_MM,
        model: str | None = None,
        figures: bool = True,
        checkpoints: Mapping[str, str | os.PathLike | None] | None = None,
        resume: bool = True,
        resume_key: Mapping[str, Any] | None = None,
        population_datalist: str | os.PathLike | None = None,
        probability_map: str = "samples",
    ) -> None:
        self.datalist = Path(datalist)
        self.output_dir = Path(output_dir)
        self.split = split
        self.device = torch.device(device)
        self.deterministic: DeterministicBaseline | None = None
        if deterministic_network is not None:
            self.deterministic = DeterministicBaseline(
                deterministic_network, deterministic_inferer or ThresholdInferer(return_probability=True), device
            )
        self.unaware: UnawareBaseline | None = None
        if unaware_network is not None:
            if unaware_inferer is None:
                raise ValueError("unaware_network needs an unaware_inferer (a ForecastInferer without arms)")
            self.unaware = UnawareBaseline(unaware_network, unaware_inferer, device, probability_map)
        self.truth_dir = Path(truth_dir) if truth_dir is not None else self.datalist.parent / "truth"
        self.num_bins = int(num_bins)
        self.distance_mm = float(distance_mm)
        self.model = model
        self.figures = figures
        self.records: dict[str, dict[str, Any]] = {}
        self.calibration: dict[tuple[str, str], ReliabilityAccumulator] = {}
        self.notes: list[str] = []
        self.population: dict[str, Any] | None = None
        self.population_note: str | None = None
        self.regression: CountRegression | None = None
        self.regression_note: str | None = None
        self.reference = ObservableReference()
        self.arms: list[str] = []
        self.num_samples: int | None = None
        self.failed: list[str] = []
        self.checkpoints = {k: None if v is None else str(v) for k, v in (checkpoints or {}).items()}
        self.resume = bool(resume)
        self.resume_key = dict(resume_key or {})
        self.key: dict[str, Any] | None = None
        self.population_datalist = Path(population_datalist) if population_datalist is not None else self.datalist
        self.resumed: list[str] = []
        self._started = time.perf_counter()

    # ---- the baselines fitted on the training split ----

    def prepare(self) -> None:
        """Fit the population baseline and the count regression on the training split (once)."""
        if self.population is not None or self.population_note is not None:
            return
        try:
            errors: list[CaseError] = []
            cases = [
                c
                for c in load_datalist(self.population_datalist, "training", errors=errors)
                if c.get("label") and c.get("treatment")
            ]
            observations, rows = [], []
            for case in tqdm(cases, desc="population baseline and regression: training cases", unit="case"):
                count = count_native(case["label"])
                observations.append((case["treatment"], float(case["horizon_weeks"]), count))
                rows.append((observable_features(case), case["treatment"], float(case["horizon_weeks"]), count))
            self._fit_regression(rows)
            self.population = population_rates(observations)
            self.population["n_training_cases"] = len(observations)
            self.population["datalist"] = str(self.population_datalist)
        except (ValueError, OSError) as err:
            self.population_note = f"not available: {err}"
            logger.warning("population baseline %s", self.population_note)

    def _fit_regression(self, rows: list[tuple[dict[str, float], str, float, int]]) -> None:
        try:
            self.regression = CountRegression.fit(rows)
        except ValueError as err:
            self.regression_note = f"not available: {err}"
            logger.warning("regression baseline %s", self.regression_note)

    # ---- the hook ----

    def __call__(self, result: CaseForecast) -> None:
        """Score one forecast case (a listener of :meth:`ForecastRunner.run`)."""
        case, data, samples, forecast = result.case, result.data, result.samples, result.forecast
        probs, regions, allowed = result.probs, result.regions, result.allowed
        self.prepare()
        case_id = str(case["id"])
        arms = list(forecast["arms"])
        self.arms = self.arms or arms
        self.num_samples = int(forecast["num_samples"])
        working_affine = np.asarray(data["working_affine"], dtype=np.float64)
        affine = np.asarray(data["reference_affine"], dtype=np.float64)
        shape = [int(s) for s in np.asarray(data["reference_shape"]).reshape(-1)]
        horizon = float(forecast["horizon_weeks"])

        def to_ref(volume: np.ndarray, mode: str) -> np.ndarray:
            return to_reference_grid(np.asarray(volume, dtype=np.float32), working_affine, affine, shape, mode=mode)

        regions_ref = np.rint(to_ref(regions, "nearest")).astype(np.uint8)
        truth_path = self.truth_dir / f"{case_id}.json"
        truth = json.loads(truth_path.read_text()) if truth_path.is_file() else None
        factual = case.get("treatment") or (truth or {}).get("treatment")
        record: dict[str, Any] = {
            "id": case_id,
            "treatment": factual,
            "horizon_weeks": horizon,
            "truth_file": truth is not None,
            "methods": {},
        }

        # samples go to the reference grid only where they are compared (GED): reference grids can be large
        evaluated = case.get("label") is not None and factual in arms
        sample_arms = set(arms) if truth is not None else {factual} if evaluated else set()
        # the baselines get the restriction the diffusion samples got (``allowed``)
        predictions = self._predict(
            case, data, samples, forecast, probs, arms, truth, horizon, to_ref, sample_arms, allowed, result.masks
        )
        pending: list[tuple[tuple[str, str], np.ndarray, np.ndarray, np.ndarray]] = []

        if case.get("label") is None:
            record["note"] = "no label: left out of the factual metrics"
        elif factual is None:
            record["note"] = "no treatment: left out of the factual metrics"
        elif factual not in arms:
            record["note"] = f"factual arm {factual} not forecast: left out of the factual metrics"
        else:
            native, native_affine = load_mask(case["label"])  # read once: counted on its own grid, scored on ours
            label = mask_on_grid(native, native_affine, affine, shape)
            record["true_count"] = count_lesions(native)
            record["active"] = record["true_count"] > 0
            record["true_volume_mm3"] = float(label.sum() * voxel_volume_mm3(affine))
            domain = (regions_ref > 0) | label
            for method, per_arm in predictions.items():
                if factual in per_arm:
                    record["methods"][method] = self._score_factual(
                        per_arm[factual], label, affine, regions_ref, domain, method, factual, pending
                    )
            maps = {
                method: per_arm[factual].prob
                for method, per_arm in predictions.items()
                if factual in per_arm and per_arm[factual].prob is not None
            }
            if maps:
                record["location"] = case_location(
                    maps, label, regions_ref, factual, truth, self.truth_dir.parent, affine, shape
                )
            record["lesion_sizes"] = {
                "sampled": [s for sample in samples[arms.index(factual)] for s in lesion_voxel_counts(sample)],
                "true": lesion_voxel_counts(native),
            }
        if truth is not None:
            record["counterfactual"] = self._score_counterfactual(predictions, truth, affine, shape, arms)
        calibration: dict[tuple[str, str], ReliabilityAccumulator] = {}
        for key, prob, label, where in pending:
            calibration.setdefault(key, ReliabilityAccumulator(self.num_bins)).update(prob, label, where)
        # JSON round trip: a case scored now and one read back by a resumed run are the same record
        text = json.dumps(
            strict_json(
                {
                    "key": self.key,
                    "record": record,
                    "calibration": {
                        f"{method}|{group}": acc.state_dict() for (method, group), acc in calibration.items()
                    },
                }
            ),
            default=json_default,
            allow_nan=False,
        )
        if self.key is not None:  # inside run(): keep the case for a resumed run
            write_text_atomic(self.output_dir / self.CASES_FOLDER / f"{case_id}.json", text)
        self._add(json.loads(text))

    def _add(self, state: Mapping[str, Any]) -> None:
        """Count one scored case (its record and voxel statistics); only a fully scored case gets here."""
        record = state["record"]
        for name, acc in state["calibration"].items():
            method, group = name.split("|", 1)
            self.calibration.setdefault((method, group), ReliabilityAccumulator(self.num_bins)).merge(
                ReliabilityAccumulator.from_state_dict(acc)
            )
        self.records[record["id"]] = record

    def _predict(
        self,
        case: Mapping[str, Any],
        data: Mapping[str, Any],
        samples: np.ndarray,
        forecast: Mapping[str, Any],
        probs: Mapping[str, np.ndarray],
        arms: Sequence[str],
        truth: Mapping[str, Any] | None,
        horizon: float,
        to_ref: ToReference,
        sample_arms: set[str],
        allowed: np.ndarray | None = None,
        masks: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, dict[str, ArmPrediction]]:
        """Every available method's forecast of this case, per arm (reference-grid samples for ``sample_arms``);
        ``allowed`` (working grid), where given, restricts the baseline networks' forecasts as the samples were."""
        out = {"diffusion": diffusion_predictions(samples, forecast, probs, arms, to_ref, sample_arms, masks)}
        if self.deterministic is not None:
            out["deterministic"] = self.deterministic.predict(data["cond"], horizon, arms, to_ref, allowed)
        if self.unaware is not None:
            out["unaware"] = self.unaware.predict(
                data["cond"], horizon, arms, data["working_affine"], to_ref, bool(sample_arms), allowed
            )
        if self.population is not None:
            rates = self.population["rate_per_week"]
            out["population"] = poisson_predictions({arm: rates[arm] * horizon for arm in arms}, arms)
        features = observable_features(case) if self.regression is not None or truth is not None else {}
        if self.regression is not None:
            out["regression"] = self.regression.predict(features, arms, horizon)
        if truth is not None:  # the reference is the generator's model: synthetic cohorts only
            out["reference"] = reference_predictions(self.reference, features, arms, horizon)
            out["oracle"] = poisson_predictions(truth["expected_count"], arms)
        return out

    def _score_factual(
        self,
        pred: ArmPrediction,
        label: np.ndarray,
        affine: np.ndarray,
        regions: np.ndarray,
        domain: np.ndarray,
        method: str,
        arm: str,
        pending: list[tuple[tuple[str, str], np.ndarray, np.ndarray, np.ndarray]],
    ) -> dict[str, Any]:
        """Factual figures of one method; its voxel probabilities are queued in ``pending`` for the calibration."""
        out: dict[str, Any] = {
            "expected_count": float(pred.expected_count),
            "p_active": float(pred.p_active),
            "interval_90": pred.interval_90,
        }
        if pred.mask is not None:
            out["lesions"] = lesion_table(pred.mask, label, affine, regions)
        if pred.samples is not None:
            out["ged"] = generalized_energy_distance(pred.samples, label)
            # every sample is a forecast of its own: lesion-wise detection of each, summed (the mask of a sampled
            # forecast holds only voxels most samples agree on, which new lesions at uncertain places never are)
            keys = ("tp", "fp", "fn", "n_forecast_lesions", "n_true_lesions", "matched_forecast_lesions")
            per_sample = [lesion_table(sample, label, affine) for sample in pred.samples]
            out["sample_lesions"] = {k: int(sum(t[k] for t in per_sample)) for k in keys}
            out["sample_lesions"]["n_samples"] = len(per_sample)
        if pred.prob is not None:
            where = domain | (pred.prob > 0)
            pending += [((method, group), pred.prob, label, where) for group in ("all", arm)]
        return out

    def _score_counterfactual(
        self,
        predictions: Mapping[str, Mapping[str, ArmPrediction]],
        truth: Mapping[str, Any],
        affine: np.ndarray,
        shape: Sequence[int],
        arms: Sequence[str],
    ) -> dict[str, Any]:
        expected = {arm: float(v) for arm, v in truth["expected_count"].items()}
        efficacy = {arm: float(v) for arm, v in truth.get("efficacy", {}).items()}
        labels = truth.get("counterfactual_labels", {})
        masks: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for arm in arms:
            if arm in labels:
                path = Path(labels[arm])
                path = path if path.is_absolute() else self.truth_dir.parent / path
                masks[arm] = load_mask_on(path, affine, shape)
                counts[arm] = int(truth.get("counts", {}).get(arm, count_lesions(masks[arm])))
        out: dict[str, Any] = {}
        for method in COUNTERFACTUAL_METHODS:
            per_arm = predictions.get(method)
            if not per_arm:
                continue
            cells: dict[str, dict[str, Any]] = {}
            base = per_arm.get("placebo")
            for arm in arms:
                if arm not in expected:
                    continue
                pred = per_arm[arm]
                cell: dict[str, Any] = {
                    "predicted_count": float(pred.expected_count),
                    "true_expected_count": expected[arm],
                    "true_count": counts.get(arm),
                }
                if arm in masks and pred.mask is not None:
                    table = lesion_table(pred.mask, masks[arm], affine)
                    cell.update(dice=table["dice"], f1=table["f1"])
                if arm in masks and pred.samples is not None:
                    cell["ged"] = generalized_energy_distance(pred.samples, masks[arm])
                if base is not None and "placebo" in expected:
                    cell["predicted_ratio"] = (
                        pred.expected_count / base.expected_count if base.expected_count > 0 else None
                    )
                    cell["true_ratio"] = expected[arm] / expected["placebo"] if expected["placebo"] > 0 else None
                    cell["predicted_difference"] = float(pred.expected_count - base.expected_count)
                    cell["true_difference"] = expected[arm] - expected["placebo"]
                cells[arm] = cell
            ranking = ranking_agreement({a: c["predicted_count"] for a, c in cells.items()}, efficacy)
            out[method] = {"arms": cells, "ranking": ranking}
        return out

    # ---- results ----

    def results(self) -> dict[str, Any]:
        """The content of ``metrics.json``."""
        records = list(self.records.values())
        factual = [r for r in records if "true_count" in r]
        arms_seen = [a for a in ARMS if any(r["treatment"] == a for r in factual)]

        def factual_section(method: str) -> dict[str, Any]:
            return {
                "overall": summarize_factual(factual, method, self.calibration.get((method, "all")), self.distance_mm),
                "per_arm": {
                    arm: summarize_factual(
                        [r for r in factual if r["treatment"] == arm],
                        method,
                        self.calibration.get((method, arm)),
                        self.distance_mm,
                    )
                    for arm in arms_seen
                },
            }

        with_truth = [r for r in records if r.get("counterfactual")]
        truth_note = (
            None
            if with_truth
            else (
                f"no truth files in {self.truth_dir}: counterfactual and oracle "
                "sections skipped (synthetic cohorts only)"
            )
        )
        diffusion = factual_section("diffusion")
        baselines: dict[str, Any] = {}
        availability = {
            "deterministic": (self.deterministic is not None, "not provided (set deterministic_ckpt)"),
            "unaware": (self.unaware is not None, "not provided (set unaware_ckpt)"),
            "population": (self.population is not None, self.population_note or "not available"),
            "regression": (
                self.regression is not None,
                self.regression_note or self.population_note or "not available",
            ),
            "reference": (bool(with_truth), truth_note or "not available"),
            "oracle": (bool(with_truth), truth_note or "not available"),
        }
        for method, (available, note) in availability.items():
            section: dict[str, Any] = {"label": METHOD_LABELS[method], "available": available}
            if available:
                section.update(factual_section(method))
                if method in COUNTERFACTUAL_METHODS and with_truth:
                    section["counterfactual"] = summarize_counterfactual(with_truth, method)
            else:
                section["note"] = note
            if method == "population" and self.population is not None:
                section["rates"] = self.population
            if method == "regression" and self.regression is not None:
                section["fit"] = self.regression.summary()
            baselines[method] = section
        comparisons = {
            method: paired_comparison(factual, "diffusion", method)
            for method, section in baselines.items()
            if section["available"]
        }
        spatial = summarize_location(factual)
        counterfactual: dict[str, Any] = {"available": bool(with_truth)}
        if with_truth:
            counterfactual.update(summarize_counterfactual(with_truth, "diffusion"))
        else:
            counterfactual["note"] = truth_note
        return strict_json(
            {
                "settings": {
                    "datalist": str(self.datalist),
                    "split": self.split,
                    "model": self.model,
                    "arms": self.arms,
                    "num_samples": self.num_samples,
                    "cases_forecast": len(records),
                    "cases_evaluated": len(factual),
                    "cases_with_truth": len(with_truth),
                    "failed_cases": self.failed,
                    "cases_resumed": len(self.resumed),
                    "checkpoints": self.checkpoints,
                    "seconds": round(time.perf_counter() - self._started, 1),
                },
                "overall": diffusion["overall"],
                "per_arm": diffusion["per_arm"],
                "counterfactual": counterfactual,
                "spatial": spatial,
                "baselines": baselines,
                "comparisons": comparisons,
                "cases": [case_summary(r) for r in records],
                "notes": self.notes + [f"{r['id']}: {r['note']}" for r in records if r.get("note")],
                "conventions": CONVENTIONS,
            }
        )

    def write(self) -> dict[str, Any]:
        """Write ``metrics.json``, the plots and ``report.md`` into the output folder; returns the metrics."""
        metrics = self.results()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        figures: dict[str, str] = {}
        if self.figures:
            figures = evaluation_figures(metrics, self.records, self.output_dir)
        metrics["figures"] = figures
        write_text_atomic(
            self.output_dir / "metrics.json", json.dumps(metrics, indent=2, default=json_default, allow_nan=False)
        )
        write_text_atomic(self.output_dir / "report.md", render_report(metrics))
        o = metrics["overall"]
        logger.info(
            "evaluated %d case(s): count MAE %s lesions, 90%% coverage %s, activity AUC %s, Dice (active) %s; "
            "wrote %s, %s and %d plot(s)",
            o["n_cases"],
            fmt(o.get("count_mae")),
            fmt(o.get("interval_coverage_90"), percent=True),
            fmt(o.get("auc")),
            fmt(o.get("dice_active")),
            self.output_dir / "metrics.json",
            self.output_dir / "report.md",
            len(figures),
        )
        return metrics

    def run(self, forecaster: ForecastRunner) -> dict[str, Any]:
        """Forecast with ``forecaster`` (this evaluator listening to every case), then write the evaluation.

        The evaluation is written even when some cases failed; the forecaster's error is raised afterwards.
        """
        settings = forecaster.settings()
        self.arms = list(settings["arms"])
        if settings.get("num_samples") is not None:  # also when every case is read back from an earlier run
            self.num_samples = int(settings["num_samples"])
        self.prepare()
        self.key = self.run_key(settings)
        if self.resume:
            self.resumed = self.read_back()
            self.complete_references(forecaster)
        if not settings["overwrite"]:
            self.notes.append("overwrite was false: cases already forecast were skipped and are not evaluated")
        failure: ForecastFailed | None = None
        try:
            forecaster.run(listeners=[self], skip_ids=set(self.resumed))
        except ForecastFailed as err:
            failure = err
            self.failed = [line for line in str(err).splitlines()[1:] if line]
        metrics = self.write()
        if failure is not None:
            raise failure
        return metrics

    def run_key(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """What a scored case depends on (``settings``: :meth:`ForecastRunner.settings`): a case scored under another
        key is forecast and scored again."""
        return strict_json(
            json.loads(
                json.dumps(
                    {
                        "datalist": str(self.datalist.resolve()),
                        "split": self.split,
                        "arms": list(settings["arms"]),
                        "num_samples": settings.get("num_samples"),
                        "seed": settings.get("seed"),
                        "num_inference_steps": settings.get("num_inference_steps"),
                        "guidance_scale": settings.get("guidance_scale"),
                        "num_bins": self.num_bins,
                        "distance_mm": self.distance_mm,
                        "truth_dir": str(self.truth_dir.resolve()),
                        "population_datalist": str(self.population_datalist.resolve()),
                        "weights": {method: file_digest(path) for method, path in sorted(self.checkpoints.items())},
                        **self.resume_key,
                    },
                    default=json_default,
                )
            )
        )

    def complete_references(self, forecaster: ForecastRunner) -> list[str]:
        """Score the truth-only location maps (the generator's location oracle and region prior, the outcome draws
        and their per-sample ceiling) of resumed cases that were scored before the cohort held them.

        These scores do not depend on the forecast, so the cases are preprocessed (for their region map) but not
        forecast again; the case files are rewritten with the completed record. The forecast maps of those cases
        were not kept: the model's own scores against the outcome draws stay missing for them, and the report's
        ratios to the oracle are taken on the cases both maps were scored on. Returns the completed ids.
        """
        folder = self.output_dir / self.CASES_FOLDER
        cases = {str(c["id"]): c for c in load_datalist(self.datalist, self.split, errors=[])}
        completed: list[str] = []
        for case_id in tqdm(self.resumed, desc="location references of resumed cases", unit="case", leave=False):
            record = self.records[case_id]
            truth_path = self.truth_dir / f"{case_id}.json"
            location = record.get("location")
            if location is None or not truth_path.is_file():
                continue
            truth = json.loads(truth_path.read_text())
            offered = {name for name in (ORACLE, REGION_PRIOR) if "map" in truth.get(name, {})}
            draws = "frequency" in truth.get("outcome_draws", {})
            if offered <= set(location["methods"]) and (location.get("outcome_draws") is not None or not draws):
                continue
            data, regions = forecaster.preprocess(cases[case_id])
            affine = np.asarray(data["reference_affine"], dtype=np.float64)
            shape = [int(v) for v in np.asarray(data["reference_shape"]).reshape(-1)]
            regions_ref = np.rint(
                to_reference_grid(
                    regions.astype(np.float32),
                    np.asarray(data["working_affine"], dtype=np.float64),
                    affine,
                    shape,
                    mode="nearest",
                )
            ).astype(np.uint8)
            native, native_affine = load_mask(cases[case_id]["label"])
            label = mask_on_grid(native, native_affine, affine, shape)
            added = case_location(
                {}, label, regions_ref, record["treatment"], truth, self.truth_dir.parent, affine, shape
            )
            new = [name for name in added["methods"] if name not in location["methods"]]
            location["methods"].update({name: added["methods"][name] for name in new})
            for key in ("outcome_draws", "oracle_sample_lesions"):
                if added.get(key) is not None:
                    location[key] = added[key]
            location["completed_later"] = sorted(set(location.get("completed_later", [])) | set(new))
            path = folder / f"{case_id}.json"
            state = json.loads(path.read_text())
            state["record"] = record
            write_text_atomic(path, json.dumps(strict_json(state), default=json_default, allow_nan=False))
            completed.append(case_id)
        if completed:
            self.notes.append(
                f"location references completed: {len(completed)} resumed case(s) were scored before the cohort "
                "held the generator's location oracle, region prior and outcome draws; those were scored now "
                "(they do not depend on the forecast), while the forecast maps of these cases, not kept, are "
                "scored against the realised mask only"
            )
            logger.info("location references scored for %d resumed case(s)", len(completed))
        return completed

    def read_back(self) -> list[str]:
        """Add the cases of a previous run with the same key (and still in the split); returns their ids."""
        folder = self.output_dir / self.CASES_FOLDER
        if not folder.is_dir():
            return []
        wanted = {str(c["id"]) for c in load_datalist(self.datalist, self.split, errors=[])}
        resumed, other_key = [], 0
        for path in sorted(folder.glob("*.json")):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # unreadable: that case is simply scored again
            if state.get("key") != self.key:
                other_key += 1
                continue
            if state["record"]["id"] in wanted and state["record"]["id"] not in self.records:
                self._add(state)
                resumed.append(state["record"]["id"])
        if resumed:
            self.notes.append(
                f"resumed: {len(resumed)} case(s) scored by an earlier run with the same weights and "
                f"settings were read back from {folder} (resume=False, or delete it, to redo them)"
            )
            logger.info("resuming: %d case(s) already scored in %s", len(resumed), folder)
        if other_key:
            logger.info("%d scored case(s) in %s have other weights or settings: scored again", other_key, folder)
        return resumed
