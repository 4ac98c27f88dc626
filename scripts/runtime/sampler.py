"""The reverse diffusion process: from noise and conditions to binary NET2 mask samples.

``ForecastSampler`` knows nothing about cases, arms or files: it takes a batch of conditioning volumes with one
treatment and horizon per row and returns one binary sample per row. Callers (the validation inferer, the forecast
inferer) lay out rows as (case, arm, sample) and batch them; this module only decides how each row is denoised.

Speed switches (measured in ``bundle/docs/performance.md``; ``python -m scripts.benchmark``):

* ``torch.inference_mode`` around the whole reverse process (no autograd bookkeeping);
* ``channels_last``: the network's convolution weights in channels-last (NDHWC) layout; oneDNN then keeps every
  activation in that layout, its native one on CPU, instead of converting around each convolution. The inputs
  are left alone: the network concatenates the one-channel noisy signal with the condition, and that
  concatenation comes out contiguous whatever the inputs' layout, so converting them would only copy;
* ``precision="bfloat16"``: the network under bfloat16 autocast (the scheduler step stays float32);
* ``compile``: ``torch.compile`` of the network (off by default: see the performance notes);
* ``reuse_memory``: on CPU with glibc, freed activations stay in the heap while sampling instead of going back to
  the kernel, which otherwise faults and zeroes them again at every network call (:func:`reuse_freed_memory`);
* ``chunk_size``: at most this many rows per network call, the knob that bounds peak memory. Chunks are sliced
  lazily from the (possibly broadcast, stride-0) condition tensor, so the condition of a case is never copied once
  per row; with guidance the conditional and unconditional rows are gathered chunk by chunk as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from scripts.runtime.constants import NULL_TREATMENT
from scripts.runtime.scheduler import ForecastScheduler, signal_to_mask
from torch import nn
from tqdm.auto import tqdm

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


# glibc mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (the only one whose ``mallopt`` this module tunes), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Keep freed memory in the process heap while the block runs (glibc; elsewhere a no-op).

    glibc serves large blocks (above a threshold of at most 32 MiB) with a fresh ``mmap`` and unmaps them on free,
    so each activation of a 64^3 forward pass is page-faulted and zeroed by the kernel again at every call: a third
    of the CPU time of a forecast went to the kernel (system time). With ``mmap`` off and trimming off, freed
    activations are reused by the next call instead. The defaults are restored afterwards and the free memory is
    given back (``malloc_trim``).
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bfloat16"`` on a CPU with native bfloat16 (measured faster there, same forecasts; see
    ``bundle/docs/performance.md``), else ``"float32"`` (GPUs included: not measured yet). Others unchanged."""
    if precision != "auto":
        return precision
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def _rows(v: torch.Tensor, start: int, stop: int, n: int) -> torch.Tensor:
    """Rows ``start:stop`` of the virtual concatenation ``[v, v]`` (``n`` rows each), copying only when they span
    both halves."""
    if stop <= n:
        return v[start:stop]
    if start >= n:
        return v[start - n : stop - n]
    return torch.cat([v[start:], v[: stop - n]])


