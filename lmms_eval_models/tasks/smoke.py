"""`doc_to_visual` of the smoke tasks (configs/tasks/smoke): the benchmark's real document fields, mapped to
synthetic videos laid out like the real benchmark's video folders and written on first use.

Everything else the smoke tasks use (prompts, `process_results`, aggregation) is the built-in tasks' own code,
referenced from the YAML files by dotted path.
"""

from __future__ import annotations

from typing import Any

from lmms_eval_models.tasks.synthetic_videos import ensure_video


def videomme_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [ensure_video(f"videomme/data/{doc['videoID']}.mp4")]


def egoschema_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [ensure_video(f"egoschema/videos/{doc['video_idx']}.mp4")]


def longvideobench_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [ensure_video(f"longvideobench/videos/{doc['video_path']}")]


def mvbench_doc_to_visual(
    doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None
) -> list[str]:
    from lmms_eval.tasks.mvbench.utils import DATA_LIST

    folder = DATA_LIST[(lmms_eval_specific_kwargs or {})["sub_task"]]
    return [ensure_video(f"mvbench_video/{folder}/{doc['video']}")]


def mlvu_test_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [ensure_video(f"mlvu_test/{doc['video_name']}")]
