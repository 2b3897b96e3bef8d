"""The model file: the weights plus the network and the preprocessing they were trained with.

One file is the single source of truth for what must match between training and use. Inference, evaluation, export
and the MONAI Label app build the network and its preprocessing from it (:func:`load_model_file`), so no option
has to be repeated, or can disagree, at inference.

Format (``torch.save``; read back with ``torch.load(weights_only=True)``: tensors and plain dicts, lists, tuples,
strings, numbers, booleans and None only, so reading a file never runs pickled code)::

    {"model": {state dict},
     "sgpsam_model": {"format_version": 1,
                      "network": {"preset": "tiny" (informative; None if the sizes match no preset),
                                  "sizes": {img_size, patch_size, embed_dim, ...},  # scripts.modeling.PRESETS keys
                                  "sgpm": {"gate_mode", "gate_threshold", "fuse_depths"} or None,
                                  "clicks": {"click_map", "refiner", "refiner_context", "refiner_geodesic",
                                             "click_consistent", "multi_click"},
                                  "in_chans": 1,
                                  "extensions": [{"_target_": "scripts.baselines.ma_sam.MASAMConfig", ...}]},
                      "preprocessing": {"spacing": 1.5, "roi_size": 64, "image_channel": None,
                                        "ct_clamp": False, "normalisation": "upstream"}}}

``network`` holds the arguments of :func:`scripts.modeling.build_network` (a :class:`NetworkConfig` as a plain
dict). The bundle writes this format: ``model.pt`` (best validation) and ``checkpoint_epoch=N.pt``, whose
``"sgpsam_model"`` entry is a :class:`ModelDescription` in the CheckpointSaver's ``save_dict``.

A SAM-Med3D release file (e.g. ``sam_med3d_turbo.pth``: no description, exactly SAM-Med3D's state-dict keys and
shapes) is recognised and gets the ``sam_med3d`` preset without SGPM and :data:`UPSTREAM_PREPROCESSING`. Any
other file without a description is refused with a :class:`ModelFileError`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from . import BUNDLE_ROOT
from .checkpoint import CheckpointError, describe_mismatch, extract_state_dict, read_checkpoint
from .data.crops import NORMALISATIONS
from .modeling.build import PRESETS, ClickConfig, NetworkConfig, SGPMConfig, build_network

__all__ = [
    "DESCRIPTION_KEY",
    "ModelDescription",
    "ModelFile",
    "ModelFileError",
    "Preprocessing",
    "UPSTREAM_PREPROCESSING",
    "build_from_description",
    "build_from_file",
    "default_model_path",
    "describe_network",
    "is_sam_med3d_release",
    "load_model_file",
    "network_summary",
    "read_description",
    "read_model_file",
    "same_model",
    "save_model_file",
]

DEFAULT_MODEL_NAME = "sgp_sam_default.pt"
WEIGHTS_KEY = "model"
DESCRIPTION_KEY = "sgpsam_model"
FORMAT_VERSION = 1


class ModelFileError(CheckpointError):
    """A file that is not a usable model file (no description and not a SAM-Med3D release, or a bad description)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a model's input is made from an image file (``scripts.data.transforms``): resampling ``spacing`` (mm,
    isotropic), crop side ``roi_size`` (the network's ``img_size``), the input channel of multi-channel images
    (None: one-channel images only), the CT clamp to [-1000, 1000] and the crop's intensity ``normalisation``
    ("upstream" or "robust", ``scripts.data.crops.normalise_crop``)."""

    spacing: float = 1.5
    roi_size: int = 128
    image_channel: int | None = None
    ct_clamp: bool = False
    normalisation: str = "upstream"

    def __post_init__(self) -> None:
        try:
            spacing, roi_size = float(self.spacing), int(self.roi_size)
            channel = None if self.image_channel is None else int(self.image_channel)
        except (TypeError, ValueError) as err:
            raise ModelFileError(f"bad preprocessing {self}: {err}") from None
        if not spacing > 0 or roi_size <= 0 or not isinstance(self.ct_clamp, (bool, np.bool_)):
            raise ModelFileError(f"bad preprocessing {self}: spacing > 0, roi_size > 0 and ct_clamp true/false")
        if self.normalisation not in NORMALISATIONS:
            raise ModelFileError(f"bad preprocessing: normalisation must be one of {NORMALISATIONS}")
        for name, value in (("spacing", spacing), ("roi_size", roi_size), ("image_channel", channel)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "ct_clamp", bool(self.ct_clamp))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Preprocessing":
        """From a plain dict (a config's ``preprocessing``, a model file's entry); unknown keys are an error."""
        if isinstance(values, Preprocessing):
            return values
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ModelFileError(f"unknown preprocessing keys {unknown}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def image_kwargs(self) -> dict[str, Any]:
        """The volume-level part (``get_preprocess_transforms``, ``InteractiveSegmenter``): spacing, channel, clamp."""
        return {"spacing": self.spacing, "image_channel": self.image_channel, "ct_clamp": self.ct_clamp}


# SAM-Med3D's own: 1.5 mm, 128^3 crops, z-normalisation over voxels > 0. Upstream clamps its CT training sets to
# [-1000, 1000] and leaves MR as is; one file serves both modalities here and a clamp would cut MR intensities
# above 1000, so the clamp is off.
UPSTREAM_PREPROCESSING = Preprocessing(spacing=1.5, roi_size=128, image_channel=None, ct_clamp=False)


def _plain(value: Any) -> Any:
    """Plain containers and scalars only (what ``torch.load(weights_only=True)`` reads back without an allow-list)."""
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ModelFileError(f"cannot record {type(value).__name__} {value!r} in a model file (plain values only)")


def _extension_entry(extension: Any) -> dict[str, Any]:
    cls = type(extension)
    if not dataclasses.is_dataclass(extension) or not cls.__module__.startswith("scripts."):
        raise ModelFileError(
            f"extension {extension!r} cannot be recorded in a model file: use a dataclass config from "
            "scripts.baselines (e.g. MASAMConfig, TAGSConfig)"
        )
    fields = {f.name: getattr(extension, f.name) for f in dataclasses.fields(extension)}
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **_plain(fields)}


def _extension_from_entry(entry: Mapping[str, Any]) -> Any:
    target = str(entry.get("_target_", ""))
    module, _, name = target.rpartition(".")
    if not module.startswith("scripts."):
        raise ModelFileError(f"model file names extension {target!r}: only scripts.* configs are built")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise ModelFileError(f"model file names extension {target!r}, which is not a dataclass config")
    return cls(**{k: v for k, v in entry.items() if k != "_target_"})


def _preset_name(sizes: Mapping[str, Any]) -> str | None:
    """The preset whose sizes these are (any crop size), for people reading the file; None if none matches."""
    plain = _plain({k: v for k, v in sizes.items() if k != "img_size"})
    for name, preset in PRESETS.items():
        if plain == _plain({k: v for k, v in preset.items() if k != "img_size"}):
            return name
    return None


def describe_network(network: nn.Module) -> dict[str, Any]:
    """The builder arguments of a network made by ``scripts.modeling.build_network`` / ``build_sgp_sam``."""
    module = getattr(network, "module", network)  # DataParallel / DDP
    config: NetworkConfig | None = getattr(module, "network_config", None)
    if config is None:
        raise ModelFileError("the network was not built by scripts.modeling.build_network: nothing to record")
    return {
        "preset": _preset_name(config.sizes),
        "sizes": _plain(config.sizes),
        "sgpm": None if config.sgpm is None else _plain(dataclasses.asdict(config.sgpm)),
        "clicks": _plain(dataclasses.asdict(config.clicks)),
        "in_chans": int(config.in_chans),
        "extensions": [_extension_entry(e) for e in getattr(module, "extension_configs", ())],
    }


def build_from_description(network: Mapping[str, Any]) -> nn.Module:
    """The network a model file's ``"network"`` entry describes (random weights)."""
    try:
        sizes = dict(network["sizes"])
        missing = sorted(set(PRESETS["sam_med3d"]) - set(sizes))
        if missing:
            raise ModelFileError(f"network sizes lack {missing}")
        sgpm = network.get("sgpm")
        if sgpm is not None:
            sgpm = SGPMConfig(**sgpm)
        config = NetworkConfig(sizes, sgpm, ClickConfig(**network.get("clicks", {})), int(network.get("in_chans", 1)))
        extensions = [_extension_from_entry(e) for e in network.get("extensions", [])]
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"bad network description: {err}") from None
    return build_network(config, extensions)


