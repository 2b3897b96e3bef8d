#!/usr/bin/env bash
# Install, then train SGP-SAM (tiny CPU preset) on the embedded synthetic lesion dataset (generated on first use),
# then evaluate the held-out test split with the interactive click protocol. Extra arguments override the config,
# e.g. --max_epochs 5 or --device cuda:0.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
exec python -m monai.bundle run training \
    --config_file "['bundle/configs/train.json','configs/cpu_tiny.json']" "$@"
