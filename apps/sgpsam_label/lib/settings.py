"""The app's ``--conf`` options, parsed once and shared by every task (server and task subprocesses alike)."""

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
DEFAULT_CHECKPOINT = os.path.join(BUNDLE_ROOT, "models", "model.pt")
PRESETS = ("tiny", "small", "sam_med3d")
RANDOM_INIT = ("", "none", "random")

# --conf key -> one-line help (also listed in docs/monailabel.md)
CONF_HELP = {
    "checkpoint": "start weights: SAM-Med3D .pth (e.g. sam_med3d_turbo.pth) or an SGP-SAM model.pt; 'random' = none",
    "model_dir": "where training writes model.pt / train_stats.json (default <app>/model/sgpsam_<preset>[_plain])",
    "preset": "network size: tiny | small | sam_med3d (default sam_med3d)",
    "sgpm": "true/false: Self-Gated Prompting Module on top of SAM-Med3D (default true)",
    "click_map": "true/false: dense click-map prompt (docs/method.md; default false; true for cpu_tiny-trained models)",
    "refiner": "true/false: high-resolution mask refiner (docs/method.md; default false; true for cpu_tiny models)",
    "multi_click": "true/false: decoder gets every click so far (SAM-Med3D --multi_click; true for cpu_tiny models)",
    "click_consistent": "true/false: masks agree with the clicks, clicked lesion only (docs/method.md; default true)",
    "device": "cpu | cuda | cuda:N (default cuda when available)",
    "cache_mb": "ONE memory budget in MiB for volumes, embeddings and click histories (default 2048)",
    "max_sessions": "click sessions kept, least recently used dropped first (default 64)",
    "session_idle_s": "a session idle this long is dropped; it keeps its start weights until then (default 900)",
    "max_windows": "crop windows per lesion: main crop + large-lesion extensions (default 4)",
    "max_objects": "lesions (crops) per click session (default 8)",
    "max_clicks": "clicks per foreground/background list of one request (default 200)",
    "sample_lease_s": "Next Sample: an image one client fetched is not given to another for this long (default 600)",
    "image_channel": "input channel of multi-channel images (default: images must have one channel)",
    "ct_clamp": "true/false: clamp intensities to [-1000, 1000] (CT; default false)",
    "spacing": "isotropic resampling in mm (default 1.5, what SAM-Med3D was trained with)",
    "new_object_distance_mm": "a foreground click this far from a lesion starts another (default 0.4*S*spacing)",
    "max_epochs": "default epochs of the train task (default 10)",
    "train_num_workers": "DataLoader workers in training (default 0 on CPU, 2 on GPU)",
    "uncertainty_candidates": "candidate clicks per image for the uncertainty score (default 4)",
    "uncertainty_flips": "flip axes for the TTA members, e.g. '0,1,2' (default)",
}


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
    preset: str
    sgpm: bool
    click_map: bool
    refiner: bool
    click_consistent: bool
    multi_click: bool
    checkpoint: str | None  # None = random initialisation
    checkpoint_is_default: bool  # picked automatically (bundle/models/model.pt), not named by the user
    model_dir: str
    device: str
    cache_mb: int
    max_sessions: int
    session_idle_s: float
    max_windows: int
    max_objects: int
    max_clicks: int
    sample_lease_s: float
    image_channel: int | None
    ct_clamp: bool
    spacing: float
    new_object_distance_mm: float | None
    max_epochs: int
    train_num_workers: int
    uncertainty_candidates: int
    uncertainty_flips: tuple[int, ...]
    normalisation: str = "upstream"  # the crop's intensity normalisation (scripts.data.crops.normalise_crop)
    bundle_root: str = BUNDLE_ROOT

    @property
    def trained_model(self) -> str:
        """The model the train task writes (``ckpt_dir/model.pt`` of the bundle's train config)."""
        return os.path.join(self.model_dir, "model.pt")

    @property
    def train_stats_path(self) -> str:
        return os.path.join(self.model_dir, "train_stats.json")

    @property
    def roi_size(self) -> int:
        from scripts.modeling.build import PRESETS as NET_PRESETS

        return int(NET_PRESETS[self.preset]["img_size"])

    def describe(self, public: bool = False) -> dict[str, Any]:
        """The settings; ``public=True`` (shown in ``/info``) names files without their server folders."""
        checkpoint = self.checkpoint or "random-init"
        out = {
            "preset": self.preset,
            "sgpm": self.sgpm,
            "click_map": self.click_map,
            "refiner": self.refiner,
            "click_consistent": self.click_consistent,
            "multi_click": self.multi_click,
            "checkpoint": os.path.basename(checkpoint) if public else checkpoint,
            "device": self.device,
            "cache_mb": self.cache_mb,
            "max_sessions": self.max_sessions,
            "session_idle_s": self.session_idle_s,
            "max_windows": self.max_windows,
            "max_objects": self.max_objects,
            "max_clicks": self.max_clicks,
            "sample_lease_s": self.sample_lease_s,
            "image_channel": self.image_channel,
            "ct_clamp": self.ct_clamp,
            "spacing": self.spacing,
            "normalisation": self.normalisation,
        }
        if not public:
            out["model_dir"] = self.model_dir
        return out

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | None, app_dir: str = APP_DIR) -> "AppSettings":
        """Parse ``--conf`` pairs; raises ValueError with a one-line reason for a bad value."""
        conf = dict(conf or {})
        preset = str(conf.get("preset", "sam_med3d")).strip()
        if preset not in PRESETS:
            raise ValueError(f"--conf preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        sgpm = _bool(conf.get("sgpm", "true"), "sgpm")

        raw = conf.get("checkpoint")
        is_default = raw is None
        if raw is None:
            checkpoint = DEFAULT_CHECKPOINT if os.path.isfile(DEFAULT_CHECKPOINT) else None
        elif str(raw).strip().lower() in RANDOM_INIT:
            checkpoint = None
        else:
            checkpoint = os.path.realpath(os.path.expanduser(str(raw)))
            if not os.path.isfile(checkpoint):
                raise ValueError(f"--conf checkpoint {raw!r}: file not found")

        model_dir = conf.get("model_dir") or os.path.join(
            app_dir, "model", f"sgpsam_{preset}{'' if sgpm else '_plain'}"
        )
        model_dir = os.path.realpath(os.path.expanduser(str(model_dir)))

        device = str(conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")).strip()
        if device.startswith("cuda") and not torch.cuda.is_available():
            logger.warning("--conf device %s requested but CUDA is not available; using cpu", device)
            device = "cpu"

        channel = conf.get("image_channel")
        channel = None if channel in (None, "", "none", "None") else _number(channel, "image_channel", int)
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
            preset=preset,
            sgpm=sgpm,
            click_map=_bool(conf.get("click_map", "false"), "click_map"),
            refiner=_bool(conf.get("refiner", "false"), "refiner"),
            click_consistent=_bool(conf.get("click_consistent", "true"), "click_consistent"),
            multi_click=_bool(conf.get("multi_click", "false"), "multi_click"),
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
            image_channel=channel,
            ct_clamp=_bool(conf.get("ct_clamp", "false"), "ct_clamp"),
            spacing=_number(conf.get("spacing", 1.5), "spacing", float, 0.01),
            new_object_distance_mm=distance,
            max_epochs=_number(conf.get("max_epochs", 10), "max_epochs", int, 1),
            train_num_workers=workers,
            uncertainty_candidates=_number(conf.get("uncertainty_candidates", 4), "uncertainty_candidates", int, 1),
            uncertainty_flips=flip_axes,
        )
