#!/usr/bin/env bash
# Qwen3-VL-8B with the official script's settings (not in the paper: no paper rows to compare).
# Runs the sweep(s) (resumable: rerun after a crash; finished runs are skipped), then writes the report
# (results/<sweep>/: CSV and Markdown beside the paper's numbers, accuracy_vs_retention.png).
# Extra arguments go to `flashvid-sweep run` (e.g. --output-root /scratch/runs, --stream).
set -euo pipefail
cd "$(dirname "$0")/.."
flashvid-sweep run configs/sweeps/qwen3_vl.yaml "$@"
