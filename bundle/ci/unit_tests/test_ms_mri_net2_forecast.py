# Copyright (c) MS forecasting bundle contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Model Zoo unit test of the bundle (copy to the zoo's ``ci/unit_tests/``; run from the zoo's root).

Trains one epoch and forecasts with ``ConfigWorkflow`` on a small synthetic cohort drawn by the bundle's own
generator, at a small working grid and network, as the zoo's other unit tests do. The bundle is
``models/ms_mri_net2_forecast`` (the zoo's layout) unless ``MS_NET2_BUNDLE_ROOT`` names another folder.
"""

import json
import os
import shutil
import sys
import tempfile
import unittest

from monai.bundle import ConfigWorkflow

BUNDLE_ROOT = os.environ.get("MS_NET2_BUNDLE_ROOT", os.path.join("models", "ms_mri_net2_forecast"))
SMALL = {
    "spatial_size": [32, 32, 32],
    "spacing": [6.0, 6.0, 6.0],
    "network_channels": [8, 16, 16, 16],
    "num_inference_steps": 2,
    "device": "cpu",
}
TRAIN = {
    **SMALL,
    "train#trainer#max_epochs": 1,
    "cache_rate": 0.0,
    "batch_size": 2,
    "val_interval": 1,
    "val_num_samples": 2,
    "checkpoint_interval": 1,
}
INFER = {**SMALL, "num_samples": 2, "treatments": ["placebo", "ocrelizumab"]}


def check_workflow(workflow: ConfigWorkflow, check_properties: bool = True) -> None:
    """Initialise, check the workflow's required properties, run and finalise it."""
    workflow.initialize()
    if check_properties:
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"{workflow.workflow_type} workflow lacks properties: {missing}")
    workflow.run()
    workflow.finalize()


class TestMSNet2Forecast(unittest.TestCase):
    def setUp(self):
        sys.path = [BUNDLE_ROOT] + sys.path  # the bundle's own scripts package
        from scripts.bench.synthetic.cohort import generate_cohort

        self.workdir = tempfile.mkdtemp()
        self.datalist = str(
            generate_cohort(
                os.path.join(self.workdir, "cohort"),
                n=4,
                seed=3,
                shape=32,
                spacing=6.0,
                split=(0.5, 0.25, 0.25),
                progress=False,
            )
        )

    def tearDown(self):
        shutil.rmtree(self.workdir)
        sys.path.remove(BUNDLE_ROOT)

    def _workflow(self, workflow_type, config, override):
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=os.path.join(BUNDLE_ROOT, "configs", config),
            logging_file=os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
            meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
            bundle_root=BUNDLE_ROOT,
            datalist=self.datalist,
            **override,
        )

    def test_train_then_infer(self):
        train_dir = os.path.join(self.workdir, "train")
        check_workflow(self._workflow("train", "train.json", {**TRAIN, "output_dir": train_dir}))
        weights = os.path.join(train_dir, "models", "model.pt")
        self.assertTrue(os.path.isfile(weights))

        out = os.path.join(self.workdir, "forecast")
        check_workflow(self._workflow("infer", "inference.json", {**INFER, "output_dir": out, "ckpt_path": weights}))
        with open(self.datalist) as f:
            case = json.load(f)["testing"][0]["id"]
        with open(os.path.join(out, case, "forecast.json")) as f:
            forecast = json.load(f)
        self.assertEqual(list(forecast["arms"]), INFER["treatments"])
        self.assertEqual(forecast["num_samples"], INFER["num_samples"])
        for arm in INFER["treatments"]:
            self.assertTrue(os.path.isfile(os.path.join(out, case, f"{arm}_prob.nii.gz")))


if __name__ == "__main__":
    unittest.main()
