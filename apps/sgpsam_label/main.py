"""MONAI Label app serving the SGP-SAM bundle: click-based 3D lesion segmentation, training and active learning.

Start (offline; nothing at start-up reaches the network)::

    monailabel start_server --app apps/sgpsam_label --studies <folder>      # the shipped default model
    monailabel start_server --app apps/sgpsam_label --studies <folder> --conf checkpoint /path/to/model.pt

The network and its preprocessing come from the model file (``scripts.model_file``); ``--conf`` holds serving
options only (see ``lib/settings.py``, ``CONF_HELP``, and docs/monailabel.md) and a model setting there (preset,
spacing, ...) stops the start with a message. The app imports the bundle's code (``bundle/scripts``: network,
preprocessing, model files, interactive engine, training config); it does not re-implement any of it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from typing import Dict

import numpy as np
import torch

APP_DIR = os.path.dirname(os.path.realpath(__file__))
BUNDLE_ROOT = os.environ.get("SGPSAM_BUNDLE_ROOT", os.path.join(os.path.dirname(os.path.dirname(APP_DIR)), "bundle"))
for _path in (APP_DIR, BUNDLE_ROOT):  # MONAI Label removes the app dir from sys.path after loading main.py
    if _path not in sys.path:
        sys.path.insert(0, _path)

from fastapi import HTTPException  # noqa: E402
from lib.datastore import SafeLocalDatastore  # noqa: E402
from lib.infers.batch import ClickModelBatchInfer  # noqa: E402
from lib.infers.sgpsam import SGPSAMInfer  # noqa: E402
from lib.model import NetworkLoader  # noqa: E402
from lib.request import SERVER_KEY, session_owner, unprocessable  # noqa: E402
from lib.routes import install_into_running_server  # noqa: E402
from lib.scoring.tta import TTAUncertaintyScoring  # noqa: E402
from lib.settings import AppSettings  # noqa: E402
from lib.strategies.leases import SampleLeases  # noqa: E402
from lib.strategies.uncertainty import HighestUncertainty  # noqa: E402
from lib.trainers.sgpsam import SGPSAMTrain  # noqa: E402
from monailabel.config import settings as ml_settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.scoring import ScoringMethod  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.transform.writer import write_itk  # noqa: E402
from scripts.checkpoint import CheckpointError  # noqa: E402
from scripts.data.inference_image import load_image  # noqa: E402

logger = logging.getLogger(__name__)

MODEL_NAME = "sgpsam"
LABELS = ["lesion"]
# what a click request may carry from the client (anything else is ignored: docs/monailabel.md)
CLIENT_KEYS = ("label", "foreground", "background", "reset_state", "roi", "client_id", "result_extension")


def warm_up(network, device) -> None:
    """One-time costs paid at start-up instead of on the first click: kernel set-up, ITK's lazy IO modules."""
    s = int(network.img_size)
    with torch.inference_mode():
        network.encode(torch.zeros(1, 1, s, s, s, device=device))
    with tempfile.TemporaryDirectory() as tmp:
        for ext in (".nrrd", ".nii.gz"):
            path = os.path.join(tmp, f"warm{ext}")
            write_itk(np.zeros((2, 2, 2), np.int16), path, np.eye(4), None, False)
            load_image(path)  # the reader the engine uses: ITK loads its IO modules on the first read (2-5 s)


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        try:
            self.settings = AppSettings.from_conf(conf, app_dir)
            self.loader = NetworkLoader(self.settings)  # reads the model file's network and preprocessing
        except (ValueError, CheckpointError) as err:
            logger.error(f"SGP-SAM app cannot start: {err}")
            raise
        self.leases = SampleLeases(self.settings.sample_lease_s)
        logger.info(f"SGP-SAM app settings: {self.settings.describe()}; model: {self.loader.summary()}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SGP-SAM lesion segmentation",
            description="Click-based 3D lesion segmentation (SAM-Med3D + Self-Gated Prompting Module)",
            version="0.1.0",
            labels=LABELS,
        )

    # -- tasks --------------------------------------------------------------------------------------------------
    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        logger.info(f"Init Datastore (atomic label writes) for: {self.studies}")
        return SafeLocalDatastore(
            self.studies,
            extensions=ml_settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=ml_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=ml_settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return {MODEL_NAME: SGPSAMInfer(self.settings, self.loader, labels=LABELS)}

    def init_trainers(self) -> Dict[str, TrainTask]:
        # Same name as the infer task: MONAI Label then reports these train stats with the model (/model/info).
        trainer = SGPSAMTrain(self.settings, self.loader, description="Fine-tune SGP-SAM on final labels")
        if not trainer.is_valid():
            logger.warning(f"no bundle train config under {self.settings.bundle_root}/configs: training disabled")
            return {}
        return {MODEL_NAME: trainer}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"uncertainty": HighestUncertainty(), "random": Random(), "first": First()}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {"sgpsam_uncertainty": TTAUncertaintyScoring(self.settings, self.loader)}

    def init_batch_infer(self):
        return ClickModelBatchInfer()

    def on_init_complete(self):
        install_into_running_server()  # before the first request: checked endpoints, clicks off the event loop
        super().on_init_complete()
        try:  # load the weights now: the first click should not pay for it, and a bad checkpoint shows at start
            loaded = self._infers[MODEL_NAME].model()
            warm_up(loaded.network, self.settings.device)
            logger.info(f"SGP-SAM model ready: {loaded.version}")
        except Exception as err:
            logger.error(f"SGP-SAM model could not be loaded at start-up: {err}")

    # -- requests: a bad request is the client's error (4xx with a reason), not a 500 -----------------------------
    def _image_for_infer(self, request, datastore) -> tuple[str, str]:
        """(file to read, image id for the click session): a datastore id, or the plugin's upload session."""
        server = request.get(SERVER_KEY) or {}
        image = request.get("image")
        if server.get("session_id"):
            session = self.sessions().get_session(server["session_id"]) if self.sessions() else None
            if session is None or image != session.image:
                raise HTTPException(status_code=404, detail=f"session {server['session_id']!r} not found or expired")
            return image, f"session:{server['session_id']}"
        if server.get("upload") and isinstance(image, str) and os.path.isfile(image):
            return image, image
        if not isinstance(image, str) or not image:
            raise unprocessable(f"image must be an image id, got {image!r}"[:200])
        uri = datastore.get_image_uri(image)
        if not uri and hasattr(datastore, "sync"):
            datastore.sync()
            uri = datastore.get_image_uri(image)
        if not uri or not os.path.isfile(uri):
            raise HTTPException(status_code=404, detail=f"image {image!r} not found in the datastore"[:200])
        return uri, image

    def infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}; available: {sorted(self._infers)}")
        datastore = datastore if datastore else self.datastore()
        path, image_id = self._image_for_infer(request, datastore)
        clean = {k: request[k] for k in (*CLIENT_KEYS, SERVER_KEY) if k in request}
        clean.update(model=model, image=path, image_id=image_id)
        return super().infer(clean, datastore)

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise HTTPException(
                status_code=404, detail=f"unknown strategy {strategy!r}; available: {sorted(self._strategies)}"
            )
        result = self.leases.pick(self._strategies[strategy], request, self.datastore(), session_owner(request))
        if not result:
            return {}
        result["path"] = self._datastore.get_image_uri(result["id"])  # Slicer on the server's machine loads it directly
        if self._auto_update_scoring:
            self.async_scoring(None)
        return result

    def on_save_label(self, image_id, label_id):
        self.leases.release(image_id)
        return super().on_save_label(image_id, label_id)
