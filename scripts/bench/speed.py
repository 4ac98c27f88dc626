"""Timing primitives of the benchmark and MONAI's stock sampling path (the speed side of the benchmark).

:class:`ConcatModeNetwork` runs the network in MONAI ``DiffusionInferer`` "concat" mode behind a 1000-step
``DDPMScheduler``; :class:`ForwardTimer` and :class:`TimedInferer` add up where the forecast's time goes; FLOPs,
matrix-product throughput, memory and reduced-precision error complete the figures.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler
from scripts.runtime.sampler import PRECISIONS
from scripts.runtime.scheduler import ForecastScheduler
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class BenchmarkError(RuntimeError):
    """A benchmark precondition failed (e.g. weights that do not match the network); the message says which."""


class ConcatModeNetwork(nn.Module):
    """MONAI ``DiffusionInferer`` "concat" mode adapter: ``forward(x, timesteps, context=None)`` where ``x`` holds
    the noisy signal (first channel) and the condition channels; treatment and horizon are fixed attributes.

    The adapter also does what MONAI's DDPM scheduler cannot: it hands the network the scheduler's input scaling of
    x_t and turns the output logits into the x0 prediction (``prediction_type`` "sample" for ``DDPMScheduler``). Both
    are elementwise and cost nothing next to the network.
    """

    def __init__(
        self, network: nn.Module, treatment: torch.Tensor, horizon: torch.Tensor, scheduler: ForecastScheduler
    ) -> None:
        super().__init__()
        self.network = network
        self.scheduler = scheduler
        self.register_buffer("treatment", treatment.reshape(-1).long(), persistent=False)
        self.register_buffer("horizon", horizon.reshape(-1).float(), persistent=False)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        timesteps = timesteps.reshape(-1).expand(x.shape[0])
        t = timesteps.long()
        noisy, cond = x[:, :1], x[:, 1:]
        logits = self.network(self.scheduler.scale_model_input(noisy, t), timesteps, cond, self.treatment, self.horizon)
        alpha = self.scheduler.alphas_cumprod.to(x.device)[t[0]]
        return self.scheduler.predict_x0_eps(logits, noisy, alpha)[0]


class ForwardTimer(nn.Module):
    """Wrap a network and add up the wall time spent inside its forward calls (synchronising CUDA around them)."""

    def __init__(self, network: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.network = network
        self.seconds = 0.0
        self.calls = 0
        self.rows = 0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sync(x.device)
        start = time.perf_counter()
        out = self.network(x, *args, **kwargs)
        sync(x.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.rows += int(x.shape[0])
        return out


class TimedInferer:
    """Wrap an inferer and add up the wall time of its calls (the reverse process of a forecast)."""

    def __init__(self, inferer: Any) -> None:
        self.inferer = inferer
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inferer, name)

    def __call__(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._timed(self.inferer, inputs, *args, **kwargs)

    def draw(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """:meth:`ForecastInferer.draw`, timed (what ``ForecastRunner`` calls)."""
        return self._timed(self.inferer.draw, inputs, *args, **kwargs)

    def _timed(self, fn: Any, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(inputs, *args, **kwargs)
        sync(inputs.device)
        self.seconds += time.perf_counter() - start
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def describe_device(device: torch.device) -> str:
    """Human-readable machine description: accelerator or CPU model, threads, torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"cuda: {name}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"cpu: {model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )


