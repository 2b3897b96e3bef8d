"""Interactive 3D lesion segmentation engine shared by the bundle's inference and the MONAI Label app.

One :class:`InteractiveSegmenter` wraps a SAM-Med3D-style network (``encode`` once per crop, ``decode`` once per
click round) and keeps, per session, the clicks and the per-round low-res logits, so that a client that re-sends
all of its clicks on every call (3D Slicer's MONAI Label plugin does) gets exactly one decoder round per new click.

Geometry (docs/conventions.md, /work/shared/reference/sam_med3d.md):
    file voxel (i, j, k)  --original affine-->  world mm (RAS)  --resampled affine^-1-->  RAS 1.5 mm voxel
The image is preprocessed once with the training transforms (:func:`scripts.data.transforms.preprocess_image_for_inference`),
each object gets an ``S``³ crop (``S = network.img_size``) that is z-normalised like training, and the merged mask is
resampled back (nearest) onto the file's grid, so the result has the input file's shape and affine.

Click rounds (how SAM-Med3D was trained): every round feeds only the NEW click(s) of an object together with that
object's previous low-res logits as the mask prompt; round one uses an all-zero mask prompt.

Objects (several lesions = several crops):
    * the first click of a session starts object 0, its crop centred on that click;
    * a later FOREGROUND click starts a new object when it is farther than ``new_object_distance_mm`` (default
      0.4 x S x spacing) from every click of every object AND outside the central region (the central half,
      ``[S/4, 3S/4)`` per axis) of every object's crop, or when it lies outside every object's crop (it could not be
      fed to any window otherwise); background clicks never start objects;
    * otherwise the click belongs to the nearest object (smallest distance to that object's clicks), preferring
      objects whose crop contains it.

Session history and undo (clicks are compared per list, foreground and background, as ordered prefixes):
    * a snapshot is kept after every round (its click counts ``n_fg``, ``n_bg``, the objects' logits);
    * on each call the latest snapshot whose clicks are a prefix of the sent lists is restored; the sent clicks after
      it (foreground first, then background) form ONE new round. Hence: new clicks -> one round on top of the last
      state; fewer clicks that end on a round boundary (UNDO) -> exact restore, no network call; a prefix that ends
      inside a round, or edited/moved clicks -> restore the last common round boundary (possibly the empty state)
      and feed the remaining clicks as one round.
    * ``reset=True`` forgets the session first.

Large lesions (SAM-Med3D: extend with 50 %-overlap windows where the mask touches the crop edge). Rule used here,
per object and recomputed whenever the object gets new clicks:
    1. the object's mask in its main window is checked face by face (order -x, +x, -y, +y, -z, +z); a face counts
       when the mask has a voxel on the window's outermost slice there AND the resampled volume continues beyond
       that face;
    2. each such face queues a window shifted by ``S // 2`` along that axis (50 % overlap), breadth first;
       windows found touching a face are expanded the same way; a start already used is skipped; at most
       ``max_extra_windows`` (default 6) extra windows per object;
    3. an extra window is prompted with ALL of the object's clicks that fall inside it (crop coordinates), and as
       mask prompt the object's current full-resolution logits cropped to the window (where earlier windows
       overlap it; the union's maximum logit) and area-downsampled to the low-res grid; the part no window has
       seen yet is 0, i.e. the "no prior" value of round one. No click inside = a mask-only round, which SAM-Med3D
       also trained on;
    4. the object's mask is the union over its windows of ``sigmoid(upsampled logits) > 0.5``, each window's logits
       first made to agree with its clicks when the network is ``click_consistent`` (``click_rounds.shown_logits``;
       only the main window keeps just the components that hold a foreground click).
The merged mask is the union over objects.

Caching: a bounded LRU (``cache_max_bytes``, counted as tensor ``nbytes``) holds the preprocessed volumes (key
``image_id``) and the image embeddings (key ``(image_id, crop start, model_version)``), so a repeat click on the same
object runs only the prompt encoder and mask decoder. ``set_network`` bumps the version, drops the embeddings and
the sessions (their logits came from the old weights). Callers must give a different ``image_id`` to different
image content.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from monai.utils import convert_to_tensor

from ..training.click_rounds import decoder_clicks, initial_mask_prompt, shown_logits
from ..data.transforms import (
    InferenceImage,
    centred_crop_start,
    crop_at,
    file_voxel_to_resampled,
    normalise_crop,
    preprocess_image_for_inference,
)

__all__ = ["ClickError", "InteractiveSegmenter", "SegmentationResult", "parse_click_list"]

STAT_KEYS = ("encoder_runs", "decoder_runs", "cache_hits", "cache_misses", "evictions", "image_loads")


class ClickError(ValueError):
    """Malformed, non-finite or out-of-range clicks, no clicks, or an image the engine cannot use as given."""


@dataclass
class SegmentationResult:
    """Output of :meth:`InteractiveSegmenter.segment`.

    Attributes:
        mask: uint8 (X, Y, Z) in the image FILE's voxel order and shape, 1 = lesion.
        affine: (4, 4) float64 affine of the file (voxel index -> world mm, RAS as MONAI reports it).
        info: per-call counters: encoder_runs, decoder_runs, cache_hits, new_clicks, undone_clicks, replayed_clicks,
            objects, windows, reset, latency_ms.
    """

    mask: np.ndarray
    affine: np.ndarray
    info: dict


# ----------------------------------------------------------------------------------------------------------------
# internal state
# ----------------------------------------------------------------------------------------------------------------
class _ByteLRU:
    """Least-recently-used mapping capped by the summed ``nbytes`` of its values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.total = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> int:
        """Insert (most recent) and evict the oldest entries over the cap; returns the number evicted.

        A value larger than the whole cap is not stored (it would evict everything and still not fit).
        """
        self.pop(key)
        if nbytes > self.max_bytes:
            return 0
        self._items[key] = (value, nbytes)
        self.total += nbytes
        evicted = 0
        while self.total > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.total -= size
            evicted += 1
        return evicted

    def pop(self, key: Hashable) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.total -= item[1]

    def drop(self, predicate) -> None:
        for key in [k for k in self._items if predicate(k)]:
            self.pop(key)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class _Click:
    """One click: ``point`` (3,) float voxel coordinates in the resampled RAS grid, ``label`` 1 fg / 0 bg."""

    point: tuple[float, float, float]
    label: int


