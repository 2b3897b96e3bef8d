"""The served model: the network and preprocessing its model file describes, reloaded when the file changes."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
from monailabel.utils.others.generic import file_checksum
from scripts.checkpoint import CheckpointError
from scripts.model_file import Preprocessing, network_summary, read_description, read_model_file, same_model

from .settings import AppSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    network: torch.nn.Module
    version: str  # the weights' tag reported to clients and used as the engine's cache version
    path: str  # the model file it was loaded from
    key: str  # file name + mtime + size of ``path`` when it was read (change detection)


def file_version(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.basename(path)}@{st.st_mtime_ns}:{st.st_size}"


class NetworkLoader:
    """The current network: the trained ``model_dir/model.pt`` if present, else the ``--conf checkpoint`` model file.

    The start model file decides the network and its preprocessing (:attr:`description`, :attr:`preprocessing`):
    they are read when the app starts, without the weights, so a file that is not a model file stops the app with
    the reason. A trained or uploaded model must describe the same network and preprocessing.

    ``get()`` re-stats the file on every call (cheap) and rebuilds the network when its mtime/size changed, like
    ``BasicInferTask`` does, but reads through the bundle's weights-only model-file reader (SAM-Med3D release files
    load; arbitrary pickles are refused). A trained file that does not load (a copy cut short, a wrong upload) is
    skipped until it changes: the weights already served stay, or the start model is used, so clicks never fail
    because of it.
    """

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.description = read_description(settings.checkpoint)
        self.preprocessing = Preprocessing.from_dict(self.description["preprocessing"])
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._bad_key: str | None = None  # file_version of a trained model that failed to load
        self.loads = 0

    def summary(self) -> dict[str, Any]:
        """The served network and preprocessing, as ``/info`` shows them."""
        return network_summary(self.description)

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def _trained_usable(self) -> bool:
        trained = self.settings.trained_model
        try:
            return os.path.isfile(trained) and file_version(trained) != self._bad_key
        except OSError:
            return False

    def path(self) -> str:
        """The file to serve. The train task publishes ``model.pt`` with one ``os.replace``, so a missing file
        means it was deleted: serve the start model again."""
        return self.settings.trained_model if self._trained_usable() else self.settings.checkpoint

    def key(self, path: str | None = None) -> str:
        path = self.path() if path is None else path
        try:
            return file_version(path)
        except OSError:
            return self._current.key if self._current else os.path.basename(path)

    def get(self) -> LoadedModel:
        with self._lock:
            for _ in range(2):  # a second pass when the trained file turned out unusable
                path = self.path()
                current = self._current
                if current is not None and path == current.path and not os.path.isfile(path):
                    return current  # a start model file deleted after it was loaded
                key = self.key(path)
                if current is not None and current.key == key:
                    return current
                try:
                    self._current = self._load(path, key)
                except CheckpointError as err:
                    if path != self.settings.trained_model:
                        raise
                    self._bad_key = key
                    logger.error(f"SGP-SAM: trained model {key} does not load, skipped until it changes: {err}")
                    if current is not None:
                        return current
                    continue
                self.loads += 1
                return self._current
            raise CheckpointError("no usable weights")  # unreachable: the second pass does not read the trained file

    # -- the trained model file (PUT / DELETE /model) ------------------------------------------------------------
    def check_file(self, path: str) -> None:
        """Raise ValueError unless ``path`` is a model file of this app's network and preprocessing."""
        try:
            self._read(path)
        except Exception as err:  # any reader error: the upload is not a usable model file
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"not a model file of the served model: {reason}"[:300]) from None

    def install_upload(self, fileobj) -> dict:
        """Check an uploaded model and make it the trained model, atomically; the start checkpoint is untouched."""
        trained = self.settings.trained_model
        os.makedirs(os.path.dirname(trained), exist_ok=True)
        tmp = f"{trained}.{os.getpid()}.{threading.get_ident()}.upload"
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(fileobj, out)
            self.check_file(tmp)
            os.replace(tmp, trained)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return {"checksum": file_checksum(trained), "modified_time": int(os.stat(trained).st_mtime)}

    def retire_trained(self) -> bool:
        """Rename the trained model aside (served weights fall back to the start checkpoint); False if none."""
        trained = self.settings.trained_model
        if not os.path.isfile(trained):
            return False
        os.replace(trained, f"{trained}.{datetime.now().strftime('%Y%m%d_%H%M%S')}.deleted")
        return True

    def _read(self, path: str, device: str = "cpu") -> torch.nn.Module:
        model = read_model_file(path, device)
        if not same_model(model.description, self.description):
            raise CheckpointError(
                f"{os.path.basename(path)} describes another network or preprocessing "
                f"({network_summary(model.description)}) than the served model file "
                f"{os.path.basename(self.settings.checkpoint)} ({self.summary()})"
            )
        return model.network

    def _load(self, path: str, key: str) -> LoadedModel:
        network = self._read(path, self.settings.device)
        logger.info("SGP-SAM model %s: %s", key, self.summary())
        return LoadedModel(network, key, path, key)