def network_flops_per_row(network: nn.Module, cond: torch.Tensor) -> int:
    """Convolution/matmul FLOPs of one network evaluation of one row (``torch.utils.flop_counter``)."""

    x = torch.zeros(1, 1, *cond.shape[2:], device=cond.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network(
            x,
            torch.full((1,), 500, device=cond.device),
            cond,
            torch.zeros(1, dtype=torch.long, device=cond.device),
            torch.full((1,), 24.0, device=cond.device),
        )
    return int(counter.get_total_flops())


def matmul_flops_per_second(
    device: str, size: int, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> tuple[float, float]:
    """Best FLOP/s of a (size x size) @ (size x size) product over ``repeats`` timed runs after one warm-up, per
    second of wall time and per second of process CPU time (all threads; the figure other jobs disturb least)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)
    sync(torch.device(device))
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        sync(torch.device(device))
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu_start)
    return 2.0 * size**3 / best, 2.0 * size**3 / max(best_cpu, 1e-9)


def time_ddpm_steps(network: nn.Module, parser: Any, cond: torch.Tensor, steps: int) -> tuple[float, float]:
    """Wall and CPU seconds per step of MONAI's stock ``DiffusionInferer.sample``, 1000-step ``DDPMScheduler``.

    One sample at a time (batch 1), float32, default memory format: the stock path without this project's switches.

    The scheduler uses the model's own schedule and prediction type (from the config's ``noise_scheduler``);
    the first step is a warm-up, the next ``steps`` are timed one by one and the fastest counts (which makes the
    speedup conservative on a loaded machine).
    """

    spec = parser.get("noise_scheduler")
    schedule_args = {k: spec[k] for k in ("shift",) if k in spec}
    scheduler = DDPMScheduler(
        num_train_timesteps=int(spec.get("num_train_timesteps", 1000)),
        schedule=spec.get("schedule", "linear_beta"),
        prediction_type="sample",  # the adapter turns the logits into x0
        clip_sample=True,
        **schedule_args,
    )
    scheduler.set_timesteps(scheduler.num_train_timesteps)  # on the CPU, as DiffusionInferer.sample expects
    all_timesteps = scheduler.timesteps
    device = cond.device
    wrapper = ConcatModeNetwork(
        network, torch.zeros(1, dtype=torch.long), torch.full((1,), 24.0), parser.get_parsed_content("noise_scheduler")
    ).to(device)
    inferer = DiffusionInferer(scheduler)
    noise = torch.randn((1, 1, *cond.shape[2:]), generator=torch.Generator().manual_seed(0)).to(device)
    scheduler.timesteps = all_timesteps[:1]
    image = inferer.sample(noise, wrapper, scheduler, conditioning=cond[:1], mode="concat", verbose=False)
    walls, cpus = [], []
    for i in range(1, 1 + steps):  # one step per call: the fastest is the figure least disturbed by other jobs
        scheduler.timesteps = all_timesteps[i : i + 1]
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        image = inferer.sample(image, wrapper, scheduler, conditioning=cond[:1], mode="concat", verbose=False)
        sync(device)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return min(walls), min(cpus)


def precision_error(
    network: nn.Module,
    scheduler: Any,
    precision: str,
    cond: torch.Tensor,
    treatment: torch.Tensor,
    horizon: torch.Tensor,
    timesteps: Sequence[int] = (999, 750, 500, 250, 50),
) -> dict[str, float]:
    """Largest error of the network's output (relative RMS) and of its x0 prediction (max abs) under ``precision``
    autocast against float32, over a background-only x_t (x0 = -1) at several timesteps."""
    rel_rms, x0_err = 0.0, 0.0
    g = torch.Generator().manual_seed(0)
    n = cond.shape[0]
    with torch.inference_mode():
        for step in timesteps:
            t = torch.full((n,), step, dtype=torch.long, device=cond.device)
            noise = torch.randn((n, 1, *cond.shape[2:]), generator=g).to(cond.device)
            x_t = scheduler.add_noise(-torch.ones_like(noise), noise, t)
            x_in = scheduler.scale_model_input(x_t, t)
            reference = network(x_in, t, cond, treatment, horizon).float()
            with torch.autocast(device_type=cond.device.type, dtype=PRECISIONS[precision]):
                reduced = network(x_in, t, cond, treatment, horizon).float()
            rel_rms = max(
                rel_rms,
                float((reduced - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt().clamp_min(1e-12)),
            )
            alpha = scheduler.alphas_cumprod.to(cond.device)[step]
            x0_ref = scheduler.predict_x0_eps(reference, x_t, alpha)[0]
            x0_red = scheduler.predict_x0_eps(reduced, x_t, alpha)[0]
            x0_err = max(x0_err, float((x0_red - x0_ref).abs().max()))
    return {"output_relative_rms_error": rel_rms, "x0_max_abs_error": x0_err}
