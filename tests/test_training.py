"""Training workflows through ``python -m monai.bundle run``: checkpoints, resuming, the baseline, torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from scripts.runtime.constants import CONDITION_CHANNELS

from tests.conftest import REPO_ROOT

TINY = [
    "--spatial_size",
    "[32,32,32]",
    "--spacing",
    "[6,6,6]",
    "--batch_size",
    "2",
    "--val_interval",
    "1",
    "--num_inference_steps",
    "2",
    "--val_num_samples",
    "2",
    "--network_channels",
    "[8,16,16,16]",
    "--device",
    "cpu",
    "--checkpoint_interval",
    "1",
]


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _train(config: str, datalist: Path, out: Path, epochs: int, launcher: list[str] | None = None) -> str:
    launcher = launcher or [sys.executable, "-m"]
    result = _run(
        [
            *launcher,
            "monai.bundle",
            "run",
            "--config_file",
            config,
            "--datalist",
            str(datalist),
            "--output_dir",
            str(out),
            "--train#trainer#max_epochs",
            str(epochs),
            *TINY,
        ]
    )
    return result.stdout + result.stderr


def _epoch_of(checkpoint: Path) -> int:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["trainer"]
    return int(state["iteration"]) // int(state["epoch_length"])


def test_train_writes_checkpoint_and_resumes(tiny_cohort: Path, tmp_path: Path) -> None:
    log = _train("bundle/configs/train.json", tiny_cohort, tmp_path, epochs=1)
    models = tmp_path / "models"
    assert (models / "checkpoint_epoch=1.pt").is_file(), log[-2000:]
    assert (models / "model.pt").is_file()  # EMA weights of the best validation epoch
    saved = torch.load(models / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    assert {"network", "ema", "optimizer", "lr_scheduler", "trainer"} <= set(saved)
    assert _epoch_of(models / "checkpoint_epoch=1.pt") == 1
    assert "val_count_crps" in log and "val_count_mae" in log and "train_loss" in log
    assert (models / "ema_model_epoch=1.pt").is_file()  # EMA weights of every validation
    assert (tmp_path / "tensorboard").is_dir()

    log = _train("bundle/configs/train.json", tiny_cohort, tmp_path, epochs=2)
    assert "resuming from" in log and "resumed at epoch 1" in log, log[-2000:]
    assert _epoch_of(models / "checkpoint_epoch=2.pt") == 2
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("patch_embed") for k in state)
    # the best validation survives the resume: model.pt holds the EMA of the best epoch of the whole run (ties keep
    # the earlier one), not the first validation after the resume
    best = torch.load(models / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=False)["validation"]
    assert best["best_metric_epoch"] in (1, 2)
    kept = torch.load(models / f"ema_model_epoch={best['best_metric_epoch']}.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(state[k], kept[k]) for k in state)
    assert f"best value: {best['best_metric']}" in log and f"at epoch: {best['best_metric_epoch']}" in log


def test_deterministic_baseline_trains(tiny_cohort: Path, tmp_path: Path) -> None:
    config = "['bundle/configs/train.json','bundle/configs/train_deterministic.json']"
    _train(config, tiny_cohort, tmp_path, epochs=1)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state["patch_embed.weight"].shape[1] == len(CONDITION_CHANNELS)  # conditioning only, no noisy channel


def test_torchrun_two_processes_on_cpu(tiny_cohort: Path, tmp_path: Path) -> None:
    config = "['bundle/configs/train.json','bundle/configs/multi_gpu_train.json']"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m"]
    _train(config, tiny_cohort, tmp_path, epochs=1, launcher=launcher)
    assert _epoch_of(tmp_path / "models" / "checkpoint_epoch=1.pt") == 1
    log = _train(config, tiny_cohort, tmp_path, epochs=2, launcher=launcher)
    assert "resumed at epoch 1" in log
    assert _epoch_of(tmp_path / "models" / "checkpoint_epoch=2.pt") == 2


def test_mlflow_tracking(tiny_cohort: Path, tmp_path: Path) -> None:
    import sqlite3

    _run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "bundle/configs/train.json",
            "--datalist",
            str(tiny_cohort),
            "--output_dir",
            str(tmp_path),
            "--train#trainer#max_epochs",
            "1",
            *TINY,
            "--tracking",
            "mlflow",
        ]
    )
    with sqlite3.connect(tmp_path / "mlruns.db") as db:
        keys = {row[0] for row in db.execute("select distinct key from metrics")}
    assert {"train_loss", "val_count_crps", "val_count_mae", "val_activity_brier", "val_dice"} <= keys, keys
