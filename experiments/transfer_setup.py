"""The transfer study's definition: its methods (the presets in configs/), its budgets and its data (the synthetic
lesions with organ masks, the stage-1 organ targets and the real cases). See ``experiments.transfer_study``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scripts import BUNDLE_ROOT

REPO_ROOT = Path(BUNDLE_ROOT).parent
TRAIN_JSON = Path(BUNDLE_ROOT) / "configs" / "train.json"
EVALUATE_JSON = Path(BUNDLE_ROOT) / "configs" / "evaluate.json"
CPU_TINY_JSON = REPO_ROOT / "configs" / "cpu_tiny.json"

# method id -> (table name, preset in configs/)
METHODS: dict[str, tuple[str, str]] = {
    "full_finetune": ("Full fine-tuning", "method_full_finetune.json"),
    "decoder_only": ("Decoder-only (frozen encoder)", "method_decoder_only.json"),
    "sgp_sam": ("SGP-SAM (SGPM + Zoom Loss)", "method_sgp_sam.json"),
    "sgp_sam_no_gate": ("SGP-SAM, SGPM without gate", "method_sgp_sam_no_gate.json"),
    "sgp_sam_dice_ce": ("SGP-SAM, Dice+CE instead of Zoom Loss", "method_sgp_sam_dice_ce.json"),
    "ma_sam": ("MA-SAM (3D adapters + FacT)", "method_ma_sam.json"),
    "tags": ("TAGS (anatomy + semantic prompts)", "method_tags.json"),
}
PRETRAIN_METHOD = "full_finetune"  # stage 1 trains the whole plain backbone
NO_TRANSFER = "pretrained_only"
REFERENCE_METHOD = "full_finetune"  # the paper's baseline, for the noise comparison
PRETRAIN_DATA_SEED = 1000  # stage-1 cases are drawn apart from the lesion splits
DICE_KS = (1, 3, 5, 10)
NOC_KEYS = ("noc@85", "noc@90")
SIZE_BINS = ("<10mm", "10-30mm", ">30mm")


@dataclass(frozen=True)
class Budget:
    """Everything that sets the study's cost; every method gets the same."""

    num_train: int  # stage-2 lesion cases (one validation case is generated but not used)
    num_test: int
    num_pretrain: int  # stage-1 organ cases
    shape: tuple[int, int, int]  # synthetic voxel grid
    pretrain_iterations: int
    iterations: int  # stage-2 iterations per method and seed
    batch_size: int
    num_rounds: int  # simulated click rounds per training step
    max_clicks: int  # evaluation clicks per lesion (NoC cap)
    seeds: int
    latency_clicks: int


BUDGETS = {
    # Plumbing check (tests): every stage, method and evaluation runs, on a few tiny cases.
    "smoke": Budget(
        num_train=2,
        num_test=1,
        num_pretrain=2,
        shape=(64, 64, 20),
        pretrain_iterations=2,
        iterations=2,
        batch_size=1,
        num_rounds=2,
        max_clicks=10,
        seeds=1,
        latency_clicks=5,
    ),
    # Sized for a 2-core CPU: about 35 minutes for 7 methods x 3 seeds (docs/transfer_study.md, "Cost").
    "full": Budget(
        num_train=24,
        num_test=8,
        num_pretrain=24,
        shape=(128, 128, 40),
        pretrain_iterations=400,
        iterations=100,
        batch_size=2,
        num_rounds=6,
        max_clicks=20,
        seeds=3,
        latency_clicks=20,
    ),
}


def real_cases(data_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """``*_image.nrrd`` / ``*_label.nrrd`` pairs in ``data_dir``; by default the study's three MR cases in
    ``tests/data`` (brain1, brain2, breast1; the CT crop there is left out, as when the study was run)."""
    root = Path(data_dir or REPO_ROOT / "tests" / "data")
    images = sorted(root.glob("*_image.nrrd"))
    if data_dir is None:
        images = [root / f"{case}_image.nrrd" for case in ("brain1", "brain2", "breast1")]
    items = []
    for image in images:
        label = image.with_name(image.name.replace("_image.nrrd", "_label.nrrd"))
        if label.is_file():
            items.append({"image": str(image), "label": str(label)})
    return items


def prepare_datasets(data_root: Path, budget: Budget) -> tuple[Path, Path]:
    """Stage-2 lesion dataset (with organ masks, for TAGS) and the stage-1 dataset whose label is the organ mask."""
    from scripts.data.synthetic_data import generate_dataset

    lesions = data_root / "lesions"
    shape = tuple(budget.shape)
    generate_dataset(lesions, budget.num_train, 1, budget.num_test, seed=0, shape=shape, organ_masks=True)
    source = data_root / "pretrain_cases"
    source_json = generate_dataset(source, budget.num_pretrain, 1, 0, PRETRAIN_DATA_SEED, shape, organ_masks=True)
    meta = json.loads(source_json.read_text())
    organ_targets = data_root / "pretrain_organs"
    organ_targets.mkdir(parents=True, exist_ok=True)
    splits = {
        split: [{"image": str(source / i["image"]), "label": str(source / i["organ"])} for i in meta[split]]
        for split in ("training", "validation", "test")
    }
    description = "stage-1 targets of the transfer study: the organ masks of " + str(source)
    dataset = {"name": "transfer-study-organs", "description": description, "labels": {"1": "organ"}, **splits}
    (organ_targets / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return lesions, organ_targets


def method_configs(method: str) -> list[str]:
    return [str(TRAIN_JSON), str(CPU_TINY_JSON), str(REPO_ROOT / "configs" / METHODS[method][1])]


def network_overrides(network_preset: str = "tiny") -> dict[str, Any]:
    """Config overrides every job shares.

    The click-map prompt, the refiner and click-consistent masks stay off, the decoder gets the new click only, and
    the Zoom Loss keeps its region-mean zoom term: the study compares the published methods' own prompt and output
    paths, and the recorded results in docs/transfer_study.md were measured that way.
    """
    from scripts.modeling import PRESETS

    overrides: dict[str, Any] = {
        "network_def#click_map": False,
        "network_def#refiner": False,
        "network_def#click_consistent": False,
        "network_def#multi_click": False,
        "zoom_loss#background_divisor": "region",
    }
    if network_preset != "tiny":
        overrides.update({"preset": network_preset, "preprocessing#roi_size": PRESETS[network_preset]["img_size"]})
    return overrides


@dataclass
class StudyPlan:
    """What every job of one study shares: budget, datasets, real cases, overrides and threads per job."""

    budget: Budget
    lesions: Path
    organs: Path
    real_items: list[dict[str, str]]
    network_overrides: dict[str, Any]
    threads: int

    def job(self, method: str, seed: int, run_dir: Path, train: bool, **kw: Any) -> dict[str, Any]:
        """One job's spec, in plain JSON types, so it compares equal with a stored ``result.json``."""
        spec = dict(
            method=method,
            method_id=kw.pop("method_id", method),
            seed=seed,
            run_dir=str(run_dir),
            train=train,
            train_dataset=str(self.lesions),
            eval_dataset=str(self.lesions),
            pretrained_ckpt=None,
            iterations=self.budget.iterations,
            batch_size=self.budget.batch_size,
            num_rounds=self.budget.num_rounds,
            max_clicks=self.budget.max_clicks,
            real_items=self.real_items,
            network_overrides=self.network_overrides,
            threads=self.threads,
            budget=asdict(self.budget),
        )
        spec.update(kw)
        return json.loads(json.dumps(spec))
