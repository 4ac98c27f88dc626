"""The MONAI Label inference task of the bundle: one forecast request -> per-arm probability maps and the analysis.

Request (``POST /infer/net2_forecast?image=<id or path>``, options in the form field ``params``):

- ``image``: a case id of the app's datalist, the path of one of that case's images, or a folder of images named
  by their datalist keys (``flair_1.nii.gz``, ...; see :func:`scripts.runtime.service.resolve_case`);
- ``arms``: arm names, a list or one string separated by commas (default all six);
- ``horizon_weeks``: weeks after visit 1 (default the case's own, else 24; the trained range is 12-48).

Result: the label file is a float32 NIfTI on the case's reference grid (the grid of ``flair_1``) holding one
probability map per requested arm (4D, arms in the order of ``params.arms``; 3D for one arm); the JSON holds the
case's ``forecast.json`` (expected count, 90% interval, P(active), lesions and effects against placebo per arm) and
the folder with every file the forecast command writes for the case.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from scripts.runtime.constants import ARMS, DEFAULT_HORIZON_WEEKS
from scripts.runtime.service import BundleForecaster, resolve_case, stack_arm_maps

logger = logging.getLogger(__name__)


class NET2ForecastTask(InferTask):
    """Forecast the NET2 lesions of a case under the requested arms with the bundle (:class:`BundleForecaster`).

    Args:
        forecaster: the bundle, loaded once.
        output_dir: where each request's case folder goes (``<output_dir>/<request>/<id>/``).
        datalist: the datalist that case ids are looked up in (None: requests name case folders or images).
        split: the datalist's list of cases.
    """

    def __init__(
        self,
        forecaster: BundleForecaster,
        output_dir: str | Path,
        datalist: str | Path | None = None,
        split: str = "testing",
    ) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=["net2"],
            dimension=3,
            description=(
                "Forecast of new and enlarging T2 lesions at a future visit under each treatment arm: per-arm "
                "voxel probability maps on the case's grid, expected lesion counts, P(active) and effects against "
                f"placebo (bundle {forecaster.version})"
            ),
            config={"arms": ",".join(ARMS), "horizon_weeks": DEFAULT_HORIZON_WEEKS},
        )
        self.forecaster = forecaster
        self.output_dir = Path(output_dir)
        self.datalist, self.split = datalist, split
        self._requests = 0

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        case = resolve_case(request["image"], self.datalist, self.split)
        self._requests += 1
        folder = self.output_dir / f"request{self._requests:05d}"
        horizon = request.get("horizon_weeks")
        forecast, case_dir = self.forecaster.forecast(
            case, folder, arms=request.get("arms"), horizon_weeks=None if horizon in (None, "") else float(horizon)
        )
        label = stack_arm_maps(case_dir, forecast, folder / f"{case['id']}_prob.nii.gz")
        logger.info("case %s: forecast in %.1f s -> %s", case["id"], time.perf_counter() - start, case_dir)
        result = {"forecast": forecast, "label_arms": list(forecast["arms"]), "output_folder": str(case_dir)}
        return str(label), result
