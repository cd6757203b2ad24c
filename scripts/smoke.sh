#!/usr/bin/env bash
# The CPU smoke sweep: tiny checkpoints x the five smoke tasks x {vanilla, R = 25 %, R = 10 %}; ends with the table and the plot's path.
# Runs the sweep(s) (resumable: rerun after a crash; finished runs are skipped), then writes the report
# (results/<sweep>/: CSV and Markdown beside the paper's numbers, accuracy_vs_retention.png).
# Extra arguments go to `flashvid-sweep run` (e.g. --output-root /scratch/runs, --stream).
set -euo pipefail
cd "$(dirname "$0")/.."
flashvid-sweep run configs/sweeps/smoke.yaml "$@"
