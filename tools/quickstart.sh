#!/usr/bin/env bash
# Install, then fine-tune SGP-SAM (tiny CPU preset) from the shipped default model on the embedded
# synthetic lesion dataset (generated on first use), then evaluate the held-out test split with the interactive
# click protocol (Dice after 1/3/5/10 clicks, NoC). Extra arguments override the config of both steps, e.g.
# --max_epochs 5, --device cuda:0, or --pretrained_ckpt null --max_epochs 20 to train from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
tiny="'configs/cpu_tiny.json','configs/cpu_tiny_finetune.json'"
python -m monai.bundle run training --config_file "['bundle/configs/train.json',$tiny]" "$@"
python -m monai.bundle run evaluating --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json',$tiny]" "$@"
