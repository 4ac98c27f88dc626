"""The benchmark (``python -m scripts.benchmark``, quick mode as in CI) and the sampler speed switches it measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scripts.bench.parity import activity_auc
from scripts.bench.speed import ConcatModeNetwork
from scripts.runtime.constants import CONDITION_CHANNELS
from scripts.runtime.network import ForecastDiffusionUNet
from scripts.runtime.sampler import ForecastSampler
from scripts.runtime.scheduler import ForecastScheduler

from tests.conftest import REPO_ROOT, perturbed_small_net

CONTRACT_KEYS = (
    "forecast_seconds",
    "ddpm1000_seconds",
    "speedup_vs_ddpm1000",
    "network_evaluations_per_sample",
    "forward_time_share",
    "flops_per_forecast",
    "achieved_flops_per_second",
    "matmul_flops_per_second",
    "peak_memory_bytes",
    "quality_parity",
    "device",
)
SIZE = 16


def _benchmark(args: list[str], timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "scripts.benchmark", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def net() -> ForecastDiffusionUNet:
    return perturbed_small_net()


def _inputs(n: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, SIZE, SIZE, SIZE, generator=g)
    cond = torch.rand(n, len(CONDITION_CHANNELS), SIZE, SIZE, SIZE, generator=g)
    return x, torch.tensor([500] * n), cond, torch.tensor([0, 5][:n]), torch.full((n,), 24.0)


def test_quick_benchmark_writes_every_contract_key(tmp_path: Path) -> None:
    out = tmp_path / "benchmark.json"
    result = _benchmark(["--quick", "--out", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(CONTRACT_KEYS) <= set(data)
    for key in (
        "forecast_seconds",
        "ddpm1000_seconds",
        "speedup_vs_ddpm1000",
        "achieved_flops_per_second",
        "matmul_flops_per_second",
    ):
        assert isinstance(data[key], float) and data[key] > 0, key
    for key in ("flops_per_forecast", "peak_memory_bytes", "network_evaluations_per_sample"):
        assert isinstance(data[key], int) and data[key] > 0, key
    assert data["network_evaluations_per_sample"] == data["sampler"]["network_evaluations_per_sample"]
    assert 0.0 < data["forward_time_share"] <= 1.0
    assert data["speedup_vs_ddpm1000"] == pytest.approx(data["ddpm1000_seconds"] / data["forecast_seconds"])
    assert data["peak_memory_bytes"] < 64 * 1024**3
    assert isinstance(data["device"], str) and data["device"]
    parity = data["quality_parity"]
    for sampler in ("fast", "reference"):
        assert parity[sampler]["count_mae"] >= 0.0
        auc = parity[sampler]["activity_auc"]
        assert auc is None or 0.0 <= auc <= 1.0
    assert parity["reference"]["network_evaluations_per_sample"] > parity["fast"]["network_evaluations_per_sample"]
    assert data["training_cases_per_second"] > 0
    assert "speedup vs DDPM-1000" in result.stdout  # the printed table
    assert "[target" not in result.stdout  # quick sizes are not judged against the full-size targets


def test_mismatched_weights_fail_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    torch.save({"unrelated": torch.zeros(1)}, bad)
    result = _benchmark(["--out", str(tmp_path / "b.json"), "--ckpt", str(bad)], timeout=600)
    assert result.returncode == 2
    assert "cannot load the weights" in result.stderr and "--ckpt" in result.stderr
    assert not (tmp_path / "b.json").exists()


def test_activity_auc() -> None:
    assert activity_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert activity_auc([0.1, 0.9], [True, False]) == 0.0
    assert activity_auc([0.5, 0.5], [True, False]) == 0.5
    assert activity_auc([0.5, 0.7], [True, True]) is None


def test_concat_mode_adapter_matches_the_network(net: ForecastDiffusionUNet) -> None:
    x, t, cond, treatment, horizon = _inputs(1)
    scheduler = ForecastScheduler()
    wrapper = ConcatModeNetwork(net, treatment, horizon, scheduler)
    with torch.no_grad():
        out = wrapper(torch.cat([x, cond], 1), t.float())
        direct = net(scheduler.scale_model_input(x, t), t, cond, treatment, horizon)
    # logits reach MONAI's DDPM scheduler as the x0 prediction
    assert torch.allclose(out, scheduler.predict_x0_eps(direct, x, scheduler.alphas_cumprod[500])[0])
    assert out.abs().max() <= 1.0


def test_channels_last_and_bf16_switches(net: ForecastDiffusionUNet) -> None:
    import copy

    _, _, cond, treatment, horizon = _inputs()
    noise = torch.randn(2, 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    plain_net, cl_net = copy.deepcopy(net), copy.deepcopy(net)
    plain = ForecastSampler(ForecastScheduler(), 3, channels_last=False, precision="float32").sample(
        plain_net, cond, treatment, horizon, noise
    )
    fast = ForecastSampler(ForecastScheduler(), 3, channels_last=True, precision="float32")
    # same arithmetic in another memory layout: equal up to float rounding (a voxel at the threshold may flip)
    assert (fast.sample(cl_net, cond, treatment, horizon, noise) != plain).float().mean() < 1e-3
    assert cl_net.head.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    # the weights stay ordinary trainable tensors (inference mode covers the activations only)
    assert not any(p.is_inference() for p in cl_net.parameters())
    x, t, c, tr, h = _inputs()
    cl_net(x, t, c, tr, h).sum().backward()
    assert cl_net.head.conv1.weight.grad is not None
    bf16 = ForecastSampler(ForecastScheduler(), 3, precision="bfloat16").sample(net, cond, treatment, horizon, noise)
    assert bf16.dtype == torch.float32 and set(bf16.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        ForecastSampler(ForecastScheduler(), precision="float64")


def test_guidance_chunks_spanning_both_halves(net: ForecastDiffusionUNet) -> None:
    _, _, cond, treatment, horizon = _inputs()
    noise = torch.randn(2, 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    whole = ForecastSampler(ForecastScheduler(), 2, guidance_scale=2.0).sample(net, cond, treatment, horizon, noise)
    spanning = ForecastSampler(ForecastScheduler(), 2, guidance_scale=2.0, chunk_size=3).sample(
        net, cond, treatment, horizon, noise
    )  # rows 0-2 mix conditional and unconditional rows
    assert torch.equal(whole, spanning)
    assert ForecastSampler(ForecastScheduler(), 10, guidance_scale=2.0).network_evaluations_per_sample == 20


def test_reuse_freed_memory_is_transparent(net: ForecastDiffusionUNet) -> None:
    from scripts.runtime.sampler import reuse_freed_memory

    with reuse_freed_memory(True):
        block = torch.ones(64, 1024, 1024)  # 256 MiB: above glibc's mmap threshold
        del block
    with reuse_freed_memory(False):
        pass
    _, _, cond, treatment, horizon = _inputs()
    noise = torch.randn(2, 1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    reused, fresh = (
        ForecastSampler(ForecastScheduler(), 2, precision="float32", reuse_memory=flag).sample(
            net, cond, treatment, horizon, noise
        )
        for flag in (True, False)
    )
    assert torch.equal(reused, fresh)
