"""What a train run shows while it runs (``train_stats.json``) and how its model reaches the annotators.

3D Slicer's MONAI Label plugin polls ``/info`` during training: its progress bar is ``epoch / total_epochs`` while
``total_time`` is absent (MONAI Label's own trainers write ``current_time`` while running and ``total_time`` at
the end), and its accuracy bar multiplies ``best_metric`` by 100, so that key is a number or absent, never null.

The bundle's savers write ``model.pt`` in place (``atomic=False`` in MONAI's ``CheckpointSaver``), and after
removing the previous file. A run killed during that write would leave a truncated or missing model where the
server loads it. So the run writes into a staging folder, and :meth:`TrainProgress.publish` copies a finished
``model.pt`` over the served one with one ``os.replace`` -- as MONAI Label's ``PublishStatsAndModel`` publishes,
but atomically. A killed run therefore never changes the served file; its stats say ``RUNNING`` with the pid of a
process that is gone, which :func:`read_stats` reports as ``INTERRUPTED``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from datetime import datetime, timedelta
from typing import Any, Dict

import psutil

logger = logging.getLogger(__name__)


def number(value: Any) -> float | None:
    try:
        out = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def read_stats(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            stats = json.load(fh)
    except (OSError, ValueError):
        return {}
    pid = stats.get("pid")
    if stats.get("status") == "RUNNING" and isinstance(pid, int) and not psutil.pid_exists(pid):
        stats["status"] = "INTERRUPTED"  # killed: nothing wrote its end; the served model was left as it was
    return stats


def _file_version(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.basename(path)}@{st.st_mtime_ns}:{st.st_size}"


class TrainProgress:
    def __init__(self, stats_path: str, staged_model: str, served_model: str, info: Dict[str, Any]) -> None:
        self.stats_path = stats_path
        self.staged_model = staged_model
        self.served_model = served_model
        self.start = time.time()
        self.served_before = _file_version(served_model)
        self._staged_seen = None
        self.stats: Dict[str, Any] = {
            "status": "RUNNING",
            "pid": os.getpid(),
            "epoch": 0,
            "start_ts": int(self.start),
            "start_time": datetime.fromtimestamp(self.start).strftime("%Y-%m-%d %H:%M:%S"),
            **info,
        }
        self.trainer = self.evaluator = None

    def _elapsed(self) -> str:
        return str(timedelta(seconds=round(time.time() - self.start)))

    def write(self) -> None:
        self.stats["current_time"] = self._elapsed()
        write_json(self.stats_path, self.stats)

    def attach(self, trainer, evaluator) -> None:
        """After the trainer's own epoch handlers (validation included): publish the model, write the stats."""
        from ignite.engine import Events

        self.trainer, self.evaluator = trainer, evaluator
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_completed(self, engine=None) -> None:
        self.publish()
        self.stats.update(self.engine_stats())
        self.write()

    def publish(self) -> bool:
        """Copy a new staged ``model.pt`` over the served one in one atomic step."""
        staged = _file_version(self.staged_model)
        if staged is None or staged == self._staged_seen:
            return False
        tmp = f"{self.served_model}.{os.getpid()}.publish"
        shutil.copyfile(self.staged_model, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.served_model)
        self._staged_seen = staged
        logger.info(f"SGP-SAM: new model published ({_file_version(self.served_model)})")
        return True

    def engine_stats(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.trainer is not None:
            state = self.trainer.state
            out.update(epoch=int(state.epoch), total_epochs=int(state.max_epochs), iterations=int(state.iteration))
            output = state.output[0] if isinstance(state.output, (list, tuple)) and state.output else state.output
            loss = number(output.get("loss")) if isinstance(output, dict) else None
            if loss is not None:
                out["train_loss"] = loss  # last iteration
        if self.evaluator is not None and getattr(self.evaluator.state, "metrics", None):
            state = self.evaluator.state
            metrics = {k: number(v) for k, v in state.metrics.items()}
            out["metrics"] = {k: v for k, v in metrics.items() if v is not None}
            best = number(getattr(state, "best_metric", None))
            if best is not None and best > -1:  # ignite starts best_metric at -1 before any validation
                out.update(best_metric=best, best_metric_epoch=int(state.best_metric_epoch))
            out["key_metric"] = getattr(state, "key_metric_name", None) or next(iter(metrics), None)
        return out

    def finish(self, error: BaseException | None = None) -> Dict[str, Any]:
        self.publish()
        self.stats.update(self.engine_stats())
        if error is None:
            self.stats["status"] = "DONE"
        else:
            self.stats.update(status="ERROR", error=(str(error).splitlines() or [type(error).__name__])[0][:500])
        self.stats.pop("current_time", None)
        self.stats["total_time"] = self._elapsed()
        self.stats["total_time_s"] = round(time.time() - self.start, 2)
        after = _file_version(self.served_model)
        self.stats.update(model_version=after, model_updated=after is not None and after != self.served_before)
        write_json(self.stats_path, self.stats)
        return self.stats
