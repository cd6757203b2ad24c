#!/usr/bin/env bash
# Paper Table 1: LLaVA-OneVision (R = 25/20/15/10 %) and LLaVA-Video (R = 20/10 %) against baselines.
# Runs the sweep(s) (resumable: rerun after a crash; finished runs are skipped), then writes the report
# (results/<sweep>/: CSV and Markdown beside the paper's numbers, accuracy_vs_retention.png).
# Extra arguments go to `flashvid-sweep run` (e.g. --output-root /scratch/runs, --stream).
set -euo pipefail
cd "$(dirname "$0")/.."
# Both sweeps run even if one has failed runs; the script exits with the last failure's status.
status=0
flashvid-sweep run configs/sweeps/table1_llava_onevision.yaml "$@" || status=$?
flashvid-sweep run configs/sweeps/table1_llava_video.yaml "$@" || status=$?
exit "$status"
