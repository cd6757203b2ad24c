"""The paper's evaluation protocol (lmms-eval 0.5.0 as bundled with the official FlashVID code) where lmms-eval
0.7.3 differs, for the suite's task variants in configs/tasks/paper. See docs/tasks.md.

Prompts and aggregation stay the built-in tasks' own; what changes is answer extraction (and MLVU's post-prompt,
set in the YAML), plus `doc_to_visual`, which looks under `$FLASHVID_DATA_ROOT` (falling back to `$HF_HOME`, as
the built-in tasks do) and raises FileNotFoundError naming the missing video instead of exiting.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# Phrases 0.5.0's VideoMME scorer removes before looking for the answer letter.
VIDEOMME_ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)
MLVU_TEST_LETTERS = "ABCDEF"  # MLVU-Test questions have six options


def data_root() -> Path:
    """$FLASHVID_DATA_ROOT if set, else $HF_HOME (default ~/.cache/huggingface), where lmms-eval unpacks videos."""
    root = os.environ.get("FLASHVID_DATA_ROOT") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return Path(root).expanduser()


def find_video(candidates: list[str]) -> str:
    """The first existing path among `candidates` (relative to the data root); FileNotFoundError naming them."""
    root = data_root()
    for candidate in candidates:
        path = root / candidate
        if path.is_file():
            return str(path)
    tried = ", ".join(str(root / candidate) for candidate in candidates)
    raise FileNotFoundError(
        f"video file not found: {tried} (set FLASHVID_DATA_ROOT or HF_HOME; see docs/tasks.md)"
    )


def _with_extensions(path: str, extensions: tuple[str, ...]) -> list[str]:
    stem = path.rsplit(".", 1)[0]
    return [f"{stem}{extension}" for extension in extensions]


# ------------------------------------------------------------------------------------------------ VideoMME


def videomme_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [find_video(_with_extensions(f"videomme/data/{doc['videoID']}.mp4", (".mp4", ".MP4", ".mkv")))]


def videomme_extract_answer(response: str) -> str:
    """0.5.0's rule: drop the answer prefixes; give up on long answers without a letter; else the first A-D."""
    text = response.strip()
    for prefix in VIDEOMME_ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    if len(text.split()) > 10 and not re.search("[ABCD]", text):
        return ""
    match = re.search("[ABCD]", text)
    return match.group(0) if match else ""


def videomme_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """The built-in VideoMME result record, with the answer read by 0.5.0's rule."""
    from lmms_eval.tasks.videomme.utils import videomme_process_results as builtin

    record = builtin(doc, results)
    data = dict(record["videomme_perception_score"])
    data["pred_answer"] = videomme_extract_answer(results[0])
    data["score"] = 1.0 if data["pred_answer"].lower() == str(doc["answer"]).lower() else 0.0
    return {"videomme_perception_score": data}


# --------------------------------------------------------------------------------------------------- MLVU


def mlvu_test_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    return [find_video([f"mlvu_test/{doc['video_name']}"])]


def mlvu_extract_answer(response: str, letters: str = MLVU_TEST_LETTERS) -> str:
    """The option letter of an answer to "... Best option: (": the letter before the closing ")".

    The model continues the opened parenthesis ("B) It changes ..."), so the answer is the letter right at the
    start; failing that, the first stand-alone option letter anywhere in the answer.
    """
    text = response.strip()
    start = re.match(rf"\(?\s*([{letters}])\s*\)", text) or re.match(rf"\(?\s*([{letters}])\b", text)
    if start:
        return start.group(1)
    anywhere = re.search(rf"\b([{letters}])\b", text)
    return anywhere.group(1) if anywhere else ""


def mlvu_test_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """The built-in MLVU record, with the answer read among all six options."""
    data = {
        "question_id": doc["question"],
        "task_type": doc["task_type"],
        "pred_answer": mlvu_extract_answer(results[0]),
        "answer": doc["answer"],
    }
    return {"mlvu_percetion_score": data}  # the built-in metric name, spelling included


# ------------------------------------------------------------------------------------------ LongVideoBench


def longvideobench_doc_to_visual(doc: dict[str, Any]) -> list[str]:
    """0.7.3 reads `datasets/longvideobench/videos`; 0.5.0 read `longvideobench/videos`: accept either."""
    return [
        find_video(
            [
                f"datasets/longvideobench/videos/{doc['video_path']}",
                f"longvideobench/videos/{doc['video_path']}",
            ]
        )
    ]


def egoschema_aggregate_submission(results: list[dict[str, int]], args: Any) -> float:
    """EgoSchema full-set accuracy (%) from its remote scorer, or NaN when the scorer cannot be reached.

    lmms-eval's own aggregation saves the submission file, posts it, and raises after its retries when the server
    is unreachable (the usual case on GPU nodes without internet); lmms-eval then drops the results of every task
    of that run. Here the other tasks' scores survive and the saved submission file can be scored later.
    """
    import math
    import warnings

    from lmms_eval.tasks.egoschema.utils import egoschema_aggregate_mc

    try:
        return egoschema_aggregate_mc(results, args)
    except RuntimeError as error:
        warnings.warn(f"EgoSchema full set not scored (recorded as NaN): {error}", stacklevel=1)
        return math.nan
