#!/usr/bin/env bash
# Rebuilds bundle/models/pretrained/sgp_sam_tiny_synthetic.pt. That is the tiny preset's stand-in for a pretrained
# foundation checkpoint (what sam_med3d_turbo.pth is for the full size), and README command 1 fine-tunes it.
#
# It trains configs/cpu_tiny.json from scratch on a separate synthetic pretraining corpus: generator seed 1000,
# 160 training and 12 validation volumes. The corpus shares no volume with the default dataset (seed 0), so that
# dataset's test split stays held out. The best validation Dice@5 weights are stored in float16 (2.3 MB), with the
# network and preprocessing they were trained with (scripts/model_file.py).
# Measured on the 2-core dev CPU: 59 min (OMP_NUM_THREADS=1, the other core busy with other jobs); validation
# Dice@5 0.52 at epoch 8, best 0.60 at epoch 16. Extra arguments override the training config.
# It pins the Zoom Loss's alpha_fg to 0.5, the value the shipped file was trained with (cpu_tiny now fine-tunes at
# 0.25), and the click loop the shipped file was trained with: the decoder gets the new click only and the masks
# are not made click-consistent (cpu_tiny now fine-tunes with multi_click and click_consistent on). One difference a rerun cannot undo: the shipped refiner was pretrained on each round's new click only;
# the current code gives it every click so far, in pretraining and in README command 1's fine-tuning.
# A longer recipe was measured and not adopted (bundle/docs/README.md, "Results"): 240 volumes, 16 epochs,
# alpha_fg 0.25, every click (50 min, 2 threads) reached validation Dice@5 0.64, but 57.9 % test Dice@5 after
# README command 1's fine-tuning, against 60.4 % from the shipped file.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
corpus=bundle/data/synthetic_pretrain
work=bundle/runs/pretrain_tiny
out=bundle/models/pretrained/sgp_sam_tiny_synthetic.pt
(cd bundle && python -m scripts.data.synthetic_data --output_dir "../$corpus" --num_train 160 --num_val 12 --num_test 0 --seed 1000)
python -m monai.bundle run training --config_file "['bundle/configs/train.json','configs/cpu_tiny.json']" \
    --dataset_dir "$corpus" --ckpt_dir "$work/models" --output_dir "$work" --max_epochs 18 --val_interval 2 \
    --zoom_loss#alpha_fg 0.5 --network_def#multi_click False --network_def#click_consistent False "$@"
python - "$work/models/model.pt" "$out" <<'EOF'
import os
import sys

from scripts.model_file import read_model_file, save_model_file

source, target = sys.argv[1:]
model = read_model_file(source)  # the bundle's model file: weights + network + preprocessing
os.makedirs(os.path.dirname(target), exist_ok=True)
save_model_file(model.network, model.preprocessing, target, half=True)
print(f"wrote {target} ({os.path.getsize(target) / 2**20:.1f} MiB) from {source}: {model.preprocessing}")
EOF
