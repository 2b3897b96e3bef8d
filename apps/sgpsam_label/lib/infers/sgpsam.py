"""Interactive (point-prompt) inference: MONAI Label's ``BasicInferTask`` around the bundle's ``InteractiveSegmenter``.

3D Slicer's MONAI Label plugin re-sends ALL clicks of a segment on every call and never sends the current mask, so
the state lives server-side in the engine, one session per ``image id : label``. The engine caches the preprocessed
volume and the image embeddings, so a repeat click on an image runs only the prompt encoder + mask decoder.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Dict, Sequence

import numpy as np
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from scripts.checkpoint import CheckpointError
from scripts.interactive import ClickError, InteractiveSegmenter

from ..model import LoadedModel, NetworkLoader
from ..settings import AppSettings

logger = logging.getLogger(__name__)

TRUE_STRINGS = ("1", "true", "yes", "on")


def one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:500]


def parse_flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS + ("0", "false", "no", "off", ""):
        return value.strip().lower() in TRUE_STRINGS
    raise HTTPException(status_code=422, detail=f"'{name}' must be true or false, got {value!r}")


class SGPSAMInfer(BasicInferTask):
    """Point-prompt 3D lesion segmentation (DeepGrow-type model for the Slicer plugin's point tools).

    Request params (Slicer): ``label`` (must be one of ``labels``), ``foreground`` / ``background``: lists of
    ``[i, j, k]`` voxel indices of the image FILE (array index after MONAI ``LoadImage``), ``reset_state``,
    optional ``client_id``. Session (click history) key: ``"<image id>:<label>"`` (``@<client_id>`` appended when
    the client sends one).
    The returned label has the image's shape and affine; ``params`` carry the engine's per-call counters
    (``encoder_runs``, ``decoder_runs``, ``cache_hits``, ``new_clicks``, ``undone_clicks``, ``objects``, ...) and the
    ``model_version``.
    """

    def __init__(
        self,
        settings: AppSettings,
        loader: NetworkLoader | None = None,
        labels: Sequence[str] = ("lesion",),
        description: str = "SGP-SAM: click-based 3D lesion segmentation (SAM-Med3D + Self-Gated Prompting)",
    ) -> None:
        super().__init__(
            path=[settings.checkpoint, settings.trained_model],  # the last existing one is current (MONAI Label rule)
            network=None,
            type=InferType.DEEPGROW,
            labels=list(labels),
            dimension=3,
            description=description,
            config={"reset_state": False},
        )
        self.settings = settings
        self.loader = loader or NetworkLoader(settings)
        self._engine: InteractiveSegmenter | None = None
        self._engine_lock = threading.Lock()

    # -- MONAI Label hooks --------------------------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        out = super().info()
        out["sgpsam"] = {**self.settings.describe(), "model_version": self.model_version()}
        if self._engine is not None:
            out["sgpsam"]["engine_stats"] = dict(self._engine.stats)
        return out

    def is_valid(self) -> bool:
        return True  # without any weights the task still runs (random init, loudly logged)

    def get_path(self, validate=True):
        return self.loader.path()

    def clear_cache(self):
        pass  # the engine's LRU is invalidated through set_network when the weights change

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return []  # the engine loads and preprocesses (cached per image), see run_inferer

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []  # the engine already returns the mask in the file's geometry

    def _get_network(self, device, data):
        return self.model().network

    # -- model / engine -----------------------------------------------------------------------------------------
    def model_version(self) -> str:
        current = self.loader.current
        return current.version if current is not None else self.loader.key()

    def model(self) -> LoadedModel:
        """The current weights; reloads when the model file's mtime changes and drops the engine's embedding cache."""
        try:
            loaded = self.loader.get()
        except CheckpointError as err:
            raise HTTPException(status_code=500, detail=f"model cannot be loaded: {one_line(err)}") from None
        with self._engine_lock:
            if self._engine is None:
                s = self.settings
                self._engine = InteractiveSegmenter(
                    loaded.network,
                    device=s.device,
                    spacing=s.spacing,
                    image_channel=s.image_channel,
                    ct_clamp=s.ct_clamp,
                    cache_max_bytes=s.cache_mb * 1024**2,
                    model_version=loaded.version,
                    new_object_distance_mm=s.new_object_distance_mm,
                )
            elif self._engine.model_version != loaded.version or self._engine.network is not loaded.network:
                logger.info(
                    "SGP-SAM: model changed (%s -> %s); cache invalidated", self._engine.model_version, loaded.version
                )
                self._engine.set_network(loaded.network, loaded.version)
        return loaded

    @property
    def engine(self) -> InteractiveSegmenter:
        self.model()
        return self._engine

    # -- request -> engine ----------------------------------------------------------------------------------------
    def _label(self, data: Dict[str, Any]) -> str:
        label = data.get("label")
        if label is None or label == "":
            return self.labels[0]  # a single-label model: a missing label means that label
        if not isinstance(label, str) or label not in self.labels:
            raise HTTPException(status_code=422, detail=f"unknown label {label!r}; this model segments: {self.labels}")
        return label

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        image = data.get(self.input_key)
        if not isinstance(image, str) or not image or not os.path.exists(image):
            shown = data.get("image_id") or image
            raise HTTPException(status_code=404, detail=f"image {shown!r} not found in the datastore")
        label = self._label(data)
        reset = parse_flag(data.get("reset_state"), "reset_state")
        image_id = str(data.get("image_id") or image)
        session_key = f"{image_id}:{label}"
        if data.get("client_id"):  # two annotators on one image keep separate click histories
            session_key += f"@{data['client_id']}"
        cache_key = f"{image}@{os.stat(image).st_mtime_ns}"  # new content under the same name = new cache entry
        loaded = self.model()
        try:
            result = self._engine.segment(
                cache_key, image, data.get("foreground"), data.get("background"), session_key=session_key, reset=reset
            )
        except (ClickError, ValueError) as err:
            raise HTTPException(status_code=422, detail=one_line(err)) from None
        except FileNotFoundError as err:
            raise HTTPException(status_code=404, detail=one_line(err)) from None

        affine = torch.as_tensor(result.affine, dtype=torch.float64)
        data[self.output_label_key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(result.mask)), affine=affine)
        data[self.output_json_key] = {
            **result.info,
            "label": label,
            "session": session_key,
            "model_version": loaded.version,
            "engine_stats": dict(self._engine.stats),
        }
        return data
