"""The app's ``--conf`` options, parsed once and shared by every task (server and task subprocesses alike).

``--conf`` holds serving options only (device, memory, limits, the model file to serve). The network and its
preprocessing come from the model file (``scripts.model_file``): a model setting given with ``--conf`` (preset,
click_map, spacing, ...) is refused at start with a message that says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(os.path.dirname(APP_DIR))
BUNDLE_ROOT = os.environ.get("SGPSAM_BUNDLE_ROOT", os.path.join(REPO_ROOT, "bundle"))

# Settings the model file decides (its network and the preprocessing it was trained with): refused in --conf.
MODEL_SETTINGS = (
    "preset",
    "sgpm",
    "click_map",
    "refiner",
    "click_consistent",
    "multi_click",
    "roi_size",
    "spacing",
    "image_channel",
    "ct_clamp",
    "normalisation",
)

# --conf key -> one-line help (also listed in docs/monailabel.md)
CONF_HELP = {
    "checkpoint": "the model file to serve (default: the shipped bundle/models/pretrained model); a model.pt the "
    "bundle wrote or a SAM-Med3D release .pth",
    "model_dir": "where training writes model.pt / train_stats.json (default <app>/model/<model file name>)",
    "device": "cpu | cuda | cuda:N (default cuda when available)",
    "cache_mb": "ONE memory budget in MiB for volumes, embeddings and click histories (default 2048)",
    "max_sessions": "click sessions kept, least recently used dropped first (default 64)",
    "session_idle_s": "a session idle this long is dropped; it keeps its start weights until then (default 900)",
    "max_windows": "crop windows per lesion: main crop + large-lesion extensions (default 4)",
    "max_objects": "lesions (crops) per click session (default 8)",
    "max_clicks": "clicks per foreground/background list of one request (default 200)",
    "sample_lease_s": "Next Sample: an image one client fetched is not given to another for this long (default 600)",
    "new_object_distance_mm": "a foreground click this far from a lesion starts another (default 0.4*S*spacing)",
    "max_epochs": "default epochs of the train task (default 10)",
    "train_num_workers": "DataLoader workers in training (default 0 on CPU, 2 on GPU)",
    "uncertainty_candidates": "candidate clicks per image for the uncertainty score (default 4)",
    "uncertainty_flips": "flip axes for the TTA members, e.g. '0,1,2' (default)",
}


def default_checkpoint(bundle_root: str = BUNDLE_ROOT) -> str:
    """The shipped default model file (``scripts.model_file.default_model_path``)."""
    from scripts.model_file import default_model_path

    return default_model_path(bundle_root)


def refuse_model_settings(conf: Mapping[str, Any]) -> None:
    """ValueError naming every model setting in ``conf``: the model file decides those."""
    given = [key for key in MODEL_SETTINGS if key in conf]
    if given:
        raise ValueError(
            f"--conf {', '.join(given)}: model setting(s) that the model file decides (its network and the "
            "preprocessing it was trained with); to serve another model, pass --conf checkpoint <model file>"
        )


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on", "y", "t"):
        return True
    if text in ("0", "false", "no", "off", "n", "f"):
        return False
    raise ValueError(f"--conf {key} expects true/false, got {value!r}")


def _number(value: Any, key: str, kind=float, minimum: float | None = None):
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"--conf {key} expects a {kind.__name__}, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"--conf {key} must be >= {minimum}, got {value!r}")
    return out


@dataclass(frozen=True)
class AppSettings:
    checkpoint: str  # the model file served (and trained from)
    checkpoint_is_default: bool  # the shipped default, not named by the user
    model_dir: str
    device: str
    cache_mb: int
    max_sessions: int
    session_idle_s: float
    max_windows: int
    max_objects: int
    max_clicks: int
    sample_lease_s: float
    new_object_distance_mm: float | None
    max_epochs: int
    train_num_workers: int
    uncertainty_candidates: int
    uncertainty_flips: tuple[int, ...]
    bundle_root: str = BUNDLE_ROOT

    @property
    def trained_model(self) -> str:
        """The model the train task writes (``ckpt_dir/model.pt`` of the bundle's train config)."""
        return os.path.join(self.model_dir, "model.pt")

    @property
    def train_stats_path(self) -> str:
        return os.path.join(self.model_dir, "train_stats.json")

    def describe(self, public: bool = False) -> dict[str, Any]:
        """The settings; ``public=True`` (shown in ``/info``) names files without their server folders."""
        out = {
            "checkpoint": os.path.basename(self.checkpoint) if public else self.checkpoint,
            "device": self.device,
            "cache_mb": self.cache_mb,
            "max_sessions": self.max_sessions,
            "session_idle_s": self.session_idle_s,
            "max_windows": self.max_windows,
            "max_objects": self.max_objects,
            "max_clicks": self.max_clicks,
            "sample_lease_s": self.sample_lease_s,
        }
        if not public:
            out["model_dir"] = self.model_dir
        return out

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | None, app_dir: str = APP_DIR) -> "AppSettings":
        """Parse ``--conf`` pairs; raises ValueError with a one-line reason for a bad value or a model setting."""
        conf = dict(conf or {})
        refuse_model_settings(conf)
        raw = conf.get("checkpoint")
        is_default = raw in (None, "")
        checkpoint = default_checkpoint() if is_default else os.path.realpath(os.path.expanduser(str(raw)))
        if not os.path.isfile(checkpoint):
            raise ValueError(f"--conf checkpoint {raw or checkpoint!r}: file not found")
        stem = os.path.basename(checkpoint).split(".")[0] or "model"
        model_dir = conf.get("model_dir") or os.path.join(app_dir, "model", stem)
        model_dir = os.path.realpath(os.path.expanduser(str(model_dir)))

        device = str(conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")).strip()
        if device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("--conf device %s requested but CUDA is not available; using cpu", device)
            device = "cpu"

        distance = conf.get("new_object_distance_mm")
        distance = None if distance in (None, "", "none") else _number(distance, "new_object_distance_mm", float, 0)
        flips = str(conf.get("uncertainty_flips", "0,1,2")).replace(" ", "")
        try:
            flip_axes = tuple(sorted({int(a) for a in flips.split(",") if a}))
        except ValueError:
            raise ValueError(f"--conf uncertainty_flips expects axes like '0,1,2', got {flips!r}") from None
        if not flip_axes or any(a not in (0, 1, 2) for a in flip_axes):
            raise ValueError(f"--conf uncertainty_flips expects axes among 0,1,2, got {flips!r}")
        workers = conf.get("train_num_workers")
        workers = (
            (0 if device == "cpu" else 2) if workers in (None, "") else _number(workers, "train_num_workers", int, 0)
        )

        return cls(
            checkpoint=checkpoint,
            checkpoint_is_default=is_default,
            model_dir=model_dir,
            device=device,
            cache_mb=_number(conf.get("cache_mb", 2048), "cache_mb", int, 1),
            max_sessions=_number(conf.get("max_sessions", 64), "max_sessions", int, 1),
            session_idle_s=_number(conf.get("session_idle_s", 900), "session_idle_s", float, 1),
            max_windows=_number(conf.get("max_windows", 4), "max_windows", int, 1),
            max_objects=_number(conf.get("max_objects", 8), "max_objects", int, 1),
            max_clicks=_number(conf.get("max_clicks", 200), "max_clicks", int, 1),
            sample_lease_s=_number(conf.get("sample_lease_s", 600), "sample_lease_s", float, 0),
            new_object_distance_mm=distance,
            max_epochs=_number(conf.get("max_epochs", 10), "max_epochs", int, 1),
            train_num_workers=workers,
            uncertainty_candidates=_number(conf.get("uncertainty_candidates", 4), "uncertainty_candidates", int, 1),
            uncertainty_flips=flip_axes,
        )
