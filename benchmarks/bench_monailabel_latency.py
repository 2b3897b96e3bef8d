"""Click round-trip latency of the SGP-SAM MONAI Label app through REST: first click on an image vs repeat click.

For every preset the script starts the real server (``monailabel start_server --app apps/sgpsam_label``) on
127.0.0.1 with a studies folder of ``--repeats`` copies of one real MR case (each copy is a new image to the
server: cold volume and embedding cache), then for each copy sends, with MONAI Label's client, one first
foreground click and ``--clicks - 1`` repeat clicks (each adds one click next to the previous ones, as an annotator
in 3D Slicer does; the plugin re-sends all clicks). Round trip = ``MONAILabelClient.infer`` wall time (HTTP,
multipart, mask file written and read back). Medians over all first / all repeat clicks.

``--case ct512`` builds a chest-CT-sized image: the vendored lung1 CT crop (HU) mirrored out to 512 x 512 x 100
voxels (0.57 x 0.57 x 5 mm; the mirror copies hold copies of the nodule), with the click on the original nodule.

Weights (``--weights``): ``default`` (the shipped default model file; the file decides the preset), ``random``
(random initialisation; its masks can spread over the crop and trigger the large-lesion extension windows, i.e.
more encoder/decoder runs, up to ``--conf max_windows``) and ``cube`` (``tests/app_testing.py``: same network and
FLOPs, hand-set weights whose mask is a cube inside one window, the typical lesion path). No checkpoint download.

    python benchmarks/bench_monailabel_latency.py                      # tiny + sam_med3d, cube + random, CPU
    python benchmarks/bench_monailabel_latency.py --presets sam_med3d --weights cube --repeats 5 --device cuda
    python benchmarks/bench_monailabel_latency.py --case ct512 --weights default   # the issue's CT latency target
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "tests" / "data"  # the vendored pyradiomics cases (three MR, one CT crop)
for path in (REPO_ROOT / "bundle", REPO_ROOT / "tests"):
    sys.path.insert(0, str(path))


def lesion_click(label_path: Path) -> list[int]:
    from monai.transforms import LoadImage
    from scipy.ndimage import distance_transform_edt

    label = np.asarray(LoadImage(image_only=True)(str(label_path)))
    dist = distance_transform_edt(label > 0)
    return [int(v) for v in np.unravel_index(int(np.argmax(dist)), dist.shape)]


def chest_ct_512(folder: Path) -> tuple[Path, list[int]]:
    """The vendored lung1 CT crop mirrored out to 512 x 512 x 100 voxels (written as NRRD), and its nodule click."""
    import SimpleITK as sitk

    crop = sitk.ReadImage(str(DATA_DIR / "lung1crop_image.nrrd"))
    array = sitk.GetArrayFromImage(crop)  # (z, y, x)
    pads = [((n - s) // 2, n - s - (n - s) // 2) for n, s in zip((100, 512, 512), array.shape)]
    big = sitk.GetImageFromArray(np.pad(array, pads, mode="symmetric"))
    big.SetSpacing(crop.GetSpacing())
    big.SetDirection(crop.GetDirection())
    big.SetOrigin(crop.TransformContinuousIndexToPhysicalPoint([-float(p[0]) for p in pads[::-1]]))
    path = folder / "ct512.nrrd"
    sitk.WriteImage(big, str(path), useCompression=True)
    click = lesion_click(DATA_DIR / "lung1crop_label.nrrd")  # (i, j, k) of the crop
    return path, [c + p[0] for c, p in zip(click, pads[::-1])]


def run_preset(preset: str, weights: str, args, click: list[int], image: Path) -> dict:
    from app_testing import AppServer, make_cube_checkpoint, make_random_checkpoint
    from scripts.model_file import default_model_path

    with tempfile.TemporaryDirectory(prefix=f"bench_{preset}_") as tmp:
        root = Path(tmp)
        (root / "studies").mkdir()
        (root / "client").mkdir()
        names = [f"case{i:02d}" for i in range(args.repeats)]
        for name in names:
            shutil.copy(image, root / "studies" / f"{name}{''.join(image.suffixes)}")
        if weights == "default":
            checkpoint = default_model_path()
        else:
            make = make_cube_checkpoint if weights == "cube" else make_random_checkpoint  # model files of the preset
            checkpoint = make(str(root / f"{weights}.pt"), preset)
        t0 = time.time()
        conf = {"checkpoint": checkpoint, "model_dir": root / "model", "device": args.device}
        env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}  # no background scoring competing for the CPU
        server = AppServer(root, root / "studies", conf, env=env, timeout=600)
        start_s = time.time() - t0
        try:
            client = server.client()
            first, repeat, server_first, server_repeat, rows = [], [], [], [], []
            for name in names:
                clicks = []
                for k in range(args.clicks):
                    clicks.append([click[0] + 2 * k, click[1], click[2]])
                    t = time.perf_counter()
                    label_file, params = client.infer(
                        "sgpsam", name, {"label": "lesion", "foreground": clicks, "background": []}
                    )
                    rtt = (time.perf_counter() - t) * 1000.0
                    os.remove(label_file)
                    (first if k == 0 else repeat).append(rtt)
                    (server_first if k == 0 else server_repeat).append(params["latency_ms"])
                    rows.append(
                        {
                            "image": name,
                            "click": k + 1,
                            "round_trip_ms": round(rtt, 1),
                            "engine_ms": round(params["latency_ms"], 1),
                            "encoder_runs": params["encoder_runs"],
                            "decoder_runs": params["decoder_runs"],
                            "windows": params["windows"],
                        }
                    )
                    if args.verbose:
                        print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    return {
        "preset": preset,
        "weights": weights,
        "device": args.device,
        "server_start_s": round(start_s, 1),
        "first_click_ms": round(statistics.median(first), 1),
        "repeat_click_ms": round(statistics.median(repeat), 1) if repeat else None,
        "first_engine_ms": round(statistics.median(server_first), 1),
        "repeat_engine_ms": round(statistics.median(server_repeat), 1) if server_repeat else None,
        "first_click_range_ms": [round(min(first), 1), round(max(first), 1)],
        "repeat_click_range_ms": [round(min(repeat), 1), round(max(repeat), 1)] if repeat else None,
        "windows": max(r["windows"] for r in rows),
        "n_first": len(first),
        "n_repeat": len(repeat),
        "rows": rows,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "sam_med3d"])
    parser.add_argument("--weights", nargs="+", default=["cube", "random"], choices=["default", "cube", "random"])
    parser.add_argument("--repeats", type=int, default=3, help="images (each: one first click)")
    parser.add_argument("--clicks", type=int, default=4, help="clicks per image (1 first + the rest repeat)")
    parser.add_argument("--case", default="brain2", help="case in tests/data (brain1, brain2, breast1), or ct512")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    scratch = tempfile.TemporaryDirectory(prefix="bench_image_")
    if args.case == "ct512":
        image, click = chest_ct_512(Path(scratch.name))
    else:
        image, click = DATA_DIR / f"{args.case}_image.nrrd", lesion_click(DATA_DIR / f"{args.case}_label.nrrd")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {args.case} {image.name}, click {click}, cpus {os.cpu_count()}, load average {load:.2f}")
    runs = [("file", w) if w == "default" else (p, w) for p in args.presets for w in args.weights]
    results = []
    for preset, weights in dict.fromkeys(runs):  # the default model runs once, whatever the presets
        res = run_preset(preset, weights, args, click, image)
        results.append(res)
        print(
            f"{preset:>10} {weights:>7} {args.device:>4} | first click {res['first_click_ms']:>8.1f} ms "
            f"(engine {res['first_engine_ms']:.1f}) | repeat click {res['repeat_click_ms']:>8.1f} ms "
            f"(engine {res['repeat_engine_ms']:.1f}) | windows {res['windows']} | "
            f"n={res['n_first']}/{res['n_repeat']} | server start {res['server_start_s']} s",
            flush=True,
        )
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    scratch.cleanup()


if __name__ == "__main__":
    main()
