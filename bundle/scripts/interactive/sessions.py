"""Click sessions of the interactive engine: the clicks as sent, one snapshot per round, undo by click-list prefix.

A client re-sends ALL of its clicks on every call (3D Slicer's MONAI Label plugin does). The session keeps the
lists it got last time and a snapshot after every round (its click counts ``n_fg``, ``n_bg`` and the objects'
logits). On each call the latest snapshot whose clicks are a prefix of the sent lists is the base; the sent clicks
after it form ONE new round. Hence new clicks give one round on top of the last state, fewer clicks that end on a
round boundary (undo) restore that state exactly without a network call, and edited or moved clicks restore the
last common round boundary (possibly the empty state) and feed the rest as one round.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .windows import inside

__all__ = [
    "ClickError",
    "Click",
    "ObjectState",
    "Session",
    "SessionStore",
    "Snapshot",
    "assign_click",
    "parse_click_list",
]


class ClickError(ValueError):
    """Malformed, non-finite or out-of-range clicks, no clicks, or an image the engine cannot use as given."""


@dataclass(frozen=True)
class Click:
    """One click: ``point`` (3,) float voxel coordinates in the resampled RAS grid, ``label`` 1 fg / 0 bg."""

    point: tuple[float, float, float]
    label: int


@dataclass
class ObjectState:
    """One target object (lesion) and its windows. Tensors are never modified in place, so snapshots share them."""

    start: tuple[int, int, int]  # main crop start (resampled grid, may be negative)
    clicks: list[Click] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (1, 1, *low_res) main-window logits after the last round (mask prompt)
    full: torch.Tensor | None = None  # (S, S, S) float16 CPU main-window crop-resolution logits (upsampled, refined)
    extra: list[tuple[tuple[int, int, int], torch.Tensor]] = field(default_factory=list)  # (start, (S, S, S) logits)

    def copy(self) -> "ObjectState":
        return replace(self, clicks=list(self.clicks), extra=list(self.extra))


@dataclass
class Snapshot:
    """State after one round: click counts and objects (copied), plus the packed output mask."""

    n_fg: int
    n_bg: int
    objects: list[ObjectState]
    packed: tuple | None = None  # see pack_mask; only the latest snapshot keeps it (undo re-merges)


@dataclass
class Session:
    """One client's clicks on one image (file voxel clicks as sent), its snapshots and the weights it runs on."""

    image_id: str
    fg: list[tuple[float, float, float]] = field(default_factory=list)
    bg: list[tuple[float, float, float]] = field(default_factory=list)
    history: list[Snapshot] = field(default_factory=list)
    version: str = ""  # model version the session started with
    last_used: float = field(default_factory=time.monotonic)

    def nbytes(self, seen: set[int]) -> int:
        """Bytes of the logits and packed masks its snapshots hold (each tensor once; ``seen``: ids counted)."""
        total = 0
        for snapshot in self.history:
            arrays = [t for o in snapshot.objects for t in (o.logits, o.full, *(f for _, f in o.extra))]
            if snapshot.packed is not None and snapshot.packed[2] is not None:
                arrays.append(snapshot.packed[2])
            for a in arrays:
                if a is not None and id(a) not in seen:
                    seen.add(id(a))
                    total += a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()
        return total

    def base(self, fg: list, bg: list) -> tuple[int, Snapshot, dict[str, int]]:
        """(history index or -1, snapshot the new round starts from, click counts for the call's info)."""
        cf, cb = _common_prefix(self.fg, fg), _common_prefix(self.bg, bg)
        index = max((i for i, s in enumerate(self.history) if s.n_fg <= cf and s.n_bg <= cb), default=-1)
        snapshot = self.history[index] if index >= 0 else Snapshot(0, 0, [])
        counts = {
            "new_clicks": (len(fg) - cf) + (len(bg) - cb),
            "undone_clicks": (len(self.fg) - cf) + (len(self.bg) - cb),
            "replayed_clicks": (cf - snapshot.n_fg) + (cb - snapshot.n_bg),
        }
        return index, snapshot, counts

    def commit(self, base_index: int, new: Snapshot | None, fg: list, bg: list) -> None:
        """Drop the snapshots after ``base_index`` (undone or replaced), append the ``new`` round's (None: an exact
        undo or the same clicks again) and remember the lists."""
        del self.history[base_index + 1 :]
        if new is not None:
            self.history.append(new)
        self.fg, self.bg = list(fg), list(bg)
        for old in self.history[:-1]:
            old.packed = None  # only the latest mask is kept packed; undo re-merges from the logits


