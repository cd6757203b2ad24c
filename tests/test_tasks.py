"""Smoke tasks (configs/tasks/smoke) and the paper-protocol variants (configs/tasks/paper), with lmms-eval's own
`dummy` model: real document formats, the built-in prompts and scoring, videos readable by lmms-eval's loader."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PAPER_TASKS_DIR, SMOKE_TASKS, SMOKE_TASKS_DIR

from lmms_eval_models.tasks.paper import mlvu_extract_answer, videomme_extract_answer
from lmms_eval_models.tasks.synthetic_videos import ensure_video, synthetic_frames, write_video

# What the dummy model's fixed answer "A" scores on the smoke documents, by the built-in scorers.
EXPECTED_WITH_ANSWER_A = {
    ("videomme_smoke", "videomme_perception_score,none"): 100 / 3,  # answers A, B, C
    ("egoschema_smoke", "score,none"): 0.0,  # answers 2, 1
    ("longvideobench_val_v_smoke", "lvb_acc,none"): 0.0,  # correct choices 1, 1
    ("mvbench_smoke_action_antonym", "mvbench_accuracy,none"): 50.0,  # first candidate right once of twice
    ("mvbench_smoke_fine_grained_action", "mvbench_accuracy,none"): 100.0,
    ("mlvu_test_smoke", "mlvu_percetion_score,none"): 0.0,  # answers B, F
}


def test_smoke_tasks_score_with_builtin_code(evaluate):
    results = evaluate("dummy", "response=A,decode_num_frames=4", SMOKE_TASKS)
    for (task, metric), expected in EXPECTED_WITH_ANSWER_A.items():
        assert results["results"][task][metric] == pytest.approx(expected), (task, metric)
    documents = {task: len(samples) for task, samples in results["samples"].items()}
    assert documents == {"videomme_smoke": 3, "egoschema_smoke": 2, "longvideobench_val_v_smoke": 2,
                         "mvbench_smoke_action_antonym": 2, "mvbench_smoke_fine_grained_action": 1,
                         "mlvu_test_smoke": 2}  # fmt: skip


def test_smoke_videos_are_deterministic_and_decodable(tmp_path):
    import decord

    first = ensure_video("videomme/data/x.mp4", tmp_path / "a")
    second = ensure_video("videomme/data/x.mp4", tmp_path / "b")
    frames = [decord.VideoReader(path).get_batch(list(range(16))).asnumpy() for path in (first, second)]
    np.testing.assert_array_equal(frames[0], frames[1])
    assert frames[0].shape == (16, 64, 64, 3)
    # lossy MPEG-4, but close to what was written
    assert np.abs(frames[0].astype(int) - synthetic_frames("videomme/data/x.mp4").astype(int)).mean() < 12
    # the two scenes differ: consecutive frames across the cut are far apart
    assert (
        np.abs(frames[0][8].astype(int) - frames[0][7].astype(int)).mean()
        > 3 * np.abs(frames[0][7].astype(int) - frames[0][6].astype(int)).mean()
    )


@pytest.mark.parametrize(
    ("response", "letter"),
    [("B) It changes colour once", "B"), ("F", "F"), ("(E) six", "E"), (" C ) x", "C"), ("I think D.", "D"),
     ("no idea", "")],
)  # fmt: skip
def test_mlvu_paper_extraction_reads_six_options(response, letter):
    assert mlvu_extract_answer(response) == letter


@pytest.mark.parametrize(
    ("response", "letter"),
    # "Answer: D" reads as A: 0.5.0 takes the first capital A-D anywhere, a quirk the paper's numbers carry
    [("The best answer is B.", "B"), ("C", "C"), ("Answer: D", "A"), ("the answer is unclear", ""),
     ("E", ""), ("This long answer has more than ten words and names no option letter at all", "")],
)  # fmt: skip
def test_videomme_paper_extraction(response, letter):
    assert videomme_extract_answer(response) == letter


def _local_variant(tmp_path, paper_yaml: str, task: str, split: str, data_file: str) -> None:
    """A task that includes the paper variant and reads the smoke documents: how a user points it at local data."""
    (tmp_path / f"{task}.yaml").write_text(
        f"include: {PAPER_TASKS_DIR / paper_yaml}\n"
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {SMOKE_TASKS_DIR / 'data' / data_file}\n"
    )


def test_paper_mlvu_variant_scores_all_six_options(tmp_path, evaluate, monkeypatch):
    root = tmp_path / "data-root"
    for name in ("smoke-mlvu-0001.mp4", "smoke-mlvu-0002.mp4"):
        write_video(root / "mlvu_test" / name, synthetic_frames(name, num_frames=4))
    monkeypatch.setenv("FLASHVID_DATA_ROOT", str(root))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _local_variant(tasks, "mlvu_test_paper.yaml", "mlvu_test_paper_local", "test", "mlvu_test.jsonl")
    paper = evaluate("dummy", "response=F) One", ["mlvu_test_paper_local"], include_path=tasks)
    builtin = evaluate("dummy", "response=F) One", ["mlvu_test_smoke"])
    # "F" answers the second document (of two task types): the paper's six-option reading scores it
    assert paper["results"]["mlvu_test_paper_local"]["mlvu_percetion_score,none"] > 0
    assert builtin["results"]["mlvu_test_smoke"]["mlvu_percetion_score,none"] == 0  # 0.7.3 reads A-D only
    prompt = paper["samples"]["mlvu_test_paper_local"][0]["arguments"][0]
    assert prompt.endswith("\nOnly give the best option. Best option: (")


def test_paper_variant_missing_video_names_the_path(tmp_path, evaluate, monkeypatch):
    monkeypatch.setenv("FLASHVID_DATA_ROOT", str(tmp_path / "empty"))
    _local_variant(tmp_path, "videomme_paper.yaml", "videomme_paper_local", "test", "videomme.jsonl")
    with pytest.raises(FileNotFoundError, match=r"empty/videomme/data/smoke000001\.mp4"):
        evaluate("dummy", "response=A,read_bytes=1", ["videomme_paper_local"], include_path=tmp_path)


def test_egoschema_paper_records_nan_when_the_remote_scorer_is_unreachable(tmp_path, monkeypatch):
    """lmms-eval's full-set EgoSchema aggregation raises offline (and lmms-eval then drops the whole run's
    results); the suite's variant keeps the submission file and records NaN. Only the network is replaced."""
    import json
    import math
    import types

    import requests
    from lmms_eval.tasks.egoschema import utils as egoschema_utils

    from lmms_eval_models.tasks.paper import egoschema_aggregate_submission

    def unreachable(*args, **kwargs):
        raise requests.exceptions.ConnectionError("no route to host")

    monkeypatch.setattr(egoschema_utils.requests, "post", unreachable)
    monkeypatch.setattr(egoschema_utils.time, "sleep", lambda seconds: None)
    args = types.SimpleNamespace(output_path=str(tmp_path))
    with pytest.warns(UserWarning, match="EgoSchema full set not scored"):
        score = egoschema_aggregate_submission([{"vid_a": 1}, {"vid_b": 4}], args)
    assert math.isnan(score)
    (submission,) = (tmp_path / "submissions").glob("*.json")
    assert json.loads(submission.read_text()) == {"vid_a": 1, "vid_b": 4}


def test_egoschema_paper_passes_the_remote_score_through(tmp_path, monkeypatch):
    import types

    from lmms_eval.tasks.egoschema import utils as egoschema_utils

    from lmms_eval_models.tasks.paper import egoschema_aggregate_submission

    class Answer:
        status_code = 200
        text = "Total result: 3 correct, 1 wrong, 0 missing, 0 invalid, accuracy: 0.75"

    monkeypatch.setattr(egoschema_utils.requests, "post", lambda *args, **kwargs: Answer())
    args = types.SimpleNamespace(output_path=str(tmp_path))
    assert egoschema_aggregate_submission([{"v": 1}], args) == 75.0
