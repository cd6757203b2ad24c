#!/usr/bin/env bash
# Paper Table 4: token selection variants (ATS, DTS, w/ E.R., w/ C.A., ADTS) on LLaVA-OneVision at R = 10 %.
# Runs the sweep(s) (resumable: rerun after a crash; finished runs are skipped), then writes the report
# (results/<sweep>/: CSV and Markdown beside the paper's numbers, accuracy_vs_retention.png).
# Extra arguments go to `flashvid-sweep run` (e.g. --output-root /scratch/runs, --stream).
set -euo pipefail
cd "$(dirname "$0")/.."
flashvid-sweep run configs/sweeps/table4_selection.yaml "$@"
