"""The interactive engine's memory: one bounded LRU (counted as tensor ``nbytes``) for the preprocessed volumes and
the per-window image embeddings and refiner features, so a repeat click on the same object runs only the prompt
encoder and the mask decoder.

Keys carry the image id, the preprocessing settings, the window start and, for network outputs, the model version;
callers must give a different ``image_id`` to different image content. The LRU is shared by threads working on
different images: its lookups and inserts hold a lock, the encoder runs outside it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..data.inference_image import InferenceImage, preprocess_image_for_inference
from .sessions import ClickError

__all__ = ["ByteLRU", "EncoderCache"]


class ByteLRU:
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

    def shrink_to(self, max_bytes: int) -> int:
        """Evict the oldest entries until at most ``max_bytes`` are held; returns the number evicted."""
        evicted = 0
        while self.total > max(int(max_bytes), 0) and self._items:
            _, (_, size) = self._items.popitem(last=False)
            self.total -= size
            evicted += 1
        return evicted

    def __len__(self) -> int:
        return len(self._items)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class EncoderCache:
    """Preprocessed volumes, embeddings and refiner features in one :class:`ByteLRU`.

    Args:
        max_bytes: the LRU's cap.
        count: ``count(name, n)`` adds ``n`` to a counter: ``image_loads``, ``encoder_runs``, ``cache_hits``,
            ``cache_misses``, ``evictions``.
        preprocessing: ``(spacing, image_channel, ct_clamp)``, part of every key.
    """

    def __init__(self, max_bytes: int, count: Callable[[str, int], None], preprocessing: tuple) -> None:
        self.lru = ByteLRU(max_bytes)
        self.count = count
        self.preprocessing = tuple(preprocessing)
        self._lock = threading.Lock()

    def _get(self, key: Hashable) -> Any | None:
        with self._lock:
            return self.lru.get(key)

    def _put(self, key: Hashable, value: Any, nbytes: int) -> None:
        with self._lock:
            evicted = self.lru.put(key, value, nbytes)
        self.count("evictions", evicted)

    def shrink_to(self, max_bytes: int) -> None:
        with self._lock:
            evicted = self.lru.shrink_to(max_bytes)
        self.count("evictions", evicted)

    @property
    def total(self) -> int:
        return self.lru.total

    def volume(self, image_id: str, image) -> InferenceImage:
        """The preprocessed image (see :func:`preprocess_image_for_inference`), loaded once per ``image_id``.

        ``image`` may also be a function returning the image, called only when the volume is not cached.
        """
        key = ("img", image_id, *self.preprocessing)
        inf = self._get(key)
        if inf is not None:
            return inf
        if callable(image):
            image = image()
        if not isinstance(image, torch.Tensor):
            path = os.fspath(image)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image not found: {path}")
        try:
            inf = preprocess_image_for_inference(image, *self.preprocessing)
        except (ValueError, RuntimeError) as err:
            # MONAI's Compose wraps a transform's ValueError (e.g. 4-D image without image_channel) in a
            # RuntimeError "applying transform ...": report the ValueError's own line to the client.
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, ValueError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise ClickError(str(cause).strip().splitlines()[0] if str(cause).strip() else repr(cause)) from None
        self.count("image_loads", 1)
        self._put(key, inf, inf.nbytes)
        return inf

    def embedding(self, image_id: str, start, version: str, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Image embedding of the window at ``start``: from the LRU, or ``encode()`` (one encoder run)."""
        key = ("emb", image_id, *self.preprocessing, tuple(start), version)
        emb = self._get(key)
        if emb is not None:
            self.count("cache_hits", 1)
            return emb
        self.count("cache_misses", 1)
        emb = encode()
        self.count("encoder_runs", 1)
        self._put(key, emb, _nbytes(emb))
        return emb

    def refiner_features(self, image_id: str, start, version: str, compute: Callable[[], torch.Tensor]):
        """The refiner's image features of the window at ``start`` (cached like embeddings, not counted)."""
        key = ("ref", image_id, *self.preprocessing, tuple(start), version)
        features = self._get(key)
        if features is None:
            features = compute()
            self._put(key, features, _nbytes(features))
        return features

    def drop_embeddings(self, keep_versions=()) -> None:
        """Forget the network outputs of every version but ``keep_versions`` (new weights); volumes stay."""
        keep = set(keep_versions)
        with self._lock:
            self.lru.drop(lambda k: k[0] in ("emb", "ref") and k[-1] not in keep)
