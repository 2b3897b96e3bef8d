"""Build the bundle's network for the app's settings and (re)load its weights when the model file changes."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch
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
    their ``argparse.Namespace`` load; arbitrary pickles are refused).
    """

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self.loads = 0

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def path(self) -> str | None:
        trained = self.settings.trained_model
        if os.path.isfile(trained):
            return trained
        if self._current is not None and self._current.path == trained:
            return trained  # the checkpoint saver replaces model.pt (remove, then write): keep the loaded one
        return self.settings.checkpoint

    def key(self) -> str:
        path = self.path()
        if path is None:
            return RANDOM_VERSION
        try:
            return file_version(path)
        except OSError:
            return self._current.key if self._current else RANDOM_VERSION

    def get(self) -> LoadedModel:
        with self._lock:
            path = self.path()
            current = self._current
            if current is not None and (path == current.path) and (path is None or not os.path.isfile(path)):
                return current  # random init, or the trained file is being replaced right now
            key = self.key()
            if current is not None and current.key == key:
                return current
            try:
                self._current = self._load(path, key)
            except CheckpointError:
                if current is not None and path == self.settings.trained_model and not os.path.isfile(path):
                    return current  # removed between stat and read (being replaced): keep serving the loaded one
                raise
            self.loads += 1
            return self._current

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
