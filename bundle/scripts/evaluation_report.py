"""Reports of an evaluation run (``scripts.evaluate``): per-lesion CSV, strict summary JSON, Dice-vs-clicks plot and
the Markdown table that the bundle prints."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .clicks import SIZE_BINS, number_of_clicks

__all__ = ["DICE_KS", "NOC_THRESHOLDS", "format_markdown_table", "json_safe", "plot_curves", "write_csv"]

DICE_KS = (1, 3, 5, 10)
NOC_THRESHOLDS = (0.85, 0.90)


def json_safe(obj: Any) -> Any:
    """NaN -> None so summary.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_csv(records: list[dict], path: Path, max_clicks: int) -> None:
    fields = ["case", "lesion", "num_voxels", "volume_mm3", "voxels_in_crop", "equivalent_diameter_mm", "size_bin"]
    fields += ["truncated", "crop_start", "clicks_used", *[f"dice@{k}" for k in DICE_KS]]
    fields += [f"noc@{round(t * 100)}" for t in NOC_THRESHOLDS] + ["dice_curve"]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in records:
            row = {f: r[f] for f in fields[:10]}
            row["volume_mm3"] = f"{r['volume_mm3']:.1f}"
            row["equivalent_diameter_mm"] = f"{r['equivalent_diameter_mm']:.2f}"
            row["truncated"] = int(r["truncated"])
            row["crop_start"] = " ".join(str(v) for v in r["crop_start"])
            for k in DICE_KS:
                row[f"dice@{k}"] = f"{r['dice'][min(k, len(r['dice'])) - 1]:.4f}"
            for t in NOC_THRESHOLDS:
                row[f"noc@{round(t * 100)}"] = number_of_clicks(r["dice"], t, max_clicks)
            row["dice_curve"] = " ".join(f"{v:.4f}" for v in r["dice"])
            writer.writerow(row)
    os.replace(tmp, path)


def plot_curves(mean_curves: dict[str, list[float]], counts: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for group, curve in mean_curves.items():
        if curve:
            ax.plot(
                range(1, len(curve) + 1),
                curve,
                marker="o",
                ms=3,
                lw=2 if group == "overall" else 1,
                label=f"{group} (n={counts[group]})",
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Dice vs clicks (per lesion)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_markdown_table(summary: Mapping[str, Any]) -> str:
    """Markdown table: group, n, Dice@1/3/5/10 (%), NoC@85/90; plus the whole-volume Dice line."""
    metrics = summary.get("metrics") or {}
    head = ["group", "n", *[f"Dice@{k} (%)" for k in DICE_KS], *[f"NoC@{round(t * 100)}" for t in NOC_THRESHOLDS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in ("overall", *SIZE_BINS):
        row = metrics.get(group)
        if row is None:
            continue
        n = row[f"dice@{DICE_KS[0]}"]["n"]
        dices = [row[f"dice@{k}"]["mean"] * 100 for k in DICE_KS]
        nocs = [row[f"noc@{round(t * 100)}"]["mean"] for t in NOC_THRESHOLDS]
        cells = [group, str(n)] + [("-" if math.isnan(v) else f"{v:.2f}") for v in dices]
        cells += [("-" if math.isnan(v) else f"{v:.2f}") for v in nocs]
        lines.append("| " + " | ".join(cells) + " |")
    wv = summary.get("whole_volume_dice", {})
    if wv.get("n"):
        lines.append(
            f"\nWhole-volume Dice after {wv['clicks']} clicks per lesion: {wv['mean'] * 100:.2f} % "
            f"(n = {wv['n']} cases)"
        )
    return "\n".join(lines)
