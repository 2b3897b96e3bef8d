"""Batch inference for a click model: every image is skipped with a reason; nothing is written.

MONAI Label runs batch inference (``POST /batch/infer/<model>``, on by default) by calling the infer task once per
image with no clicks. A point-prompt model has nothing to segment then, so instead of one error per image the
task answers, per image, why it was skipped.
"""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

logger = logging.getLogger(__name__)

SKIP_REASON = "skipped: this model segments from clicks, and batch inference sends none (click in 3D Slicer instead)"


class ClickModelBatchInfer(BatchInferTask):
    def __call__(self, request, datastore: Datastore, infer):
        images = sorted(self.get_images(request, datastore))
        logger.info(f"batch inference: {len(images)} images skipped (click model)")
        return {image_id: {"skipped": SKIP_REASON} for image_id in images}
