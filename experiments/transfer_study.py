"""Transfer study: pretrain on large organ-like targets, then transfer to small lesions with each method.

Mirrors the paper's setting offline (design and reading of the results: ``docs/transfer_study.md``):

* **Stage 1 (stand-in for SAM-Med3D's general pretraining).** The whole network (no SGPM, no extensions) trains
  on synthetic volumes whose target is the *organ*: one large, organ-like structure per case (the generator's
  organ masks, on cases drawn with a seed of their own, so no test image is seen). Dice + CE, as SAM-Med3D.
* **Stage 2 (transfer).** From that checkpoint, every method of ``METHODS`` trains on the synthetic lesions
  (3-40 mm, most of them small) under the same budget: the same iterations, batch, click rounds and learning rate,
  once per seed. The weights after the last iteration are evaluated (no checkpoint selection).
* **Evaluation.** The bundle's interactive protocol (``evaluate.json``: Dice after 1/3/5/10 clicks, NoC@85/90, by
  lesion size) on the synthetic test split and on the real NRRD cases (``--real_data_dir``, default the three
  pyradiomics MR cases in ``tests/data``). The stage-1 checkpoint without transfer is evaluated as a reference.
* **Cost.** Trainable / total parameters per method (the training policy of its preset) and the per-click decoder
  latency with the encode-once / decode-per-click API (plus one encoder pass), measured one method at a time.

Every training and evaluation goes through ``monai.bundle.run`` (what ``python -m monai.bundle run`` calls) with
``bundle/configs/train.json``, ``configs/cpu_tiny.json``, the method preset and ``bundle/configs/evaluate.json``,
so the study runs exactly what users run. Jobs run in parallel worker processes (``--jobs``), one fresh process per
job. Finished jobs whose settings match are reused when the command is run again (``--fresh`` redoes them).

Outputs in ``--output_dir``: ``results.md`` (tables), ``results.json`` (all numbers, per seed), ``dice_vs_clicks.png``,
and ``runs/<method>/seed<k>/`` (checkpoints, logs, per-lesion CSVs).

CLI (repository root, after ``source tools/env.sh``; or ``experiments/run_transfer_study.sh``)::

    python -m experiments.transfer_study                                                   # full: 7 methods x 3 seeds
    python -m experiments.transfer_study --budget smoke --output_dir bundle/runs/study_smoke  # plumbing check, < 2 min

The default ``--output_dir`` is ``bundle/runs/transfer_study`` (git-ignored).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from scripts import BUNDLE_ROOT

from .transfer_report import aggregate, format_tables, hardware_description, plot_curves
from .transfer_setup import (
    BUDGETS,
    EVALUATE_JSON,
    METHODS,
    NO_TRANSFER,
    PRETRAIN_METHOD,
    StudyPlan,
    method_configs,
    network_overrides,
    prepare_datasets,
    real_cases,
)

__all__ = ["aggregate", "format_tables", "main", "run_job", "run_jobs", "measure_cost"]


# ---------------------------------------------------------------------------------------------------------------
# Jobs (run in worker processes)
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _output_to(log_path: Path):
    """Send this process's stdout and stderr, file descriptors included, to ``log_path``: MONAI's loggers hold the
    original ``sys.stdout`` from import time, so replacing the Python object alone would not catch them."""
    saved = {}
    with open(log_path, "a") as log:
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            stream.flush()
            saved[fd] = os.dup(fd)
            os.dup2(log.fileno(), fd)
        try:
            yield
        finally:
            for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
                stream.flush()
                os.dup2(saved[fd], fd)
                os.close(saved[fd])


def _bundle_run(run_id: str, config_files: Sequence[str], **overrides: Any) -> None:
    """``python -m monai.bundle run <run_id> --config_file ... --key value ...``, in this process."""
    from monai.bundle import run

    print(f"\n=== monai.bundle run {run_id} {list(config_files)} {overrides}", flush=True)
    run(run_id=run_id, config_file=list(config_files), **overrides)


def _read_summary(eval_dir: Path) -> dict[str, Any]:
    return json.loads((eval_dir / "summary.json").read_text())


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one method with one seed (or stage 1), then evaluate on the synthetic test split and the real cases."""
    import torch

    torch.set_num_threads(int(job["threads"]))
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with _output_to(run_dir / "log.txt"):
        result = _train_and_evaluate(job, run_dir)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _train_and_evaluate(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    configs = method_configs(job["method"])
    common = dict(job["network_overrides"], seed=int(job["seed"]))
    result: dict[str, Any] = {"job": job}
    start = time.perf_counter()
    if job["train"]:
        _bundle_run(
            "training",
            configs,
            dataset_dir=job["train_dataset"],
            pretrained_ckpt=job["pretrained_ckpt"],
            max_epochs=1,
            iterations_per_epoch=int(job["iterations"]),
            val_interval=2,  # no validation: every method is evaluated after its last iteration
            batch_size=int(job["batch_size"]),
            num_rounds=int(job["num_rounds"]),
            ckpt_dir=str(run_dir / "models"),
            output_dir=str(run_dir / "logs"),
            **common,
        )
    result["train_seconds"] = time.perf_counter() - start
    checkpoint = run_dir / "models" / "checkpoint_epoch=1.pt" if job["train"] else Path(job["pretrained_ckpt"])
    result["checkpoint"] = str(checkpoint)
    start = time.perf_counter()
    for name, datalist in (("synthetic", None), ("real", job["real_items"])):
        if name == "real" and not datalist:
            continue
        eval_dir = run_dir / f"eval_{name}"
        _bundle_run(
            "evaluating",
            configs + [str(EVALUATE_JSON)],
            dataset_dir=job["eval_dataset"],
            ckpt_path=str(checkpoint),
            eval_output_dir=str(eval_dir),
            output_dir=str(run_dir / "logs"),
            max_clicks=int(job["max_clicks"]),
            **({"eval_datalist": datalist} if datalist else {}),
            **common,
        )
        result[name] = _read_summary(eval_dir)
    result["eval_seconds"] = time.perf_counter() - start
    return result


def _finished(job: dict[str, Any]) -> dict[str, Any] | None:
    """The stored result of an identical earlier job, if any."""
    path = Path(job["run_dir"]) / "result.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if stored.get("job") == job else None


def run_jobs(jobs: list[dict[str, Any]], workers: int, fresh: bool) -> list[dict[str, Any]]:
    """Each job in a fresh spawned process (no state carried between runs), ``workers`` at a time."""
    results: list[dict[str, Any] | None] = [None if fresh else _finished(job) for job in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    for i in range(len(jobs)):
        if results[i] is not None:
            print(f"  reusing {jobs[i]['run_dir']}")
    if not todo:
        return results  # type: ignore[return-value]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_job, jobs[i]): i for i in todo}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as err:
                raise RuntimeError(f"job {jobs[i]['run_dir']} failed (see its log.txt): {err}") from err
            r = results[i]
            print(f"  done {jobs[i]['run_dir']}: train {r['train_seconds']:.0f} s, eval {r['eval_seconds']:.0f} s")
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts and latency (main process, one method at a time)
# ---------------------------------------------------------------------------------------------------------------
def measure_cost(method: str, checkpoint: str, network_overrides: dict, clicks: int, repeats: int = 3) -> dict:
    """Trainable/total parameters under the preset's training policy; median per-click decoder latency on cached
    embeddings (``encode`` once, then ``decode`` per click with the previous low-res logits) and encoder time."""
    import torch
    from monai.bundle import ConfigParser
    from scripts.checkpoint import load_weights
    from scripts.training.trainable import count_parameters

    parser = ConfigParser()
    parser.read_config(method_configs(method))
    parser.update({"pretrained_ckpt": None, **network_overrides})
    network = parser.get_parsed_content("network")
    counts = count_parameters(network)["all"]
    load_weights(network, checkpoint)
    network.eval()
    device = next(network.parameters()).device
    size = network.img_size
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 1, size, size, size, generator=generator).to(device)
    encode_inputs = {}
    tags = network.extensions["tags"] if "tags" in network.extensions else None
    if tags is not None and tags.anatomy_embed is not None:
        grid = torch.arange(size, dtype=torch.float32) - size / 2
        ball = (grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2) < (size / 3) ** 2
        encode_inputs["anatomy"] = ball[None, None].float().to(device)

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        encode_times = []
        for _ in range(repeats + 1):  # the first pass warms up
            synchronise()
            start = time.perf_counter()
            embedding = network.encode(image, **encode_inputs)
            synchronise()
            encode_times.append(time.perf_counter() - start)
        decode_times = []
        for _ in range(repeats):
            logits = torch.zeros((1, 1, *network.low_res_size), device=device)
            for k in range(clicks):
                point = torch.randint(0, size, (1, 1, 3), generator=generator).float().to(device)
                label = torch.tensor([[k % 2 == 0]], device=device).long()
                synchronise()
                start = time.perf_counter()
                logits, _ = network.decode(embedding, point, label, logits)
                synchronise()
                decode_times.append(time.perf_counter() - start)
    return {
        "trainable_parameters": counts["trainable"],
        "total_parameters": counts["total"],
        "decode_ms_per_click": 1000.0 * statistics.median(decode_times[1:]),
        "encode_ms": 1000.0 * statistics.median(encode_times[1:]),
        "device": str(device),
    }


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=str(Path(BUNDLE_ROOT) / "runs" / "transfer_study"))
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full", help="smoke: < 2 min plumbing check")
    parser.add_argument("--quick", action="store_true", help="same as --budget smoke")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, help="seeds per method (budget default: smoke 1, full 3)")
    parser.add_argument("--iterations", type=int, help="stage-2 iterations per method and seed")
    parser.add_argument("--pretrain_iterations", type=int, help="stage-1 iterations")
    parser.add_argument("--jobs", type=int, help="parallel jobs (default: 1 on a GPU, else one per core, max 4)")
    parser.add_argument("--network_preset", default="tiny", help="tiny (64^3, CPU) or small (128^3, GPU)")
    parser.add_argument("--real_data_dir", help="real NRRD cases (default tests/data)")
    parser.add_argument("--fresh", action="store_true", help="redo jobs even if an identical finished one exists")
    return parser.parse_args(argv)


