"""The forecast job: per case, K samples under every requested arm, their analysis, and the contract's outputs.

For each case of the datalist split, ``ForecastRunner``:

1. preprocesses it (``bundle/configs/inference.json``'s ``preprocessing``: working grid, ``cond``, ``horizon``);
2. draws K binary NET2 samples for every arm with the ``inferer`` (all arms and samples of the case in one batch,
   every arm from the same starting noise, so differences between arms come from the treatment alone), and the
   conditional mean forecast of every arm (:meth:`scripts.runtime.inferer.ForecastInferer.draw`);
3. analyses the samples on the working grid (:func:`summarize_arm`): lesion count of each sample (26-connected
   components), expected count, P(active) = share of samples with at least one lesion, expected volume;
4. makes each arm's maps on the case's reference grid (the grid of ``flair_1``; ``postprocessing``): the voxel
   probability map (``inference.json``'s ``probability_map``: the conditional mean forecast, or the share of samples
   holding the voxel) and the forecast mask (the voxels that at least half of the samples hold); lists the mask's
   lesions with world centroid, volume, mean probability and region;
5. writes ``<arm>_prob.nii.gz``, ``<arm>_mask.nii.gz``, ``forecast.json`` and ``forecast.png`` into a staging
   folder that is renamed to ``O/<id>`` only when everything is written, so a failed case leaves nothing behind;
6. at the end writes ``O/summary.csv`` (one row per case and arm) and, if any case failed, raises an error that
   names every failed case, its input key and the reason (the command then exits non-zero).

Faults: a case whose ``O/<id>/forecast.json`` exists is skipped unless ``overwrite``; temporary files and folders
(``O/.<name>.tmp-<pid>@<host>-*``) that a killed run left behind are removed by the next run.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scripts.runtime.analysis import effects_vs_placebo, summarize_arm
from scripts.runtime.constants import MAX_NUM_SAMPLES
from scripts.runtime.datalist import CaseDataset
from scripts.runtime.errors import CaseError, ForecastFailed, ForecastInterrupted, InputError, find_case_error
from scripts.runtime.figures import forecast_figure
from scripts.runtime.files import (
    atomic_path,
    claim,
    claim_is_live,
    claim_path,
    move_into_place,
    release,
    remove_stale_temporaries,
    staging_folder,
    temp_prefix,
)
from scripts.runtime.grids import to_reference_grid
from scripts.runtime.io import save_nifti
from scripts.runtime.lesions import describe_lesions
from scripts.runtime.options import check_num_samples, parse_arms
from scripts.runtime.regions import brain_restriction, lesion_regions, region_map
from scripts.runtime.transforms import forecast_postprocessing, scale_foreground_percentiles
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = (
    "id",
    "arm",
    "horizon_weeks",
    "num_samples",
    "expected_count",
    "count_p05",
    "count_p95",
    "p_active",
    "expected_volume_mm3",
    "mask_lesions",
    "count_ratio_vs_placebo",
    "count_difference_vs_placebo",
    "p_active_difference_vs_placebo",
)


@dataclass(frozen=True)
class CaseForecast:
    """One forecast case as the runner hands it to its listeners, before the case folder is moved into place."""

    case: Mapping[str, Any]
    """The datalist entry (validated, paths resolved)."""
    data: Mapping[str, Any]
    """The preprocessed case: ``cond``, ``horizon``, ``working_affine``, ``reference_affine``, ``reference_shape``."""
    samples: np.ndarray
    """Binary samples (A, K, *working grid), arms in ``forecast["arms"]`` order, brain restriction applied."""
    forecast: Mapping[str, Any]
    """The content of ``forecast.json``."""
    probs: Mapping[str, np.ndarray]
    """Arm -> voxel probability on the reference grid."""
    regions: np.ndarray
    """Region map of the case (working grid, codes of :data:`scripts.runtime.regions.REGIONS`)."""
    allowed: np.ndarray | None
    """The brain restriction applied to the samples (working grid); None when none was."""
    masks: Mapping[str, np.ndarray] = field(default_factory=dict)
    """Arm -> the saved forecast mask on the reference grid (empty: the probability map at 0.5)."""


CaseListener = Callable[[CaseForecast], None]
"""Called by :meth:`ForecastRunner.run` for every forecast case; one that raises fails the case."""


FIGURE_VMAX = 0.5
"""Top of ``forecast.png``'s probability colour scale, the same for every case: the mask threshold, so a voxel
drawn in the top colour is in the forecast mask and the figures of two cases compare at a glance."""


def reference_mri(path: str | os.PathLike) -> np.ndarray:
    """The reference MRI of a case on its own grid, scaled for display (foreground median 0.5, as the network sees
    it): what ``forecast.png`` draws the saved probability maps on."""
    image = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    while image.ndim > 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return scale_foreground_percentiles(image)


class ForecastRunner:
    """Forecast every case of a datalist split under every requested arm and write the contract's outputs.

    Args:
        dataset: the cases (:class:`scripts.runtime.datalist.CaseDataset`): its ``data`` are the valid datalist
            entries, its ``transform`` turns one into a dict with ``cond``, ``horizon``, ``working_affine``,
            ``reference_affine``, ``reference_shape``, its ``errors`` the invalid entries (reported as failed cases).
        output_dir: output folder ``O``; each case goes to ``O/<id>``.
        network: the trained diffusion network (weights loaded).
        inferer: a :class:`scripts.runtime.inferer.ForecastInferer` (any inferer of samples works; without a
            ``draw`` method its conditional mean is taken as the samples' mean).
        arms: arm names to forecast (default: all six); a string of names separated by commas is accepted.
        num_samples: overrides the inferer's K when given.
        max_num_samples: the largest K accepted (all samples of a case are held in memory at once).
        device: torch device.
        overwrite: re-forecast cases whose ``O/<id>/forecast.json`` exists (default: skip them).
        figure: write ``forecast.png``.
        brain_margin: forecast voxels farther than this many voxels outside the brain found in the case's own images
            (:func:`scripts.runtime.regions.brain_restriction`) are removed from every sample before anything is counted
            (NET2 lesions are brain lesions); None keeps the samples as drawn. Cases where no brain is found keep
            theirs (logged).
        postprocessing: one arm's binary samples ``pred`` (K, *working grid) and conditional mean ``mean``
            (1, *working grid) with ``working_affine``, ``reference_affine`` and ``reference_shape`` -> ``prob`` and
            ``mask`` (1, *reference grid)
            (``inference.json``'s ``postprocessing``; default
            :func:`scripts.runtime.transforms.forecast_postprocessing`).
    """

    def __init__(
        self,
        dataset: CaseDataset,
        output_dir: str | os.PathLike,
        network: torch.nn.Module,
        inferer: Any,
        arms: Sequence[str] | None = None,
        num_samples: int | None = None,
        device: str | torch.device = "cpu",
        overwrite: bool = False,
        figure: bool = True,
        brain_margin: int | None = 1,
        max_num_samples: int | None = MAX_NUM_SAMPLES,
        postprocessing: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    ) -> None:
        self.dataset = dataset
        self.postprocessing = forecast_postprocessing() if postprocessing is None else postprocessing
        self.output_dir = Path(output_dir)
        self.network = network
        self.inferer = inferer
        self.arms = parse_arms(arms)
        if num_samples is not None:
            self.inferer.num_samples = num_samples
        self.inferer.num_samples = check_num_samples(self.inferer.num_samples, max_num_samples)
        self.device = torch.device(device)
        self.overwrite = overwrite
        self.figure = figure
        if brain_margin is not None and int(brain_margin) < 0:
            raise ValueError(f"brain_margin must be >= 0 or None, got {brain_margin!r}")
        self.brain_margin = None if brain_margin is None else int(brain_margin)

    def settings(self) -> dict[str, Any]:
        """What the forecasts depend on besides the weights and the cases: arms, K, steps, guidance, seed, and
        ``overwrite`` (False: cases already forecast are skipped)."""
        return {"arms": list(self.arms), **self.inferer.settings(), "overwrite": bool(self.overwrite)}

    def run(self, listeners: Sequence[CaseListener] = (), skip_ids: Collection[str] = ()) -> list[dict[str, Any]]:
        """Forecast all cases; returns the summary rows. Raises :class:`ForecastFailed` after the others if any
        case failed, and :class:`ForecastInterrupted` on Ctrl-C; ``summary.csv`` is written either way.

        Several forecast runs may share an output folder: each case is claimed (:func:`scripts.runtime.files.claim`)
        before it is forecast, so concurrent runs split the cases between them; a case still claimed by another run at
        the end is reported as not forecast. With ``listeners`` (an evaluation, which needs every case's samples
        itself) cases are not claimed.

        Args:
            listeners: called with each forecast case's :class:`CaseForecast` (e.g. the evaluation, which so sees
                the samples without them being saved).
            skip_ids: cases not to forecast (e.g. those a resumed evaluation already scored).
        """
        errors: list[CaseError] = list(self.dataset.errors)
        cases = self.dataset.data
        self._claimed_elsewhere: dict[str, str] = {}
        self._started = time.time()
        self._prepare_output_dir()
        self.network.eval()
        logger.info(
            "forecasting %d case(s) of %s under %d arm(s) with %d samples each into %s",
            len(cases),
            self.dataset.datalist,
            len(self.arms),
            self.inferer.num_samples,
            self.output_dir,
        )
        try:
            for index, case in enumerate(tqdm(cases, desc="cases", unit="case")):
                case_id = str(case["id"])
                try:
                    self._run_case(case, listeners, skip_ids)
                except Exception as err:  # one bad case must not stop the others
                    case_error = self._case_error(case_id, err)
                    logger.error("%s", case_error)
                    errors.append(case_error)
                    if _out_of_space(err):  # every later case would fail the same way, after its computation
                        left = [
                            str(c["id"])
                            for c in cases[index + 1 :]
                            if str(c["id"]) not in skip_ids
                            and not (self.output_dir / str(c["id"]) / "forecast.json").is_file()
                        ]
                        errors.extend(CaseError(i, "case", "not forecast: the output disk is full") for i in left)
                        break
        except KeyboardInterrupt:
            rows = self._write_summary(errors)
            raise ForecastInterrupted(
                f"stopped by the user; {len({r['id'] for r in rows})} case(s) finished are "
                f"listed in {self.output_dir / 'summary.csv'}, a rerun forecasts the others"
            ) from None
        for case_id, holder in self._claimed_elsewhere.items():
            if (self.output_dir / case_id / "forecast.json").is_file():
                continue
            if claim_is_live(holder):  # a run of this machine is still at it: its own summary will list it
                logger.info("case %s: still being forecast by another run (%s)", case_id, holder)
            else:  # another machine's claim cannot be checked: say so rather than leave the case out unseen
                errors.append(
                    CaseError(
                        case_id,
                        "case",
                        f"not forecast: claimed by another run ({holder}); rerun "
                        f"once it has finished, or delete {claim_path(self.output_dir, case_id)} "
                        "if that run is dead",
                    )
                )
        rows = self._write_summary(errors)
        if errors:
            message = f"{len(errors)} case(s) failed:\n" + "\n".join(str(e) for e in errors)
            raise ForecastFailed(message)
        return rows

    def _prepare_output_dir(self) -> None:
        """Create the output folder and check that files can be written there, before any case is computed."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise InputError(f"output_dir {self.output_dir}: is a file, not a folder")
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=temp_prefix("write-check"), dir=self.output_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise InputError(f"output_dir {self.output_dir}: cannot write there ({err.strerror or err})") from None
        for stale in remove_stale_temporaries(self.output_dir):
            logger.info("removed %s, left by an interrupted run", stale)

    def _run_case(self, case: dict, listeners: Sequence[CaseListener], skip_ids: Collection[str]) -> None:
        """Forecast one case unless it is done, skipped or claimed by another run."""
        case_id = str(case["id"])
        done = self.output_dir / case_id / "forecast.json"
        if case_id in skip_ids:
            logger.info("case %s: skipped (already done by an earlier run)", case_id)
            return
        if done.is_file() and not self.overwrite:
            logger.info("case %s: already forecast in %s, skipped (overwrite=True to redo)", case_id, done.parent)
            return
        if listeners:  # an evaluation needs this run's own samples of every case
            self.forecast_case(case, listeners)
            return
        owner = claim(self.output_dir, case_id)
        if owner is not None:
            logger.info("case %s: being forecast by another run (%s), skipped", case_id, owner)
            self._claimed_elsewhere[case_id] = owner
            return
        try:
            if done.is_file() and (not self.overwrite or done.stat().st_mtime >= self._started):
                logger.info("case %s: forecast by another run meanwhile, skipped", case_id)
                return
            self.forecast_case(case, listeners)
        finally:
            release(self.output_dir, case_id)

    def _case_error(self, case_id: str, err: Exception) -> CaseError:
        """The one-line report of a failed case (its inputs are read, and so checked, by the preprocessing: an OS
        error here is one of writing its outputs)."""
        case_error = find_case_error(err)
        if case_error is not None:
            return case_error
        if isinstance(err, OSError):
            where = err.filename or self.output_dir / case_id
            return CaseError(case_id, "output", f"cannot write {where}: {err.strerror or err}")
        logger.exception("case %s failed", case_id)
        return CaseError(case_id, "case", f"{type(err).__name__}: {err}")

    def _write_summary(self, errors: list[CaseError]) -> list[dict[str, Any]]:
        """Write ``summary.csv`` of every case of the datalist whose ``forecast.json`` exists (this run's, an earlier
        run's, or a concurrent run's) and that did not fail in this run (an older forecast of a case that failed now
        is not listed); a failure to write it joins ``errors``. Returns the rows."""
        rows: list[dict[str, Any]] = []
        failed = {e.case_id for e in errors}
        for case in self.dataset.data:
            if str(case["id"]) in failed:
                continue
            done = self.output_dir / str(case["id"]) / "forecast.json"
            try:
                if done.is_file():
                    rows.extend(summary_rows(json.loads(done.read_text())))
            except (OSError, ValueError, KeyError) as err:
                errors.append(CaseError(str(case["id"]), "forecast.json", f"cannot be read back: {err}"))
        try:
            write_summary(rows, self.output_dir / "summary.csv")
        except OSError as err:
            errors.append(
                CaseError(
                    "summary", "summary.csv", f"cannot write {self.output_dir / 'summary.csv'}: {err.strerror or err}"
                )
            )
        return rows

    def preprocess(self, case: dict) -> tuple[dict[str, Any], np.ndarray]:
        """One case's preprocessed inputs (``cond``, ``horizon``, the working and reference grids) and its region
        map on the working grid (codes of :data:`scripts.runtime.regions.REGIONS`), without forecasting it."""
        data = self.dataset.transform(dict(case))
        working_affine = np.asarray(data["working_affine"], dtype=np.float64)
        cond = torch.as_tensor(data["cond"]).float()
        regions = region_map(cond.numpy(), spacing_mm=float(np.abs(np.diag(working_affine)[:3]).mean()))
        return data, regions

    @torch.no_grad()
    def forecast_case(self, case: dict, listeners: Sequence[CaseListener] = ()) -> dict[str, Any]:
        """Forecast one case, hand it to the ``listeners`` and write its outputs; returns its ``forecast.json``."""
        case_id = str(case["id"])
        start = time.perf_counter()
        data, regions = self.preprocess(case)
        cond = torch.as_tensor(data["cond"]).float()
        horizon = float(torch.as_tensor(data["horizon"]))
        working_affine = np.asarray(data["working_affine"], dtype=np.float64)
        reference_affine = np.asarray(data["reference_affine"], dtype=np.float64)
        reference_shape = [int(s) for s in np.asarray(data["reference_shape"]).reshape(-1)]

        horizon_t = torch.tensor([horizon], device=self.device)
        inputs = cond[None].to(self.device)
        if hasattr(self.inferer, "draw"):
            draws = self.inferer.draw(inputs, self.network, horizon=horizon_t, arms=self.arms)
            samples = draws.samples[0].cpu().numpy() > 0.5  # (A, K, *S)
            mean = draws.mean[0].cpu().numpy().astype(np.float32)  # (A, *S)
        else:  # an inferer of samples only: its conditional mean is the samples' mean
            samples = self.inferer(inputs, self.network, horizon=horizon_t, arms=self.arms)[0].cpu().numpy() > 0.5
            mean = samples.mean(1).astype(np.float32)

        restriction: dict[str, Any] = {"brain_margin_voxels": self.brain_margin, "applied": False}
        allowed = None
        if self.brain_margin is not None:
            allowed = brain_restriction(regions, self.brain_margin)
            if allowed is None:
                logger.warning(
                    "case %s: no brain found in its images; forecasts are not restricted to the brain", case_id
                )
            else:
                removed = int((samples & ~allowed).sum())
                samples &= allowed
                mean *= allowed
                restriction.update(
                    applied=True, removed_voxels_per_sample=removed / max(samples.shape[0] * samples.shape[1], 1)
                )
        regions_reference: np.ndarray | None = None  # the region map on the reference grid, made when needed

        staging = staging_folder(self.output_dir, case_id)
        try:
            arms_out: dict[str, dict[str, Any]] = {}
            probs_reference: dict[str, np.ndarray] = {}
            masks_reference: dict[str, np.ndarray] = {}
            for a, arm in enumerate(self.arms):
                figures = summarize_arm(samples[a], working_affine)
                figures.pop("prob_working")  # the postprocessing makes the map that is saved
                post = self.postprocessing(
                    {
                        "pred": torch.from_numpy(samples[a]),
                        "mean": torch.from_numpy(mean[a][None]),
                        "working_affine": working_affine,
                        "reference_affine": reference_affine,
                        "reference_shape": reference_shape,
                    }
                )
                prob = np.asarray(post["prob"], dtype=np.float32)[0]
                mask = np.asarray(post["mask"], dtype=np.uint8)[0]
                if listeners or self.figure:  # kept only where used: reference grids can be large
                    probs_reference[arm] = prob
                if listeners:
                    masks_reference[arm] = mask
                lesions = describe_lesions(mask, reference_affine, prob=prob)
                if lesions:  # the region holding most of each lesion's voxels, as the evaluation assigns them
                    if regions_reference is None:
                        regions_reference = np.rint(
                            to_reference_grid(
                                regions.astype(np.float32),
                                working_affine,
                                reference_affine,
                                reference_shape,
                                mode="nearest",
                            )
                        ).astype(np.uint8)
                    for lesion, region in zip(lesions, lesion_regions(mask, regions_reference), strict=True):
                        lesion["region"] = region
                save_nifti(prob, reference_affine, staging / f"{arm}_prob.nii.gz", np.float32)
                save_nifti(mask, reference_affine, staging / f"{arm}_mask.nii.gz", np.uint8)
                arms_out[arm] = {
                    **figures,
                    "lesions": lesions,
                    "prob": f"{arm}_prob.nii.gz",
                    "mask": f"{arm}_mask.nii.gz",
                }
            forecast: dict[str, Any] = {
                "id": case_id,
                "num_samples": int(samples.shape[1]),
                "horizon_weeks": horizon,
                "reference_key": data.get("reference_key"),
                "brain_restriction": restriction,
                "arms": arms_out,
            }
            effects = effects_vs_placebo(arms_out)
            if effects:
                forecast["effects_vs_placebo"] = effects
            if self.figure:  # the saved maps, on the grid they are saved on
                forecast_figure(
                    reference_mri(data["reference_path"]),
                    probs_reference,
                    arms_out,
                    staging / "forecast.png",
                    title=f"{case_id}: NET2 forecast, {horizon:g} weeks after visit 1",
                    mri_name=str(data.get("reference_key", "reference MRI")),
                    affine=reference_affine,
                    vmax=FIGURE_VMAX,
                )
            if listeners:
                result = CaseForecast(case, data, samples, forecast, probs_reference, regions, allowed, masks_reference)
                for listener in listeners:
                    listener(result)
            (staging / "forecast.json").write_text(json.dumps(forecast, indent=2))
            move_into_place(staging, self.output_dir / case_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info(
            "case %s: %s (%.1f s) -> %s",
            case_id,
            ", ".join(
                f"{arm} E[count]={f['expected_count']:.2f} P(active)={f['p_active']:.2f}" for arm, f in arms_out.items()
            ),
            time.perf_counter() - start,
            self.output_dir / case_id,
        )
        return forecast


def _out_of_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def summary_rows(forecast: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``summary.csv`` rows (one per arm) of one case's ``forecast.json`` content."""
    effects = forecast.get("effects_vs_placebo", {})
    rows = []
    for arm, figures in forecast["arms"].items():
        effect = effects.get(arm, {})
        rows.append(
            {
                "id": forecast["id"],
                "arm": arm,
                "horizon_weeks": forecast["horizon_weeks"],
                "num_samples": forecast["num_samples"],
                "expected_count": figures["expected_count"],
                "count_p05": figures["count_interval_90"][0],
                "count_p95": figures["count_interval_90"][1],
                "p_active": figures["p_active"],
                "expected_volume_mm3": figures["expected_volume_mm3"],
                "mask_lesions": len(figures["lesions"]),
                "count_ratio_vs_placebo": effect.get("count_ratio"),
                "count_difference_vs_placebo": effect.get("count_difference"),
                "p_active_difference_vs_placebo": effect.get("p_active_difference"),
            }
        )
    return rows


def _cell(value: Any) -> Any:
    """A ``summary.csv`` cell: empty for undefined, floats to 6 significant digits (``23.3``, not
    ``23.299999999999997``)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_summary(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write ``summary.csv`` atomically (empty fields for undefined effects)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in SUMMARY_FIELDS})
