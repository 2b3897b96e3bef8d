"""MONAI Label ``ScoringMethod`` that writes the TTA-disagreement uncertainty of every unlabeled image."""

from __future__ import annotations

import logging
import time

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from ..model import NetworkLoader
from ..settings import AppSettings
from .uncertainty import SCORE_KEY, image_uncertainty

logger = logging.getLogger(__name__)


class TTAUncertaintyScoring(ScoringMethod):
    """Scores unlabeled images whose score is missing or was computed with other weights.

    Writes ``image info[SCORE_KEY] = {"score", "model", "ts", "per_candidate", "candidates", "members"}`` through
    the datastore API (the :class:`~lib.strategies.uncertainty.HighestUncertainty` strategy reads it).
    Request options: ``max_samples`` (0 = all), ``force`` (re-score everything).
    """

    def __init__(self, settings: AppSettings, loader: NetworkLoader, key: str = SCORE_KEY) -> None:
        super().__init__(
            "SGP-SAM uncertainty: 1 - mean pairwise Dice of one-click proposals under flip test-time augmentation"
        )
        self.settings = settings
        self.loader = loader
        self.key = key

    @staticmethod
    def check_request(params):
        """``max_samples`` (integer >= 0) and ``force`` (boolean); ValueError names a bad value, others are dropped."""
        out = {}
        samples = params.get("max_samples")
        if samples is not None:
            if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
                raise ValueError(f"max_samples must be an integer >= 0, got {samples!r}"[:200])
            out["max_samples"] = samples
        force = params.get("force")
        if force is not None:
            if not isinstance(force, bool):
                raise ValueError(f"force must be true or false, got {force!r}"[:200])
            out["force"] = force
        return out

    def __call__(self, request, datastore: Datastore):
        request = {**request, **self.check_request(request)}
        loaded = self.loader.get()
        images = datastore.get_unlabeled_images()
        force = request.get("force") is True
        todo = []
        for image_id in sorted(images):
            previous = datastore.get_image_info(image_id).get(self.key)
            if force or not isinstance(previous, dict) or previous.get("model") != loaded.version:
                todo.append(image_id)
        max_samples = int(request.get("max_samples", 0) or 0)
        todo = todo[:max_samples] if max_samples > 0 else todo

        threads = torch.get_num_threads()
        if self.settings.device == "cpu":
            torch.set_num_threads(max(1, threads // 2))  # leave CPU to the interactive requests
        t0 = time.time()
        done, failed = [], {}
        try:
            for image_id in todo:
                try:
                    result = image_uncertainty(
                        loaded.network,
                        datastore.get_image_uri(image_id),
                        normalisation=self.loader.preprocessing.normalisation,  # the model file's
                        **self.loader.preprocessing.image_kwargs(),
                        num_candidates=self.settings.uncertainty_candidates,
                        flip_axes=self.settings.uncertainty_flips,
                        device=self.settings.device,
                    )
                except Exception as err:  # one unreadable image must not stop the others
                    failed[image_id] = str(err).splitlines()[0] if str(err) else type(err).__name__
                    logger.warning(f"SGP-SAM uncertainty: {image_id} skipped: {failed[image_id]}")
                    continue
                result.update(model=loaded.version, ts=int(time.time()))
                datastore.update_image_info(image_id, {self.key: result})
                done.append(image_id)
                logger.info(f"SGP-SAM uncertainty: {image_id} => {result['score']:.4f} ({result['latency_s']} s)")
        finally:
            torch.set_num_threads(threads)
        summary = {
            "total": len(images),
            "executed": len(done),
            "skipped": len(images) - len(todo),
            "failed": failed,
            "model": loaded.version,
            "latency": round(time.time() - t0, 3),
        }
        logger.info(f"SGP-SAM uncertainty scoring: {summary}")
        return summary
