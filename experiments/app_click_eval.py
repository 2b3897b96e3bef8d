"""Real lesions segmented through the MONAI Label app as 3D Slicer's plugin sends clicks: Dice per lesion and click.

The script starts the real server (``monailabel start_server --app apps/sgpsam_label``, 127.0.0.1, no ``--conf``
model setting: the app serves its default model unless ``--checkpoint`` is given) on a studies folder holding the
images of ``--dataset_dir`` (``<case>_image.<ext>`` + ``<case>_label.<ext>``, or the MSD / ``images``+``labels``
layouts of ``scripts.data.folders``). Each connected lesion of ``--target_label`` (26-connectivity) is one segment
of its own, annotated by a simulated user on the WHOLE volume:

- click 1 at the lesion's deepest point;
- every later click at the deepest point of the larger error of the returned mask against that lesion
  (``scripts.clicks.next_eval_click``, distances in mm; a mask over another lesion counts as an error);
- all clicks of the segment re-sent with every request, as the plugin does.

Dice is taken on the whole volume after each click. Sizes are binned by equivalent-sphere diameter. This is the
protocol of the issue's outside check; the bundle's ``evaluate.json`` instead crops around each lesion.

    python experiments/app_click_eval.py --dataset_dir CASES --target_label 1 --clicks 5 --output OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT / "bundle", REPO_ROOT / "tests"):
    sys.path.insert(0, str(path))

from app_testing import AppServer  # noqa: E402
from scripts.clicks import SIZE_BINS, dice, lesion_size_bin, next_eval_click  # noqa: E402
from scripts.data.folders import IMAGE_SUFFIXES, find_pairs  # noqa: E402
from scripts.data.inference_image import load_image  # noqa: E402


def read_mask(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) array and its affine, on the grid the app's click indices use."""
    image = load_image(path)
    return np.asarray(image.as_tensor()[0]), np.asarray(image.affine, dtype=np.float64)


def lesions_of(label: np.ndarray, target_label: int | None) -> list[np.ndarray]:
    target = label > 0 if target_label is None else label == target_label
    components, n = ndimage.label(target, structure=np.ones((3, 3, 3)))
    return [components == k for k in range(1, n + 1)]


def annotate(server: AppServer, image_id: str, segment: str, lesion: np.ndarray, spacing, clicks: int) -> list[float]:
    """Dice after each click for one lesion, its own segment and session."""
    client = server.client(client_id="app-click-eval")
    fg, bg, scores = [], [], []
    pred = np.zeros_like(lesion)
    for _ in range(clicks):
        step = next_eval_click(pred, lesion, spacing)
        if step is None:  # perfect: later clicks keep the score
            scores.append(scores[-1])
            continue
        (fg if step[1] == 1 else bg).append([int(v) for v in step[0]])
        mask_file, _ = client.infer("sgpsam", image_id, {"label": segment, "foreground": fg, "background": bg})
        pred = read_mask(mask_file)[0] > 0
        Path(mask_file).unlink(missing_ok=True)
        scores.append(dice(pred, lesion))
    return scores


def run(args) -> dict:
    pairs = find_pairs(args.dataset_dir)
    if not pairs:
        raise SystemExit(f"no image/label pairs in {args.dataset_dir}")
    records = []
    with tempfile.TemporaryDirectory(prefix="app_click_eval_") as tmp:
        root = Path(tmp)
        studies = root / "studies"
        studies.mkdir()
        for pair in pairs:  # the case name is the image id in the app's datastore
            suffix = next(s for s in IMAGE_SUFFIXES if pair["image"].lower().endswith(s))
            shutil.copy(pair["image"], studies / f"{pair['case']}{suffix}")
        conf = {"model_dir": root / "model", "device": args.device}
        if args.checkpoint:
            conf["checkpoint"] = args.checkpoint
        server = AppServer(root, studies, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}, timeout=600)
        try:
            for pair in pairs:
                label, affine = read_mask(pair["label"])
                spacing = np.linalg.norm(affine[:3, :3], axis=0)
                for k, lesion in enumerate(lesions_of(label, args.target_label)):
                    volume_mm3 = float(lesion.sum()) * float(np.prod(spacing))
                    scores = annotate(server, pair["case"], f"lesion{k}", lesion, spacing, args.clicks)
                    records.append(
                        {
                            "case": pair["case"],
                            "lesion": k,
                            "voxels": int(lesion.sum()),
                            "diameter_mm": round((6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0), 1),
                            "bin": lesion_size_bin(int(lesion.sum()), spacing),
                            "dice": [round(s, 4) for s in scores],
                        }
                    )
                    print(json.dumps(records[-1]), flush=True)
        finally:
            server.stop()
    return {"dataset_dir": str(args.dataset_dir), "clicks": args.clicks, "lesions": records}


def summary_table(result: dict) -> str:
    n = result["clicks"]
    shown = [c for c in (1, 3, 5, 10) if c <= n]
    lines = ["| group | lesions | " + " | ".join(f"Dice@{c} (%)" for c in shown) + " |"]
    lines.append("|---" * (len(shown) + 2) + "|")
    groups = [("overall", result["lesions"])] + [
        (b, [r for r in result["lesions"] if r["bin"] == b]) for b in SIZE_BINS
    ]
    for name, rows in groups:
        cells = [f"{100 * statistics.mean(r['dice'][c - 1] for r in rows):.1f}" if rows else "-" for c in shown]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", required=True, type=Path)
    parser.add_argument("--target_label", type=int, default=1, help="label value of the lesions (-1: any > 0)")
    parser.add_argument("--clicks", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="a model file to serve (default: the app's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="write the per-lesion records as JSON")
    args = parser.parse_args(argv)
    args.target_label = None if args.target_label < 0 else args.target_label
    result = run(args)
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))
    print(summary_table(result))


if __name__ == "__main__":
    main()
