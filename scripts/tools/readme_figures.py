"""Check the sample-case figures the README quotes against a forecast of the sample cases with the shipped weights.

    python -m monai.bundle run --config_file bundle/configs/inference.json --output_dir O
    python -m scripts.readme_figures --forecast_dir O

The README says, of the three embedded sample cases, "the mean expected NET2 count is X under placebo and Y under
ocrelizumab; truth A and B". X and Y are the means over the cases of ``expected_count`` in ``O/summary.csv``, A
and B those of the generator's true expected counts (``bundle/sample_data/truth/<id>.json``), each quoted to one
decimal. The command prints the quoted and the measured figures and exits 1 when any differ (or the sentence is
gone), so the README cannot keep figures of other weights.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ARMS_QUOTED = ("placebo", "ocrelizumab")
SENTENCE = re.compile(
    r"mean expected NET2 count is\s+(?P<placebo>\d+(?:\.\d+)?)\s+under placebo\s+and\s+(?P<ocrelizumab>\d+(?:\.\d+)?)"
    r"\s+under ocrelizumab;\s+truth\s+(?P<truth_placebo>\d+(?:\.\d+)?)\s+and\s+(?P<truth_ocrelizumab>\d+(?:\.\d+)?)"
)


def quoted_figures(readme: str) -> dict[str, float]:
    """The figures of the README's sample-case sentence.

    Raises:
        ValueError: the README holds no such sentence.
    """
    match = SENTENCE.search(readme)
    if match is None:
        raise ValueError(f"no sentence matching {SENTENCE.pattern!r} in the README")
    return {key: float(value) for key, value in match.groupdict().items()}


def measured_figures(forecast_dir: str | os.PathLike[str], truth_dir: str | os.PathLike[str]) -> dict[str, float]:
    """Mean expected count per quoted arm over the cases of ``forecast_dir/summary.csv``, and the same of the truth.

    Raises:
        ValueError: an arm is missing from the summary, or a case has no truth file.
    """
    with open(Path(forecast_dir) / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    figures: dict[str, float] = {}
    for arm in ARMS_QUOTED:
        counts = {r["id"]: float(r["expected_count"]) for r in rows if r["arm"] == arm}
        if not counts:
            raise ValueError(f"{forecast_dir}/summary.csv: no {arm} forecast")
        truths = []
        for case_id in counts:
            path = Path(truth_dir) / f"{case_id}.json"
            if not path.is_file():
                raise ValueError(f"case {case_id}: no truth file {path}")
            truths.append(float(json.loads(path.read_text())["expected_count"][arm]))
        figures[arm] = sum(counts.values()) / len(counts)
        figures[f"truth_{arm}"] = sum(truths) / len(truths)
    return figures


def drift(quoted: dict[str, float], measured: dict[str, float], decimals: int = 1) -> list[str]:
    """The quoted figures that are not the measured ones rounded to ``decimals``, one line each."""
    return [
        f"{key}: README says {quoted[key]:g}, the forecast gives {measured[key]:.{decimals}f} ({measured[key]:.4g})"
        for key in quoted
        if round(measured[key], decimals) != round(quoted[key], decimals)
    ]


def main(
    forecast_dir: str = "outputs/forecast",
    readme: str = str(REPO_ROOT / "README.md"),
    truth_dir: str = str(REPO_ROOT / "bundle" / "sample_data" / "truth"),
) -> None:
    """Compare the README's sample-case figures with ``forecast_dir`` (a forecast of the sample cases); exit 1 on
    any difference."""
    quoted = quoted_figures(Path(readme).read_text())
    measured = measured_figures(forecast_dir, truth_dir)
    for key in quoted:
        print(f"{key:20s} README {quoted[key]:6g}   forecast {measured[key]:.4g}")
    problems = drift(quoted, measured)
    if problems:
        print("README figures drifted from the forecast:\n" + "\n".join(problems), file=sys.stderr)
        sys.exit(1)
    print("README sample-case figures match the forecast")
