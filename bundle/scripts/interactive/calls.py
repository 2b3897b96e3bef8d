"""What lets several clients use one interactive engine at once: a lock per image, counters per call, and the
weights each call runs on.

* :class:`ImageLocks`: calls on the same image run one after the other (they share its volume, embeddings and,
  usually, sessions); calls on different images run side by side.
* :class:`CallCounters`: engine-wide totals plus, per thread, what the current call did (the ``encoder_runs`` a
  response reports must not include another client's first click running meanwhile).
* :class:`Weights`: the current network and the older ones that sessions started on still use; a call runs on
  its session's weights (``use``), kept in a thread-local so that concurrent calls can run on different ones.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterable

__all__ = ["CallCounters", "ImageLocks", "Weights", "fit_budget", "release_unused"]


class ImageLocks:
    def __init__(self) -> None:
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, image_id: Hashable):
        with self._guard:  # one lock object per image for the engine's life (a few hundred bytes each)
            lock = self._locks.setdefault(image_id, threading.Lock())
        with lock:
            yield


class CallCounters:
    def __init__(self, keys: Iterable[str]) -> None:
        self.totals: dict[str, int] = {k: 0 for k in keys}
        self._lock = threading.Lock()
        self._local = threading.local()

    def add(self, key: str, n: int = 1) -> None:
        if not n:
            return
        with self._lock:
            self.totals[key] = self.totals.get(key, 0) + n
        call = getattr(self._local, "call", None)
        if call is not None:
            call[key] = call.get(key, 0) + n

    def begin(self) -> None:
        self._local.call = {}

    def end(self) -> dict[str, int]:
        call, self._local.call = getattr(self._local, "call", None) or {}, None
        return call


class Weights:
    """The current network (``network``/``version``) and older ones kept while some session still runs on them."""

    def __init__(self, network, version: str) -> None:
        self.network, self.version = network, str(version)
        self._older: dict[str, object] = {}
        self._local = threading.local()
        self._lock = threading.Lock()

    def replace(self, network, version: str, keep_old: bool) -> None:
        with self._lock:
            if keep_old and str(version) != self.version:
                self._older[self.version] = self.network
            self.network, self.version = network, str(version)
            self._older.pop(self.version, None)

    def has(self, version: str) -> bool:
        return version == self.version or version in self._older

    def prune(self, used: set[str]) -> None:
        """Forget older networks no session runs on any more."""
        with self._lock:
            for version in [v for v in self._older if v not in used]:
                del self._older[version]

    def live_versions(self) -> set[str]:
        return {self.version, *self._older}

    def older_nbytes(self) -> int:
        return sum(sum(p.numel() * p.element_size() for p in net.parameters()) for net in self._older.values())

    @contextlib.contextmanager
    def use(self, version: str):
        """Run the calling thread's network work on ``version`` (current if unknown)."""
        with self._lock:
            network = self._older.get(version, self.network) if version != self.version else self.network
            version = version if network is not self.network or version == self.version else self.version
        previous = getattr(self._local, "active", None)
        self._local.active = (network, version)
        try:
            yield
        finally:
            self._local.active = previous

    @property
    def active(self) -> tuple[object, str]:
        return getattr(self._local, "active", None) or (self.network, self.version)


def release_unused(weights: Weights, sessions, cache) -> None:
    """Forget older networks, and the embeddings of any version, once no session runs on them."""
    weights.prune(sessions.versions())
    cache.drop_embeddings(keep_versions=weights.live_versions())


def fit_budget(max_bytes: int, cache, sessions, weights: Weights, keep: Hashable) -> None:
    """Keep LRU + sessions' logits + older networks within ``max_bytes``: drop the least recently used sessions
    other than ``keep`` first (freeing the weights only they used), then the oldest LRU entries."""
    held = sessions.nbytes()
    while cache.total + held + weights.older_nbytes() > max_bytes and sessions.evict_oldest(keep):
        release_unused(weights, sessions, cache)
        held = sessions.nbytes()
    cache.shrink_to(max_bytes - held - weights.older_nbytes())
