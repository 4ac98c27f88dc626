"""Training plumbing for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``: batch preparation, the weighted
diffusion loss, gradient clipping and resuming.

A training iteration of the diffusion model, following the names used in ``bundle/configs/train.json``:

1. ``MaskDiffusionPrepareBatch`` turns a preprocessed batch (``cond``, ``label``, ``treatment``, ``horizon``) into
   the noisy NET2 signal ``x_t`` at random timesteps, the target with its min-SNR and lesion weights, and the
   network's keyword arguments (``timesteps``, ``cond``, ``treatment`` with classifier-free dropout to the null
   token, ``horizon``);
2. the trainer's ``AutocastInferer`` (a ``SimpleInferer``, in bfloat16 where the CPU has it natively) calls
   ``network(x_t, timesteps=..., cond=..., treatment=..., horizon=...)``;
3. ``WeightedBCEWithLogitsLoss`` compares the predicted logits with the target mask (binary, or soft:
   :class:`scripts.runtime.transforms.SoftMaskd`), weighted;
4. ``GradientClipHandler`` clips gradients between backward and the optimizer step; ignite's ``EMAHandler`` then
   updates the EMA weights that validation and inference use.

``ConditionPrepareBatch`` serves the deterministic baseline and validation: it passes ``cond`` as the input and
``treatment`` / ``horizon`` as keyword arguments.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.engines.utils import DiffusionPrepareBatch, IterationEvents, PrepareBatch
from monai.handlers import CheckpointLoader, CheckpointSaver, ValidationHandler
from monai.inferers import SimpleInferer
from scripts.runtime.constants import NULL_TREATMENT
from scripts.runtime.files import atomic_path, remove_stale_temporaries
from scripts.runtime.sampler import resolve_precision
from scripts.runtime.scheduler import ForecastScheduler, mask_to_signal

logger = logging.getLogger(__name__)


class WeightedTarget(NamedTuple):
    """Target, its loss weight (per sample, or per voxel; broadcast against the target) and the weight of the
    lesion class (``pos_weight`` of the binary cross-entropy)."""

    target: torch.Tensor
    weight: torch.Tensor
    pos_weight: float = 1.0


def _to(value: torch.Tensor, device: str | torch.device | None, non_blocking: bool) -> torch.Tensor:
    return torch.as_tensor(value).to(device, non_blocking=non_blocking)


def _conditions(
    batchdata: Mapping[str, Any], device: str | torch.device | None, non_blocking: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cond = _to(batchdata["cond"], device, non_blocking).float()
    treatment = _to(batchdata["treatment"], device, non_blocking).long().reshape(-1)
    horizon = _to(batchdata["horizon"], device, non_blocking).float().reshape(-1)
    return cond, treatment, horizon


class ConditionPrepareBatch(PrepareBatch):
    """``(cond, label, (), {"treatment", "horizon"})``: input for the deterministic net and for sampling."""

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        cond, treatment, horizon = _conditions(batchdata, device, non_blocking)
        label = batchdata.get("label")
        label = _to(label, device, non_blocking).float() if label is not None else None
        return cond, label, (), {"treatment": treatment, "horizon": horizon}


class MaskDiffusionPrepareBatch(DiffusionPrepareBatch):
    """MONAI's ``DiffusionPrepareBatch`` for NET2 masks: noise the mask signal at random timesteps and hand the
    network its conditions.

    The hooks keep MONAI's meaning: ``get_noise`` (Gaussian) and ``get_timesteps`` (uniform over T) are inherited,
    ``get_target`` is the clean mask signal (the binary cross-entropy of the logits turns it into a lesion
    probability: 0/1 for a binary mask, a value in between for a soft one,
    :class:`scripts.runtime.transforms.SoftMaskd`) and ``get_weights`` its min-SNR weight; the scheduler's
    ``lesion_weight`` goes with the target as the lesion class weight. A call returns
    ``(x_t, WeightedTarget, (), kwargs)`` with ``x_t`` the scheduler's input scaling of the noisy signal and
    ``kwargs`` the network's ``timesteps``, ``cond``, ``treatment`` (dropped to the null token with probability
    ``treatment_dropout``, for classifier-free guidance) and ``horizon``.

    Args:
        scheduler: the training noise scheduler.
        treatment_dropout: probability of replacing the treatment by the null token.
    """

    def __init__(self, scheduler: ForecastScheduler, treatment_dropout: float = 0.1) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps)
        self.scheduler = scheduler
        self.treatment_dropout = float(treatment_dropout)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The clean mask signal {-1, +1}."""
        return images

    def get_weights(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Loss weight per sample (min-SNR), shaped to broadcast against the target."""
        n = images.shape[0]
        return self.scheduler.loss_weights(timesteps).to(images.dtype).reshape(n, *([1] * (images.ndim - 1)))

    def __call__(  # type: ignore[override]
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, WeightedTarget, tuple, dict]:
        cond, treatment, horizon = _conditions(batchdata, device, non_blocking)
        x0 = mask_to_signal(_to(batchdata["label"], device, non_blocking).float())
        noise = self.get_noise(x0)
        timesteps = self.get_timesteps(x0)
        x_t = self.scheduler.scale_model_input(self.scheduler.add_noise(x0, noise, timesteps), timesteps)
        target = WeightedTarget(
            self.get_target(x0, noise, timesteps), self.get_weights(x0, timesteps), self.scheduler.lesion_weight
        )
        if self.treatment_dropout > 0:
            dropped = torch.rand(x0.shape[0], device=x0.device) < self.treatment_dropout
            treatment = torch.where(dropped, torch.full_like(treatment, NULL_TREATMENT), treatment)
        kwargs_out = {"timesteps": timesteps, "cond": cond, "treatment": treatment, "horizon": horizon}
        return x_t, target, (), kwargs_out


class WeightedBCEWithLogitsLoss(torch.nn.Module):
    """Mean of weight * class-weighted binary cross-entropy of mask logits against a mask signal in [-1, +1].

    ``target`` is a :class:`WeightedTarget`: the signal s becomes the lesion probability y = (s + 1) / 2, and the
    lesion term is weighted by ``pos_weight`` w: -(w y log p + (1 - y) log(1 - p)). Its minimiser over a
    distribution of targets is logit p = logit(E[y]) + log w whether the targets are binary or soft, which is what
    the sampler's de-bias (:meth:`scripts.runtime.scheduler.ForecastScheduler.predict_x0_eps`) undoes; for a binary
    mask it is the per-voxel weight w on lesion voxels.
    """

    def forward(self, pred: torch.Tensor, target: WeightedTarget) -> torch.Tensor:
        labels = ((target.target.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        pos_weight = torch.tensor(float(target.pos_weight), device=pred.device)
        error = torch.nn.functional.binary_cross_entropy_with_logits(
            pred.float(), labels, pos_weight=pos_weight, reduction="none"
        )
        return (target.weight.float() * error).mean()


class AutocastInferer(SimpleInferer):
    """MONAI's ``SimpleInferer`` under autocast: the training forward pass in bfloat16 on a CPU that multiplies it
    natively (measured in ``bundle/docs/performance.md``), float32 elsewhere.

    ``precision``: ``"auto"`` (:func:`scripts.runtime.sampler.resolve_precision`: bfloat16 on such a CPU, float32
    otherwise, GPUs included, where the trainer's own ``amp`` applies), ``"float32"`` or ``"bfloat16"``. The
    parameters, their gradients and the loss stay float32; only the network's operations run in the lower precision.
    """

    def __init__(self, precision: str = "auto") -> None:
        super().__init__()
        if precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        precision = resolve_precision(self.precision, inputs.device)
        enabled = precision == "bfloat16"
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=enabled):
            return super().__call__(inputs, network, *args, **kwargs)


class GradientClipHandler:
    """Clip the gradient norm after backward and before the optimizer step (unscaling first under AMP)."""

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = float(max_norm)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
        engine.state.grad_norm = float(norm)


def epoch_checkpoints(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> list[tuple[int, str]]:
    """``(epoch, path)`` of every ``{prefix}_epoch=N.pt`` in ``ckpt_dir``, by epoch."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(str(ckpt_dir)), f"{prefix}_epoch=*.pt")):
        match = re.search(r"_epoch=(\d+)\.pt$", path)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str, prefix: str = "checkpoint") -> str | None:
    """Path of the checkpoint with the highest epoch in ``ckpt_dir`` (``{prefix}_epoch=N.pt``), or None."""
    found = epoch_checkpoints(ckpt_dir, prefix)
    return found[-1][1] if found else None


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that writes a temporary file (:func:`~scripts.runtime.files.atomic_path`), syncs, renames,
    and only then deletes the checkpoint the new one replaces.

    A run killed while saving leaves at most that hidden temporary file (removed by the next resume, see
    :func:`scripts.runtime.files.remove_stale_temporaries`), never a half written checkpoint under a checkpoint's name.
    ignite's ``Checkpoint`` asks its saver to remove the oldest file *before* it writes the new one; with
    ``n_saved: 1`` a kill in between would leave no checkpoint at all, so removals wait here until the new file is in
    place. ``filename`` fixes the file name whatever the checkpoint's score (as MONAI's own saver does, e.g.
    ``model.pt``); the rename then replaces the old file in one step.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename
        self.pending_removal: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        target = self.filename or filename
        super().__call__(checkpoint, target, metadata)
        pending, self.pending_removal = self.pending_removal, []
        for name in pending:
            if name != target:  # a file of the same name was just replaced by the rename
                self._remove_now(name)

    def remove(self, filename: str) -> None:
        """Remove ``filename`` once the next checkpoint is written (ignite calls this just before saving)."""
        self.pending_removal.append(self.filename or filename)

    def _remove_now(self, filename: str) -> None:
        try:
            super().remove(filename)
        except FileNotFoundError:  # already gone (removed by hand, or by the resume's bookkeeping)
            pass

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        # fsync: the rename must not reach the disk before the data (power loss)
        with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as handle:
            func(checkpoint, handle, **self.kwargs)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` whose every file (interval, final, key metric) is written atomically.

    MONAI's saver writes in place (``atomic=False``), so a run killed mid-save leaves a truncated checkpoint, which
    the next resume would then pick as the newest. Here every save goes through :class:`AtomicDiskSaver`.
    """

    def __init__(self, save_dir: str, save_dict: dict, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                fixed = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, filename=fixed)


class TrainerCheckpointSaver(AtomicCheckpointSaver):
    """Atomic checkpoint saver that also saves the state of the engine it is attached to under ``"trainer"``.

    The trainer cannot be named in its own handler's config (a circular reference), so it joins at ``attach``.
    Each checkpoint is written to a temporary file and renamed (:class:`AtomicDiskSaver`); with ``n_saved`` the
    older one is deleted only after the new one is in place, so a complete checkpoint exists at every moment.
    """

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self._count_earlier_checkpoints)
        if self._interval_checkpoint is not None and self.epoch_level:
            # after the resume's loader (attached earlier, also at STARTED): the epoch this run starts from
            engine.add_event_handler(Events.STARTED, lambda e: setattr(self, "_start_epoch", e.state.epoch))
            engine.add_event_handler(Events.COMPLETED, self._save_last_epoch)

    def _save_last_epoch(self, engine: Engine) -> None:
        """Checkpoint the last epoch of a run whose length is not a multiple of ``save_interval`` (a one-epoch run
        would otherwise leave nothing to resume from)."""
        if engine.state.epoch <= getattr(self, "_start_epoch", 0) or engine.state.epoch % self.save_interval == 0:
            return  # nothing trained in this run (a resumed run with nothing left), or just saved on the interval
        self.interval_completed(engine)

    def _count_earlier_checkpoints(self, engine: Engine) -> None:
        """On a resumed run, count the checkpoints already on disk against ``n_saved``.

        ignite only deletes the files it saved itself, so without this the checkpoint a run resumed from would stay
        forever next to the new ones.
        """
        checkpoint = self._interval_checkpoint
        if checkpoint is None or not self.epoch_level or engine.state.epoch == 0:
            return
        earlier = [
            (epoch, os.path.basename(path))
            for epoch, path in epoch_checkpoints(self.save_dir)
            if epoch <= engine.state.epoch
        ]
        keep = len(earlier) if checkpoint.n_saved is None else checkpoint.n_saved
        # a run killed between writing a checkpoint and deleting the one it replaces leaves both
        superseded, earlier = earlier[: max(len(earlier) - keep, 0)], earlier[max(len(earlier) - keep, 0) :]
        for _, name in superseded:
            logger.info("removed %s, superseded by a later checkpoint", os.path.join(self.save_dir, name))
            checkpoint.save_handler._remove_now(name)
        # the state's key is "saved" or "_saved", depending on the ignite version
        checkpoint.load_state_dict({key: earlier for key in checkpoint.state_dict()})


class FinalValidationHandler(ValidationHandler):
    """MONAI's ``ValidationHandler`` that also validates after the last epoch when it is not on the interval.

    The best-model saver runs on validation, so without this a run shorter than ``val_interval`` epochs (or one whose
    length is not a multiple of it) would end without ``model.pt`` or with weights older than its last epochs. It fires
    at the last ``EPOCH_COMPLETED``, before the trainer's checkpoint of that epoch, so the checkpoint records the
    validation's best score.
    """

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._last_epoch)

    def _last_epoch(self, engine: Engine) -> None:
        if engine.state.epoch == engine.state.max_epochs and engine.state.epoch % self.interval != 0:
            self(engine)


class ValidationState:
    """The best validation score so far and the key-metric saver's record of it, as one checkpointable object.

    Both live in memory only (the evaluator's ``state.best_metric``, the saver's tracking list), so a resumed run
    would take its first validation as the best and overwrite ``model.pt`` even with worse weights. Saved in the
    trainer checkpoint (``load_dict``), they survive a resume: ``model.pt`` stays the best of the whole run.
    """

    def __init__(self, evaluator: Engine, saver: CheckpointSaver | None = None) -> None:
        self.evaluator = evaluator
        self.saver = saver

    def state_dict(self) -> dict[str, Any]:
        state = self.evaluator.state
        out: dict[str, Any] = {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
        }
        tracker = getattr(self.saver, "_key_metric_checkpoint", None)  # MONAI has load_state_dict, no getter
        if tracker is not None:
            out["key_metric_saved"] = tracker.state_dict()
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = state_dict["best_metric"]
        self.evaluator.state.best_metric_epoch = state_dict["best_metric_epoch"]
        if self.saver is not None and "key_metric_saved" in state_dict:
            self.saver.load_state_dict(dict(state_dict["key_metric_saved"]))


class ResumeFromCheckpoint:
    """Resume a run from the newest ``checkpoint_epoch=N.pt`` in ``ckpt_dir``, if there is one.

    It loads every object of ``load_dict`` (network, EMA, optimizer, learning-rate schedule) and the state of the
    engine it is attached to (epoch, iteration) through MONAI's ``CheckpointLoader``; the trainer then continues at
    epoch N + 1. A run killed mid-epoch thus repeats that epoch from its start. Temporary files of a save that was
    killed are deleted first.
    """

    def __init__(self, ckpt_dir: str, load_dict: dict, map_location: Any = None, enabled: bool = True) -> None:
        self.ckpt_dir = ckpt_dir
        self.load_dict = load_dict
        self.map_location = map_location
        self.enabled = enabled

    def attach(self, engine: Engine) -> None:
        # before training, no save is in progress: a temporary checkpoint file is a killed run's leftover (rank 0
        # alone saves, so it alone cleans)
        if idist.get_rank() == 0:
            for path in remove_stale_temporaries(self.ckpt_dir):
                logger.info("removed %s, a checkpoint whose writing was interrupted", path)
        path = latest_checkpoint(self.ckpt_dir) if self.enabled else None
        if path is None:
            logger.info("no checkpoint in %s: training starts at epoch 1", self.ckpt_dir)
            return
        logger.info("resuming from %s", path)
        # its keys only: memory-mapped, the tensors are not read (CheckpointLoader reads them once, below)
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        missing = [key for key in self.load_dict if key not in saved]
        del saved
        if missing:  # e.g. a checkpoint written before the validation state was saved
            logger.warning("%s holds no %s: not restored", path, ", ".join(missing))
        load_dict = {**{k: v for k, v in self.load_dict.items() if k not in missing}, "trainer": engine}
        CheckpointLoader(load_path=path, load_dict=load_dict, map_location=self.map_location).attach(engine)
        engine.add_event_handler(
            Events.STARTED, lambda e: logger.info("resumed at epoch %d, iteration %d", e.state.epoch, e.state.iteration)
        )
