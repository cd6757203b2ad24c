#!/usr/bin/env bash
# Paper Table 7: Qwen2.5-VL at R = 25/15 % against baselines.
# Runs the sweep(s) (resumable: rerun after a crash; finished runs are skipped), then writes the report
# (results/<sweep>/: CSV and Markdown beside the paper's numbers, accuracy_vs_retention.png).
# Extra arguments go to `flashvid-sweep run` (e.g. --output-root /scratch/runs, --stream).
set -euo pipefail
cd "$(dirname "$0")/.."
flashvid-sweep run configs/sweeps/table7_qwen2_5_vl.yaml "$@"
