"""How often the Self-Gated Prompting Module runs its fusion block on real crops (the gate's skip rate).

For every lesion of every image/label pair in the given folders (``scripts.data.folders`` layouts), the model file's
network encodes the lesion-centred crop the evaluation protocol uses, plus ``--background`` random crops of the same
case that hold no lesion voxel. The SGPM is in eval mode, so each stage either runs its fusion block (decision
probability at or above the threshold) or skips it. Printed per stage: how often it fused, and the mean decision
probability, for lesion crops by lesion size and for background crops; and the share of the encoder's time the
fusion blocks take (timed here, gates forced open against SGPM off), so the compute a skip saves.

    python experiments/sgpm_gate.py --dataset_dir tests/data            # the shipped default model
    python experiments/sgpm_gate.py --dataset_dir CASES --model bundle/models/model.pt --background 4
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))

from scripts.clicks import SIZE_BINS, lesion_size_bin  # noqa: E402
from scripts.data.crops import crop_at, lesion_crops, normalise_crop  # noqa: E402
from scripts.data.folders import folder_datalist  # noqa: E402
from scripts.data.transforms import get_preprocess_transforms  # noqa: E402
from scripts.model_file import default_model_path, read_model_file  # noqa: E402


def stage_decisions(network, crop: torch.Tensor) -> dict[str, tuple[bool, float]]:
    """{stage block: (fused, decision probability)} for one (1, S, S, S) crop."""
    network.sgpm.reset_counters()
    with torch.no_grad():
        network.encode(crop[None].float())
    return {
        name: (stage.fusion_calls > 0, float(stage.last_decision_prob[0]))
        for name, stage in network.sgpm.stages.items()
    }


def fusion_share(network, size: int, repeats: int = 5) -> float:
    """Share of an encoder pass that the fusion blocks take: (gates open - SGPM off) / gates open, median times."""
    image = torch.randn(1, 1, size, size, size)
    times = {}
    for mode in ("open", "closed"):
        variant = copy.deepcopy(network)
        variant.sgpm.gate_mode = mode
        with torch.no_grad():
            variant.encode(image)
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                variant.encode(image)
                runs.append(time.perf_counter() - start)
        times[mode] = float(np.median(runs))
    return max(0.0, (times["open"] - times["closed"]) / times["open"])


def background_starts(label: torch.Tensor, size: int, count: int, rng: np.random.Generator) -> list[list[int]]:
    """Up to ``count`` crop starts inside the (1, X, Y, Z) volume whose crop holds no lesion voxel."""
    starts, high = [], np.maximum(np.array(label.shape[1:]) - size, 0) + 1
    for _ in range(count * 200):
        if len(starts) == count:
            break
        start = [int(v) for v in rng.integers(0, high)]
        if not (torch.as_tensor(crop_at(label, start, size)) > 0.5).any():
            starts.append(start)
    return starts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", nargs="+", required=True)
    parser.add_argument("--model", default=None, help="model file (default: the shipped default model)")
    parser.add_argument("--background", type=int, default=2, help="lesion-free random crops per case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = read_model_file(args.model or default_model_path())
    network, prep = model.network.eval(), model.preprocessing
    if network.sgpm is None:
        raise SystemExit("this model has no SGPM")
    transform = get_preprocess_transforms(1, prep.image_channel, prep.ct_clamp, prep.spacing)
    rng = np.random.default_rng(args.seed)
    rows = []
    for folder in args.dataset_dir:
        for item in folder_datalist(folder):
            data = transform({"image": item["image"], "label": item["label"]})
            image, label = data["image"], data["label"]
            for _, voxels, _, crop, _ in lesion_crops(image, label, prep.roi_size, 3, prep.normalisation):
                kind = f"lesion {lesion_size_bin(voxels, prep.spacing)}"
                rows.append((kind, item["case"], stage_decisions(network, crop)))
            for start in background_starts(label, prep.roi_size, args.background, rng):
                crop = normalise_crop(crop_at(image, start, prep.roi_size), prep.normalisation)
                rows.append(("background", item["case"], stage_decisions(network, torch.as_tensor(crop))))
    share = fusion_share(network, prep.roi_size)
    print(f"model {model.path}: {len(rows)} crops, threshold {network.sgpm.threshold}")
    print(f"fusion blocks: {100 * share:.1f} % of an encoder pass with every gate open (a skip saves its stage's part)")
    for kind in [f"lesion {b}" for b in SIZE_BINS] + ["background"]:
        chosen = [r[2] for r in rows if r[0] == kind]
        for stage in network.sgpm.stages:
            fused = [d[stage][0] for d in chosen]
            probs = [d[stage][1] for d in chosen]
            if chosen:
                print(
                    f"{kind:>16} crops (n={len(chosen):>3}) stage after block {stage}: fused {np.mean(fused):6.1%}, "
                    f"skipped {1 - np.mean(fused):6.1%}, mean decision probability {np.mean(probs):.3f}"
                )


if __name__ == "__main__":
    main()
