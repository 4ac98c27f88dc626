"""Training curves from a run's TensorBoard logs.

Command line: ``python -m scripts.tools.curves --tb_dir RUN/tensorboard --out curve.png`` draws the
epoch training loss and the validation metrics of a run, and prints them as JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import fire
import numpy as np
from scripts.runtime.figures import figure_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

logger = logging.getLogger(__name__)


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a TensorBoard log folder as ``{tag: [(step, value), ...]}`` (last write wins per step)."""
    series: dict[str, dict[int, float]] = {}
    for events in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                series.setdefault(tag, {})[int(event.step)] = float(event.value)
    return {tag: sorted(values.items()) for tag, values in series.items()}


def training_curves(
    tb_dir: str,
    out: str,
    title: str = "Training of the NET2 forecasting model",
    references: Mapping[str, Mapping[str, float]] | None = None,
    key_metric: str = "val_count_crps",
) -> dict:
    """Plot epoch training loss and validation metrics of a run into ``out`` (PNG); return the plotted series.

    ``references``: per metric tag, labelled reference levels drawn as horizontal lines (e.g. the score of an empty
    forecast and of the generator's true expected count on the same validation cases). The lowest point of
    ``key_metric`` (train.json's key validation metric, lower is better) is marked: the run keeps those weights.
    """
    scalars = read_scalars(tb_dir)
    wanted = {
        "train_loss": "training loss (train.json's loss)",
        "val_count_crps": "validation NET2 count CRPS (lesions)",
        "val_count_mae": "validation NET2 count MAE (lesions)",
        "val_activity_brier": "validation Brier score of P(active)",
        "val_dice": "validation Dice of the forecast mask",
    }
    present = [tag for tag in wanted if tag in scalars]
    if not present:
        raise ValueError(f"no training or validation scalars in {tb_dir}; found {sorted(scalars)}")
    ncols = min(3, len(present))
    nrows = -(-len(present) // ncols)
    with figure_file(out, nrows=nrows, ncols=ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False) as (fig, axes):
        for ax in axes.flat[len(present) :]:
            ax.set_visible(False)
        for ax, tag in zip(axes.flat, present, strict=False):
            steps, values = zip(*scalars[tag], strict=True)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label="model")
            if tag == key_metric:
                best = int(np.argmin(values))  # the first minimum, as the run's key-metric saver keeps it
                ax.plot(
                    steps[best],
                    values[best],
                    marker="*",
                    markersize=14,
                    color="tab:red",
                    linestyle="none",
                    label=f"kept as model.pt (epoch {steps[best]})",
                )
            for (label, level), style in zip((references or {}).get(tag, {}).items(), ("--", ":", "-."), strict=False):
                ax.axhline(level, color="grey", linestyle=style, linewidth=1, label=f"{label} ({level:.2f})")
            if (references or {}).get(tag) or tag == key_metric:
                ax.legend(fontsize=8)
            if tag == "train_loss" and min(values) > 0:
                ax.set_yscale("log")  # the loss falls over decades; a linear axis shows only the first epochs
            ax.set_xlabel("epoch")
            ax.set_ylabel(wanted[tag])
            ax.set_title(wanted[tag])
            ax.grid(alpha=0.3)
        fig.suptitle(title)
    result = {tag: scalars[tag] for tag in present}
    logger.info("wrote %s", out)
    return result


def main() -> None:

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def curves(tb_dir: str, out: str, references: str | None = None) -> None:
        """Plot a run's curves and print the series as JSON; ``references``: a JSON file
        ``{tag: {label: level}}`` of reference lines."""
        refs = json.loads(Path(references).read_text()) if references else None
        print(json.dumps(training_curves(tb_dir, out, references=refs)))

    fire.Fire({"training_curves": curves})


if __name__ == "__main__":
    main()
