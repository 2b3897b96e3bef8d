"""evaluate_dataset on two small synthetic cases with a tiny random-init network: files, ranges, one row per lesion."""

import csv
import json
import math

import pytest
import torch
from scripts.evaluate import evaluate_dataset, format_markdown_table
from scripts.data.synthetic_data import generate_dataset
from scripts.data.transforms import get_preprocess_transforms, lesion_components, load_datalist


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("eval")
    # seed 3 at 48x48x16: two cases with two lesions each (few lesions keep the 20-click protocol fast)
    datalist = load_datalist(generate_dataset(root / "data", 0, 0, 2, seed=3, shape=(48, 48, 16)), "test")
    torch.manual_seed(0)
    from scripts.modeling import build_sgp_sam

    network = build_sgp_sam("tiny")
    summary = evaluate_dataset(network, datalist, root / "out", max_clicks=20, print_table=False)
    return summary, datalist, root / "out"


def test_outputs_written(result):
    summary, _, out = result
    for name in ("per_lesion.csv", "summary.json", "dice_vs_clicks.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["num_lesions"] == summary["num_lesions"] and on_disk["max_clicks"] == 20
    table = format_markdown_table(summary)
    assert table.splitlines()[0].startswith("| group | n | Dice@1") and "| overall |" in table


def test_one_row_per_lesion_and_ranges(result):
    summary, datalist, out = result
    pre = get_preprocess_transforms(1)
    expected = sum(len(lesion_components(pre(dict(item))["label"])[1]) for item in datalist)
    with open(out / "per_lesion.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == expected == summary["num_lesions"] > 0
    for row in rows:
        curve = [float(v) for v in row["dice_curve"].split()]
        assert len(curve) == 20 and all(0.0 <= v <= 1.0 for v in curve)
        assert 1 <= int(row["noc@85"]) <= 20 and 1 <= int(row["noc@90"]) <= 20
        assert row["size_bin"] in ("<10mm", "10-30mm", ">30mm")


def test_summary_metrics(result):
    summary, _, _ = result
    overall = summary["metrics"]["overall"]
    for k in (1, 3, 5, 10):
        assert 0.0 <= overall[f"dice@{k}"]["mean"] <= 1.0
    assert overall["noc@85"]["mean"] <= 20 and overall["noc@90"]["mean"] <= 20
    assert summary["mean_dice@5"] == overall["dice@5"]["mean"]
    wv = summary["whole_volume_dice"]
    assert wv["n"] == 2 and 0.0 <= wv["mean"] <= 1.0 and not math.isnan(wv["mean"])
    assert len(summary["dice_curve"]["overall"]) == 20


def test_deterministic(result, tmp_path):
    """Same network, same case: the first 3 Dice values repeat exactly (the protocol has no randomness)."""
    _, datalist, out = result
    torch.manual_seed(0)
    from scripts.modeling import build_sgp_sam

    evaluate_dataset(build_sgp_sam("tiny"), datalist[:1], tmp_path, max_clicks=3, print_table=False, plot=False)

    def curves(path, n):
        with open(path / "per_lesion.csv") as fh:
            return {(r["case"], r["lesion"]): r["dice_curve"].split()[:n] for r in csv.DictReader(fh)}

    short, full = curves(tmp_path, 3), curves(out, 3)
    assert short and all(full[key] == value for key, value in short.items())
