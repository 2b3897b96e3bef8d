"""Active-learning strategy: the unlabeled image with the highest SGP-SAM uncertainty score.

Unlike MONAI Label's ``Epistemic`` strategy, the choice is NOT re-sorted by when an image was last served: the
same most-uncertain image is proposed until it is labelled (or re-scored lower). Ties and unscored images are
ordered by image id, so the answer is deterministic.
"""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..scoring.uncertainty import SCORE_KEY

logger = logging.getLogger(__name__)


class HighestUncertainty(Strategy):
    def __init__(self, key: str = SCORE_KEY) -> None:
        super().__init__("Unlabeled image with the highest SGP-SAM uncertainty (flip-TTA disagreement) score")
        self.key = key

    def __call__(self, request, datastore: Datastore):
        if hasattr(datastore, "sync"):
            datastore.sync()  # scores are written by the scoring subprocess
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        scored, unscored = [], []
        for image_id in images:
            entry = datastore.get_image_info(image_id).get(self.key)
            score = entry.get("score") if isinstance(entry, dict) else None
            if isinstance(score, (int, float)):
                scored.append((-float(score), image_id, entry))
            else:
                unscored.append(image_id)
        if scored:
            neg, image_id, entry = min(scored)
            logger.info(
                f"uncertainty: selected {image_id} (score {-neg:.4f}; {len(scored)} scored, {len(unscored)} not)"
            )
            return {"id": image_id, "score": -neg, "score_model": entry.get("model"), "unscored": len(unscored)}
        image_id = sorted(unscored)[0]
        logger.info(f"uncertainty: no image scored yet; selected {image_id} (first by id)")
        return {"id": image_id, "score": None, "unscored": len(unscored)}