def _description(network: nn.Module, preprocessing: Preprocessing | Mapping[str, Any]) -> dict[str, Any]:
    preprocessing = Preprocessing.from_dict(preprocessing)
    described = describe_network(network)
    if described["sizes"]["img_size"] != preprocessing.roi_size:
        raise ModelFileError(
            f"preprocessing roi_size {preprocessing.roi_size} differs from the network's crop size "
            f"{described['sizes']['img_size']}"
        )
    return {"format_version": FORMAT_VERSION, "network": described, "preprocessing": preprocessing.as_dict()}


class ModelDescription:
    """The ``"sgpsam_model"`` entry of a model file, as an object with ``state_dict`` so MONAI's ``CheckpointSaver``
    can write it beside the weights (``save_dict``). Built (and checked) when the config is parsed, so a network
    that cannot be recorded fails before training, not at the first save."""

    def __init__(self, network: nn.Module, preprocessing: Preprocessing | Mapping[str, Any]) -> None:
        self.description = _description(network, preprocessing)

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.description)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.description = copy.deepcopy(dict(state))


def save_model_file(
    network: nn.Module, preprocessing: Preprocessing | Mapping[str, Any], path: str | os.PathLike, half: bool = False
) -> str:
    """Write ``network``'s weights with its description atomically; ``half`` stores floats as float16 (the shipped
    files: half the size, loaded back into float32)."""
    description = _description(network, preprocessing)
    state = getattr(network, "module", network).state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({WEIGHTS_KEY: state, DESCRIPTION_KEY: description}, tmp)
    os.replace(tmp, path)
    return path


