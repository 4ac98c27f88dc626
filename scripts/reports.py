"""Reports and figures: training curves from a run's TensorBoard logs.

Command line: ``python -m scripts.reports training_curves --tb_dir RUN/tensorboard --out curve.png`` draws the
epoch training loss and the validation metrics of a run, and prints them as JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a TensorBoard log folder as ``{tag: [(step, value), ...]}`` (last write wins per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                series.setdefault(tag, {})[int(event.step)] = float(event.value)
    return {tag: sorted(values.items()) for tag, values in series.items()}


def training_curves(tb_dir: str, out: str, title: str = "Training of the NET2 forecasting model") -> dict:
    """Plot epoch training loss and validation metrics of a run into ``out`` (PNG); return the plotted series."""
    scalars = read_scalars(tb_dir)
    wanted = {"train_loss": "training loss (min-SNR weighted v-MSE)", "val_count_mae": "validation NET2 count MAE",
              "val_dice": "validation Dice of the forecast mask"}
    present = [tag for tag in wanted if tag in scalars]
    if not present:
        raise ValueError(f"no training or validation scalars in {tb_dir}; found {sorted(scalars)}")
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
    for ax, tag in zip(axes[0], present, strict=True):
        steps, values = zip(*scalars[tag], strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(wanted[tag])
        ax.set_title(wanted[tag])
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    result = {tag: scalars[tag] for tag in present}
    logger.info("wrote %s", out)
    return result


def main() -> None:
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def curves(tb_dir: str, out: str) -> None:
        """Plot a run's curves and print the series as JSON."""
        print(json.dumps(training_curves(tb_dir, out)))

    fire.Fire({"training_curves": curves})


if __name__ == "__main__":
    main()
