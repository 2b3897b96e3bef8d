#!/usr/bin/env bash
# SGPM on/off and Zoom Loss vs Dice + CE on README command 1's recipe: fine-tune the shipped default model on the
# embedded synthetic training split (configs/cpu_tiny.json + configs/cpu_tiny_finetune.json), two seeds per
# variant, then evaluate every run on the embedded synthetic test split and on each folder of real image/label
# pairs given, and print the paired differences (experiments/ablation_report.py).
#
#   experiments/sgpm_loss_ablation.sh OUT_DIR [REAL_CASES_DIR ...]
#
# Variants: zoom_sgpm (README command 1 itself), sgpm_off (--sgpm#gate_mode closed: the fusion block never runs),
# dice_ce (experiments/configs/loss_dice_ce.json). A run whose model.pt exists is not trained again.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
out="$1"
shift
recipe="'bundle/configs/train.json','configs/cpu_tiny.json','configs/cpu_tiny_finetune.json'"
for seed in 0 1; do
    for variant in zoom_sgpm sgpm_off dice_ce; do
        overlay="" extra=()
        case "$variant" in
            sgpm_off) extra=(--sgpm#gate_mode closed) ;;
            dice_ce) overlay=",'experiments/configs/loss_dice_ce.json'" ;;
        esac
        run="$out/$variant/seed$seed"
        if [ ! -f "$run/models/model.pt" ]; then
            python -m monai.bundle run training --config_file "[$recipe$overlay]" --seed "$seed" \
                --ckpt_dir "$run/models" --output_dir "$run/runs" "${extra[@]}"
        fi
        python -m monai.bundle run evaluating --config_file "[$recipe,'bundle/configs/evaluate.json']" \
            --ckpt_path "$run/models/model.pt" --eval_output_dir "$run/eval/synthetic"
        for cases in "$@"; do
            python -m monai.bundle run evaluating --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" \
                --dataset_dir "$cases" --target_label 1 --ckpt_path "$run/models/model.pt" \
                --eval_output_dir "$run/eval/$(basename "$cases")"
        done
    done
done
python experiments/ablation_report.py "$out"
