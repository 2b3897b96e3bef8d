"""The transfer study's report: per-method means and spreads over seeds, the Markdown tables with the noise flag,
the Dice-vs-clicks plot and the hardware line.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Sequence

from .transfer_setup import DICE_KS, METHODS, NO_TRANSFER, NOC_KEYS, REFERENCE_METHOD, SIZE_BINS


def _metric(summary: dict | None, group: str, key: str) -> float:
    value = ((((summary or {}).get("metrics") or {}).get(group) or {}).get(key) or {}).get("mean")
    return float("nan") if value is None else float(value)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else float("nan"), len(finite)


def aggregate(results: list[dict[str, Any]], dataset: str) -> dict[str, dict[str, Any]]:
    """Per method: mean, std (over seeds, ddof=1) and n of each seed's lesion-mean metric, and the mean curve."""
    by_method: dict[str, list[dict]] = {}
    for result in results:
        if dataset in result:
            by_method.setdefault(result["job"]["method_id"], []).append(result[dataset])
    table: dict[str, dict[str, Any]] = {}
    for method, summaries in by_method.items():
        row: dict[str, Any] = {"seeds": len(summaries), "lesions": summaries[0].get("num_lesions")}
        keys = [f"dice@{k}" for k in DICE_KS] + list(NOC_KEYS)
        for key in keys:
            row[key] = _mean_std([_metric(s, "overall", key) for s in summaries])
        for group in SIZE_BINS:
            for key in ("dice@1", "dice@5"):
                row[f"{group} {key}"] = _mean_std([_metric(s, group, key) for s in summaries])
            row[f"{group} n"] = ((summaries[0].get("metrics") or {}).get(group) or {}).get("dice@1", {}).get("n", 0)
        curves = [s["dice_curve"]["overall"] for s in summaries if (s.get("dice_curve") or {}).get("overall")]
        row["curve_mean"] = [statistics.fmean(c) for c in zip(*curves)] if curves else []
        row["curve_std"] = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*curves)] if curves else []
        table[method] = row
    return table


def _pm(stats: tuple[float, float, int], scale: float = 1.0, digits: int = 1) -> str:
    mean, std, n = stats
    if n == 0 or not math.isfinite(mean):
        return "–"
    if n < 2 or not math.isfinite(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _name(method: str) -> str:
    return "Stage-1 checkpoint, no transfer" if method == NO_TRANSFER else METHODS[method][0]


def format_tables(
    tables: dict[str, dict[str, dict[str, Any]]], costs: dict[str, dict[str, Any]], methods: Sequence[str]
) -> str:
    """Markdown: one metrics table per dataset (Dice in %, mean ± std over seeds), the size bins of the synthetic
    split, and each method's Dice@5 difference from the reference with a 2-standard-error noise flag."""
    lines: list[str] = []
    order = (NO_TRANSFER, *methods)
    titles = {"synthetic": "Synthetic test split", "real": "Real cases (NRRD)"}
    for dataset, table in tables.items():
        if not table:
            continue
        first = next(iter(table.values()))
        lines += [f"### {titles.get(dataset, dataset)} ({first['lesions']} lesions per run)", ""]
        head = ["method", "seeds", "trainable / total params", *[f"Dice@{k} (%)" for k in DICE_KS]]
        head += ["NoC@85", "NoC@90", "decoder ms/click", "encoder ms"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in order:
            if method not in table:
                continue
            row, cost = table[method], costs.get(method, {})
            params = "–"
            if "total_parameters" in cost:
                params = f"{cost['trainable_parameters']:,} / {cost['total_parameters']:,}"
            cells = [_name(method), str(row["seeds"]), params]
            cells += [_pm(row[f"dice@{k}"], 100.0) for k in DICE_KS]
            cells += [_pm(row[key], 1.0) for key in NOC_KEYS]
            cells += [f"{cost['decode_ms_per_click']:.1f}" if "decode_ms_per_click" in cost else "–"]
            cells += [f"{cost['encode_ms']:.0f}" if "encode_ms" in cost else "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    synthetic = tables.get("synthetic") or {}
    if synthetic:
        first = next(iter(synthetic.values()))
        head = ["method", *[f"{g} Dice@{k} (%)" for g in SIZE_BINS for k in (1, 5)]]
        counts = ", ".join(f"{g}: {first[f'{g} n']}" for g in SIZE_BINS)
        lines += [f"### Synthetic test split by lesion size (lesions per run: {counts})", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in order:
            if method in synthetic:
                row = synthetic[method]
                cells = [_name(method)] + [_pm(row[f"{g} dice@{k}"], 100.0) for g in SIZE_BINS for k in (1, 5)]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for dataset, table in tables.items():
        if REFERENCE_METHOD not in table:
            continue
        ref = table[REFERENCE_METHOD]["dice@5"]
        lines += [
            f"### Dice@5 difference from {_name(REFERENCE_METHOD)} ({titles.get(dataset, dataset)})",
            "",
            "Flagged when |Δ| > 2 standard errors of the difference (sqrt(s1²/n1 + s2²/n2), seeds as samples).",
            "",
            "| method | Δ Dice@5 (points) | 2 SE | beyond noise? |",
            "|---|---|---|---|",
        ]
        for method in methods:
            if method == REFERENCE_METHOD or method not in table:
                continue
            mean, std, n = table[method]["dice@5"]
            diff = 100.0 * (mean - ref[0])
            if n > 1 and ref[2] > 1:
                two_se = 200.0 * math.sqrt(std**2 / n + ref[1] ** 2 / ref[2])
                verdict = "yes" if abs(diff) > two_se else "no"
                lines.append(f"| {_name(method)} | {diff:+.1f} | {two_se:.1f} | {verdict} |")
            else:
                lines.append(f"| {_name(method)} | {diff:+.1f} | – | needs ≥ 2 seeds |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(tables: dict[str, dict[str, dict[str, Any]]], methods: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    panels = [(d, t) for d, t in tables.items() if t]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (dataset, table) in zip(axes[0], panels):
        for method in (NO_TRANSFER, *methods):
            row = table.get(method)
            if not row or not row["curve_mean"]:
                continue
            clicks = range(1, len(row["curve_mean"]) + 1)
            style = dict(ls="--", color="grey") if method == NO_TRANSFER else {}
            line = ax.plot(clicks, row["curve_mean"], marker="o", ms=2.5, lw=1.5, label=_name(method), **style)[0]
            if row["seeds"] > 1:
                low = [m - s for m, s in zip(row["curve_mean"], row["curve_std"])]
                high = [m + s for m, s in zip(row["curve_mean"], row["curve_std"])]
                ax.fill_between(clicks, low, high, color=line.get_color(), alpha=0.12)
        ax.set_title(f"{dataset}: mean Dice per lesion (± std over seeds)")
        ax.set_xlabel("clicks")
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hardware_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} usable cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text
