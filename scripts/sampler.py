"""The reverse diffusion process: from noise and conditions to binary NET2 mask samples.

``ForecastSampler`` knows nothing about cases, arms or files: it takes a batch of conditioning volumes with one
treatment and horizon per row and returns one binary sample per row. Callers (the validation inferer, the forecast
inferer) lay out rows as (case, arm, sample) and batch them; this module only decides how each row is denoised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from scripts.constants import NULL_TREATMENT
from scripts.scheduler import ForecastScheduler, signal_to_mask


class ForecastSampler:
    """Deterministic few-step sampler with optional classifier-free guidance and chunking.

    Args:
        scheduler: the noise scheduler the network was trained with.
        num_inference_steps: number of denoising steps (network evaluations per sample without guidance).
        guidance_scale: classifier-free guidance weight w; the prediction is uncond + w * (cond - uncond). With
            w = 1 (default) guidance is off and each step costs one network evaluation per row.
        chunk_size: at most this many rows per network call (memory bound); None for all at once.
        progress: show a progress bar over the denoising steps.
    """

    def __init__(
        self,
        scheduler: ForecastScheduler,
        num_inference_steps: int = 10,
        guidance_scale: float = 1.0,
        chunk_size: int | None = None,
        progress: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.chunk_size = chunk_size
        self.progress = progress

    def _predict(
        self, network: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
        treatment: torch.Tensor, horizon: torch.Tensor,
    ) -> torch.Tensor:
        guided = self.guidance_scale != 1.0
        if guided:
            # conditional and unconditional rows share one network call
            x, t, cond, horizon = (torch.cat([v, v]) for v in (x, t, cond, horizon))
            treatment = torch.cat([treatment, torch.full_like(treatment, NULL_TREATMENT)])
        step = self.chunk_size or x.shape[0]
        out = torch.cat([
            network(x[i:i + step], t[i:i + step], cond[i:i + step], treatment[i:i + step], horizon[i:i + step])
            for i in range(0, x.shape[0], step)
        ])
        if guided:
            conditional, unconditional = out.chunk(2)
            out = unconditional + self.guidance_scale * (conditional - unconditional)
        return out

    @torch.no_grad()
    def sample(
        self,
        network: nn.Module | Callable[..., torch.Tensor],
        cond: torch.Tensor,
        treatment: torch.Tensor,
        horizon: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw one binary NET2 mask per row.

        Args:
            network: ``network(x, timesteps, cond, treatment, horizon)`` predicting the scheduler's target.
            cond: (N, C, *spatial) conditioning volumes.
            treatment: (N,) arm indices; horizon: (N,) weeks.
            noise: (N, 1, *spatial) starting noise; drawn from ``generator`` when None. Passing the same noise for
                different arms makes their forecasts differ through the treatment alone.

        Returns:
            (N, 1, *spatial) float tensor of 0/1.
        """
        n = cond.shape[0]
        if noise is None:
            noise = torch.randn((n, 1, *cond.shape[2:]), generator=generator, device=cond.device, dtype=cond.dtype)
        self.scheduler.set_timesteps(self.num_inference_steps, device=cond.device)
        x = noise.to(cond.device)
        treatment = treatment.to(cond.device).long().reshape(-1).expand(n)
        horizon = horizon.to(cond.device).float().reshape(-1).expand(n)
        for t in tqdm(self.scheduler.timesteps, desc="denoising", leave=False, disable=not self.progress):
            timesteps = torch.full((n,), int(t), device=cond.device, dtype=torch.long)
            model_output = self._predict(network, x, timesteps, cond, treatment, horizon)
            x, _ = self.scheduler.step(model_output.float(), int(t), x)
        return signal_to_mask(x)