@functools.lru_cache(maxsize=1)
def _sam_med3d_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        network = build_network(NetworkConfig.from_preset("sam_med3d", sgpm=False))
    return {k: tuple(v.shape) for k, v in network.state_dict().items()}


def is_sam_med3d_release(state: Mapping[str, torch.Tensor]) -> bool:
    """True for exactly SAM-Med3D's state-dict keys and shapes (released ``vit_b_ori`` / turbo weights)."""
    shapes = _sam_med3d_shapes()
    return set(state) == set(shapes) and all(tuple(v.shape) == shapes[k] for k, v in state.items())


_NEITHER = (
    "{path} is neither an SGP-SAM model file (it has no '{key}' entry with the network and preprocessing; train "
    "with the bundle, or describe it with tools/describe_model_file.py) nor a SAM-Med3D release file (its keys or "
    "shapes differ from SAM-Med3D's)"
)


@dataclass
class ModelFile:
    """A loaded model file: the network (eval mode, weights loaded), its preprocessing, the description and
    ``kind`` ("sgp-sam": described file, "sam_med3d": SAM-Med3D release file)."""

    network: nn.Module
    preprocessing: Preprocessing
    description: dict[str, Any]
    kind: str
    path: str


def _load_exactly(network: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    problems = describe_mismatch(network, state, list(network.state_dict()))
    if problems:
        raise ModelFileError(f"{path}: the weights do not fit the network it describes: " + "; ".join(problems))
    network.load_state_dict(state, strict=True)


def read_model_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelFile:
    """Read a model file (module docstring) and build its network; ModelFileError / CheckpointError say why not."""
    path = os.fspath(path)
    content = read_checkpoint(path)
    description = content.get(DESCRIPTION_KEY) if isinstance(content, Mapping) else None
    state = extract_state_dict(content)
    if description is not None:
        if not isinstance(description, Mapping) or description.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{path}: unknown model file format (format_version {FORMAT_VERSION} expected)")
        network = build_from_description(description["network"])
        preprocessing = Preprocessing.from_dict(description["preprocessing"])
        kind = "sgp-sam"
    elif is_sam_med3d_release(state):
        network = build_network(NetworkConfig.from_preset("sam_med3d", sgpm=False))
        preprocessing, kind = UPSTREAM_PREPROCESSING, "sam_med3d"
    else:
        raise ModelFileError(_NEITHER.format(path=path, key=DESCRIPTION_KEY))
    _load_exactly(network, state, path)
    description = _description(network, preprocessing)
    return ModelFile(network.to(device).eval(), preprocessing, description, kind, path)


def default_model_path(bundle_root: str | os.PathLike | None = None) -> str:
    """The shipped default model: ``models/pretrained/sgp_sam_default.pt`` of the bundle."""
    return os.path.join(os.fspath(bundle_root or BUNDLE_ROOT), "models", "pretrained", DEFAULT_MODEL_NAME)


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """The description of a model file (a SAM-Med3D release file: the one it is given) without building the network
    or reading the weights (memory-mapped); ModelFileError for a file that is neither."""
    path = os.fspath(path)
    content = read_checkpoint(path, mmap=True)
    stored = content.get(DESCRIPTION_KEY) if isinstance(content, Mapping) else None
    if stored is not None:
        if not isinstance(stored, Mapping) or stored.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{path}: unknown model file format (format_version {FORMAT_VERSION} expected)")
        Preprocessing.from_dict(stored["preprocessing"])  # checked here, not at the first click
        return _plain(stored)
    if is_sam_med3d_release(extract_state_dict(content)):
        with torch.device("meta"):
            network = build_network(NetworkConfig.from_preset("sam_med3d", sgpm=False))
        return _description(network, UPSTREAM_PREPROCESSING)
    raise ModelFileError(_NEITHER.format(path=path, key=DESCRIPTION_KEY))


def build_from_file(path: str | os.PathLike) -> nn.Module:
    """The network a model file describes, randomly initialised (a training config's ``network_def`` when it
    fine-tunes that file: ``pretrained_ckpt`` then loads the weights)."""
    return build_from_description(read_description(path)["network"])


def _click_switches(network: Mapping[str, Any]) -> dict[str, Any]:
    """A description's click switches in full: a file written before a switch existed has that switch's default."""
    return dataclasses.asdict(ClickConfig(**network.get("clicks", {})))


def same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two descriptions give the same network and preprocessing (the informative preset name aside)."""

    def essential(d: Mapping[str, Any]) -> tuple:
        network = {k: v for k, v in d["network"].items() if k != "preset"}
        network["clicks"] = _click_switches(network)
        return _plain(network), _plain(d["preprocessing"])

    return essential(a) == essential(b)


def load_model_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Preprocessing]:
    """(network in eval mode with the file's weights, the preprocessing it was trained with)."""
    model = read_model_file(path, device)
    return model.network, model.preprocessing


def network_summary(description: Mapping[str, Any]) -> dict[str, Any]:
    """Short, JSON-ready view of a description (what ``/info`` and logs show)."""
    network = description["network"]
    clicks = _click_switches(network)
    return {
        "preset": network.get("preset"),
        "img_size": network["sizes"]["img_size"],
        "sgpm": network.get("sgpm") is not None,
        **{k: clicks.get(k) for k in ("click_map", "refiner", "click_consistent", "multi_click")},
        "refiner_context": clicks["refiner_context"] if clicks["refiner"] else None,
        "refiner_geodesic": clicks["refiner_geodesic"] if clicks["refiner"] else None,
        "extensions": [e["_target_"].rsplit(".", 1)[-1] for e in network.get("extensions", [])],
        "preprocessing": dict(description["preprocessing"]),
    }