def run_stages(plan: StudyPlan, out: Path, methods: Sequence[str], workers: int, cores: int, fresh: bool, seconds):
    """Stage 1, stage 2 and the cost measurement; returns (stage-1 result, stage-2 results, costs) and records each
    stage's wall time in ``seconds``."""
    import torch

    budget = plan.budget
    print("stage 1: pretraining on organ targets")
    start = time.perf_counter()
    # Stage 1 runs alone, so it uses every core; its evaluations are the "no transfer" reference row.
    pretrain_job = plan.job(
        PRETRAIN_METHOD, 0, out / "runs" / "stage1_pretrain", True, method_id=NO_TRANSFER,
        train_dataset=str(plan.organs), iterations=budget.pretrain_iterations, threads=cores,
    )  # fmt: skip
    pretrained = run_jobs([pretrain_job], 1, fresh)[0]
    seconds["stage1"] = time.perf_counter() - start

    print(f"stage 2: {len(methods)} methods x {budget.seeds} seeds, {budget.iterations} iterations each")
    start = time.perf_counter()
    transfer_jobs = [
        plan.job(m, seed, out / "runs" / m / f"seed{seed}", True, pretrained_ckpt=pretrained["checkpoint"])
        for seed in range(budget.seeds)
        for m in methods
    ]
    results = run_jobs(transfer_jobs, workers, fresh)
    seconds["stage2"] = time.perf_counter() - start

    print("cost: parameter counts and latency")
    start = time.perf_counter()
    torch.set_num_threads(1)  # the per-click latency of one interactive session on one core
    costs = {}
    for method in methods:
        seed0 = next(r for r in results if r["job"]["method"] == method)
        costs[method] = measure_cost(method, seed0["checkpoint"], plan.network_overrides, budget.latency_clicks)
    seconds["cost"] = time.perf_counter() - start
    return pretrained, results, costs


