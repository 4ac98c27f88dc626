"""Benchmark of the forecast: speed against MONAI's stock 1000-step sampler, quality parity, FLOPs, memory.

``python -m scripts.benchmark --out FILE.json [--quick]`` measures, for one case (the first ``testing`` case of the
config's datalist, by default the embedded sample case ``syn0000``), all six arms and K samples each:

* ``forecast_seconds``: wall time of the project's forecast of that case, end to end as the bundle runs it
  (``ForecastRunner.forecast_case``: preprocessing, sampling, analysis, NIfTI/JSON/figure writing), in a fresh
  process (weights loaded, first case, no warm-up); ``sampling_seconds`` is its reverse-process part;
* ``ddpm1000_seconds``: MONAI's stock path on the same weights: ``DiffusionInferer.sample`` with a 1000-step
  ``DDPMScheduler`` (the model's own noise schedule and prediction type), one sample at a time, the network in
  ``"concat"`` mode behind :class:`ConcatModeNetwork`, float32, default memory format. A few steps are timed and
  extrapolated to 1000 steps x (arms x K) samples (``ddpm_extrapolated_from_steps``);
* ``speedup_vs_ddpm1000`` = ``ddpm1000_seconds / forecast_seconds`` (the forecast side includes its overhead);
* ``forward_time_share``: time inside the network's forward (timed around every call) over ``forecast_seconds``;
* ``flops_per_forecast``: convolution/matmul FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) of one
  network row, times rows and network evaluations; ``achieved_flops_per_second`` over ``forecast_seconds``, against
  ``matmul_flops_per_second``, the best float32 square matrix product measured in the same run;
* ``peak_memory_bytes``: peak resident memory (``ru_maxrss``) of the forecast's own fresh process (on CUDA: the
  peak reserved GPU memory; the host figure is ``peak_host_rss_bytes``);
* ``quality_parity``: lesion-count MAE and activity AUC of the fast sampler and of a many-step reference sampler
  (same weights, same starting noise) on a synthetic cohort (``generate_cohort``, stated seed), factual arm;
* ``training_cases_per_second``: iterations of ``train.json``'s own ``SupervisedTrainer`` (batch, crop, loss, AdamW,
  learning-rate schedule, clipping, EMA) on one random batch repeated, data loading excluded.

The timing primitives and MONAI's stock path live in :mod:`scripts.bench.speed`, the parity in
:mod:`scripts.bench.parity`.

``--quick`` shrinks everything (tiny network, 16^3 grid at 12 mm, K = 2, 2 parity cases, random weights) so that
the whole run takes well under a minute: the CI mode that keeps this script from rotting; its figures mean nothing.

``--chunk_sweep 48,24,12`` adds, per chunk size, the peak memory and the sampling time per row of a one-step
forecast in a fresh process (the peak is reached in the first step), to choose ``chunk_size``.

Wall times on a loaded machine are inflated; the ``*_cpu_seconds`` figures (process CPU time, all threads) are
less sensitive to other jobs and are reported next to them.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from scripts.bench.parity import quality_parity
from scripts.bench.speed import (
    BenchmarkError,
    ForwardTimer,
    TimedInferer,
    describe_device,
    matmul_flops_per_second,
    network_flops_per_row,
    peak_rss_bytes,
    sync,
    time_ddpm_steps,
)
from scripts.runtime.constants import ARMS, CONDITION_CHANNELS, NULL_TREATMENT
from scripts.runtime.datalist import CaseDataset
from scripts.runtime.forecast import ForecastRunner
from scripts.runtime.sampler import resolve_precision
from scripts.runtime.weights import load_weights
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]


DEFAULT_CONFIG = REPO_ROOT / "bundle" / "configs" / "inference.json"


DEFAULT_TRAIN_CONFIG = REPO_ROOT / "bundle" / "configs" / "train.json"


DEFAULT_CKPT = REPO_ROOT / "bundle" / "models" / "model.pt"


QUICK_OVERRIDES: dict[str, Any] = {
    "network_channels": [8, 16, 16, 16],
    "spatial_size": [16, 16, 16],
    "spacing": [12.0, 12.0, 12.0],
}


TARGETS = {
    "speedup_vs_ddpm1000": 100.0,
    "network_evaluations_per_sample": 10,
    "forward_time_share": 0.9,
    "matmul_fraction": 0.6,
    "peak_memory_bytes": 4 * 1024**3,
}


logger = logging.getLogger("scripts.benchmark")


def load_config(args: argparse.Namespace) -> Any:
    """The inference config with the benchmark's overrides (quick sizes, device, sampler switches)."""
    parser = ConfigParser()
    parser.read_config(str(args.config))
    overrides: dict[str, Any] = dict(QUICK_OVERRIDES) if args.quick else {}
    overrides["device"] = f"$torch.device({args.device!r})"
    overrides["inferer#progress"] = False
    overrides["num_samples"] = args.num_samples
    for key in ("spatial_size", "spacing"):  # e.g. the 1-1.5 mm GPU run
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    switches = ("precision", "channels_last", "compile", "reuse_memory")
    for key in ("num_inference_steps", "chunk_size", *switches):
        value = getattr(args, key)
        if value is not None:
            overrides[f"inferer#{key}" if key in switches else key] = value
    for key, value in overrides.items():
        parser[key] = value
    return parser