class SessionStore:
    """Sessions by key: the least recently used dropped beyond ``max_sessions``, sessions unused for ``idle_s``
    seconds dropped at the next call. Safe to use from several threads."""

    def __init__(self, max_sessions: int, idle_s: float | None = None) -> None:
        self.max_sessions = int(max_sessions)
        self.idle_s = idle_s
        self._sessions: OrderedDict[Hashable, Session] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, key: Hashable, image_id: str, reset: bool = False, version: str = "", usable=None) -> Session:
        """The session of ``key``, marked most recent: a fresh one on ``version`` after ``reset``, for another image,
        or when ``usable(its version)`` is False (the weights it ran on are gone)."""
        now = time.monotonic()
        with self._lock:
            if self.idle_s is not None:
                for idle in [k for k, v in self._sessions.items() if now - v.last_used > self.idle_s]:
                    del self._sessions[idle]
            if reset:
                self._sessions.pop(key, None)
            session = self._sessions.get(key)
            if session is None or session.image_id != image_id or (usable is not None and not usable(session.version)):
                session = Session(image_id, version=version)
            session.last_used = now
            self._sessions[key] = session
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return session

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._sessions.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()

    def versions(self) -> set[str]:
        with self._lock:
            return {s.version for s in self._sessions.values()}

    def nbytes(self) -> int:
        seen: set[int] = set()
        with self._lock:
            return sum(s.nbytes(seen) for s in list(self._sessions.values()))

    def evict_oldest(self, keep: Hashable) -> bool:
        """Drop the least recently used session other than ``keep``; False when there is none."""
        with self._lock:
            for key in self._sessions:
                if key != keep:
                    del self._sessions[key]
                    return True
            return False

    def __len__(self) -> int:
        return len(self._sessions)


def pack_mask(mask: np.ndarray, shape: Sequence[int] | None = None, offset: Sequence[int] | None = None) -> tuple:
    """Bounding-box crop of a binary mask (exact, small): (shape, lo, cropped). ``mask`` may be a part of a larger
    mask of ``shape`` that starts at voxel ``offset`` there."""
    shape = tuple(int(n) for n in (mask.shape if shape is None else shape))
    nz = np.nonzero(mask)
    if not nz[0].size:
        return shape, None, None
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    cropped = mask[tuple(slice(a, b) for a, b in zip(lo, hi))].copy()
    return shape, [a + int(o) for a, o in zip(lo, offset or (0, 0, 0))], cropped


def unpack_mask(packed: tuple) -> np.ndarray:
    shape, lo, sub = packed
    out = np.zeros(shape, dtype=np.uint8)
    if lo is not None:
        out[tuple(slice(a, a + n) for a, n in zip(lo, sub.shape))] = sub
    return out


def parse_click_list(points: Any, name: str) -> list[tuple[float, float, float]]:
    """Validate one click list ``[[i, j, k], ...]`` -> list of float triples; ClickError names the bad click.

    Only syntax and finiteness are checked here; the range check needs the image shape (:func:`check_bounds`).
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


def check_bounds(points: list, name: str, shape: Sequence[int]) -> None:
    """ClickError naming the first click outside an image of ``shape`` (voxel indices of the file array)."""
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


def assign_click(
    objects: list[ObjectState], click: Click, crop_size: int, spacing: float, new_object_mm: float
) -> int | None:
    """Index of the object ``click`` belongs to, or None when it starts a new object.

    A foreground click starts one when it lies outside every object's crop, or when it is farther than
    ``new_object_mm`` from every click of every object and outside the central half of every crop. Otherwise the
    click goes to the nearest object (distance to its clicks), preferring objects whose crop holds it."""
    if not objects:
        return None
    p = np.asarray(click.point)
    dist = [min(np.linalg.norm(p - np.asarray(c.point)) * spacing for c in o.clicks) for o in objects]
    containing = [i for i, o in enumerate(objects) if inside(click.point, o.start, crop_size)]
    if click.label == 1:
        if not containing:
            return None
        central = any(inside(click.point, o.start, crop_size, margin=crop_size / 4.0) for o in objects)
        if min(dist) > new_object_mm and not central:
            return None
    candidates = containing or list(range(len(objects)))
    return min(candidates, key=lambda i: (dist[i], i))
