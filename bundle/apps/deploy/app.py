"""MONAI Deploy application of the bundle: forecast the NET2 lesions of the case(s) in the input folder.

    python bundle/apps/deploy/app.py -i <input> -o <output> [-m <model.pt or model.ts>]

``<input>`` is one case folder (images named by their datalist keys: ``flair_1.nii.gz``, ``t2les_0.nii.gz``, ...,
the layout of ``sample_data/images/<id>/``) or a folder of such case folders. Each case's forecast goes to
``<output>/<id>/`` with the files of the forecast command (``<arm>_prob.nii.gz`` and ``<arm>_mask.nii.gz`` on the
case's grid, ``forecast.json``, ``forecast.png``), and ``<output>/<id>/<id>_prob.nii.gz`` holds every requested
arm's map (X, Y, Z, arm).

The request: arms and horizon come from ``request.json`` in the case folder (``{"arms": ["placebo",
"ocrelizumab"], "horizon_weeks": 36}``), else from the environment (``NET2_ARMS`` = names separated by commas,
``NET2_HORIZON_WEEKS``), else all six arms at the case's default horizon (24 weeks). ``NET2_NUM_SAMPLES`` and
``NET2_DEVICE`` set the samples per arm and the torch device. The model (``-m`` or ``HOLOSCAN_MODEL_PATH``) is the
bundle's ``models/model.pt`` unless given: a ``.pt`` checkpoint or a ``.ts`` TorchScript export of the bundle.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Fragment, Operator, OperatorSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bundle_path
from bundle_path import bundle_root  # noqa: E402 (needs the line above)

BUNDLE_ROOT = bundle_root()

from scripts.runtime.errors import InputError  # noqa: E402 (imports scripts, which bundle_root() puts on the path)
from scripts.runtime.service import BundleForecaster, case_from_folder, stack_arm_maps  # noqa: E402

logger = logging.getLogger(__name__)

REQUEST_FILE = "request.json"


def case_folders(input_path: Path) -> list[Path]:
    """The case folders of the input: the folder itself when it holds images named by keys, else its subfolders.

    Raises:
        InputError: the input is not a folder, or holds no case.
    """
    if not input_path.is_dir():
        raise InputError(f"input {input_path}: expected a case folder or a folder of case folders")
    try:
        case_from_folder(input_path)
        return [input_path]
    except InputError:
        pass
    folders = []
    for folder in sorted(p for p in input_path.iterdir() if p.is_dir()):
        try:
            case_from_folder(folder)
        except InputError:
            continue
        folders.append(folder)
    if not folders:
        raise InputError(f"input {input_path}: no case folder (images named flair_1.nii.gz, t2les_0.nii.gz, ...)")
    return folders


def read_request(folder: Path) -> dict[str, Any]:
    """Arms and horizon of one case: its ``request.json``, else ``NET2_ARMS`` / ``NET2_HORIZON_WEEKS``."""
    request: dict[str, Any] = {}
    if os.environ.get("NET2_ARMS"):
        request["arms"] = os.environ["NET2_ARMS"]
    if os.environ.get("NET2_HORIZON_WEEKS"):
        request["horizon_weeks"] = float(os.environ["NET2_HORIZON_WEEKS"])
    path = folder / REQUEST_FILE
    if path.is_file():
        try:
            own = json.loads(path.read_text())
        except ValueError as err:
            raise InputError(f"{path}: not JSON ({err})") from None
        unknown = sorted(set(own) - {"arms", "horizon_weeks"})
        if not isinstance(own, dict) or unknown:
            raise InputError(f"{path}: expected an object with 'arms' and/or 'horizon_weeks', got keys {unknown}")
        request.update(own)
    return request


def bundle_overrides(model_path: str | os.PathLike[str] | None) -> tuple[list[str], dict[str, Any]]:
    """The bundle configs and overrides for a model file (``.pt`` checkpoint, ``.ts`` export or none) and the
    ``NET2_NUM_SAMPLES`` / ``NET2_DEVICE`` settings."""
    configs = [str(BUNDLE_ROOT / "configs" / "inference.json")]
    overrides: dict[str, Any] = {}
    if model_path and Path(model_path).is_file():
        if str(model_path).endswith(".ts"):
            configs.append(str(BUNDLE_ROOT / "configs" / "inference_ts.json"))
            overrides["ts_path"] = str(Path(model_path).resolve())
        else:
            overrides["ckpt_path"] = str(Path(model_path).resolve())
    if os.environ.get("NET2_NUM_SAMPLES"):
        overrides["num_samples"] = int(os.environ["NET2_NUM_SAMPLES"])
    if os.environ.get("NET2_DEVICE"):
        overrides["device"] = os.environ["NET2_DEVICE"]
    return configs, overrides


class NET2ForecastOperator(Operator):
    """Forecast every case folder of ``input_path`` into ``output_path`` with the bundle (no ports: it runs once)."""

    def __init__(
        self, fragment: Fragment, *args: Any, input_path: Path, output_path: Path, model_path: str | None, **kwargs: Any
    ) -> None:
        self.input_path, self.output_path = Path(input_path), Path(output_path)
        self.model_path = model_path
        super().__init__(fragment, *args, **kwargs)  # the base class's constructor calls setup: last

    def setup(self, spec: OperatorSpec) -> None:
        pass

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        configs, overrides = bundle_overrides(self.model_path)
        forecaster = BundleForecaster(BUNDLE_ROOT, configs, overrides)
        for folder in case_folders(self.input_path):
            request = read_request(folder)
            forecast, case_dir = forecaster.forecast(
                case_from_folder(folder), self.output_path, request.get("arms"), request.get("horizon_weeks")
            )
            stack_arm_maps(case_dir, forecast, case_dir / f"{forecast['id']}_prob.nii.gz")
            logger.info("case %s: %s", forecast["id"], case_dir)


class NET2ForecastApp(Application):
    """Forecast new and enlarging T2 MS lesions under each treatment arm (the bundle's forecast, one operator)."""

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        model = context.model_path if context.model_path and Path(context.model_path).is_file() else None
        forecast = NET2ForecastOperator(
            self,
            CountCondition(self, 1),
            input_path=Path(context.input_path),
            output_path=Path(context.output_path),
            model_path=model,
            name="net2_forecast",
        )
        self.add_operator(forecast)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    NET2ForecastApp().run()