def build_network(parser: Any, args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The network of the config with the benchmark's weights; returns it (eval mode) and a weights description.

    Raises:
        BenchmarkError: the checkpoint is missing or does not match the network.
    """

    torch.manual_seed(0)
    network = copy.deepcopy(parser.get_parsed_content("network_def")).to(args.device)
    if args.quick and args.ckpt is None:
        return network.eval(), "random initialisation (seed 0), quick mode"
    ckpt = Path(args.ckpt or DEFAULT_CKPT)
    try:
        load_weights(network, ckpt, args.device)
    except Exception as err:
        raise BenchmarkError(
            f"cannot load the weights {ckpt} into the network of {args.config} ({err}). Pass --ckpt PATH to weights "
            f"that match its network_def (timings do not depend on the weight values; quality parity does)."
        ) from err
    return network.eval(), str(ckpt)


def benchmark_dataset(parser: Any, args: argparse.Namespace) -> CaseDataset:
    """The ``testing`` cases of ``--datalist`` (default: the config's datalist) with the config's preprocessing; the
    benchmarked case is the first."""
    datalist = args.datalist or parser.get_parsed_content("datalist")
    dataset = CaseDataset(datalist, "testing", parser.get_parsed_content("preprocessing"))
    if not dataset.data:
        raise BenchmarkError(f"no valid testing case in {datalist}")
    return dataset


def run_forecast(args: argparse.Namespace) -> dict[str, Any]:
    """Forecast the benchmark case (all arms, K samples) in this process and time it; used by the child process."""
    parser = load_config(args)
    network, weights = build_network(parser, args)
    inferer = parser.get_parsed_content("inferer")
    sampler = inferer.sampler
    compile_seconds, use_compile = 0.0, sampler.compile
    if use_compile:  # compile outside the timer, so the timer sees the compiled module's calls
        compiled = sampler.prepare(network)
        sampler.compile = False
        start = time.perf_counter()
        size = parser.get_parsed_content("spatial_size")
        cond_channels = int(parser.get_parsed_content("network_args#cond_channels"))
        n = min(sampler.chunk_size or 6 * args.num_samples, 6 * args.num_samples)
        sampler.sample(
            compiled,
            torch.zeros(n, cond_channels, *size, device=args.device),
            torch.zeros(n, dtype=torch.long),
            torch.full((n,), 24.0),
        )
        compile_seconds = time.perf_counter() - start
        network = compiled
    timer = ForwardTimer(network)
    timed_inferer = TimedInferer(inferer)
    dataset = benchmark_dataset(parser, args)
    case = dataset.data[0]
    baseline_rss = peak_rss_bytes()
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    with tempfile.TemporaryDirectory(prefix="benchmark_forecast_") as out:
        runner = ForecastRunner(dataset, out, timer, timed_inferer, arms=list(ARMS), device=args.device, overwrite=True)
        runner.network.eval()
        start, cpu_start = time.perf_counter(), time.process_time()
        forecast = runner.forecast_case(dict(case))
        sync(torch.device(args.device))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "case": case["id"],
        "weights": weights,
        "forecast_seconds": wall,
        "forecast_cpu_seconds": cpu,
        "torch_threads": torch.get_num_threads(),
        "sampling_seconds": timed_inferer.seconds,
        "forward_seconds": timer.seconds,
        "forward_calls": timer.calls,
        "forward_rows": timer.rows,
        "compile_seconds": compile_seconds,
        "baseline_rss_bytes": baseline_rss,
        "peak_host_rss_bytes": peak_rss_bytes(),
        "expected_counts": {arm: figures["expected_count"] for arm, figures in forecast["arms"].items()},
        "sampler": {
            "num_inference_steps": sampler.num_inference_steps,
            "guidance_scale": sampler.guidance_scale,
            "chunk_size": sampler.chunk_size,
            "channels_last": sampler.channels_last,
            "precision": resolve_precision(sampler.precision, torch.device(args.device)),
            "compile": use_compile,
            "reuse_memory": sampler.reuse_memory,
            "network_evaluations_per_sample": sampler.network_evaluations_per_sample,
        },
    }
    if torch.device(args.device).type == "cuda":
        result["peak_gpu_bytes"] = int(torch.cuda.max_memory_reserved(args.device))
    return result


def forecast_in_subprocess(argv: Sequence[str]) -> dict[str, Any]:
    """Run :func:`run_forecast` in a fresh Python process (its peak memory is the forecast's own)."""
    with tempfile.TemporaryDirectory(prefix="benchmark_child_") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "scripts.benchmark", *argv, "--forecast_child", str(result_path)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        if completed.returncode != 0 or not result_path.is_file():
            raise BenchmarkError(
                f"the forecast process failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
            )
        return json.loads(result_path.read_text())


def chunk_sweep(args: argparse.Namespace, argv: Sequence[str], rows: int) -> list[dict[str, Any]]:
    """Peak memory and sampling seconds per row of a one-step forecast per chunk size, each in a fresh process."""
    sweep = []
    for chunk in (int(c) for c in str(args.chunk_sweep).split(",") if c.strip()):
        logger.info("chunk sweep: chunk_size %d ...", chunk)
        fc = forecast_in_subprocess([*argv, "--chunk_size", str(chunk), "--num_inference_steps", "1"])
        peak = int(fc.get("peak_gpu_bytes", fc["peak_host_rss_bytes"]))
        sweep.append(
            {
                "chunk_size": chunk,
                "peak_memory_bytes": peak,
                "sampling_seconds_per_row": fc["sampling_seconds"] / rows,
                "forward_seconds_per_row": fc["forward_seconds"] / rows,
                "forecast_cpu_seconds": fc["forecast_cpu_seconds"],
            }
        )
    return sweep


TRAINING_HANDLERS = ("LrScheduleHandler", "scripts.training.engines.GradientClipHandler")
"""The handlers of ``train#handlers`` that act on every iteration (with ``train#ema``); validation, checkpoints and
logging are left out of the timing."""


def _time_training(args: argparse.Namespace, precision: str) -> tuple[float, dict[str, Any]]:
    """Seconds per iteration of ``train.json``'s trainer with ``train_precision`` = ``precision``, and the setting."""
    parser = ConfigParser()
    parser.read_config(str(args.train_config))
    if args.quick:
        parser["network_channels"] = QUICK_OVERRIDES["network_channels"]
        parser["batch_size"], parser["train_crop_size"] = 2, [16, 16, 16]
    parser["device"] = f"$torch.device({str(args.device)!r})"
    parser["train_precision"] = precision
    batch_size = int(parser.get_parsed_content("batch_size"))
    crop = [int(s) for s in parser.get_parsed_content("train_crop_size")]
    g = torch.Generator().manual_seed(0)
    batch = {
        "cond": torch.rand(batch_size, len(CONDITION_CHANNELS), *crop, generator=g),
        "label": (torch.rand(batch_size, 1, *crop, generator=g) > 0.999).float(),
        "treatment": torch.randint(0, NULL_TREATMENT, (batch_size,), generator=g),
        "horizon": torch.full((batch_size,), 24.0),
    }
    iterations = args.train_iterations + 1  # the first is a warm-up
    parser["train#dataloader"] = [batch] * iterations
    parser["train#handlers"] = [h for h in parser["train#handlers"] if h["_target_"] in TRAINING_HANDLERS]
    parser["train#trainer#max_epochs"] = 1
    torch.manual_seed(0)
    trainer = parser.get_parsed_content("train#trainer")
    stamps: list[float] = []
    device = torch.device(args.device)

    def stamp(_: Any) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    trainer.run()
    loss_fn = parser.get_parsed_content("train#loss")
    setting = {
        "batch_size": batch_size,
        "crop": crop,
        "text": f"train.json's trainer: batch {batch_size}, crop {crop}, AdamW, {type(loss_fn).__name__}, "
        f"learning-rate schedule, grad clip {parser.get_parsed_content('grad_clip_norm')}, EMA, amp="
        f"{bool(parser.get_parsed_content('amp'))}; one random batch repeated, data loading and augmentation excluded",
    }
    return (stamps[-1] - stamps[0]) / args.train_iterations, setting


def training_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Cases per second of ``train.json``'s own trainer (prepare-batch, loss, AdamW, learning-rate schedule,
    clipping, EMA) on one batch of random tensors repeated, so data loading and augmentation are left out: at the
    config's training precision (``train_precision``, "auto": bfloat16 autocast on a CPU with native bfloat16) and,
    in the same run, in float32, with their ratio."""
    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    seconds, setting = _time_training(args, "auto")
    out = {
        "training_cases_per_second": setting["batch_size"] / seconds,
        "training_seconds_per_iteration": seconds,
        "training_precision": precision,
        "training_setting": setting["text"],
    }
    if precision != "float32":
        seconds_fp32, _ = _time_training(args, "float32")
        out["training_cases_per_second_float32"] = setting["batch_size"] / seconds_fp32
        out["training_speedup_vs_float32"] = seconds_fp32 / seconds
    return out


def run_benchmark(args: argparse.Namespace, child_argv: Sequence[str]) -> dict[str, Any]:
    """All measurements; returns the JSON object (the contract's keys first)."""
    parser = load_config(args)
    network, weights = build_network(parser, args)  # fails early and clearly on mismatched weights
    device = torch.device(args.device)
    size = [int(s) for s in parser.get_parsed_content("spatial_size")]
    dataset = benchmark_dataset(parser, args)
    case = dataset.data[0]
    data = parser.get_parsed_content("preprocessing")(dict(case))
    cond = torch.as_tensor(data["cond"]).float()[None].to(device)
    rows = len(ARMS) * args.num_samples

    logger.info("matmul peak ...")
    matmul, matmul_per_cpu = matmul_flops_per_second(args.device, args.matmul_size, repeats=args.matmul_repeats)
    logger.info("forecast (fresh process) ...")
    fc = forecast_in_subprocess(child_argv)
    again = matmul_flops_per_second(args.device, args.matmul_size, repeats=args.matmul_repeats)
    matmul, matmul_per_cpu = max(matmul, again[0]), max(matmul_per_cpu, again[1])  # measured before and after
    nfe = int(fc["sampler"]["network_evaluations_per_sample"])
    flops_row = network_flops_per_row(network, cond)
    flops = flops_row * rows * nfe
    logger.info("stock MONAI DDPM path (%d steps timed) ...", args.ddpm_steps)
    ddpm_step, ddpm_cpu_step = time_ddpm_steps(network, parser, cond, args.ddpm_steps)
    ddpm_seconds = ddpm_step * 1000 * rows
    peak = int(fc.get("peak_gpu_bytes", fc["peak_host_rss_bytes"]))
    result: dict[str, Any] = {
        "forecast_seconds": fc["forecast_seconds"],
        "ddpm1000_seconds": ddpm_seconds,
        "speedup_vs_ddpm1000": ddpm_seconds / fc["forecast_seconds"],
        "network_evaluations_per_sample": nfe,
        "forward_time_share": min(1.0, fc["forward_seconds"] / fc["forecast_seconds"]),
        "flops_per_forecast": flops,
        "achieved_flops_per_second": flops / fc["forecast_seconds"],
        "matmul_flops_per_second": matmul,
        "peak_memory_bytes": peak,
        "quality_parity": None,
        "device": describe_device(device),
    }
    result.update(
        {
            "matmul_fraction": result["achieved_flops_per_second"] / matmul,
            "matmul_flops_per_cpu_second": matmul_per_cpu,
            "flops_per_cpu_second": flops / fc["forecast_cpu_seconds"],
            "matmul_fraction_cpu_time": flops / fc["forecast_cpu_seconds"] / matmul_per_cpu,
            "flops_per_second_in_forward": flops / fc["forward_seconds"] if fc["forward_seconds"] > 0 else None,
            "sampling_seconds": fc["sampling_seconds"],
            "forward_seconds": fc["forward_seconds"],
            "forward_time_share_of_sampling": fc["forward_seconds"] / fc["sampling_seconds"],
            "flops_per_network_row": flops_row,
            "rows_per_forecast": rows,
            "forward_calls": fc["forward_calls"],
            "ddpm_seconds_per_step": ddpm_step,
            "forecast_cpu_seconds": fc["forecast_cpu_seconds"],
            "ddpm1000_cpu_seconds": ddpm_cpu_step * 1000 * rows,
            "speedup_vs_ddpm1000_cpu_time": ddpm_cpu_step * 1000 * rows / fc["forecast_cpu_seconds"],
            "torch_threads": fc["torch_threads"],
            "ddpm_extrapolated_from_steps": args.ddpm_steps,
            "ddpm_path": "monai.inferers.DiffusionInferer.sample + monai.networks.schedulers.DDPMScheduler(1000, "
            "model's schedule and prediction type), mode='concat', one sample at a time, float32; "
            f"{args.ddpm_steps} steps timed one by one after 1 warm-up, the fastest extrapolated "
            f"x1000 steps x {rows} samples",
            "peak_memory_kind": "GPU reserved" if "peak_gpu_bytes" in fc else "host peak RSS of the forecast process",
            "peak_host_rss_bytes": fc["peak_host_rss_bytes"],
            "baseline_rss_bytes": fc["baseline_rss_bytes"],
            "compile_seconds": fc["compile_seconds"],
            "case": fc["case"],
            "arms": len(ARMS),
            "num_samples": args.num_samples,
            "spatial_size": size,
            "sampler": fc["sampler"],
            "weights": weights,
            "quick": bool(args.quick),
            "forecast_expected_counts": fc["expected_counts"],
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
    )
    if fc["sampler"]["precision"] == "bfloat16":
        bf16_matmul = matmul_flops_per_second(args.device, args.matmul_size, args.matmul_repeats, torch.bfloat16)
        result["matmul_bf16_flops_per_second"] = bf16_matmul[0]
        result["matmul_bf16_fraction"] = result["achieved_flops_per_second"] / bf16_matmul[0]
    if args.chunk_sweep:
        result["chunk_sweep"] = chunk_sweep(args, child_argv, rows)
    if not args.skip_parity:
        logger.info("quality parity on %d synthetic cases ...", args.parity_cases)
        result["quality_parity"] = quality_parity(network, parser, args, weights)
    if not args.skip_training:
        logger.info("training throughput ...")
        result.update(training_throughput(args))
    result["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def format_report(result: dict[str, Any]) -> str:
    """A plain-text table of the figures against the issue's targets (not judged at ``--quick`` sizes, where they
    mean nothing)."""
    gib = 1024**3

    def check(ok: bool | None) -> str:
        if ok is None or result.get("quick"):  # quick sizes: the targets are of the full-size forecast
            return ""
        return "  [target met]" if ok else "  [target missed]"

    parity = result.get("quality_parity") or {}
    r = result
    lines = [
        f"device: {result['device']}",
        f"case {r['case']}, {r['arms']} arms x {r['num_samples']} samples, grid {r['spatial_size']}, "
        f"sampler {r['sampler']}",
        f"forecast wall time            {r['forecast_seconds']:10.2f} s (sampling {r['sampling_seconds']:.2f} s)",
        f"stock DDPM-1000 (extrapolated){r['ddpm1000_seconds']:10.1f} s ({r['ddpm_seconds_per_step']:.3f} s/step, "
        f"{r['ddpm_extrapolated_from_steps']} steps timed)",
        f"speedup vs DDPM-1000          {result['speedup_vs_ddpm1000']:10.1f} x"
        + check(result["speedup_vs_ddpm1000"] >= TARGETS["speedup_vs_ddpm1000"]),
        f"  in CPU time                 {r['speedup_vs_ddpm1000_cpu_time']:10.1f} x (forecast "
        f"{r['forecast_cpu_seconds']:.1f} CPU s, DDPM-1000 {r['ddpm1000_cpu_seconds']:.0f} CPU s, "
        f"{r['torch_threads']} threads)",
        f"network evaluations / sample  {result['network_evaluations_per_sample']:10d}"
        + check(result["network_evaluations_per_sample"] <= TARGETS["network_evaluations_per_sample"]),
        f"forward share of wall time    {100 * result['forward_time_share']:10.1f} %"
        + check(result["forward_time_share"] >= TARGETS["forward_time_share"]),
        f"FLOPs per forecast            {result['flops_per_forecast'] / 1e12:10.3f} TFLOP",
        f"achieved                      {result['achieved_flops_per_second'] / 1e9:10.1f} GFLOP/s "
        f"(in forward {(result['flops_per_second_in_forward'] or 0) / 1e9:.1f})",
        f"fp32 matmul                   {result['matmul_flops_per_second'] / 1e9:10.1f} GFLOP/s -> "
        f"{100 * r['matmul_fraction']:.1f} % of it" + check(r["matmul_fraction"] >= TARGETS["matmul_fraction"]),
        f"peak memory                   {result['peak_memory_bytes'] / gib:10.2f} GiB ({result['peak_memory_kind']})"
        + check(result["peak_memory_bytes"] < TARGETS["peak_memory_bytes"]),
    ]
    lines.append(
        f"  in CPU time                 {r['flops_per_cpu_second'] / 1e9:10.1f} GFLOP per CPU s vs matmul "
        f"{r['matmul_flops_per_cpu_second'] / 1e9:.1f} -> {100 * r['matmul_fraction_cpu_time']:.1f} %"
    )
    if "matmul_bf16_flops_per_second" in result:
        lines.append(
            f"bf16 matmul                   {r['matmul_bf16_flops_per_second'] / 1e9:10.1f} GFLOP/s -> "
            f"{100 * r['matmul_bf16_fraction']:.1f} % of it"
        )
    if "training_cases_per_second" in result:
        lines.append(
            f"training throughput           {result['training_cases_per_second']:10.2f} cases/s "
            f"({result['training_setting']})"
        )
    for row in result.get("chunk_sweep", []):
        lines.append(
            f"chunk_size {row['chunk_size']:4d}: peak {row['peak_memory_bytes'] / gib:.2f} GiB, "
            f"{row['sampling_seconds_per_row']:.3f} s per row and step"
        )
    if parity:
        for name in ("fast", "reference", "fast_float32"):
            if name not in parity:
                continue
            p = parity[name]
            auc = "n/a (one class)" if p["activity_auc"] is None else f"{p['activity_auc']:.3f}"
            line = f"parity {name:12s} count MAE {p['count_mae']:.3f}, activity AUC {auc} ({p['sampler']})"
            if name != "fast":
                line += (
                    f"; vs fast: |E[count] difference| {parity[f'count_mae_fast_vs_{name}']:.3f}, voxel "
                    f"agreement {parity[f'voxel_agreement_fast_vs_{name}']:.5f}"
                )
            lines.append(line)
        lines.append(f"parity cohort: {parity['cohort']}; weights {parity['weights']}")
        if "reduced_precision_error_first_case" in parity:
            e = parity["reduced_precision_error_first_case"]
            lines.append(
                f"reduced precision vs float32 network: output relative RMS error "
                f"{e['output_relative_rms_error']:.2e}, x0 max abs error {e['x0_max_abs_error']:.2e}"
            )
        if "note" in parity:
            lines.append(f"parity NOTE: {parity['note']}")
    return "\n".join(lines)


def _int_list(value: str) -> list[int]:
    return [int(v) for v in json.loads(value)]


def _float_list(value: str) -> list[float]:
    return [float(v) for v in json.loads(value)]


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="tiny network and grid (CI); figures are meaningless")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="inference config")
    p.add_argument("--train_config", type=Path, default=DEFAULT_TRAIN_CONFIG, help="training config")
    p.add_argument(
        "--ckpt",
        type=Path,
        default=None,
        help=f"weights (default {DEFAULT_CKPT.relative_to(REPO_ROOT)}; quick mode: random initialisation)",
    )
    p.add_argument("--datalist", type=Path, default=None, help="datalist whose first testing case is forecast")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_samples", type=int, default=None, help="K per arm (default 8; quick 2)")
    p.add_argument("--num_inference_steps", type=int, default=None, help="default: the config's")
    p.add_argument("--chunk_size", type=int, default=None, help="rows per network call (default: the config's)")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    p.add_argument("--channels_last", type=_bool, default=None)
    p.add_argument("--compile", type=_bool, default=None)
    p.add_argument("--spatial_size", type=_int_list, default=None, help='working grid, e.g. "[128,128,128]"')
    p.add_argument("--spacing", type=_float_list, default=None, help='working voxel size in mm, e.g. "[1.5,1.5,1.5]"')
    p.add_argument("--reuse_memory", type=_bool, default=None)
    p.add_argument("--ddpm_steps", type=int, default=None, help="DDPM steps timed (default 5; quick 2)")
    p.add_argument("--matmul_size", type=int, default=None, help="matmul side (default 2048; quick 512)")
    p.add_argument("--matmul_repeats", type=int, default=None, help="timed matmuls (default 10; quick 3)")
    p.add_argument("--parity_cases", type=int, default=None, help="synthetic cases (default 8; quick 2)")
    p.add_argument("--parity_samples", type=int, default=None, help="samples per parity case (default 4; quick 1)")
    p.add_argument("--parity_seed", type=int, default=1234)
    p.add_argument("--reference_steps", type=int, default=None, help="reference DDIM steps (default 100; quick 20)")
    p.add_argument("--train_iterations", type=int, default=None, help="timed iterations (default 5; quick 2)")
    p.add_argument("--chunk_sweep", default=None, help="comma-separated chunk sizes to sweep (memory, time per row)")
    p.add_argument("--skip_parity", action="store_true")
    p.add_argument("--skip_training", action="store_true")
    p.add_argument("--forecast_child", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the size-dependent defaults (full or quick)."""
    quick = {
        "num_samples": 2,
        "ddpm_steps": 2,
        "matmul_size": 512,
        "matmul_repeats": 3,
        "parity_cases": 2,
        "parity_samples": 1,
        "reference_steps": 20,
        "train_iterations": 2,
    }
    full = {
        "num_samples": 8,
        "ddpm_steps": 5,
        "matmul_size": 2048,
        "matmul_repeats": 10,
        "parity_cases": 8,
        "parity_samples": 4,
        "reference_steps": 100,
        "train_iterations": 5,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = apply_defaults(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.forecast_child is not None:
            args.forecast_child.write_text(json.dumps(run_forecast(args)))
            return 0
        result = run_benchmark(args, argv)
    except BenchmarkError as err:
        print(f"benchmark: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(format_report(result))
    print(f"wrote {args.out}")
    return 0