class ForecastSampler:
    """Deterministic few-step sampler with optional classifier-free guidance and chunking.

    Args:
        scheduler: the noise scheduler the network was trained with.
        num_inference_steps: number of denoising steps (network evaluations per sample without guidance).
        guidance_scale: classifier-free guidance weight w; the prediction is uncond + w * (cond - uncond). With
            w = 1 (default) guidance is off and each step costs one network evaluation per row.
        chunk_size: at most this many rows per network call (memory bound); None for all at once.
        progress: show a progress bar over the denoising steps.
        channels_last: run the network in channels-last memory format (3D/2D inputs).
        precision: ``"auto"`` (default: :func:`resolve_precision`), ``"float32"``, ``"bfloat16"`` or
            ``"float16"``: autocast dtype of the network. The scheduler step always runs in float32.
        compile: wrap the network in ``torch.compile`` (once per network object).
        reuse_memory: on CPU, keep freed activations in the heap while sampling (:func:`reuse_freed_memory`).
    """

    def __init__(
        self,
        scheduler: ForecastScheduler,
        num_inference_steps: int = 10,
        guidance_scale: float = 1.0,
        chunk_size: int | None = None,
        progress: bool = False,
        channels_last: bool = True,
        precision: str = "auto",
        compile: bool = False,
        reuse_memory: bool = True,
    ) -> None:
        if precision != "auto" and precision not in PRECISIONS:
            raise ValueError(f"precision must be 'auto' or one of {sorted(PRECISIONS)}, got {precision!r}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.chunk_size = int(chunk_size) if chunk_size is not None else None
        self.progress = progress
        self.channels_last = bool(channels_last)
        self.precision = precision
        self.compile = bool(compile)
        self.reuse_memory = bool(reuse_memory)
        self._compiled: dict[int, Callable[..., torch.Tensor]] = {}

    @property
    def network_evaluations_per_sample(self) -> int:
        """Network evaluations (rows through the network) per drawn sample: steps, doubled under guidance."""
        return self.num_inference_steps * (2 if self.guidance_scale != 1.0 else 1)

    def prepare(self, network: nn.Module | Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Put ``network`` into the configured memory format (in place) and compile it if asked; returns the
        callable to evaluate."""
        if isinstance(network, nn.Module) and self.channels_last:
            network._apply(self._channels_last)  # conv weights only: Linear weights and biases have fewer dims
        if not self.compile or not isinstance(network, nn.Module):
            return network
        key = id(network)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(network)
        return self._compiled[key]

    @staticmethod
    def _channels_last(v: torch.Tensor) -> torch.Tensor:
        """``v`` in channels-last memory format if it is a 3D (5-dim) or 2D (4-dim) convolution weight."""
        if v.ndim == 5:
            return v.contiguous(memory_format=torch.channels_last_3d)
        if v.ndim == 4:
            return v.contiguous(memory_format=torch.channels_last)
        return v

    def _predict(
        self,
        network: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        treatment: torch.Tensor,
        horizon: torch.Tensor,
    ) -> torch.Tensor:
        n = x.shape[0]
        guided = self.guidance_scale != 1.0
        total = 2 * n if guided else n
        if guided:  # the unconditional rows follow the conditional ones; they may share a network call
            null = torch.full_like(treatment, NULL_TREATMENT)
        step = self.chunk_size or total
        dtype = PRECISIONS[resolve_precision(self.precision, x.device)]
        outputs = []
        for i in range(0, total, step):
            j = min(i + step, total)
            if guided:
                rows = [_rows(v, i, j, n) for v in (x, t, cond, horizon)]
                tr = torch.cat([treatment, null])[i:j]
            else:
                rows = [v[i:j] for v in (x, t, cond, horizon)]
                tr = treatment[i:j]
            xi, ti, ci, hi = rows
            with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = network(xi, ti, ci, tr, hi)
            outputs.append(out.float().contiguous())
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        if guided:
            conditional, unconditional = out.chunk(2)
            out = unconditional + self.guidance_scale * (conditional - unconditional)
        return out

    def sample(
        self,
        network: nn.Module | Callable[..., torch.Tensor],
        cond: torch.Tensor,
        treatment: torch.Tensor,
        horizon: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Draw one binary NET2 mask per row.

        Args:
            network: ``network(x, timesteps, cond, treatment, horizon)`` predicting the scheduler's target.
            cond: (N, C, *spatial) conditioning volumes (a broadcast view is fine: chunks are sliced from it).
            treatment: (N,) arm indices; horizon: (N,) weeks.
            noise: (N, 1, *spatial) starting noise; drawn from ``generator`` when None. Passing the same noise for
                different arms makes their forecasts differ through the treatment alone.
            callback: called after every step as ``callback(step, timestep, x0, x)`` with the step's index, its
                timestep, the scheduler's predicted clean signal x0 (N, 1, *spatial, in [-1, 1]) and the new sample
                (diffusers' ``callback_on_step_end``): to look at the reverse process step by step.

        Returns:
            (N, 1, *spatial) float tensor of 0/1.
        """
        network = self.prepare(network)  # outside inference mode: the weights must stay ordinary tensors
        with torch.inference_mode(), reuse_freed_memory(self.reuse_memory and cond.device.type == "cpu"):
            n = cond.shape[0]
            if noise is None:
                noise = torch.randn((n, 1, *cond.shape[2:]), generator=generator, device=cond.device, dtype=cond.dtype)
            self.scheduler.set_timesteps(self.num_inference_steps, device=cond.device)
            x = noise.to(cond.device).float()
            treatment = treatment.to(cond.device).long().reshape(-1).expand(n)
            horizon = horizon.to(cond.device).float().reshape(-1).expand(n)
            # the network's view of x_t (x_t itself, or its likelihood ratio for mask logits), as in training
            scale_input = getattr(self.scheduler, "scale_model_input", None)
            steps = tqdm(self.scheduler.timesteps, desc="denoising", leave=False, disable=not self.progress)
            for i, t in enumerate(steps):
                timesteps = torch.full((n,), int(t), device=cond.device, dtype=torch.long)
                x_in = scale_input(x, timesteps) if scale_input is not None else x
                model_output = self._predict(network, x_in, timesteps, cond, treatment, horizon)
                x, x0 = self.scheduler.step(model_output, int(t), x)
                if callback is not None:
                    callback(i, int(t), x0, x)
            return signal_to_mask(x)
