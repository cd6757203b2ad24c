"""`doc_to_visual` of the benchmark task (configs/tasks/bench): VideoMME's document format with longer, larger
synthetic videos than the smoke tasks', so that decoding and the vision pass weigh as they do on real benchmarks
(`scripts/bench_sweep_reuse.py`). Written on first use into $FLASHVID_CACHE/videos/smoke/bench/."""

from __future__ import annotations

from typing import Any

from lmms_eval_models.tasks.synthetic_videos import ensure_video

# 30 s at 10 fps, 256 x 256: decoding a video costs far more than with the smoke tasks' 16 frames of 64 x 64.
LONG_FRAMES = 300
LONG_SIZE = 256
LONG_FPS = 10


def videomme_long_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [ensure_video(f"bench/videomme_long/{doc['videoID']}.mp4", num_frames=LONG_FRAMES, size=LONG_SIZE,
                         fps=LONG_FPS)]
