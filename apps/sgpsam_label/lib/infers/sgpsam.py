"""Interactive (point-prompt) inference: MONAI Label's ``BasicInferTask`` around the bundle's ``InteractiveSegmenter``.

3D Slicer's MONAI Label plugin re-sends ALL clicks of a segment on every call and never sends the current mask, so
the state lives server-side in the engine, one session per (image, segment name, client) -- see
:mod:`lib.request` for how the client is told apart. The engine caches the preprocessed volume and the image
embeddings, so a repeat click on an image runs only the prompt encoder + mask decoder.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Dict, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.transforms import SpatialCrop
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import file_ext
from scripts.checkpoint import CheckpointError
from scripts.data.inference_image import load_image
from scripts.interactive import ClickError, InteractiveSegmenter, parse_click_list

from ..mask_file import write_mask_nrrd
from ..model import LoadedModel, NetworkLoader
from ..request import ClickRequest, click_request, inside_roi, parse_roi, unprocessable
from ..settings import AppSettings

logger = logging.getLogger(__name__)

MAX_ROI_MEMORY = 1024  # (session -> last ROI) entries remembered to spot an ROI change
BOX_KEY = "sgpsam_mask_box"  # run_inferer -> writer: (box,), box = (start, part) of the mask or None when empty


def one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:500]


def file_shape(path: str) -> tuple[int, int, int]:
    """Voxel grid of an image file from its header (the array shape MONAI's readers give, channel aside)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise unprocessable("the image's header cannot be read with ITK, so an ROI cannot be applied") from None
    return tuple(int(s) for s in reader.GetSize()[:3])


def roi_loader(path: str, roi) -> Callable[[], MetaTensor]:
    """Loads the ROI's part of the image (channel first, affine moved to the ROI's corner); called on a cache miss."""

    def load() -> MetaTensor:
        image = load_image(path)  # the engine's reader, so ROI and whole-image calls see the same voxels
        return SpatialCrop(roi_start=[lo for lo, _ in roi], roi_end=[hi + 1 for _, hi in roi])(image)

    return load


class SGPSAMInfer(BasicInferTask):
    """Point-prompt 3D lesion segmentation (DeepGrow-type model for the Slicer plugin's point tools).

    Request params (Slicer): ``label`` (the segment's name, any name), ``foreground`` / ``background``: lists of
    ``[i, j, k]`` voxel indices of the image FILE (array index after MONAI ``LoadImage``), ``reset_state``,
    optional ``roi`` ``[i0, i1, j0, j1, k0, k1]``, ``client_id``. The returned mask has the image's shape and
    affine, value 1 under the segment's name (``label_names``); ``params`` carry the engine's per-call counters
    (``encoder_runs``, ``decoder_runs``, ``cache_hits``, ``new_clicks``, ``undone_clicks``, ``objects``, ...), the
    ``session`` and the ``model_version`` the session runs on.
    """

    def __init__(
        self,
        settings: AppSettings,
        loader: NetworkLoader | None = None,
        labels: Sequence[str] = ("lesion",),
        description: str = "SGP-SAM: click-based 3D lesion segmentation (SAM-Med3D + Self-Gated Prompting)",
    ) -> None:
        super().__init__(
            path=[settings.checkpoint, settings.trained_model],
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
        self._rois: OrderedDict[tuple, Any] = OrderedDict()  # session key -> ROI of its last call
        self._rois_lock = threading.Lock()

    # -- MONAI Label hooks --------------------------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        out = super().info()
        out["sgpsam"] = {
            **self.settings.describe(public=True),
            **self.loader.summary(),  # the network and preprocessing, as the model file describes them
            "model_version": self.model_version(),
        }
        if self._engine is not None:
            out["sgpsam"]["engine_stats"] = dict(self._engine.stats)
        return out

    def is_valid(self) -> bool:
        return True  # the model file was checked when the app started

    def get_path(self, validate=True):
        # validate=False is where MONAI Label writes an uploaded model: never the user's --conf checkpoint
        return self.loader.path() if validate else self.settings.trained_model

    def clear_cache(self):
        pass  # the engine's LRU follows the weights' version

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return []  # the engine loads and preprocesses (cached per image), see run_inferer

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []  # the engine already returns the mask in the file's geometry

    def _get_network(self, device, data):
        return self.model().network

    def __call__(self, request, callbacks=None):
        result_file, result = super().__call__(request, callbacks)
        if result.get("label"):
            result["label_names"] = {result["label"]: 1}  # the plugin imports value 1 as this segment
        return result_file, result

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        box = data.pop(BOX_KEY, None)
        ext = data.get("result_extension") or file_ext(data.get("image_path") or "")
        if ext == ".nrrd" and box is not None:
            label = data[self.output_label_key]
            path = write_mask_nrrd(label.shape, box[0], np.asarray(label.affine, dtype=np.float64))
            return path, data[self.output_json_key]
        data["result_write_to_file"] = True
        return super().writer(data, extension=data.get("result_extension"), dtype="uint8")

    # -- model / engine -----------------------------------------------------------------------------------------
    def model_version(self) -> str:
        current = self.loader.current
        return current.version if current is not None else self.loader.key()

    def model(self) -> LoadedModel:
        """The current weights; reloads when the model file changes (sessions keep the weights they started on)."""
        try:
            loaded = self.loader.get()
        except CheckpointError as err:
            raise HTTPException(status_code=500, detail=f"model cannot be loaded: {one_line(err)}") from None
        with self._engine_lock:
            if self._engine is None:
                s, pre = self.settings, self.loader.preprocessing  # the model file's preprocessing
                self._engine = InteractiveSegmenter(
                    loaded.network,
                    device=s.device,
                    normalisation=pre.normalisation,
                    **pre.image_kwargs(),
                    cache_max_bytes=s.cache_mb * 1024**2,
                    model_version=loaded.version,
                    new_object_distance_mm=s.new_object_distance_mm,
                    max_extra_windows=s.max_windows - 1,
                    max_sessions=s.max_sessions,
                    max_objects=s.max_objects,
                    session_idle_s=s.session_idle_s,
                    keep_session_weights=True,  # a weight swap mid-annotation must not change a session's masks
                )
            elif self._engine.model_version != loaded.version or self._engine.network is not loaded.network:
                logger.info("SGP-SAM: model changed (%s -> %s)", self._engine.model_version, loaded.version)
                self._engine.set_network(loaded.network, loaded.version)
        return loaded

    @property
    def engine(self) -> InteractiveSegmenter:
        self.model()
        return self._engine

    # -- request -> engine ----------------------------------------------------------------------------------------
    def _roi_changed(self, key: tuple, roi) -> bool:
        """True when this session's ROI differs from its last call's (a new ROI starts the session over)."""
        with self._rois_lock:
            changed = key in self._rois and self._rois[key] != roi
            self._rois[key] = roi
            self._rois.move_to_end(key)
            while len(self._rois) > MAX_ROI_MEMORY:
                self._rois.popitem(last=False)
        return changed

    def _clicks(self, data: Dict[str, Any], roi) -> tuple[list, list, int]:
        """Checked click lists; with an ROI, clicks outside it are dropped (counted) and the rest moved into it."""
        try:
            fg = parse_click_list(data.get("foreground"), "foreground")
            bg = parse_click_list(data.get("background"), "background")
        except ClickError as err:
            raise unprocessable(one_line(err)) from None
        if roi is None:
            return fg, bg, 0
        keep_fg = [p for p in fg if inside_roi(p, roi)]
        keep_bg = [p for p in bg if inside_roi(p, roi)]
        shift = np.asarray([lo for lo, _ in roi], dtype=np.float64)
        moved = [[(np.asarray(p) - shift).tolist() for p in points] for points in (keep_fg, keep_bg)]
        return moved[0], moved[1], len(fg) + len(bg) - len(keep_fg) - len(keep_bg)

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        image = data.get(self.input_key)
        if not isinstance(image, str) or not os.path.isfile(image):
            raise HTTPException(status_code=404, detail=f"image {data.get('image_id') or image!r} not found")
        req = click_request(data, self.labels[0], self.settings.max_clicks)
        roi = parse_roi(data.get("roi"), file_shape(image)) if data.get("roi") not in (None, "", []) else None
        fg, bg, dropped = self._clicks(data, roi)
        reset = req.reset or self._roi_changed(req.session_key, roi)
        loaded = self.model()
        cache_key = f"{image}@{os.stat(image).st_mtime_ns}"  # new content under the same name = new cache entry
        try:
            if not fg and not bg:
                mask, affine, info, box = self._empty(req, cache_key, image)
            elif roi is None:
                result = self._engine.segment(cache_key, image, fg, bg, session_key=req.session_key, reset=reset)
                mask, affine, info, box = result.mask, result.affine, result.info, result.box
            else:
                mask, affine, info, box = self._segment_roi(req, cache_key, image, roi, fg, bg, reset)
        except (ClickError, ValueError) as err:
            raise unprocessable(one_line(err)) from None
        except FileNotFoundError as err:
            raise HTTPException(status_code=404, detail=one_line(err)) from None

        data["result_extension"] = req.extension
        data[BOX_KEY] = (box,)  # the mask's bounding box, for a fast writer
        tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
        data[self.output_label_key] = MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64))
        data[self.output_json_key] = {
            **info,
            "label": req.segment,
            "session": req.describe(),
            "roi": [list(pair) for pair in roi] if roi else None,
            "ignored_clicks": dropped,
            "model_version": info.get("model_version", loaded.version),
            "engine_stats": dict(self._engine.stats),
        }
        return data

    def _empty(self, req: ClickRequest, cache_key: str, image: str):
        """No clicks (all points deleted, or only an ROI): an empty mask, and the session starts over."""
        self._engine.clear_session(req.session_key)
        shape, affine = self._engine.image_geometry(cache_key, image)
        info = {"new_clicks": 0, "objects": 0, "windows": 0, "reset": True, "empty": True}
        return np.zeros(shape, dtype=np.uint8), affine, info, None

    def _segment_roi(self, req: ClickRequest, cache_key: str, image: str, roi, fg, bg, reset: bool):
        """Segment the ROI's part of the image as an image of its own, then put the mask back in the full grid."""
        tag = "_".join(f"{lo}-{hi}" for lo, hi in roi)
        sub = self._engine.segment(
            f"{cache_key}#roi{tag}", roi_loader(image, roi), fg, bg, session_key=req.session_key, reset=reset
        )
        shape = file_shape(image)
        mask = np.zeros(shape, dtype=np.uint8)
        mask[tuple(slice(lo, hi + 1) for lo, hi in roi)] = sub.mask
        to_corner = np.eye(4)
        to_corner[:3, 3] = [-lo for lo, _ in roi]
        box = None if sub.box is None else ([a + lo for a, (lo, _) in zip(sub.box[0], roi)], sub.box[1])
        return mask, np.asarray(sub.affine, dtype=np.float64) @ to_corner, sub.info, box
