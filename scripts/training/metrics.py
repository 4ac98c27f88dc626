"""Validation metrics on sampled forecasts, as ignite metrics that synchronise across processes.

All take ``(samples, label)``: ``samples`` (B, K, *spatial) binary forecasts (K samples per case) and ``label``
(B, 1, *spatial) the observed NET2 mask.

The key validation metric is the CRPS of the forecast lesion count (:class:`CountCRPS`), not the absolute error of
the expected count (:class:`CountAbsoluteError`, still logged). NET2 counts are small and right-skewed (most
patients have none, a few have many), and the absolute error of a mean is minimised by the *median*: a forecast
that learns the right, skewed count distribution scores worse on it than an empty one. The CRPS is a proper
scoring rule of the whole count distribution (lowest in expectation for the true distribution), in lesions like
the absolute error, and equal to it for a point forecast, so an empty forecast keeps the same score.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import fire
import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.bundle import ConfigParser
from scripts.runtime.datalist import load_datalist
from scripts.runtime.files import write_text_atomic
from scripts.runtime.lesions import count_lesions, dice, load_mask


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


class _CaseMean(Metric):
    """Mean over cases of a per-case score."""

    def __init__(self, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._num = torch.tensor(0, dtype=torch.long, device=self._device)

    def score(self, samples: np.ndarray, label: np.ndarray) -> float:
        raise NotImplementedError

    @reinit__is_reduced
    def update(self, output: Sequence[torch.Tensor]) -> None:
        samples, label = output[0], output[1]
        for case_samples, case_label in zip(_numpy(samples), _numpy(label), strict=True):
            self._sum += self.score(case_samples, case_label[0])
            self._num += 1

    @sync_all_reduce("_sum", "_num")
    def compute(self) -> float:
        return float(self._sum / max(int(self._num), 1))


def count_crps(counts: Sequence[float], observed: float) -> float:
    """CRPS of the empirical distribution of ``counts`` (one per sample) against the ``observed`` count.

    The fair (unbiased in K) estimator ``mean|X_i - y| - sum_{i != j} |X_i - X_j| / (2 K (K - 1))``, so that 4 or 8
    samples score a forecast like infinitely many would in expectation; one sample gives the absolute error.
    """
    x = np.asarray(counts, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("count_crps needs at least one sample")
    error = float(np.abs(x - float(observed)).mean())
    if x.size == 1:
        return error
    spread = float(np.abs(x[:, None] - x[None, :]).sum()) / (2.0 * x.size * (x.size - 1))
    return error - spread


def poisson_count_crps(mean: float, observed: int, tail: float = 1e-12) -> float:
    """Exact CRPS of a Poisson(``mean``) count forecast: ``sum_k (F(k) - 1[observed <= k])^2``.

    The reference score of a forecaster that knows each case's true expected count (the synthetic cohort's oracle).
    """
    if mean < 0:
        raise ValueError(f"mean must be >= 0, got {mean}")
    total, cdf, pmf, k = 0.0, 0.0, math.exp(-mean), 0
    while True:
        cdf += pmf
        total += (cdf - (1.0 if observed <= k else 0.0)) ** 2
        k += 1
        if k > observed and 1.0 - cdf < tail:
            return total
        pmf *= mean / k


class CountCRPS(_CaseMean):
    """CRPS (lesions) of the forecast NET2 lesion count distribution (over the K samples) against the observed
    count: the key validation metric (see the module docstring)."""

    def score(self, samples: np.ndarray, label: np.ndarray) -> float:
        return count_crps([count_lesions(s) for s in samples], count_lesions(label))


class ActivityBrier(_CaseMean):
    """Brier score of P(active) (share of samples with a lesion) against the observed activity (>= 1 lesion)."""

    def score(self, samples: np.ndarray, label: np.ndarray) -> float:
        p_active = float(np.mean([bool(s.any()) for s in samples]))
        return (p_active - float(bool(label.any()))) ** 2


class CountAbsoluteError(_CaseMean):
    """Absolute error between the expected NET2 lesion count (mean over samples) and the observed count."""

    def score(self, samples: np.ndarray, label: np.ndarray) -> float:
        expected = float(np.mean([count_lesions(s) for s in samples]))
        return abs(expected - count_lesions(label))


class ForecastDice(_CaseMean):
    """Voxel Dice of the forecast mask (voxel probability >= 0.5) with the observed mask; 1 when both are empty."""

    def score(self, samples: np.ndarray, label: np.ndarray) -> float:
        return dice(samples.mean(0) >= 0.5, label)


def reference_scores(
    datalist: str | os.PathLike, split: str = "validation", transform: Callable[[dict], dict] | None = None
) -> dict[str, dict[str, float]]:
    """The validation metrics of two reference forecasters on a split's labelled cases, as ``{metric: {name: score}}``
    (the ``references`` of :func:`scripts.tools.curves.training_curves`).

    ``empty forecast``: no lesion ever (its CRPS is its absolute error). ``oracle``: Poisson(the generator's true
    expected count under the factual arm), where the synthetic cohort's truth files (``truth/<id>.json`` beside the
    datalist) exist for every case. Counts are taken on the labels' own grid, or, with ``transform`` (a training
    config's ``validate#preprocessing``), on the label that validation sees (the working grid).
    """

    cases = [c for c in load_datalist(datalist, split) if c.get("label")]
    if not cases:
        raise ValueError(f"{datalist}: no labelled cases in the {split!r} split")
    truth_dir = Path(datalist).resolve().parent / "truth"
    observed, means = [], []
    for case in cases:
        if transform is None:
            label = load_mask(case["label"])[0]
        else:
            label = _numpy(transform(dict(case))["label"])[0]
        observed.append(count_lesions(label > 0.5))
        truth = truth_dir / f"{case['id']}.json"
        means.append(
            float(json.loads(truth.read_text())["expected_count"][case["treatment"]])
            if truth.is_file() and case.get("treatment")
            else None
        )
    active = np.asarray(observed) > 0
    out: dict[str, dict[str, float]] = {
        "val_count_crps": {"empty forecast": float(np.mean(observed))},
        "val_count_mae": {"empty forecast": float(np.mean(observed))},
        "val_activity_brier": {"empty forecast": float(active.mean())},
    }
    if all(m is not None for m in means):
        out["val_count_crps"]["oracle"] = float(
            np.mean([poisson_count_crps(m, y) for m, y in zip(means, observed, strict=True)])
        )
        out["val_count_mae"]["oracle"] = float(np.mean(np.abs(np.asarray(means) - np.asarray(observed))))
        p_active = 1.0 - np.exp(-np.asarray(means))
        out["val_activity_brier"]["oracle"] = float(np.mean((p_active - active) ** 2))
    return out


def main() -> None:
    """``python -m scripts.training.metrics references --datalist D``: the reference scores of a split."""

    def references(
        datalist: str, split: str = "validation", config_file: str | None = None, out: str | None = None
    ) -> None:
        """Print (and with ``out`` write) the reference scores of a split as JSON; with ``config_file`` (e.g.
        bundle/configs/train.json) the labels go through its ``validate#preprocessing`` first."""
        transform = None
        if config_file:
            parser = ConfigParser()
            parser.read_config(config_file)
            parser["datalist"] = datalist
            transform = parser.get_parsed_content("validate#preprocessing")
        scores = reference_scores(datalist, split, transform)
        if out:
            write_text_atomic(out, json.dumps(scores, indent=2))
        print(json.dumps(scores, indent=2))

    fire.Fire({"references": references})


if __name__ == "__main__":
    main()