@dataclass
class _Object:
    """One target object. Tensors are never modified in place, so snapshots can share them."""

    start: tuple[int, int, int]  # main crop start (resampled grid, may be negative)
    clicks: list[_Click] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (1, 1, *low_res) main-window logits after the last round (mask prompt)
    full: torch.Tensor | None = None  # (S, S, S) float16 CPU main-window crop-resolution logits (upsampled, refined)
    extra: list[tuple[tuple[int, int, int], torch.Tensor]] = field(default_factory=list)  # (start, (S, S, S) logits)

    def copy(self) -> "_Object":
        return replace(self, clicks=list(self.clicks), extra=list(self.extra))


@dataclass
class _Snapshot:
    """State after one round: click counts and objects (copied), plus the packed output mask."""

    n_fg: int
    n_bg: int
    objects: list[_Object]
    packed: tuple | None = None  # see _pack; only the latest snapshot keeps it (undo re-merges)


@dataclass
class _Session:
    image_id: str
    fg: list[tuple[float, float, float]] = field(default_factory=list)  # file voxel clicks as sent
    bg: list[tuple[float, float, float]] = field(default_factory=list)
    history: list[_Snapshot] = field(default_factory=list)


def _pack(mask: np.ndarray) -> tuple:
    """Bounding-box crop of a binary mask (exact, small): (shape, lo, cropped)."""
    nz = np.nonzero(mask)
    if not nz[0].size:
        return mask.shape, None, None
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    return mask.shape, lo, mask[tuple(slice(a, b) for a, b in zip(lo, hi))].copy()


