"""Paired differences of an ablation run by ``experiments/sgpm_loss_ablation.sh``, by data set and lesion size.

Layout read: ``OUT/<variant>/seed<N>/eval/<data set>/per_lesion.csv``. Every variant is compared with the reference
variant (``zoom_sgpm``) lesion by lesion: for each lesion the Dice@5 difference is averaged over the seeds both
variants have, and the table gives the mean of those differences with its standard error over lesions
(std / sqrt(n)); that error leaves out the training-seed spread, so the differences of each seed alone (mean over
lesions) are printed beside it. Real data sets are also pooled into one "real" row set.

    python experiments/ablation_report.py OUT [--metric dice@5]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

REFERENCE = "zoom_sgpm"
SIZE_BINS = ("<10mm", "10-30mm", ">30mm")


def read_runs(out: Path, metric: str) -> dict:
    """{(variant, data set): {seed: {(case, lesion): (size bin, value)}}}."""
    runs: dict = defaultdict(dict)
    for path in sorted(out.glob("*/seed*/eval/*/per_lesion.csv")):
        data_set, seed, variant = path.parent.name, path.parents[2].name, path.parents[3].name
        with open(path, newline="") as fh:
            rows = {(r["case"], r["lesion"]): (r["size_bin"], float(r[metric])) for r in csv.DictReader(fh)}
        runs[(variant, data_set)][seed] = rows
    return runs


def per_lesion_means(by_seed: dict, seeds: list[str]) -> dict:
    """{lesion: (size bin, value averaged over ``seeds``)}; empty without seeds."""
    if not seeds:
        return {}
    lesions = set.intersection(*(set(by_seed[s]) for s in seeds))
    return {k: (by_seed[seeds[0]][k][0], float(np.mean([by_seed[s][k][1] for s in seeds]))) for k in lesions}


def summary_rows(runs: dict, data_sets: list[str], variants: list[str]) -> list[list[str]]:
    rows = []
    for variant in variants:
        for group in data_sets + ["real"]:
            members = [d for d in data_sets if d != "synthetic"] if group == "real" else [group]
            diffs: dict[str, list[float]] = defaultdict(list)
            values: dict[str, list[float]] = defaultdict(list)
            seed_diffs: dict[str, list[float]] = defaultdict(list)
            for data_set in members:
                ours, ref = runs.get((variant, data_set)), runs.get((REFERENCE, data_set))
                if not ours or not ref:
                    continue
                seeds = sorted(set(ours) & set(ref))
                for seed in seeds:
                    one, other = per_lesion_means(ours, [seed]), per_lesion_means(ref, [seed])
                    seed_diffs[seed] += [100 * (one[k][1] - other[k][1]) for k in set(one) & set(other)]
                mine, base = per_lesion_means(ours, seeds), per_lesion_means(ref, seeds)
                for key in set(mine) & set(base):
                    size = mine[key][0]
                    for bin_name in ("all", size):
                        diffs[bin_name].append(100 * (mine[key][1] - base[key][1]))
                        values[bin_name].append(100 * mine[key][1])
            for bin_name in ("all", *SIZE_BINS):
                d = np.asarray(diffs.get(bin_name, []))
                if d.size == 0:
                    continue
                se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
                mean = f"{np.mean(values[bin_name]):.1f}"
                diff = "–" if variant == REFERENCE else f"{d.mean():+.1f} ± {se:.1f}"
                per_seed = " / ".join(f"{np.mean(v):+.1f}" for _, v in sorted(seed_diffs.items()) if v)
                shown = per_seed if bin_name == "all" and variant != REFERENCE else ""
                rows.append([variant, group, bin_name, str(d.size), mean, diff, shown])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--metric", default="dice@5")
    args = parser.parse_args(argv)
    runs = read_runs(args.out, args.metric)
    variants = sorted({v for v, _ in runs}, key=lambda v: (v != REFERENCE, v))
    data_sets = sorted({d for _, d in runs}, key=lambda d: (d != "synthetic", d))
    seeds = {v: sorted({s for (vv, _), by in runs.items() if vv == v for s in by}) for v in variants}
    print(f"{args.metric} in %, mean over lesions of the seed-averaged value; difference vs {REFERENCE}: paired over")
    print(f"lesions, mean ± standard error over lesions. Seeds: {seeds}")
    print(f"\n| variant | data | lesion size | lesions | {args.metric} | difference vs {REFERENCE} | per seed |")
    print("|---|---|---|---|---|---|---|")
    for row in summary_rows(runs, data_sets, variants):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
