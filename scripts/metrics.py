"""Validation metrics on sampled forecasts, as ignite metrics that synchronise across processes.

Both take ``(samples, label)``: ``samples`` (B, K, *spatial) binary forecasts (K samples per case) and ``label``
(B, 1, *spatial) the observed NET2 mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from scripts.lesions import count_lesions, dice


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


class CountAbsoluteError(_CaseMean):
    """Absolute error between the expected NET2 lesion count (mean over samples) and the observed count."""

    def score(self, samples: np.ndarray, label: np.ndarray) -> float:
        expected = float(np.mean([count_lesions(s) for s in samples]))
        return abs(expected - count_lesions(label))


class ForecastDice(_CaseMean):
    """Voxel Dice of the forecast mask (voxel probability >= 0.5) with the observed mask; 1 when both are empty."""

    def score(self, samples: np.ndarray, label: np.ndarray) -> float:
        return dice(samples.mean(0) >= 0.5, label)
