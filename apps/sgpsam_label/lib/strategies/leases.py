"""Next Sample for a team: an image one client fetched is not handed to another client for ``sample_lease_s``.

Without this, every annotator who presses Next Sample gets the same most-uncertain image (the ``uncertainty``
strategy is deterministic, ``random`` can repeat), and the later save overwrites the earlier one. Leases live in
the server's memory only: they are short, and a restart simply frees them. A client is told apart the same way
as for click sessions (:func:`lib.request.session_owner`). The client that holds a lease may fetch its image
again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


class _WithoutLeased:
    """The datastore as a strategy sees it, minus the images leased to other clients."""

    def __init__(self, datastore: Datastore, leased: set[str]) -> None:
        self._datastore = datastore
        self._leased = leased

    def get_unlabeled_images(self, *args, **kwargs):
        return [i for i in self._datastore.get_unlabeled_images(*args, **kwargs) if i not in self._leased]

    def __getattr__(self, name):
        return getattr(self._datastore, name)


class SampleLeases:
    def __init__(self, lease_s: float, clock=time.monotonic) -> None:
        self.lease_s = float(lease_s)
        self._clock = clock
        self._leases: Dict[str, tuple[str, float]] = {}  # image id -> (owner, when fetched)
        self._lock = threading.Lock()
        self._pick_lock = threading.Lock()  # one pick at a time: two clients cannot both get the last free image

    def held_by_others(self, owner: str) -> set[str]:
        now = self._clock()
        with self._lock:
            expired = [i for i, (_, ts) in self._leases.items() if now - ts >= self.lease_s]
            for image_id in expired:
                del self._leases[image_id]
            return {i for i, (who, _) in self._leases.items() if who != owner}

    def grant(self, image_id: str, owner: str) -> None:
        with self._lock:
            self._leases[image_id] = (owner, self._clock())

    def release(self, image_id: str) -> None:
        with self._lock:
            self._leases.pop(image_id, None)

    def holder(self, image_id: str) -> Optional[str]:
        with self._lock:
            lease = self._leases.get(image_id)
            return lease[0] if lease and self._clock() - lease[1] < self.lease_s else None

    def pick(self, strategy: Strategy, request: Dict[str, Any], datastore: Datastore, owner: str) -> Dict[str, Any]:
        """Run ``strategy`` on the images nobody else holds and lease the pick to ``owner``; {} if none is left."""
        with self._pick_lock:
            leased = self.held_by_others(owner) if self.lease_s > 0 else set()
            result = strategy(request, _WithoutLeased(datastore, leased) if leased else datastore)
            if not result or not result.get("id"):
                if leased:
                    logger.info(f"next sample: every unlabeled image is leased to another client ({len(leased)})")
                return {}
            if self.lease_s > 0:
                self.grant(result["id"], owner)
            return result