def write_report(out: Path, title: str, run: dict[str, Any], methods: Sequence[str]) -> str:
    """``results.md``, ``results.json`` and ``dice_vs_clicks.png`` in ``out``; returns the Markdown text."""
    budget, seconds, wall = run["budget"], run["stage_seconds"], run["wall_seconds"]
    report = [
        f"# Transfer study results ({title} budget)",
        "",
        f"Hardware: {run['hardware']}. {run['jobs']} parallel jobs x {run['threads']} threads; latency on 1 thread.",
        f"Budget: {json.dumps(budget)}.",
        f"Wall time: {wall / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ").",
        "Dice in %, mean ± std over seeds of each run's mean over lesions; NoC capped at max_clicks.",
        "",
        format_tables(run["tables"], run["costs"], methods),
    ]
    text = "\n".join(report)
    (out / "results.md").write_text(text + "\n")
    plot_curves(run["tables"], methods, out / "dice_vs_clicks.png")
    (out / "results.json").write_text(json.dumps(run, indent=1, default=str))
    return text


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    budget = BUDGETS["smoke" if args.quick else args.budget]
    overrides = {k: getattr(args, k) for k in ("seeds", "iterations", "pretrain_iterations") if getattr(args, k)}
    budget = replace(budget, **overrides)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = args.jobs or (1 if torch.cuda.is_available() else max(1, min(cores, 4)))
    threads = max(1, cores // jobs)
    torch.set_num_threads(threads)
    print(f"transfer study, budget {asdict(budget)}, {jobs} parallel jobs x {threads} threads -> {out}")

    start = time.perf_counter()
    lesions, organs = prepare_datasets(out / "data", budget)
    real_items = real_cases(args.real_data_dir)
    if not real_items:
        print("no real cases found: the real-data evaluation is skipped")
    seconds = {"data": time.perf_counter() - start}
    plan = StudyPlan(budget, lesions, organs, real_items, network_overrides(args.network_preset), threads)
    pretrained, results, costs = run_stages(plan, out, args.methods, jobs, cores, args.fresh, seconds)

    all_results = [pretrained, *results]
    tables = {dataset: aggregate(all_results, dataset) for dataset in ("synthetic", "real")}
    wall = time.perf_counter() - wall_start
    run = {
        "budget": asdict(budget),
        "hardware": hardware_description(),
        "jobs": jobs,
        "threads": threads,
        "wall_seconds": wall,
        "stage_seconds": seconds,
        "costs": costs,
        "tables": tables,
        "runs": all_results,
    }
    print(write_report(out, "smoke" if args.quick else args.budget, run, args.methods))
    print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min); results in {out}")
    return {"tables": tables, "costs": costs, "wall_seconds": wall, "output_dir": str(out)}


if __name__ == "__main__":
    main(sys.argv[1:])
