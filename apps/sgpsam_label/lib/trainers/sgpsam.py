"""Fine-tune SGP-SAM on the datastore's final labels with the bundle's own training config (``configs/train.json``).

MONAI Label's ``BundleTrainTask`` fits: it runs ``monai.bundle`` run id ``run`` with the datastore's labels as
overrides, and MONAI Label already runs every train request in a subprocess (``AsyncTask``), so the server keeps
answering clicks meanwhile. What this subclass changes:

* the start weights go through the bundle's ``pretrained_ckpt`` (``scripts.checkpoint.load_weights``: weights-only,
  SAM-Med3D ``.pth`` files with their ``argparse.Namespace`` accepted, strict on the backbone) instead of the
  ``CheckpointLoader`` that ``BundleTrainTask`` inserts (full unpickling, ``strict=False``: a wrapped
  ``model_state_dict`` would silently load nothing);
* start = the CURRENT model: the last fine-tuned ``model_dir/model.pt`` if any, else ``--conf checkpoint``;
* outputs (``ckpt_dir``: ``model.pt``, ``checkpoint_epoch=N.pt``; ``output_dir``: TensorBoard) go to the app's
  ``model_dir``, never into the bundle folder;
* the labels replace ``train_datalist`` / ``val_datalist`` (so the bundle's synthetic dataset is never generated)
  and the network/preprocessing ids follow the app's ``--conf`` (preset, sgpm, spacing, channel, CT clamp);
* with fewer than ``min_val_split_cases`` labelled images the same images are used for validation (the bundle only
  writes ``model.pt`` from the validation key metric);
* ``stats()`` (shown in ``/info`` as ``train_stats``) reads ``model_dir/train_stats.json``, written at the end of
  each run from the trainer's and evaluator's ignite state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from datetime import datetime, timedelta
from typing import Any, Dict

from monai.bundle.scripts import create_workflow
from monai.data import partition_dataset
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.bundle import BundleConstants, BundleTrainTask
from monailabel.utils.others.generic import device_list

from ..model import RANDOM_VERSION, NetworkLoader, file_version
from ..settings import APP_DIR, AppSettings

logger = logging.getLogger(__name__)

FALLBACK_METADATA = os.path.join(APP_DIR, "lib", "trainers", "bundle_metadata.json")


class SGPSAMBundleConstants(BundleConstants):
    def __init__(self, metadata_path: str) -> None:
        self._metadata_path = metadata_path

    def configs(self):
        return ["train.json"]

    def metadata_json(self) -> str:
        return self._metadata_path  # absolute: os.path.join(bundle, "configs", <abs>) == <abs>


def _float(value: Any) -> float | None:
    try:
        out = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


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
            "pretrained": True,  # start from the current model (else: --conf checkpoint / random init)
            "max_epochs": self.settings.max_epochs,
            "val_split": 0.2,
            "multi_gpu": False,
            "gpus": "all",
            "run_id": "run",
        }

    def stats(self) -> Dict[str, Any]:
        try:
            with open(self.settings.train_stats_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def __call__(self, request, datastore: Datastore):
        req = {k: v for k, v in self.config().items() if k != "device"}
        req["device"] = self.settings.device
        req.update({k: v for k, v in request.items() if v is not None and v != ""})
        req["multi_gpu"] = False  # the bundle has no multi-GPU config
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
            loaded = self.loader.get()  # validates the file (and falls back loudly if the default one does not fit)
            self._pretrained = loaded.path if loaded.version != RANDOM_VERSION else None
            del loaded
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
                "preset": s.preset,
                "sgpm": s.sgpm,
                "click_map": s.click_map,
                "refiner": s.refiner,
                "click_consistent": s.click_consistent,
                "multi_click": s.multi_click,
                "roi_size": s.roi_size,
                "spacing": s.spacing,
                "image_channel": s.image_channel,
                "ct_clamp": s.ct_clamp,
                "target_label": None,  # any non-zero label voxel is lesion (Slicer writes 1 for "lesion")
                "ckpt_dir": s.model_dir,
                "output_dir": os.path.join(s.model_dir, "runs"),
                "num_workers": s.train_num_workers,
            }
        )
        self._run_info = {"num_train": len(train), "num_val": len(val), "max_epochs": epochs}
        return overrides

    def run_single_gpu(self, request, overrides):
        s = self.settings
        os.makedirs(s.model_dir, exist_ok=True)
        before = file_version(s.trained_model) if os.path.isfile(s.trained_model) else None
        start = time.time()
        stats: Dict[str, Any] = {
            "status": "RUNNING",
            "start_ts": int(start),
            "start_time": datetime.fromtimestamp(start).strftime("%Y-%m-%d %H:%M:%S"),
            "preset": s.preset,
            "sgpm": s.sgpm,
            "device": str(overrides.get("device")),
            "pretrained": self._pretrained,
            **getattr(self, "_run_info", {}),
        }
        try:
            workflow = create_workflow(
                config_file=self.bundle_config_path,
                meta_file=self._metadata_file,
                run_id=request.get("run_id") or "run",
                **overrides,
            )
            workflow.run()
            stats.update(self._engine_stats(workflow))
            workflow.finalize()
            stats["status"] = "DONE"
        except BaseException as err:
            stats.update(status="ERROR", error=(str(err).splitlines() or [type(err).__name__])[0][:500])
            raise
        finally:
            stats["total_time"] = str(timedelta(seconds=round(time.time() - start)))
            stats["total_time_s"] = round(time.time() - start, 2)
            after = file_version(s.trained_model) if os.path.isfile(s.trained_model) else None
            stats["model"] = s.trained_model if after else None
            stats["model_version"] = after
            stats["model_updated"] = after is not None and after != before
            self._write_stats(stats)
        logger.info(f"SGP-SAM training finished: {stats}")

    @staticmethod
    def _engine_stats(workflow) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        try:
            trainer = workflow.parser.get_parsed_content("train#trainer")
            state = trainer.state
            out["epochs"] = int(state.epoch)
            out["iterations"] = int(state.iteration)
            output = state.output[0] if isinstance(state.output, (list, tuple)) and state.output else state.output
            out["train_loss"] = _float(output.get("loss")) if isinstance(output, dict) else None  # last iteration
        except Exception as err:  # stats are best effort; the model file is what matters
            logger.warning(f"train stats unavailable: {err}")
        try:
            evaluator = workflow.parser.get_parsed_content("validate#evaluator")
            state = evaluator.state
            out["metrics"] = {k: _float(v) for k, v in (state.metrics or {}).items()}
            out["best_metric"] = _float(state.best_metric)
            out["best_metric_epoch"] = int(state.best_metric_epoch)
            out["key_metric"] = getattr(evaluator, "key_metric_name", None) or next(iter(out["metrics"]), None)
        except Exception as err:
            logger.warning(f"validation stats unavailable: {err}")
        return out

    def _write_stats(self, stats: Dict[str, Any]) -> None:
        path = self.settings.train_stats_path
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(stats, fh, indent=2, default=str)
        os.replace(tmp, path)
