"""Export SGP-SAM's inference parts with ``torch.export``: ``encode``, ``decode`` and, if present, ``refine``.

Interactive use runs ``encode`` once per crop and ``decode`` once per click, so both are exported as separate
programs (``encode.pt2``, ``decode.pt2``):

    encode(image (1, 1, S, S, S) float32) -> embedding (1, C, S/p, S/p, S/p)
    decode(embedding, points (1, N, 3) float32, labels (1, N) int64, mask_input (1, 1, 4S/p, 4S/p, 4S/p) float32)
        -> (low-res logits (1, 1, 4S/p, 4S/p, 4S/p), iou (1, 1));  N is dynamic, 1..max_points

A model with the high-resolution refiner (``refiner=True``) also gets ``refine.pt2``, which turns a round's
low-res logits into crop-resolution logits (``network.full_res_logits``, refiner features computed inside):

    refine(image (1, 1, S, S, S), low-res logits, prev_logits (1, 1, S, S, S), points, labels) -> (1, 1, S, S, S)

where ``points``/``labels`` hold every click so far (``decode`` gets the new one only) and ``prev_logits`` is the
previous round's ``refine`` output, or a tensor filled with ``-inf`` in round one (sigmoid 0, the same as no
previous mask). Without a refiner, crop-resolution logits are the trilinear upsampling
of the low-res logits (``align_corners=False``).

Why not TorchScript (``python -m monai.bundle ckpt_export``): see bundle/docs/README.md, "Export". In short,
``torch.jit.script`` cannot compile the encoder (closure block hooks, ``**kwargs``, optional sub-modules,
unannotated tuple arguments), and ``torch.jit.trace`` records the SGPM hard-gate decision of the example image
as a constant and drops the prompt inputs.

The SGPM hard gate skips its fusion block when the decision probability is below the threshold (a data-dependent
branch that ``torch.export`` cannot capture). While exporting, :func:`traceable_gates` replaces that branch by the
equivalent masked form ``x + [p >= t] * p * g * Fuse(x)``: same output, but the fusion block always runs.

CLI (repository root, ``PYTHONPATH=bundle``)::

    python -m scripts.export --ckpt_file bundle/models/model.pt --output_dir bundle/models/exported

The network and its preprocessing come from the model file (``scripts.model_file``); the preprocessing is written
to ``export_info.json``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import types
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .model_file import load_model_file
from .modeling.sgpm import SGPMStage

__all__ = [
    "traceable_gates",
    "export_encoder_decoder",
    "load_exported",
    "load_exported_refine",
    "compare_with_eager",
    "main",
]

ENCODE_FILE = "encode.pt2"
DECODE_FILE = "decode.pt2"
REFINE_FILE = "refine.pt2"
INFO_FILE = "export_info.json"


def _masked_stage_forward(
    self: SGPMStage, x: torch.Tensor, features: dict[int, torch.Tensor], gate_mode: str, hard: bool, threshold: float
) -> torch.Tensor:
    """``SGPMStage.forward`` without data-dependent branches (no counters, no stored decision)."""
    if gate_mode == "closed":
        return x  # SGPM off: a fixed choice of the model, not a data-dependent branch
    earlier = [features[d] for d in self.fuse_depths]
    if gate_mode == "open":
        return x + self.fusion(x, earlier)
    channel_gate, prob = self.gate(x)
    scale = prob[:, None] * channel_gate
    if hard:
        scale = scale * (prob >= threshold).to(scale.dtype)[:, None]
    return x + scale[:, None, None, None, :] * self.fusion(x, earlier)


@contextlib.contextmanager
def traceable_gates(network: nn.Module) -> Iterator[nn.Module]:
    """Within the context, every ``SGPMStage`` of ``network`` uses the branch-free (masked) hard gate."""
    stages = [m for m in network.modules() if isinstance(m, SGPMStage)]
    for stage in stages:
        stage.forward = types.MethodType(_masked_stage_forward, stage)
    try:
        yield network
    finally:
        for stage in stages:
            del stage.forward


class _Encode(nn.Module):
    """``network.encode`` holding only the modules it uses, so the program carries no decoder weights."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.image_encoder = network.image_encoder
        self.sgpm = network.sgpm
        self.extensions = network.extensions
        self._encode = type(network).encode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(self, images)


