#!/usr/bin/env bash
# Install, then train SGP-SAM (tiny CPU preset) on the embedded synthetic lesion dataset (generated on first use),
# then evaluate the held-out test split with the interactive click protocol (Dice after 1/3/5/10 clicks, NoC).
# Extra arguments override the config of both steps, e.g. --max_epochs 5 or --device cuda:0.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
configs="'bundle/configs/train.json','configs/cpu_tiny.json'"
python -m monai.bundle run training --config_file "[$configs]" "$@"
python -m monai.bundle run evaluating --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json','configs/cpu_tiny.json']" "$@"
