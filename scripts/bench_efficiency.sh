#!/usr/bin/env bash
# Paper Table 6 (efficiency) on this machine: vanilla vs FlashVID in one run, the paper's rows beside ours.
# On a CUDA GPU: the LLaVA-OneVision-7B shape (random weights, built on the GPU), 64 frames, R = 10 %, bf16,
# 1 warm-up + 3 timed calls per variant. Without a GPU: the small CPU shape (16 frames), in well under 5 minutes.
# Writes CSV and Markdown under results/efficiency/ (never overwriting earlier runs).
# Extra arguments go to flashvid-bench, e.g. --model llava_video_7b, --ratios 0.25,0.1, --checkpoint PATH,
# --video-dir DIR --limit 5 (see docs/efficiency.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  flashvid-bench --device cuda --model llava_onevision_7b --frames 64 --ratios 0.1 --dtype bfloat16 "$@"
else
  flashvid-bench --device cpu "$@"
fi
