#!/usr/bin/env bash
# The whole transfer study in one command (docs/transfer_study.md). Extra arguments go to experiments.transfer_study,
# e.g. `experiments/run_transfer_study.sh --budget smoke --output_dir bundle/runs/study_smoke` for the two-minute plumbing check.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo_root/tools/env.sh"
cd "$repo_root"
exec python -m experiments.transfer_study "$@"