def _unpack(packed: tuple) -> np.ndarray:
    shape, lo, sub = packed
    out = np.zeros(shape, dtype=np.uint8)
    if lo is not None:
        out[tuple(slice(a, a + n) for a, n in zip(lo, sub.shape))] = sub
    return out


def parse_click_list(points: Any, name: str) -> list[tuple[float, float, float]]:
    """Validate one click list ``[[i, j, k], ...]`` -> list of float triples; ClickError names the bad click.

    Only syntax and finiteness are checked here; the range check needs the image shape (done in ``segment``).
    """
    if points is None:
        return []
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().tolist()
    elif isinstance(points, np.ndarray):
        points = points.tolist()
    if isinstance(points, (str, bytes)) or not isinstance(points, Sequence):
        raise ClickError(f"{name} clicks must be a list of [i, j, k] voxel indices, got {type(points).__name__}")
    out = []
    for n, p in enumerate(points, start=1):
        if isinstance(p, (np.ndarray, torch.Tensor)):
            p = np.asarray(p).tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 3:
            raise ClickError(f"{name} click #{n} is not a list of 3 numbers: {p!r}")
        if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in p):
            raise ClickError(f"{name} click #{n} is not a list of 3 numbers: {p!r}")
        if not all(math.isfinite(float(v)) for v in p):
            raise ClickError(f"{name} click #{n} {list(p)} has a non-finite coordinate (NaN or inf)")
        out.append(tuple(float(v) for v in p))
    return out


def _check_bounds(points: list, name: str, shape: Sequence[int]) -> None:
    for n, p in enumerate(points, start=1):
        if not all(-0.5 <= v < s - 0.5 for v, s in zip(p, shape)):
            dims = "x".join(str(int(s)) for s in shape)
            valid = ", ".join(f"0..{int(s) - 1}" for s in shape)
            shown = [int(v) if float(v).is_integer() else v for v in p]
            raise ClickError(f"{name} click #{n} {shown} is outside the image (shape {dims}, valid indices {valid})")


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if not np.allclose(x, y, rtol=0.0, atol=1e-6):
            break
        n += 1
    return n


