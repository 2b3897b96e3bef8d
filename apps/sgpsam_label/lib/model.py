"""Build the bundle's network for the app's settings and (re)load its weights when the model file changes."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from datetime import datetime

import torch
from monailabel.utils.others.generic import file_checksum
from scripts.checkpoint import CheckpointError, load_weights
from scripts.modeling import build_sgp_sam

from .settings import AppSettings

logger = logging.getLogger(__name__)

RANDOM_VERSION = "random-init"


@dataclass(frozen=True)
class LoadedModel:
    network: torch.nn.Module
    version: str  # the weights' tag reported to clients and used as the engine's cache version
    path: str | None  # the file it was loaded from; None = random initialisation
    key: str = RANDOM_VERSION  # file name + mtime + size of ``path`` when it was read (change detection)


def file_version(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.basename(path)}@{st.st_mtime_ns}:{st.st_size}"


class NetworkLoader:
    """The current network: the trained ``model_dir/model.pt`` if present, else ``--conf checkpoint``, else random.

    ``get()`` re-stats the file on every call (cheap) and rebuilds the network when its mtime/size changed, like
    ``BasicInferTask`` does, but loads through the bundle's weights-only ``load_weights`` (SAM-Med3D checkpoints with
    their ``argparse.Namespace`` load; arbitrary pickles are refused). A trained file that does not load (a copy
    cut short, a wrong upload) is skipped until it changes: the weights already served stay, or the start
    checkpoint is used, so clicks never fail because of it.
    """

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._bad_key: str | None = None  # file_version of a trained model that failed to load
        self.loads = 0

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def _trained_usable(self) -> bool:
        trained = self.settings.trained_model
        try:
            return os.path.isfile(trained) and file_version(trained) != self._bad_key
        except OSError:
            return False

    def path(self) -> str | None:
        """The file to serve. The train task publishes ``model.pt`` with one ``os.replace``, so a missing file
        means it was deleted: serve the start checkpoint again."""
        return self.settings.trained_model if self._trained_usable() else self.settings.checkpoint

    def key(self, path: str | None = None) -> str:
        path = self.path() if path is None else path
        if path is None:
            return RANDOM_VERSION
        try:
            return file_version(path)
        except OSError:
            return self._current.key if self._current else RANDOM_VERSION

    def get(self) -> LoadedModel:
        with self._lock:
            for _ in range(2):  # a second pass when the trained file turned out unusable
                path = self.path()
                current = self._current
                if current is not None and path == current.path and (path is None or not os.path.isfile(path)):
                    return current  # random init, or a start checkpoint deleted after it was loaded
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
        """Raise ValueError unless ``path`` loads into this app's network (as a start checkpoint would)."""
        try:
            load_weights(self._build(), path)
        except Exception as err:  # any reader error: the upload is not a usable checkpoint
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"not a checkpoint of preset={self.settings.preset}: {reason}"[:300]) from None

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

    def _build(self) -> torch.nn.Module:
        # Seeded so every process (server, scoring/train subprocesses) builds the same random init.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build_sgp_sam(
                self.settings.preset,
                sgpm=self.settings.sgpm,
                click_map=self.settings.click_map,
                refiner=self.settings.refiner,
                click_consistent=self.settings.click_consistent,
                multi_click=self.settings.multi_click,
            )

    def _load(self, path: str | None, key: str) -> LoadedModel:
        network = self._build()
        if path is None:
            logger.warning(
                "!!!!! SGP-SAM: NO CHECKPOINT -- the network is RANDOMLY INITIALISED; masks are meaningless. "
                "Pass --conf checkpoint <sam_med3d_turbo.pth | model.pt> or train the model first. !!!!!"
            )
            return LoadedModel(network.to(self.settings.device).eval(), RANDOM_VERSION, None, RANDOM_VERSION)
        try:
            report = load_weights(network, path)
        except CheckpointError as err:
            if path == self.settings.checkpoint and self.settings.checkpoint_is_default:
                logger.error(
                    "!!!!! SGP-SAM: the default checkpoint %s does not fit preset=%s sgpm=%s (%s); using a RANDOM "
                    "initialisation. Pass --conf checkpoint explicitly. !!!!!",
                    path,
                    self.settings.preset,
                    self.settings.sgpm,
                    str(err).splitlines()[0],
                )
                return LoadedModel(self._build().to(self.settings.device).eval(), RANDOM_VERSION, path, key)
            raise
        logger.info(
            "SGP-SAM weights %s: %d tensors loaded, %d extension tensors at their initialisation",
            key,
            len(report["loaded"]),
            len(report["initialised"]),
        )
        return LoadedModel(network.to(self.settings.device).eval(), key, path, key)
