"""Does a zoomed-out view help large lesions? Dice after clicks 1..k, by lesion size, for four ways to play.

Every lesion of ``--dataset_json``'s test split (or a ``--dataset_dir`` of image/label pairs) gets the bundle's
evaluation crop and protocol (first click at the deepest point, then the deepest point of the larger error).
Round one is played three ways, followed by the same fine-scale rounds 2..k; the fourth plays every round coarse:

* ``fine``: the served model as it is (round one on the crop alone);
* ``coarse``: round one on a crop twice as wide, averaged down to the network's size (twice the voxel size), its
  logits upsampled onto the fine crop; a lesion larger than the crop looks mid-sized there;
* ``primed``: the fine round one, given the coarse round's logits as its mask prompt and previous mask;
* ``coarse_all``: every round on the coarse crop (the clicks still chosen from the fine crop's errors).

It also prints, per start, the rule "use that start when the coarse mask's equivalent diameter is at least T mm"
for each T of ``--rule_mm``. Nothing here reads a real case unless ``--dataset_dir`` points at one.

    python experiments/zoom_out_click.py --dataset_json VALIDATION_AS_TEST.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.clicks import SIZE_BINS, dice, next_eval_click  # noqa: E402
from scripts.data.crops import crop_at, normalise_crop  # noqa: E402
from scripts.training.click_rounds import _append_clicks, decoder_clicks, initial_mask_prompt, shown_logits  # noqa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lesion_source import add_source_arguments, lesions, load_model  # noqa: E402

STARTS = ("fine", "coarse", "primed", "coarse_all")


def _point(p) -> torch.Tensor:
    return torch.as_tensor(np.asarray(p, dtype=np.float32)[None, None])


def coarse_image(volume, start, size: int, normalisation: str) -> torch.Tensor:
    """(1, 1, S, S, S): the 2S-wide crop centred like the fine crop at ``start``, averaged 2 x 2 x 2 and normalised."""
    wide = crop_at(volume, np.asarray(start) - size // 2, 2 * size)
    return normalise_crop(F.avg_pool3d(torch.as_tensor(wide)[None].float(), 2)[0], normalisation)[None].float()


def to_coarse(point, size: int) -> torch.Tensor:
    """A fine-crop voxel as a (1, 1, 3) point of the coarse crop: coarse voxel j covers fine voxels 2j and 2j + 1."""
    return _point((np.asarray(point, dtype=np.float64) + size // 2 - 0.5) / 2.0)


def to_fine(logits: torch.Tensor) -> torch.Tensor:
    """Coarse-crop logits (1, 1, n, n, n) upsampled x 2 and cut to the fine crop's part (its middle half)."""
    n = logits.shape[-1]
    inner = slice(n // 2, n // 2 + n)
    upsampled = F.interpolate(logits.float(), scale_factor=2, mode="trilinear", align_corners=False)
    return upsampled[..., inner, inner, inner]


@torch.inference_mode()
def coarse_round(network, image: torch.Tensor, point, size: int):
    """Round one on ``coarse_image`` with a foreground click at fine-crop voxel ``point``.

    Returns (full-resolution logits on the fine crop (1, 1, S, S, S), low-res logits on the fine crop's low-res grid).
    """
    points, labels = to_coarse(point, size), torch.as_tensor([[1]])
    low, _ = network.decode(network.encode(image), points, labels, initial_mask_prompt(network, 1, "cpu"))
    full = network.full_res_logits(low.float(), (size,) * 3, network.refine_features(image), None, points, labels)
    return to_fine(shown_logits(network, full, points, labels)), to_fine(low)


@torch.inference_mode()
def play(network, image, target, num_clicks, start: str, coarse=None) -> list[float]:
    """Dice after clicks 1..num_clicks from the given start (see the module docstring); ``coarse``: the
    ``coarse_round`` output (``coarse``, ``primed``); for ``coarse_all`` ``image`` is the ``coarse_image``."""
    size, on_coarse = target.shape[0], start == "coarse_all"
    embedding, features = network.encode(image), network.refine_features(image)
    prev_low, full = initial_mask_prompt(network, 1, "cpu"), None
    history, pred, scores = (None, None), np.zeros_like(target), []
    for index in range(num_clicks):
        click = next_eval_click(pred, target)
        if click is None:
            scores.append(scores[-1])
            continue
        points = to_coarse(click[0], size) if on_coarse else _point(click[0])
        labels = torch.as_tensor([[int(click[1])]])
        history = _append_clicks(history, points, labels)
        if index == 0 and start == "coarse":
            full, prev_low = coarse
        else:
            if index == 0 and start == "primed":
                full, prev_low = coarse
            prev_low, _ = network.decode(embedding, *decoder_clicks(network, (points, labels), history), prev_low)
            full = network.full_res_logits(prev_low.float(), (size,) * 3, features, full, *history)
            full = shown_logits(network, full, *history)
        pred = ((to_fine(full) if on_coarse else full) > 0)[0, 0].numpy()
        scores.append(float(dice(pred, target)))
    return scores


def lesion_row(network, pre, lesion, num_clicks: int) -> dict:
    """{"size", "coarse_mm": the coarse first mask's equivalent diameter, and each start's Dice after 1..k clicks}."""
    first = next_eval_click(np.zeros_like(lesion.target), lesion.target)[0]
    wide = coarse_image(lesion.volume, lesion.start, pre.roi_size, pre.normalisation)
    coarse = coarse_round(network, wide, first, pre.roi_size)
    voxels = float((coarse[0] > 0).sum())
    row = {"size": lesion.size, "coarse_mm": (6.0 * voxels * pre.spacing**3 / math.pi) ** (1 / 3)}
    row["coarse_all"] = play(network, wide, lesion.target, num_clicks, "coarse_all")
    for name in STARTS[:3]:
        row[name] = play(network, lesion.crop, lesion.target, num_clicks, name, coarse)
    return row


def report(rows: list[dict], rule_mm: list[float]) -> None:
    num_clicks = len(rows[0]["fine"]) if rows else 1
    shown, last = [k for k in (1, 3, 5) if k <= num_clicks], min(5, num_clicks)
    heads = [f"Dice@{k}" for k in shown] + [f"Dice@{last} {b}" for b in SIZE_BINS]

    def line(label, curves, sizes):
        curves = np.asarray(curves)
        cells = [100 * curves[:, k - 1].mean() for k in shown]
        for b in SIZE_BINS:
            sel = [i for i, s in enumerate(sizes) if s == b]
            cells.append(100 * curves[sel, last - 1].mean() if sel else float("nan"))
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")

    sizes = [r["size"] for r in rows]
    print(f"{len(rows)} lesions: " + ", ".join(f"{b} {sizes.count(b)}" for b in SIZE_BINS))
    coarse = {b: np.median([r["coarse_mm"] for r in rows if r["size"] == b]) for b in SIZE_BINS if b in sizes}
    print("coarse first mask, median equivalent diameter: " + ", ".join(f"{b} {v:.1f} mm" for b, v in coarse.items()))
    print("| start | " + " | ".join(heads) + " |\n" + "|---" * (len(heads) + 1) + "|")
    for name in STARTS:
        line(name, [r[name] for r in rows], sizes)
    for name in STARTS[1:]:
        for t in rule_mm:
            line(f"{name} if coarse ≥ {t:g} mm", [r[name] if r["coarse_mm"] >= t else r["fine"] for r in rows], sizes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_source_arguments(parser)
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--rule_mm", type=float, nargs="+", default=[20.0, 30.0, 40.0, 50.0])
    parser.add_argument("--output", default=None, help="write the per-lesion rows as JSON")
    args = parser.parse_args(argv)
    network, pre = load_model(args)
    rows = [lesion_row(network, pre, lesion, args.clicks) for lesion in lesions(args, pre)]
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))
    report(rows, args.rule_mm)


if __name__ == "__main__":
    main()
