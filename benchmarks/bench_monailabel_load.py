"""Click latency of the SGP-SAM MONAI Label app under load: several annotators clicking at once, through REST.

The script starts the real server (``monailabel start_server --app apps/sgpsam_label``, 127.0.0.1) with
``--images`` copies of one real MR case (``tests/data``), then runs ``--clients`` annotators at once, each with its
own client id, each sending ``--clicks`` requests per image on every image (one click more per request, all
clicks re-sent, as 3D Slicer's plugin does; half the clients start on the last image, so first clicks on every
image overlap). A further thread reads ``/info`` every 0.2 s meanwhile. Round trip = ``MONAILabelClient.infer``
wall time (HTTP, multipart, mask written and read back). It prints p50/p95 for first clicks, repeat clicks and
``/info``; docs/benchmarks.md records the figures with the machine.

    python benchmarks/bench_monailabel_load.py                                 # 8 clients x 2 images x 20 clicks
    python benchmarks/bench_monailabel_load.py --preset sam_med3d --device cuda --clients 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "tests" / "data"
for path in (REPO_ROOT / "bundle", REPO_ROOT / "tests"):
    sys.path.insert(0, str(path))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"n": len(values), "p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1)}


def annotator(server, client_id: str, images: list[str], clicks: int, start: list[int], seed: int, out: dict):
    rng = np.random.default_rng(seed)
    client = server.client(client_id)
    for image in images:
        points = [list(start)]
        for n in range(clicks):
            if n:
                points.append([int(v) for v in np.asarray(points[-1]) + rng.integers(-2, 3, 3) * [1, 1, 0]])
            t = time.perf_counter()
            mask_file, params = client.infer(
                "sgpsam", image, {"label": "lesion", "foreground": points, "reset_state": n == 0}
            )
            out["first" if n == 0 else "repeat"].append((time.perf_counter() - t) * 1000.0)
            out["engine_first" if n == 0 else "engine_repeat"].append(params["latency_ms"])
            out["windows"].append(params.get("windows", 0))
            os.remove(mask_file)


def poll_info(url: str, stop: threading.Event, out: list) -> None:
    import requests

    while not stop.is_set():
        t = time.perf_counter()
        requests.get(f"{url}/info/", timeout=600)
        out.append((time.perf_counter() - t) * 1000.0)
        stop.wait(0.2)


def run(args) -> dict:
    from app_testing import AppServer, make_cube_checkpoint, make_random_checkpoint
    from bench_monailabel_latency import lesion_click

    image = DATA_DIR / f"{args.case}_image.nrrd"
    start = lesion_click(DATA_DIR / f"{args.case}_label.nrrd")
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        root = Path(tmp)
        (root / "studies").mkdir()
        names = [f"case{i:02d}" for i in range(args.images)]
        for name in names:
            shutil.copy(image, root / "studies" / f"{name}.nrrd")
        make = make_cube_checkpoint if args.weights == "cube" else make_random_checkpoint  # model files of the preset
        checkpoint = make(str(root / f"{args.weights}.pt"), args.preset)
        conf = {"checkpoint": checkpoint, "model_dir": root / "model", "device": args.device}
        env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}  # no background scoring competing for the CPU
        server = AppServer(root, root / "studies", conf, env=env, timeout=600)
        times: dict[str, list] = {k: [] for k in ("first", "repeat", "engine_first", "engine_repeat", "windows")}
        info: list[float] = []
        stop = threading.Event()
        try:
            poller = threading.Thread(target=poll_info, args=(server.url, stop, info))
            poller.start()
            t0 = time.time()
            with ThreadPoolExecutor(args.clients) as pool:
                orders = [names if c % 2 == 0 else names[::-1] for c in range(args.clients)]  # first clicks overlap
                jobs = [
                    pool.submit(annotator, server, f"bench-{c}", orders[c], args.clicks, start, c, times)
                    for c in range(args.clients)
                ]
                for job in jobs:
                    job.result()
            wall = time.time() - t0
        finally:
            stop.set()
            server.stop()
    return {
        "preset": args.preset,
        "weights": args.weights,
        "device": args.device,
        "clients": args.clients,
        "images": args.images,
        "clicks": args.clicks,
        "wall_s": round(wall, 1),
        "first_click": percentiles(times["first"]),
        "repeat_click": percentiles(times["repeat"]),
        "first_click_engine": percentiles(times["engine_first"]),
        "repeat_click_engine": percentiles(times["engine_repeat"]),
        "info": percentiles(info),
        "max_windows_seen": max(times["windows"], default=0),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--weights", default="cube", choices=["cube", "random"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=20, help="requests per client and image")
    parser.add_argument("--case", default="brain2", help="real case in tests/data (brain1, brain2, breast1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# {args.case} x {args.images}, {args.clients} clients x {args.clicks} clicks, cpus {os.cpu_count()}, "
        f"load average {load:.2f}",
        flush=True,
    )
    res = run(args)
    for key in ("first_click", "repeat_click", "first_click_engine", "repeat_click_engine", "info"):
        print(f"{key:>19}: p50 {res[key].get('p50_ms')} ms, p95 {res[key].get('p95_ms')} ms (n={res[key]['n']})")
    print(f"wall {res['wall_s']} s, max windows per click {res['max_windows_seen']}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