def _region(start: Sequence[int], size: int, shape: Sequence[int]) -> tuple[tuple, tuple] | None:
    """(volume slices, window slices) of the part of window ``start`` (side ``size``) inside ``shape``."""
    lo = [max(int(s), 0) for s in start]
    hi = [min(int(s) + size, n) for s, n in zip(start, shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    dst = tuple(slice(l, h) for l, h in zip(lo, hi))
    src = tuple(slice(l - int(s), h - int(s)) for l, h, s in zip(lo, hi, start))
    return dst, src


# ----------------------------------------------------------------------------------------------------------------
# engine
# ----------------------------------------------------------------------------------------------------------------
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
        cache_max_bytes: cap of the LRU holding preprocessed volumes and embeddings.
        model_version: tag of the current weights, part of the embedding cache key.
        new_object_distance_mm: see the module docstring; default 0.4 x crop side x spacing.
        max_extra_windows: cap of large-lesion extension windows per object (0 disables extension).
        max_sessions: sessions kept (least recently used dropped first).
    """

    def __init__(
        self,
        network,
        device="cpu",
        spacing=1.5,
        image_channel=None,
        ct_clamp=False,
        cache_max_bytes=2 * 1024**3,
        model_version="0",
        new_object_distance_mm=None,
        max_extra_windows: int = 6,
        max_sessions: int = 64,
    ) -> None:
        self.device = torch.device(device)
        self.spacing = float(spacing)
        self.image_channel = image_channel
        self.ct_clamp = bool(ct_clamp)
        self.max_extra_windows = int(max_extra_windows)
        self.max_sessions = int(max_sessions)
        self._new_object_distance_mm = new_object_distance_mm
        self._cache = _ByteLRU(cache_max_bytes)
        self._sessions: OrderedDict[Hashable, _Session] = OrderedDict()
        self._lock = threading.RLock()
        self.stats: dict[str, int] = {k: 0 for k in STAT_KEYS}
        self.network = None
        self.model_version = str(model_version)
        self._install(network)

    # -- public API -------------------------------------------------------------------------------------------
    @property
    def crop_size(self) -> int:
        return int(self.network.img_size)

    @property
    def new_object_distance_mm(self) -> float:
        if self._new_object_distance_mm is not None:
            return float(self._new_object_distance_mm)
        return 0.4 * self.crop_size * self.spacing

    def set_network(self, network, model_version: str) -> None:
        """Swap the weights: new version tag, cached embeddings and all sessions are dropped (volumes are kept)."""
        with self._lock:
            self._install(network)
            self.model_version = str(model_version)
            self._cache.drop(lambda k: k[0] == "emb")
            self._sessions.clear()

    def clear_session(self, session_key) -> None:
        with self._lock:
            self._sessions.pop(session_key, None)

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
            image: file path (any MONAI reader) or MetaTensor (C, X, Y, Z) from ``LoadImage(ensure_channel_first=True)``.
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
        with self._lock:
            before = dict(self.stats)
            inf = self._get_image(image_id, image)
            _check_bounds(fg, "foreground", inf.original_shape)
            _check_bounds(bg, "background", inf.original_shape)

            key = image_id if session_key is None else session_key
            if reset:
                self._sessions.pop(key, None)
            sess = self._sessions.get(key)
            if sess is None or sess.image_id != image_id:
                sess = _Session(image_id)
            self._sessions[key] = sess
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

            cf, cb = _common_prefix(sess.fg, fg), _common_prefix(sess.bg, bg)
            base_idx = max((i for i, s in enumerate(sess.history) if s.n_fg <= cf and s.n_bg <= cb), default=-1)
            base = sess.history[base_idx] if base_idx >= 0 else _Snapshot(0, 0, [])
            info = {
                "new_clicks": (len(fg) - cf) + (len(bg) - cb),
                "undone_clicks": (len(sess.fg) - cf) + (len(sess.bg) - cb),
                "replayed_clicks": (cf - base.n_fg) + (cb - base.n_bg),
                "reset": bool(reset),
            }
            round_fg, round_bg = fg[base.n_fg :], bg[base.n_bg :]
            if round_fg or round_bg:
                objects = [o.copy() for o in base.objects]  # the base snapshot stays intact if the round fails
                pts = file_voxel_to_resampled(
                    np.asarray(round_fg + round_bg), inf.original_affine, inf.resampled_affine
                )
                labels = [1] * len(round_fg) + [0] * len(round_bg)
                new = [_Click(tuple(float(v) for v in p), lab) for p, lab in zip(pts, labels)]
                self._run_round(image_id, inf, objects, new)
                snap = _Snapshot(len(fg), len(bg), objects)
                del sess.history[base_idx + 1 :]
                sess.history.append(snap)
            else:
                snap = base  # exact undo (or the same clicks again): no network call
                del sess.history[base_idx + 1 :]
            sess.fg, sess.bg = list(fg), list(bg)
            for old in sess.history[:-1]:
                old.packed = None  # only the latest mask is kept packed; undo re-merges from the logits
            if snap.packed is None:
                snap.packed = _pack(self._to_original(self._merge(snap.objects, inf), inf))
            mask = _unpack(snap.packed)

            info.update({k: self.stats[k] - before[k] for k in ("encoder_runs", "decoder_runs", "cache_hits")})
            info["objects"] = len(snap.objects)
            info["windows"] = sum(1 + len(o.extra) for o in snap.objects)
            info["latency_ms"] = (time.perf_counter() - t0) * 1000.0
            return SegmentationResult(mask=mask, affine=np.array(inf.original_affine, dtype=np.float64), info=info)

    # -- network / cache ----------------------------------------------------------------------------------------
    def _install(self, network) -> None:
        self.network = network.to(self.device).eval()

    def _count_evictions(self, n: int) -> None:
        self.stats["evictions"] += n

    def _get_image(self, image_id: str, image) -> InferenceImage:
        key = ("img", image_id, self.spacing, self.image_channel, self.ct_clamp)
        inf = self._cache.get(key)
        if inf is not None:
            return inf
        if not isinstance(image, torch.Tensor):
            path = os.fspath(image)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image not found: {path}")
        try:
            inf = preprocess_image_for_inference(image, self.spacing, self.image_channel, self.ct_clamp)
        except (ValueError, RuntimeError) as err:
            # MONAI's Compose wraps a transform's ValueError (e.g. 4-D image without image_channel) in a
            # RuntimeError "applying transform ...": report the ValueError's own line to the client.
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, ValueError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise ClickError(str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)) from None
        self.stats["image_loads"] += 1
        self._count_evictions(self._cache.put(key, inf, inf.image.numel() * inf.image.element_size()))
        return inf

    def _crop(self, inf: InferenceImage, start: tuple[int, int, int]) -> torch.Tensor:
        """Normalised network input (1, 1, S, S, S) of the window at ``start``."""
        crop = convert_to_tensor(normalise_crop(crop_at(inf.image, start, self.crop_size)), track_meta=False)
        return crop[None].to(self.device, torch.float32)

    @torch.inference_mode()
    def _embedding(self, image_id: str, inf: InferenceImage, start: tuple[int, int, int]) -> torch.Tensor:
        """Image embedding (1, C, g, g, g) of the crop at ``start``, from the LRU or a fresh encoder run."""
        key = ("emb", image_id, self.spacing, self.image_channel, self.ct_clamp, tuple(start), self.model_version)
        emb = self._cache.get(key)
        if emb is not None:
            self.stats["cache_hits"] += 1
            return emb
        self.stats["cache_misses"] += 1
        emb = self.network.encode(self._crop(inf, start))
        self.stats["encoder_runs"] += 1
        self._count_evictions(self._cache.put(key, emb, emb.numel() * emb.element_size()))
        return emb

    @torch.inference_mode()
    def _refine_features(self, image_id: str, inf: InferenceImage, start: tuple[int, int, int]) -> torch.Tensor:
        """The refiner's image features of the crop at ``start`` (cached like embeddings)."""
        key = ("ref", image_id, self.spacing, self.image_channel, self.ct_clamp, tuple(start), self.model_version)
        features = self._cache.get(key)
        if features is None:
            features = self.network.refine_features(self._crop(inf, start))
            self._count_evictions(self._cache.put(key, features, features.numel() * features.element_size()))
        return features

    def _click_tensors(self, clicks: list[_Click], start) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(1, N, 3) crop voxel coordinates and (1, N) labels of the clicks; (None, None) without clicks."""
        if not clicks:
            return None, None
        pts = np.asarray([c.point for c in clicks], dtype=np.float32) - np.asarray(start, dtype=np.float32)
        labels = torch.as_tensor([[c.label for c in clicks]], device=self.device, dtype=torch.long)
        return torch.as_tensor(pts[None], device=self.device), labels

    @torch.inference_mode()
    def _decode(self, emb, clicks: list[_Click], start, mask_prompt: torch.Tensor) -> torch.Tensor:
        """One prompt-encoder + decoder round; clicks in resampled coordinates; returns (1, 1, *low_res) logits."""
        points, labels = self._click_tensors(clicks, start)
        logits, _ = self.network.decode(emb, points, labels, mask_prompt.to(self.device, torch.float32))
        self.stats["decoder_runs"] += 1
        return logits.float()

    @torch.inference_mode()
    def _full_res(
        self, image_id, inf, start, low_res, prev: torch.Tensor | None, clicks: list[_Click], main: bool = True
    ) -> torch.Tensor:
        """(S, S, S) float16 CPU crop-resolution logits of one window's round: upsampled, then refined if the model
        has a refiner (which also sees the window's previous logits ``prev`` and all its clicks so far), then made
        to agree with the window's clicks if the model is ``click_consistent``. Only the object's ``main`` window
        keeps just the components holding a foreground click: an extension window's part of a large lesion may
        reach the clicked part only through the neighbouring window."""
        features = prev_logits = None
        points, labels = self._click_tensors(clicks, start)
        if getattr(self.network, "refiner", None) is not None:
            features = self._refine_features(image_id, inf, start)
            prev_logits = None if prev is None else prev[None, None].to(self.device, torch.float32)
        logits = self.network.full_res_logits(low_res, (self.crop_size,) * 3, features, prev_logits, points, labels)
        logits = shown_logits(self.network, logits, points, labels, keep_clicked_components=main)
        return logits[0, 0].half().cpu()  # half precision: snapshots (undo) keep one per window and round

    # -- geometry helpers -----------------------------------------------------------------------------------------
    def _inside(self, point, start, margin: float = 0.0) -> bool:
        """Is ``point`` inside window ``start`` (``margin`` voxels in from each face; 0 = anywhere in it)?"""
        s = self.crop_size
        return all(st - 0.5 + margin <= p < st + s - 0.5 - margin for p, st in zip(point, start))

    def _assign(self, objects: list[_Object], click: _Click) -> int | None:
        """Index of the object the click belongs to, or None when it starts a new object (module docstring)."""
        if not objects:
            return None
        p = np.asarray(click.point)
        dist = [min(np.linalg.norm(p - np.asarray(c.point)) * self.spacing for c in o.clicks) for o in objects]
        containing = [i for i, o in enumerate(objects) if self._inside(click.point, o.start)]
        if click.label == 1:
            if not containing:
                return None
            central = any(self._inside(click.point, o.start, margin=self.crop_size / 4.0) for o in objects)
            if min(dist) > self.new_object_distance_mm and not central:
                return None
        candidates = containing or list(range(len(objects)))
        return min(candidates, key=lambda i: (dist[i], i))

    def _touching_faces(self, start, window_mask: torch.Tensor, shape) -> list[tuple[int, int, int]]:
        """Starts of the half-shifted windows beyond each face the mask touches where the volume continues."""
        s, half = self.crop_size, self.crop_size // 2
        out = []
        for axis in range(3):
            for side in (-1, 1):
                if side < 0 and start[axis] <= 0:
                    continue  # nothing beyond the face: the window already starts at (or before) the volume edge
                if side > 0 and start[axis] + s >= shape[axis]:
                    continue
                face = window_mask.select(axis, 0 if side < 0 else s - 1)
                if bool(face.any()):
                    new = list(start)
                    new[axis] += side * half
                    out.append(tuple(new))
        return out

    # -- rounds -------------------------------------------------------------------------------------------------
    def _run_round(self, image_id: str, inf: InferenceImage, objects: list[_Object], clicks: list[_Click]) -> None:
        """Assign the round's clicks to objects (creating new ones) and update every touched object in place."""
        s = self.crop_size
        touched: dict[int, list[_Click]] = {}
        for click in clicks:
            idx = self._assign(objects, click)
            if idx is None:
                objects.append(_Object(start=tuple(int(c) for c in centred_crop_start(click.point, s))))
                idx = len(objects) - 1
            objects[idx].clicks.append(click)
            touched.setdefault(idx, []).append(click)

        for idx in sorted(touched):
            obj = objects[idx]
            in_main = [c for c in touched[idx] if self._inside(c.point, obj.start)]
            if in_main or obj.logits is None:
                emb = self._embedding(image_id, inf, obj.start)
                prompt = obj.logits if obj.logits is not None else initial_mask_prompt(self.network, 1, self.device)
                in_window = [c for c in obj.clicks if self._inside(c.point, obj.start)]
                obj.logits = self._decode(emb, decoder_clicks(self.network, in_main, in_window), obj.start, prompt)
                obj.full = self._full_res(image_id, inf, obj.start, obj.logits, obj.full, in_window)
            obj.extra = self._extend(image_id, inf, obj)

    def _extend(self, image_id: str, inf: InferenceImage, obj: _Object) -> list[tuple[tuple[int, int, int], Any]]:
        """Large-lesion extension windows of one object (rule 1-4 of the module docstring)."""
        if self.max_extra_windows <= 0:
            return []
        s = self.crop_size
        shape = tuple(int(n) for n in inf.image.shape[1:])
        logit_vol = torch.zeros(shape)  # 0 = "no prior" where no window has looked yet
        covered = torch.zeros(shape, dtype=torch.bool)

        def add(start, up: torch.Tensor) -> torch.Tensor:
            """Fold one window's logits into the object's volume; returns its in-volume mask (S, S, S)."""
            win_mask = torch.zeros((s, s, s), dtype=torch.bool)
            reg = _region(start, s, shape)
            if reg is not None:
                dst, src = reg
                sub, cov = up[src].float(), covered[dst]
                logit_vol[dst] = torch.where(cov, torch.maximum(logit_vol[dst], sub), sub)
                covered[dst] = True
                win_mask[src] = sub > 0
            return win_mask

        main_mask = add(obj.start, obj.full)
        queue = deque(self._touching_faces(obj.start, main_mask, shape))
        seen = {tuple(obj.start)}
        extra = []
        while queue and len(extra) < self.max_extra_windows:
            start = queue.popleft()
            if start in seen:
                continue
            seen.add(start)
            prior = convert_to_tensor(crop_at(logit_vol[None], start, s), track_meta=False)
            prior = prior[None].float()  # (1, 1, S, S, S)
            prompt = F.interpolate(prior, size=tuple(self.network.low_res_size), mode="area")
            emb = self._embedding(image_id, inf, start)
            inside = [c for c in obj.clicks if self._inside(c.point, start)]
            low_res = self._decode(emb, inside, start, prompt)
            full = self._full_res(image_id, inf, start, low_res, None, inside, main=False)
            extra.append((start, full))
            win_mask = add(start, full)
            queue.extend(n for n in self._touching_faces(start, win_mask, shape) if n not in seen)
        return extra

    # -- output -------------------------------------------------------------------------------------------------
    def _merge(self, objects: list[_Object], inf: InferenceImage) -> torch.Tensor:
        """Union of every object's windows (sigmoid > 0.5 of the crop-resolution logits) in the resampled grid."""
        s = self.crop_size
        shape = tuple(int(n) for n in inf.image.shape[1:])
        vol = torch.zeros(shape, dtype=torch.bool)
        for obj in objects:
            for start, full in [(obj.start, obj.full), *obj.extra]:
                reg = _region(start, s, shape)
                if reg is not None and full is not None:
                    dst, src = reg
                    vol[dst] |= full[src] > 0
        return vol

    def _to_original(self, vol: torch.Tensor, inf: InferenceImage) -> np.ndarray:
        """Nearest resampling of a resampled-grid mask onto the file's grid -> uint8 (file X, Y, Z)."""
        if not bool(vol.any()):
            return np.zeros(inf.original_shape, dtype=np.uint8)
        src = MetaTensor(vol[None].float(), affine=torch.as_tensor(inf.resampled_affine, dtype=torch.float64))
        out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
            src, dst_affine=torch.as_tensor(inf.original_affine, dtype=torch.float64), spatial_size=inf.original_shape
        )
        return (torch.as_tensor(out)[0] > 0.5).cpu().numpy().astype(np.uint8)
