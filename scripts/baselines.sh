#!/usr/bin/env bash
# Every method (FlashVID, FastV, VisionZip, DivPrune, PruneVID, FastVID, uniform pooling, random selection) on
# LLaVA-OneVision-7B at R = 25/20/15/10 %, with vanilla: configs/sweeps/baselines.yaml (its CPU smoke variant:
# flashvid-sweep run configs/sweeps/baselines_smoke.yaml).
# Runs the sweep (resumable: rerun after a crash; finished runs are skipped), then writes the report
# (results/baselines/: CSV and Markdown, accuracy_vs_retention.png).
# Extra arguments go to `flashvid-sweep run` (e.g. --output-root /scratch/runs, --stream, --only '*.prunevid-*').
set -euo pipefail
cd "$(dirname "$0")/.."
flashvid-sweep run configs/sweeps/baselines.yaml "$@"
