"""Plumbing check of the transfer study (``--budget smoke``): every stage, method, evaluation and the report run.

It takes several minutes on a 2-core CPU, so it is not part of the test suite (``tools/test.sh``). Run it after
changing the study or the bundle workflows it drives, from the repository root::

    source tools/env.sh && python -m pytest experiments -q -p no:cacheprovider
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _study_env() -> dict:
    """The bundle's ``scripts`` importable, one thread per process, CPU only."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    paths = [str(REPO_ROOT / "bundle"), str(REPO_ROOT), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


def test_transfer_study_smoke_run(tmp_path):
    """``--budget smoke``: data, stage 1, every method through the bundle workflows, evaluation, cost and report."""
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.transfer_study", "--budget", "smoke", "--output_dir", str(out)],
        cwd=REPO_ROOT,
        env=_study_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "wall time:" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["job"]["method_id"] for r in runs][0] == "pretrained_only" and len(runs) == 8
    for run in runs:
        for dataset in ("synthetic", "real"):
            dice = run[dataset]["metrics"]["overall"]["dice@5"]["mean"]
            assert 0.0 <= dice <= 1.0
        assert run["real"]["num_lesions"] == 4  # brain1 (2 parts), brain2, breast1
    # stage 2 starts from the stage-1 checkpoint
    assert {r["job"]["pretrained_ckpt"] for r in runs[1:]} == {runs[0]["checkpoint"]}
    costs = results["costs"]
    assert costs["full_finetune"]["trainable_parameters"] == costs["full_finetune"]["total_parameters"]
    trainable = {m: c["trainable_parameters"] for m, c in costs.items()}
    assert trainable["decoder_only"] < trainable["sgp_sam"] == trainable["sgp_sam_no_gate"] < trainable["ma_sam"]
    assert trainable["ma_sam"] < trainable["tags"] < trainable["full_finetune"]
    assert all(c["decode_ms_per_click"] > 0 for c in costs.values())
    text = (out / "results.md").read_text()
    for name in ("Full fine-tuning", "Decoder-only", "SGPM without gate", "Dice+CE instead", "MA-SAM", "TAGS"):
        assert name in text
    assert "Real cases" in text and "by lesion size" in text
    assert (out / "dice_vs_clicks.png").stat().st_size > 10_000
