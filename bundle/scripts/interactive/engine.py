"""Interactive 3D lesion segmentation engine shared by the bundle's inference and the MONAI Label app.

One :class:`InteractiveSegmenter` wraps a SAM-Med3D-style network (``encode`` once per crop, ``decode`` once per
click round) and keeps, per session, the clicks and the per-round low-res logits, so that a client that re-sends
all of its clicks on every call (3D Slicer's MONAI Label plugin does) gets exactly one decoder round per new click.

Geometry (docs/conventions.md):
    file voxel (i, j, k)  --original affine-->  world mm (RAS)  --resampled affine^-1-->  RAS 1.5 mm voxel
The image is preprocessed once with the training transforms
(:func:`scripts.data.inference_image.preprocess_image_for_inference`), each object gets an ``S``³ crop
(``S = network.img_size``, resampled from the file's grid for that window only) that is normalised like training,
and the merged mask is resampled back (nearest) onto the file's grid within the windows' box (``windows.py``), so
the result has the input file's shape and affine.

Click rounds (how SAM-Med3D was trained): every round feeds only the NEW click(s) of an object together with that
object's previous low-res logits as the mask prompt; round one uses an all-zero mask prompt.

Objects (several lesions = several crops; ``sessions.assign_click``):
    * the first click of a session starts object 0, its crop centred on that click;
    * a later FOREGROUND click starts a new object when it is farther than ``new_object_distance_mm`` (default
      0.4 x S x spacing) from every click of every object AND outside the central region (the central half,
      ``[S/4, 3S/4)`` per axis) of every object's crop, or when it lies outside every object's crop (it could not be
      fed to any window otherwise); background clicks never start objects;
    * otherwise the click belongs to the nearest object (smallest distance to that object's clicks), preferring
      objects whose crop contains it.

Session history and undo (``sessions.py``; clicks are compared per list, foreground and background, as ordered
prefixes):
    * a snapshot is kept after every round (its click counts ``n_fg``, ``n_bg``, the objects' logits);
    * on each call the latest snapshot whose clicks are a prefix of the sent lists is restored; the sent clicks after
      it (foreground first, then background) form ONE new round. Hence: new clicks -> one round on top of the last
      state; fewer clicks that end on a round boundary (UNDO) -> exact restore, no network call; a prefix that ends
      inside a round, or edited/moved clicks -> restore the last common round boundary (possibly the empty state)
      and feed the remaining clicks as one round.
    * ``reset=True`` forgets the session first.

Large lesions get 50 %-overlap extension windows where the mask touches the crop edge (rule in ``windows.py``).
The merged mask is the union over objects.

Caching (``cache.py``): a bounded LRU (``cache_max_bytes``, counted as tensor ``nbytes``) holds the preprocessed
volumes (key ``image_id``) and the image embeddings (key ``(image_id, crop start, model_version)``), so a repeat
click on the same object runs only the prompt encoder and mask decoder. ``set_network`` bumps the version and
drops the sessions and old embeddings, or with ``keep_session_weights`` lets each session run on the weights it
started with until it is reset, idle (``session_idle_s``) or evicted. ``cache_max_bytes`` is ONE budget for the
LRU, the sessions' logits and kept older networks (``calls.fit_budget``). Calls on one image run one at a time,
calls on different images in parallel (``calls.py``). Callers must give a different ``image_id`` to different
image content.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor

from ..data.crops import NORMALISATIONS, centred_crop_start, normalise_crop
from ..data.inference_image import InferenceImage, file_voxel_to_resampled
from ..training.click_rounds import decoder_clicks, initial_mask_prompt, shown_logits
from .cache import EncoderCache
from .calls import CallCounters, ImageLocks, Weights, fit_budget, release_unused
from .sessions import (
    Click,
    ClickError,
    ObjectState,
    Session,
    SessionStore,
    Snapshot,
    assign_click,
    check_bounds,
    pack_mask,
    parse_click_list,
    unpack_mask,
)
from .windows import LogitVolume, inside, merge_windows, to_file_grid, touching_faces

__all__ = ["ClickError", "InteractiveSegmenter", "SegmentationResult", "parse_click_list"]

STAT_KEYS = ("encoder_runs", "decoder_runs", "cache_hits", "cache_misses", "evictions", "image_loads")


@dataclass
class SegmentationResult:
    """Output of :meth:`InteractiveSegmenter.segment`.

    Attributes:
        mask: uint8 (X, Y, Z) in the image FILE's voxel order and shape, 1 = lesion.
        affine: (4, 4) float64 affine of the file (voxel index -> world mm, RAS as MONAI reports it).
        info: per-call counters: encoder_runs, decoder_runs, cache_hits, new_clicks, undone_clicks, replayed_clicks,
            objects, windows, reset, latency_ms.
        box: (start, part) of the mask's bounding box, zero elsewhere (None: empty mask): lets a caller write a
            large image's mask without scanning it.
    """

    mask: np.ndarray
    affine: np.ndarray
    info: dict
    box: tuple[list[int], np.ndarray] | None = None


class InteractiveSegmenter:
    """Click-based 3D segmentation with an embedding cache, per-session click history, undo and multi-object crops.

    Args:
        network: SGP-SAM / SAM-Med3D model with ``encode``, ``decode``, ``full_res_logits``, ``img_size``,
            ``low_res_size`` and, if it has a ``refiner``, ``refine_features`` (moved to ``device`` and set to eval
            mode).
        device: torch device for the network and cached embeddings.
        spacing: isotropic resampling in mm (SAM-Med3D: 1.5).
        image_channel: input channel of multi-channel images (None: the image must have one channel).
        ct_clamp: clamp intensities to [-1000, 1000] before resampling (CT).
        normalisation: the crop's intensity normalisation, "upstream" or "robust" (``data.crops.normalise_crop``).
        cache_max_bytes: memory budget for the preprocessed volumes, embeddings, sessions and kept older networks.
        model_version: tag of the current weights, part of the embedding cache key.
        new_object_distance_mm: see the module docstring; default 0.4 x crop side x spacing.
        max_extra_windows: cap of large-lesion extension windows per object (0 disables extension).
        max_sessions: sessions kept (least recently used dropped first).
        max_objects: objects (crops) per session; a foreground click that would start one more is a ClickError.
        session_idle_s: a session unused this long is dropped (None: kept until evicted).
        keep_session_weights: sessions keep the weights they started with across ``set_network``.
    """

    def __init__(
        self,
        network,
        device="cpu",
        spacing=1.5,
        image_channel=None,
        ct_clamp=False,
        normalisation: str = "upstream",
        cache_max_bytes=2 * 1024**3,
        model_version="0",
        new_object_distance_mm=None,
        max_extra_windows: int = 6,
        max_sessions: int = 64,
        max_objects: int | None = None,
        session_idle_s: float | None = None,
        keep_session_weights: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.spacing = float(spacing)
        self.image_channel = image_channel
        self.ct_clamp = bool(ct_clamp)
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.normalisation = normalisation
        self.max_extra_windows = int(max_extra_windows)
        self.max_objects = max_objects
        self.max_bytes = int(cache_max_bytes)
        self.keep_session_weights = bool(keep_session_weights)
        self._new_object_distance_mm = new_object_distance_mm
        self._counters = CallCounters(STAT_KEYS)
        self.stats: dict[str, int] = self._counters.totals
        preprocessing = (self.spacing, self.image_channel, self.ct_clamp)
        self._cache = EncoderCache(cache_max_bytes, self._counters.add, preprocessing)
        self._sessions = SessionStore(max_sessions, session_idle_s)
        self._image_locks = ImageLocks()
        self._lock = threading.RLock()
        self._weights = Weights(self._prepare(network), str(model_version))

    # -- public API -------------------------------------------------------------------------------------------
    @property
    def network(self):
        return self._weights.network

    @property
    def model_version(self) -> str:
        return self._weights.version

    @property
    def crop_size(self) -> int:
        return int(self.network.img_size)

    @property
    def new_object_distance_mm(self) -> float:
        if self._new_object_distance_mm is not None:
            return float(self._new_object_distance_mm)
        return 0.4 * self.crop_size * self.spacing

    def set_network(self, network, model_version: str) -> None:
        """Swap the weights (new version tag). Sessions and their embeddings are dropped, or, with
        ``keep_session_weights``, kept on the weights they started with (module docstring); volumes are kept."""
        with self._lock:
            self._weights.replace(self._prepare(network), str(model_version), self.keep_session_weights)
            if not self.keep_session_weights:
                self._sessions.clear()
            release_unused(self._weights, self._sessions, self._cache)

    def clear_session(self, session_key) -> None:
        self._sessions.pop(session_key)

    def image_geometry(self, image_id: str, image) -> tuple[tuple[int, int, int], np.ndarray]:
        """(shape, affine) of the image FILE, as a mask for it must have (the volume is cached like for clicks)."""
        with self._image_locks.hold(str(image_id)):
            inf = self._cache.volume(str(image_id), image)
        return tuple(inf.original_shape), np.array(inf.original_affine, dtype=np.float64)

    def segment(
        self,
        image_id: str,
        image,
        foreground,
        background,
        session_key: str | None = None,
        reset: bool = False,
    ) -> SegmentationResult:
        """Segment from ALL clicks of the session so far (see the module docstring for rounds, undo and objects).

        Args:
            image_id: cache key of the image content (e.g. the MONAI Label image id or the file path).
            image: file path (any MONAI reader) or MetaTensor (C, X, Y, Z) from
                ``LoadImage(ensure_channel_first=True)``.
            foreground, background: lists of [i, j, k] voxel indices of the file array (before any reorientation).
            session_key: history key (e.g. image id + label name); default ``image_id``.
            reset: forget the session before segmenting.

        Returns:
            :class:`SegmentationResult` with the mask in the file's shape and affine.

        Raises:
            ClickError: malformed / non-finite / out-of-range clicks, no clicks, multi-channel image without
                ``image_channel``. FileNotFoundError: a missing image file.
        """
        t0 = time.perf_counter()
        fg = parse_click_list(foreground, "foreground")
        bg = parse_click_list(background, "background")
        if not fg and not bg:
            raise ClickError("no clicks given: send at least one foreground click [i, j, k]")
        image_id = str(image_id)
        key = image_id if session_key is None else session_key
        with self._image_locks.hold(image_id):
            self._counters.begin()
            try:
                inf = self._cache.volume(image_id, image)
                check_bounds(fg, "foreground", inf.original_shape)
                check_bounds(bg, "background", inf.original_shape)
                session = self._sessions.open(key, image_id, reset, self.model_version, usable=self._weights.has)
                with self._weights.use(session.version):
                    snapshot, info = self._advance(session, inf, fg, bg)
                if snapshot.packed is None:
                    merged = merge_windows(snapshot.objects, inf.resampled_shape, self.crop_size)
                    start, part = to_file_grid(merged, inf)
                    snapshot.packed = pack_mask(part, inf.original_shape, offset=start)
                packed = snapshot.packed  # a later call may drop the snapshot's copy once the lock is released
                mask = unpack_mask(packed)
            finally:
                counts = self._counters.end()
            with self._lock:
                fit_budget(self.max_bytes, self._cache, self._sessions, self._weights, key)
        info["reset"] = bool(reset)
        info.update({k: counts.get(k, 0) for k in ("encoder_runs", "decoder_runs", "cache_hits")})
        info["objects"] = len(snapshot.objects)
        info["windows"] = sum(1 + len(o.extra) for o in snapshot.objects)
        info["model_version"] = session.version
        info["latency_ms"] = (time.perf_counter() - t0) * 1000.0
        affine = np.array(inf.original_affine, dtype=np.float64)
        _, lo, part = packed
        return SegmentationResult(mask=mask, affine=affine, info=info, box=None if lo is None else (lo, part))

    def _advance(self, session: Session, inf: InferenceImage, fg: list, bg: list) -> tuple[Snapshot, dict]:
        """Restore the session's base snapshot for the sent clicks and run the clicks after it as one round."""
        base_index, base, info = session.base(fg, bg)
        round_fg, round_bg = fg[base.n_fg :], bg[base.n_bg :]
        new = None
        if round_fg or round_bg:
            objects = [o.copy() for o in base.objects]  # the base snapshot stays intact if the round fails
            points = file_voxel_to_resampled(np.asarray(round_fg + round_bg), inf.original_affine, inf.resampled_affine)
            labels = [1] * len(round_fg) + [0] * len(round_bg)
            clicks = [Click(tuple(float(v) for v in p), lab) for p, lab in zip(points, labels)]
            self._run_round(session.image_id, inf, objects, clicks)
            new = Snapshot(len(fg), len(bg), objects)
        session.commit(base_index, new, fg, bg)  # new None: exact undo (or the same clicks again), no network call
        return (base if new is None else new), info

    # -- network / cache ----------------------------------------------------------------------------------------
    def _prepare(self, network):
        return network.to(self.device).eval()

    @property
    def _net(self):
        """The network of the calling thread's session (see ``calls.Weights.use``)."""
        return self._weights.active[0]

    @property
    def _version(self) -> str:
        return self._weights.active[1]

    def _crop(self, inf: InferenceImage, start: tuple[int, int, int]) -> torch.Tensor:
        """Normalised network input (1, 1, S, S, S) of the window at ``start``."""
        crop = normalise_crop(inf.crop(start, self.crop_size), self.normalisation)
        return convert_to_tensor(crop, track_meta=False)[None].to(self.device, torch.float32)

    @torch.inference_mode()
    def _embedding(self, image_id: str, inf: InferenceImage, start: tuple[int, int, int]) -> torch.Tensor:
        """Image embedding (1, C, g, g, g) of the crop at ``start``, from the LRU or a fresh encoder run."""
        return self._cache.embedding(image_id, start, self._version, lambda: self._net.encode(self._crop(inf, start)))

    @torch.inference_mode()
    def _refine_features(self, image_id: str, inf: InferenceImage, start: tuple[int, int, int]) -> torch.Tensor:
        """The refiner's image features of the crop at ``start`` (cached like embeddings)."""
        return self._cache.refiner_features(
            image_id, start, self._version, lambda: self._net.refine_features(self._crop(inf, start))
        )

    def _click_tensors(self, clicks: list[Click], start) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(1, N, 3) crop voxel coordinates and (1, N) labels of the clicks; (None, None) without clicks."""
        if not clicks:
            return None, None
        pts = np.asarray([c.point for c in clicks], dtype=np.float32) - np.asarray(start, dtype=np.float32)
        labels = torch.as_tensor([[c.label for c in clicks]], device=self.device, dtype=torch.long)
        return torch.as_tensor(pts[None], device=self.device), labels

    @torch.inference_mode()
    def _decode(self, emb, clicks: list[Click], start, mask_prompt: torch.Tensor) -> torch.Tensor:
        """One prompt-encoder + decoder round; clicks in resampled coordinates; returns (1, 1, *low_res) logits."""
        points, labels = self._click_tensors(clicks, start)
        logits, _ = self._net.decode(emb, points, labels, mask_prompt.to(self.device, torch.float32))
        self._counters.add("decoder_runs")
        return logits.float()

    @torch.inference_mode()
    def _full_res(
        self, image_id, inf, start, low_res, prev: torch.Tensor | None, clicks: list[Click], main: bool = True
    ) -> torch.Tensor:
        """(S, S, S) float16 CPU crop-resolution logits of one window's round: upsampled, then refined if the model
        has a refiner (which also sees the window's previous logits ``prev`` and all its clicks so far), then made
        to agree with the window's clicks if the model is ``click_consistent``. Only the object's ``main`` window
        keeps just the components holding a foreground click: an extension window's part of a large lesion may
        reach the clicked part only through the neighbouring window."""
        features = prev_logits = None
        points, labels = self._click_tensors(clicks, start)
        if getattr(self._net, "refiner", None) is not None:
            features = self._refine_features(image_id, inf, start)
            prev_logits = None if prev is None else prev[None, None].to(self.device, torch.float32)
        logits = self._net.full_res_logits(low_res, (self.crop_size,) * 3, features, prev_logits, points, labels)
        logits = shown_logits(self._net, logits, points, labels, keep_clicked_components=main)
        return logits[0, 0].half().cpu()  # half precision: snapshots (undo) keep one per window and round

    # -- objects and rounds -------------------------------------------------------------------------------------
    def _inside(self, point, start, margin: float = 0.0) -> bool:
        return inside(point, start, self.crop_size, margin)

    def _run_round(self, image_id: str, inf: InferenceImage, objects: list[ObjectState], clicks: list[Click]) -> None:
        """Assign the round's clicks to objects (creating new ones) and update every touched object in place."""
        s = self.crop_size
        touched: dict[int, list[Click]] = {}
        for click in clicks:
            idx = assign_click(objects, click, s, self.spacing, self.new_object_distance_mm)
            if idx is None:
                if self.max_objects is not None and len(objects) >= self.max_objects:
                    shown = [round(v, 1) for v in click.point]
                    raise ClickError(
                        f"a foreground click (resampled voxel {shown}) would start lesion #{len(objects) + 1}; "
                        f"at most {self.max_objects} per session: use another segment"
                    )
                objects.append(ObjectState(start=tuple(int(c) for c in centred_crop_start(click.point, s))))
                idx = len(objects) - 1
            objects[idx].clicks.append(click)
            touched.setdefault(idx, []).append(click)

        for idx in sorted(touched):
            obj = objects[idx]
            in_main = [c for c in touched[idx] if self._inside(c.point, obj.start)]
            if in_main or obj.logits is None:
                emb = self._embedding(image_id, inf, obj.start)
                prompt = obj.logits if obj.logits is not None else initial_mask_prompt(self._net, 1, self.device)
                in_window = [c for c in obj.clicks if self._inside(c.point, obj.start)]
                obj.logits = self._decode(emb, decoder_clicks(self._net, in_main, in_window), obj.start, prompt)
                obj.full = self._full_res(image_id, inf, obj.start, obj.logits, obj.full, in_window)
            obj.extra = self._extend(image_id, inf, obj)

    def _extend(self, image_id: str, inf: InferenceImage, obj: ObjectState) -> list[tuple[tuple[int, int, int], Any]]:
        """Large-lesion extension windows of one object (rule 1-4 of the module docstring)."""
        if self.max_extra_windows <= 0:
            return []
        s, shape = self.crop_size, inf.resampled_shape
        volume = LogitVolume(shape, s)
        queue = deque(touching_faces(obj.start, volume.add(obj.start, obj.full), shape, s))
        seen = {tuple(obj.start)}
        extra = []
        while queue and len(extra) < self.max_extra_windows:
            start = queue.popleft()
            if start in seen:
                continue
            seen.add(start)
            prior = volume.prior(start)[None, None]
            prompt = F.interpolate(prior, size=tuple(self._net.low_res_size), mode="area")  # (1, 1, *low_res)
            inside_clicks = [c for c in obj.clicks if self._inside(c.point, start)]
            low_res = self._decode(self._embedding(image_id, inf, start), inside_clicks, start, prompt)
            full = self._full_res(image_id, inf, start, low_res, None, inside_clicks, main=False)
            extra.append((start, full))
            window_mask = volume.add(start, full)
            queue.extend(n for n in touching_faces(start, window_mask, shape, s) if n not in seen)
        return extra