class _Decode(nn.Module):
    """``network.decode`` holding only the prompt encoder, click map and mask decoder (no encoder weights)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = network.prompt_encoder
        self.mask_decoder = network.mask_decoder
        self.click_map = getattr(network, "click_map", None)
        self._decode = type(network).decode

    def forward(
        self, embeddings: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decode(self, embeddings, points, labels, mask_input)


class _Refine(nn.Module):
    """``network.full_res_logits`` holding only the refiner, its features computed from the image (stateless)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.refiner = network.refiner
        self.size = (network.img_size,) * 3
        self._full_res_logits = type(network).full_res_logits
        self._upscale_logits = type(network).upscale_logits

    def upscale_logits(self, low_res_logits: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        return self._upscale_logits(self, low_res_logits, size)

    def forward(
        self,
        image: torch.Tensor,
        low_res_logits: torch.Tensor,
        prev_logits: torch.Tensor,
        points: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        features = self.refiner.image_features(image)
        return self._full_res_logits(self, low_res_logits, self.size, features, prev_logits, points, labels)


def _example_inputs(network: nn.Module, device: torch.device) -> tuple[torch.Tensor, ...]:
    size = network.img_size
    image = torch.zeros(1, 1, size, size, size, device=device)
    points = torch.tensor([[[size / 2, size / 2, size / 2], [1.0, 1.0, 1.0]]], device=device)
    labels = torch.tensor([[1, 0]], dtype=torch.long, device=device)
    mask_input = torch.zeros(1, 1, *network.low_res_size, device=device)
    return image, points, labels, mask_input


def export_encoder_decoder(
    network: nn.Module,
    output_dir: str | os.PathLike,
    max_points: int = 64,
    preprocessing: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``encode.pt2``, ``decode.pt2`` (and ``refine.pt2`` with a refiner) and ``export_info.json``.

    The programs run on the device the network is on when exported (export on the deployment device). The
    network is put in eval mode (hard SGPM gate, as in inference). ``preprocessing`` (the model file's: spacing,
    crop, channel, CT clamp, normalisation) is written to ``export_info.json``: what a caller must do to an image
    before ``encode``.

    Returns:
        {"encode": path, "decode": path, "info": path} (+ "refine": path)
    """
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    network.eval()
    device = next(network.parameters()).device
    image, points, labels, mask_input = _example_inputs(network, device)
    num_points = torch.export.Dim("num_points", min=1, max=max_points)
    with traceable_gates(network):
        encode_program = torch.export.export(_Encode(network), (image,), strict=False)
        with torch.no_grad():
            embeddings = network.encode(image)
        decode_program = torch.export.export(
            _Decode(network),
            (embeddings, points, labels, mask_input),
            dynamic_shapes=({}, {1: num_points}, {1: num_points}, {}),
            strict=False,
        )
        refine_program = None
        if getattr(network, "refiner", None) is not None:
            full = torch.zeros(1, 1, *image.shape[2:], device=device)
            refine_program = torch.export.export(
                _Refine(network),
                (image, mask_input, full, points, labels),
                dynamic_shapes=({}, {}, {}, {1: num_points}, {1: num_points}),
                strict=False,
            )
    paths = {"encode": out / ENCODE_FILE, "decode": out / DECODE_FILE, "info": out / INFO_FILE}
    torch.export.save(encode_program, paths["encode"])
    torch.export.save(decode_program, paths["decode"])
    if refine_program is not None:
        paths["refine"] = out / REFINE_FILE
        torch.export.save(refine_program, paths["refine"])
    info = {
        "img_size": int(network.img_size),
        "embedding_shape": list(embeddings.shape),
        "low_res_shape": [1, 1, *network.low_res_size],
        "max_points": int(max_points),
        "device": str(device),
        "torch_version": torch.__version__,
        "sgpm_gate": "hard gate as masked product (fusion always computed)",
        "refine": REFINE_FILE if refine_program is not None else None,
        "preprocessing": dict(preprocessing) if preprocessing is not None else None,
    }
    paths["info"].write_text(json.dumps(info, indent=1))
    return paths


def load_exported(output_dir: str | os.PathLike) -> tuple[nn.Module, nn.Module]:
    """(encode, decode) callables from :func:`export_encoder_decoder`'s folder."""
    out = Path(output_dir)
    return torch.export.load(out / ENCODE_FILE).module(), torch.export.load(out / DECODE_FILE).module()


def load_exported_refine(output_dir: str | os.PathLike) -> nn.Module | None:
    """The ``refine`` callable of :func:`export_encoder_decoder`'s folder, None if the model had no refiner."""
    path = Path(output_dir) / REFINE_FILE
    return torch.export.load(path).module() if path.is_file() else None


@torch.no_grad()
def compare_with_eager(
    network: nn.Module, output_dir: str | os.PathLike, num_points: Sequence[int] = (1, 3), seed: int = 0
) -> dict[str, float]:
    """Max |exported - eager| of embedding, low-res logits (and refined logits) on a random crop and random clicks."""
    encode, decode = load_exported(output_dir)
    refine = load_exported_refine(output_dir)
    prev_full = None
    network.eval()
    device = next(network.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    size = network.img_size
    image = torch.randn(1, 1, size, size, size, generator=gen).to(device)
    emb_eager = network.encode(image)
    emb_export = encode(image)
    diffs = {"embedding": float((emb_export - emb_eager).abs().max())}
    prev = torch.zeros(1, 1, *network.low_res_size, device=device)
    for n in num_points:
        points = (torch.rand(1, n, 3, generator=gen) * (size - 1)).to(device)
        labels = (torch.arange(n)[None] % 2 == 0).long().to(device)  # alternate positive / negative
        logits_eager, iou_eager = network.decode(emb_eager, points, labels, prev)
        logits_export, iou_export = decode(emb_eager, points, labels, prev)
        diffs[f"logits_{n}clicks"] = float((logits_export - logits_eager).abs().max())
        diffs[f"iou_{n}clicks"] = float((iou_export - iou_eager).abs().max())
        if refine is not None:
            features = network.refine_features(image)
            full_eager = network.full_res_logits(logits_eager, None, features, prev_full, points, labels)
            prev_in = torch.full_like(full_eager, float("-inf")) if prev_full is None else prev_full
            full_export = refine(image, logits_eager, prev_in, points, labels)
            diffs[f"refined_{n}clicks"] = float((full_export - full_eager).abs().max())
            prev_full = full_eager
        prev = logits_eager
    return diffs


def _config_files(value: str) -> str | list[str]:
    value = value.strip()
    return ast.literal_eval(value) if value.startswith("[") else value


def build_network_from_config(config_file: str | Sequence[str], net_id: str = "network_def") -> nn.Module:
    """Instantiate ``net_id`` from the bundle config(s) (no training objects are built)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    return parser.get_parsed_content(net_id)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Export SGP-SAM encode/decode with torch.export")
    parser.add_argument("--ckpt_file", default=None, help="model file: its network and preprocessing are exported")
    parser.add_argument("--config_file", default=None, help="without --ckpt_file: a config's network, random weights")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--net_id", default="network_def")
    parser.add_argument("--max_points", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    if args.ckpt_file:
        network, preprocessing = load_model_file(args.ckpt_file)
        preprocessing = preprocessing.as_dict()
    elif args.config_file:
        network, preprocessing = build_network_from_config(_config_files(args.config_file), args.net_id), None
    else:
        parser.error("pass --ckpt_file (a model file) or --config_file (random weights)")
    network.to(args.device)
    paths = export_encoder_decoder(network, args.output_dir, max_points=args.max_points, preprocessing=preprocessing)
    diffs = compare_with_eager(network, args.output_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print("max |exported - eager|: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    return {"paths": paths, "diffs": diffs}


if __name__ == "__main__":
    main()
