"""Fine-tune SGP-SAM on the datastore's final labels with the bundle's own training config (``configs/train.json``).

MONAI Label's ``BundleTrainTask`` fits: it runs ``monai.bundle`` run id ``run`` with the datastore's labels as
overrides, and MONAI Label already runs every train request in a subprocess (``AsyncTask``), so the server keeps
answering clicks meanwhile. What this subclass changes:

* the request is checked (:meth:`SGPSAMTrain.check_request`; the server answers 422 before any subprocess starts)
  and only known keys pass: no client can pick another run id, experiment tracking or multi-GPU;
* ``device``: the Slicer plugin sends the GPU's NAME (MONAI Label's ``device_list()``); it is mapped to
  ``cuda``/``cuda:N`` with ``device_map()``, ``cpu`` stays, anything else falls back to ``--conf device``;
* the start weights go through the bundle's ``pretrained_ckpt`` (``scripts.checkpoint.load_weights``: weights-only,
  SAM-Med3D ``.pth`` files accepted, strict on the backbone) instead of the ``CheckpointLoader`` that
  ``BundleTrainTask`` inserts (full unpickling, ``strict=False``); start = the CURRENT model;
* the run writes into ``model_dir/train_run`` and each new best ``model.pt`` is published atomically to
  ``model_dir/model.pt``, with ``train_stats.json`` written at start, after every epoch and at the end
  (:mod:`lib.trainers.progress`); a killed run leaves the served model as it was and is reported
  ``INTERRUPTED``; the next run starts cleanly from the served model;
* the labels replace ``train_datalist`` / ``val_datalist`` (so the bundle's synthetic dataset is never generated)
  and the network and preprocessing are the served model file's (``scripts.model_file``), so the trained
  ``model.pt`` describes the same model;
* with fewer than ``min_val_split_cases`` labelled images the same images are used for validation (the bundle only
  writes ``model.pt`` from the validation key metric).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from typing import Any, Dict

import torch
from monai.bundle.scripts import create_workflow
from monai.data import partition_dataset
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask
from monailabel.utils.others.generic import device_list, device_map

from ..model import NetworkLoader
from ..settings import APP_DIR, AppSettings
from .progress import TrainProgress, read_stats

logger = logging.getLogger(__name__)

FALLBACK_METADATA = os.path.join(APP_DIR, "lib", "trainers", "bundle_metadata.json")
STAGING_DIR = "train_run"
MAX_EPOCHS_LIMIT = 100000


class SGPSAMBundleConstants(BundleConstants):
    def __init__(self, metadata_path: str) -> None:
        self._metadata_path = metadata_path

    def configs(self):
        return ["train.json"]

    def metadata_json(self) -> str:
        return self._metadata_path  # absolute: os.path.join(bundle, "configs", <abs>) == <abs>


def resolve_device(value: Any, default: str) -> str:
    """The train device from a request: ``cpu``, ``cuda[:N]`` or a GPU name as the Slicer plugin sends it."""
    if value is None or value == "" or value == []:
        return default
    if isinstance(value, (list, tuple)):
        value = value[0]
    if not isinstance(value, str):
        raise ValueError(f"device must be a name such as 'cpu' or 'cuda:0', got {value!r}"[:200])
    name = value.strip()
    mapped = device_map().get(name)
    if mapped:
        return mapped
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match and torch.cuda.is_available() and int(match.group(1) or 0) < torch.cuda.device_count():
        return name
    logger.warning(f"train device {name!r} is not on this server; using {default}")
    return default


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be an integer, got {value!r}"[:200])
    try:
        out = int(value) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        out = None
    if out is None or not low <= out <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}"[:200])
    return out


def _fraction(value: Any, name: str, high: float) -> float:
    try:
        out = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        out = None
    if out is None or not 0.0 <= out <= high:
        raise ValueError(f"{name} must be a number in [0, {high}], got {value!r}"[:200])
    return out


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"{name} must be true or false, got {value!r}"[:200])


class SGPSAMTrain(BundleTrainTask):
    def __init__(
        self, settings: AppSettings, loader: NetworkLoader, min_val_split_cases: int = 5, description: str = ""
    ) -> None:
        bundle_meta = os.path.join(settings.bundle_root, "configs", "metadata.json")
        self._metadata_file = bundle_meta if os.path.isfile(bundle_meta) else FALLBACK_METADATA
        super().__init__(settings.bundle_root, {}, const=SGPSAMBundleConstants(self._metadata_file))
        if description:
            self.description = description
        self.settings = settings
        self.loader = loader
        self.min_val_split_cases = int(min_val_split_cases)
        self._pretrained: str | None = None

    # -- MONAI Label hooks --------------------------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        return {
            "device": device_list(),
            "pretrained": True,  # start from the current model (else: random initialisation of its network)
            "max_epochs": self.settings.max_epochs,
            "val_split": 0.2,
        }

    def stats(self) -> Dict[str, Any]:
        return read_stats(self.settings.train_stats_path)

    def check_request(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """The known request keys, checked (ValueError with a reason); other keys are dropped."""
        out: Dict[str, Any] = {}
        if params.get("max_epochs") is not None:
            out["max_epochs"] = _int(params["max_epochs"], "max_epochs", 1, MAX_EPOCHS_LIMIT)
        if params.get("val_split") is not None:
            out["val_split"] = _fraction(params["val_split"], "val_split", 0.9)
        if params.get("pretrained") is not None:
            out["pretrained"] = _bool(params["pretrained"], "pretrained")
        if params.get("device") not in (None, "", []):
            out["device"] = resolve_device(params["device"], self.settings.device)
        dropped = sorted(set(params) - set(out) - {"device", "client_id", "model", "gpus", "multi_gpu"})
        if dropped:
            logger.info(f"train request: ignored keys {dropped}")
        return out

    def __call__(self, request, datastore: Datastore):
        req = {k: v for k, v in self.config().items() if k != "device"}
        req.update(self.check_request(request))
        req.setdefault("device", self.settings.device)
        req.update(model=request.get("model"), multi_gpu=False, run_id="run", tracking="none", gpus="all")
        if not datastore.datalist():
            raise ValueError("no final labels in the datastore: save at least one label before training")
        return super().__call__(req, datastore)

    # -- BundleTrainTask customisation --------------------------------------------------------------------------
    def _fetch_datalist(self, request, datastore: Datastore):
        return [{"image": d["image"], "label": d["label"]} for d in datastore.datalist() if d]

    def _partition_datalist(self, datalist, request, shuffle=False):
        val_split = float(request.get("val_split", 0.2))
        if val_split <= 0 or len(datalist) < self.min_val_split_cases:
            logger.info(f"{len(datalist)} labelled images: validating on the training images")
            return datalist, list(datalist)
        train, val = partition_dataset(datalist, ratios=[(1 - val_split), val_split], shuffle=shuffle)
        return train, val

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers):
        self._pretrained = None
        if pretrained:
            self._pretrained = self.loader.get().path  # the served model (trained or start), checked as it loads
        logger.info(f"SGP-SAM training starts from: {self._pretrained or 'random initialisation'}")

    def _update_overrides(self, overrides):
        s = self.settings
        train = overrides.pop(self.const.key_train_dataset_data())
        val = overrides.pop(self.const.key_validate_dataset_data(), None) or train
        overrides.pop(self.const.key_train_handlers(), None)  # the bundle's own handlers (savers, validation)
        epochs = int(overrides.pop(self.const.key_train_trainer_max_epochs()))
        overrides.update(
            {
                "train_datalist": train,
                "val_datalist": val,
                "max_epochs": epochs,
                "pretrained_ckpt": self._pretrained,
                "resume": False,
                # the network and preprocessing of the served model file, whatever train.json defaults to
                "network_def": {"_target_": "scripts.model_file.build_from_file", "path": s.checkpoint},
                "preprocessing": self.loader.preprocessing.as_dict(),
                "target_label": None,  # any non-zero label voxel is lesion (Slicer writes 1 for "lesion")
                "ckpt_dir": os.path.join(s.model_dir, STAGING_DIR),
                "output_dir": os.path.join(s.model_dir, "runs"),
                "num_workers": s.train_num_workers,
            }
        )
        self._run_info = {"num_train": len(train), "num_val": len(val), "total_epochs": epochs}
        return overrides

    def run_single_gpu(self, request, overrides):
        s = self.settings
        staging = os.path.join(s.model_dir, STAGING_DIR)
        shutil.rmtree(staging, ignore_errors=True)  # whatever a killed run left half-written
        os.makedirs(staging, exist_ok=True)
        summary = self.loader.summary()
        info = {
            "preset": summary["preset"],
            "sgpm": summary["sgpm"],
            "device": str(overrides.get("device")),
            "pretrained": os.path.basename(self._pretrained) if self._pretrained else None,
            **getattr(self, "_run_info", {}),
        }
        progress = TrainProgress(s.train_stats_path, os.path.join(staging, "model.pt"), s.trained_model, info)
        progress.write()
        try:
            workflow = create_workflow(
                config_file=self.bundle_config_path, meta_file=self._metadata_file, run_id="run", **overrides
            )
            parsed = workflow.parser.get_parsed_content
            progress.attach(parsed("train#trainer"), parsed("validate#evaluator"))
            workflow.run()
            workflow.finalize()
        except BaseException as err:
            progress.finish(err)
            raise
        stats = progress.finish()
        logger.info(f"SGP-SAM training finished: {stats}")
