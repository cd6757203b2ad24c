#!/usr/bin/env bash
# Paper Table 3: Qwen2.5-VL frame extension at a fixed budget (80 frames R = 20 %, 160 frames R = 10 %; vanilla 16 frames).
# Runs the sweep(s) (resumable: rerun after a crash; finished runs are skipped), then writes the report
# (results/<sweep>/: CSV and Markdown beside the paper's numbers, accuracy_vs_retention.png).
# Extra arguments go to `flashvid-sweep run` (e.g. --output-root /scratch/runs, --stream).
set -euo pipefail
cd "$(dirname "$0")/.."
flashvid-sweep run configs/sweeps/table3_qwen2_5_vl_frames.yaml "$@"
