#!/usr/bin/env bash
# Paper Table 13: TSTM merging threshold on LLaVA-OneVision and LLaVA-Video at R = 10 %.
# Runs the sweep(s) (resumable: rerun after a crash; finished runs are skipped), then writes the report
# (results/<sweep>/: CSV and Markdown beside the paper's numbers, accuracy_vs_retention.png).
# Extra arguments go to `flashvid-sweep run` (e.g. --output-root /scratch/runs, --stream).
set -euo pipefail
cd "$(dirname "$0")/.."
# Both sweeps run even if one has failed runs; the script exits with the last failure's status.
status=0
flashvid-sweep run configs/sweeps/table13_threshold_llava_onevision.yaml "$@" || status=$?
flashvid-sweep run configs/sweeps/table13_threshold_llava_video.yaml "$@" || status=$?
exit "$status"
