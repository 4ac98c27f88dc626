"""MONAI Label app serving the bundle's NET2 forecast (``monailabel start_server --app <bundle>/apps/monailabel``).

Options (``--conf NAME VALUE``): ``datalist`` (JSON datalist whose case ids requests may name; default the bundle's
``sample_data/datalist.json``), ``split`` (its list, default ``testing``), ``num_samples`` (K per arm, default the
bundle's 8), ``device`` (default ``cuda:0`` when available, else ``cpu``), ``ckpt_path`` (your own weights),
``output_dir`` (where forecasts are written; default a new temporary folder). See ``bundle/docs/apps.md``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # lib, bundle_path
from bundle_path import bundle_root  # noqa: E402 (needs the line above)

BUNDLE_ROOT = bundle_root()

from lib.net2_forecast import NET2ForecastTask  # noqa: E402 (imports scripts, which bundle_root() puts on the path)
from scripts.runtime.service import BundleForecaster  # noqa: E402

logger = logging.getLogger(__name__)

OVERRIDES = {"num_samples": int, "device": str, "ckpt_path": str}
"""App options passed on to the bundle's ``inference.json``, with their types (``--conf`` values are strings)."""


class MyApp(MONAILabelApp):
    """The bundle's forecast as one MONAI Label inference task, ``net2_forecast``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        overrides: dict[str, Any] = {key: cast(conf[key]) for key, cast in OVERRIDES.items() if conf.get(key)}
        self.forecaster = BundleForecaster(BUNDLE_ROOT, overrides=overrides)
        self.datalist = conf.get("datalist") or str(BUNDLE_ROOT / "sample_data" / "datalist.json")
        self.split = conf.get("split", "testing")
        self.output_dir = conf.get("output_dir") or tempfile.mkdtemp(prefix="net2_forecast_")
        logger.info("forecasts go to %s; case ids are looked up in %s (%s)", self.output_dir, self.datalist, self.split)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MS NET2 lesion forecast",
            description="Treatment-conditioned forecast of new and enlarging T2 MS lesions (MONAI bundle)",
            version=self.forecaster.version,
        )

    def init_infers(self) -> dict[str, Any]:
        return {"net2_forecast": NET2ForecastTask(self.forecaster, self.output_dir, self.datalist, self.split)}
