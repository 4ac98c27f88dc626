"""Inferers: MONAI ``Inferer`` s that turn a batch of conditioning volumes into NET2 forecast samples.

``ForecastInferer`` runs the whole reverse process for every case, every requested arm and K samples at once: rows
are laid out as (case, arm, sample), all arms of a case start from the same noise, so their forecasts differ through
the treatment alone (counterfactuals). Its :meth:`ForecastInferer.draw` also returns the conditional mean forecast,
the network's de-biased p(lesion) per voxel at the first, pure-noise step: with zero terminal SNR that step's input
carries no noise at all, so its prediction is E[mask | inputs, arm, horizon], the same for every sample of a case
and arm, and free (the sampler computes it anyway). ``ThresholdInferer`` wraps the deterministic baseline so that it
yields one "sample" per case and the same metrics apply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from monai.inferers import Inferer
from scripts.runtime.constants import DEFAULT_HORIZON_WEEKS, NULL_TREATMENT, arm_index
from scripts.runtime.options import check_num_samples, parse_arms
from scripts.runtime.sampler import ForecastSampler
from scripts.runtime.scheduler import ForecastScheduler


class ForecastDraws(NamedTuple):
    """What :meth:`ForecastInferer.draw` returns.

    ``samples``: binary samples, (B, A, K, *spatial) with arms, (B, K, *spatial) without. ``mean``: the conditional
    mean forecast p(lesion) per voxel in [0, 1], (B, A, *spatial) with arms, (B, *spatial) without.
    """

    samples: torch.Tensor
    mean: torch.Tensor


class ForecastInferer(Inferer):
    """Sample K binary NET2 forecasts per case and arm.

    Args:
        scheduler: the scheduler the network was trained with.
        num_samples: K, samples per case and arm.
        num_inference_steps: denoising steps per sample.
        guidance_scale: classifier-free guidance weight (1 = off).
        chunk_size: at most this many rows per network call.
        arms: arm names to forecast every case under; None forecasts the ``treatment`` passed at call time.
        seed: seed of the starting noise (None: torch's global generator).
        progress: progress bar over denoising steps.
        channels_last, precision, compile, reuse_memory: speed switches of
            :class:`~scripts.runtime.sampler.ForecastSampler`.

    Call: ``inferer(inputs, network, treatment=None, horizon=None, arms=None, callback=None)`` with ``inputs`` the
    (B, C, *spatial) conditioning volumes (``callback``: see :meth:`ForecastSampler.sample`; its rows are ordered
    case, arm, sample). Returns (B, K, *spatial) samples under the given ``treatment`` when no arms are set, and
    (B, A, K, *spatial) when arms are set (A = number of arms, in the given order).
    """

    def __init__(
        self,
        scheduler: ForecastScheduler,
        num_samples: int = 8,
        num_inference_steps: int = 10,
        guidance_scale: float = 1.0,
        chunk_size: int | None = None,
        arms: Sequence[str] | None = None,
        seed: int | None = 0,
        progress: bool = False,
        channels_last: bool = True,
        precision: str = "auto",
        compile: bool = False,
        reuse_memory: bool = True,
    ) -> None:
        super().__init__()
        self.sampler = ForecastSampler(
            scheduler,
            num_inference_steps,
            guidance_scale,
            chunk_size,
            progress,
            channels_last=channels_last,
            precision=precision,
            compile=compile,
            reuse_memory=reuse_memory,
        )
        self.num_samples = check_num_samples(num_samples, limit=None)
        self.arms = parse_arms(arms) if arms is not None else None
        self.seed = seed

    def settings(self) -> dict[str, Any]:
        """What its samples depend on besides the network and the input: K, steps, guidance and seed."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "num_inference_steps": self.sampler.num_inference_steps,
            "guidance_scale": self.sampler.guidance_scale,
        }

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args: Any,
        treatment: torch.Tensor | None = None,
        horizon: torch.Tensor | None = None,
        arms: Sequence[str] | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return self.draw(inputs, network, treatment=treatment, horizon=horizon, arms=arms, callback=callback).samples

    def draw(
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        treatment: torch.Tensor | None = None,
        horizon: torch.Tensor | None = None,
        arms: Sequence[str] | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> ForecastDraws:
        """The samples of :meth:`__call__` and the conditional mean forecast of each case and arm
        (:class:`ForecastDraws`)."""
        cond = inputs.float()
        b, k = cond.shape[0], self.num_samples
        device = cond.device
        arms = list(arms) if arms is not None else self.arms
        if horizon is None:
            horizon = torch.full((b,), DEFAULT_HORIZON_WEEKS, device=device)
        horizon = horizon.to(device).float().reshape(-1).expand(b)
        if arms is not None:
            per_case = torch.tensor([arm_index(a) for a in arms], device=device).reshape(1, -1).expand(b, -1)
        else:  # each case under its own treatment, the null token where none is given
            if treatment is None:
                treatment = torch.full((b,), NULL_TREATMENT, device=device)
            per_case = treatment.to(device).long().reshape(-1, 1).expand(b, 1)
        a = per_case.shape[1]

        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=device).manual_seed(int(self.seed))
        noise = torch.randn((b, 1, k, 1, *cond.shape[2:]), generator=generator, device=device)
        rows = b * a * k
        first: list[torch.Tensor] = []

        def record(step: int, timestep: int, x0: torch.Tensor, x: torch.Tensor) -> None:
            if step == 0:  # the pure-noise step: one prediction per case and arm (sample 0 of each)
                first.append(((x0.reshape(b, a, k, *cond.shape[2:])[:, :, 0].float() + 1.0) / 2.0).clone())
            if callback is not None:
                callback(step, timestep, x0, x)

        # for one case the row-wise condition stays a broadcast view (stride 0): the sampler copies chunks only
        samples = self.sampler.sample(
            network,
            cond[:, None, None].expand(b, a, k, *cond.shape[1:]).reshape(rows, *cond.shape[1:]),
            per_case[:, :, None].expand(b, a, k).reshape(rows),
            horizon[:, None, None].expand(b, a, k).reshape(rows),
            noise=noise.expand(b, a, k, *noise.shape[3:]).reshape(rows, 1, *cond.shape[2:]),
            callback=record,
        )
        samples = samples.reshape(b, a, k, *cond.shape[2:])
        mean = first[0].clamp(0.0, 1.0)
        return ForecastDraws(samples[:, 0], mean[:, 0]) if arms is None else ForecastDraws(samples, mean)


class ThresholdInferer(Inferer):
    """Deterministic baseline: ``sigmoid(network(cond, treatment, horizon)) >= threshold`` as one sample per case.

    Returns (B, 1, *spatial) binary masks, or the probabilities with ``return_probability=True``.
    """

    def __init__(self, threshold: float = 0.5, return_probability: bool = False) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.return_probability = return_probability

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        with torch.no_grad():
            prob = torch.sigmoid(network(inputs.float(), kwargs.get("treatment"), kwargs.get("horizon")).float())
        return prob if self.return_probability else (prob >= self.threshold).float()
