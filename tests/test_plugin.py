"""The four lmms-eval model classes on tiny checkpoints, in-process (lmms-eval's simple_evaluate)."""

from __future__ import annotations

import math
import re
import statistics

import pytest

from lmms_eval_models.models.common import FIGURE_NAMES
from lmms_eval_models.tiny_checkpoints import FAMILIES

# Few frames and small Qwen pixel budgets keep one sample well under a second on CPU.
FAST_ARGS = {
    "llava_onevision": "max_frames_num=8",
    "llava_video": "max_frames_num=8",
    "qwen2_5_vl": "max_num_frames=8,min_pixels=3136,max_pixels=12544,dtype=float32",
    "qwen3_vl": "max_num_frames=8,min_pixels=3136,max_pixels=12544,dtype=float32",
}
# The official scripts' keys, at values that compress and prune the tiny 4-layer models.
FLASHVID_ARGS = "retention_ratio=0.3,alpha=0.7,temporal_threshold=0.8,do_segment=True,segment_threshold=0.9,min_segment_num=2,complementary_segment=True,token_selection_method=attn_div_v2,expansion=1.25,pruning_layer=2,llm_retention_ratio=0.5"
TASKS = ("videomme_smoke", "mlvu_test_smoke")
PRIMARY_METRICS = {
    "videomme_smoke": "videomme_perception_score,none",
    "mlvu_test_smoke": "mlvu_percetion_score,none",
}


def model_args(path, family: str, enable: bool, extra: str = "") -> str:
    return f"pretrained={path},enable_flashvid={enable},{FAST_ARGS[family]},{FLASHVID_ARGS}{extra}"


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, evaluate):
    """One evaluation per (family, FlashVID on/off), run on first use and shared by the tests below."""
    cache: dict[tuple[str, bool], dict] = {}

    def get(family: str, enable: bool) -> dict:
        if (family, enable) not in cache:
            args = model_args(tiny_checkpoint(family), family, enable)
            cache[family, enable] = evaluate(f"flashvid_{family}", args, TASKS)
        return cache[family, enable]

    return get


def _samples(results: dict) -> list[dict]:
    return [sample for task in TASKS for sample in results["samples"][task]]


@pytest.mark.parametrize("enable", [False, True], ids=["vanilla", "flashvid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_answers_metrics_and_figures(runs, family, enable):
    results = runs(family, enable)
    for task, metric in PRIMARY_METRICS.items():
        value = results["results"][task][metric]
        assert isinstance(value, float) and math.isfinite(value)
    samples = _samples(results)
    assert len(samples) == 5
    for sample in samples:
        answer = sample["resps"][0][0]
        assert answer.strip(), (
            f"empty answer for {sample['doc_id']}"
        )  # lmms-eval's bases may answer "" on errors
        figures = sample["token_counts"][0]
        assert set(FIGURE_NAMES) <= set(figures)
        assert figures["prefill_ms"] > 0 and figures["output_tokens"] > 0
        if enable:
            assert figures["visual_tokens_out"] < figures["visual_tokens_in"]
            assert (
                figures["visual_tokens_after_pruning"] < figures["visual_tokens_out"]
            )  # pruned at layer 2 of 4
            assert figures["num_segments"] >= 1 and figures["compression_ms"] > 0
        else:
            assert (
                figures["visual_tokens_in"]
                == figures["visual_tokens_out"]
                == figures["visual_tokens_after_pruning"]
            )
            assert figures["compression_ms"] == 0
    # the results' throughput section holds the per-sample means
    for name in ("visual_tokens_in", "visual_tokens_out", "visual_tokens_after_pruning", "prefill_ms"):
        mean = statistics.fmean(sample["token_counts"][0][name] for sample in samples)
        assert results["throughput"][f"avg_{name}"] == pytest.approx(mean)


def test_vanilla_llava_video_uses_the_paper_layout(runs):
    """LLaVA-Video's vanilla run pools 7×7 → 3×3 per frame (average, stride 2), OneVision's → 4×4 (bilinear)."""
    video = _samples(runs("llava_video", False))[0]["token_counts"][0]["visual_tokens_in"]
    onevision = _samples(runs("llava_onevision", False))[0]["token_counts"][0]["visual_tokens_in"]
    assert video == 8 * 3 * 3
    assert onevision == 8 * 4 * 4  # bilinear pooling (plus one newline after all frames, not counted)


@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_and_flashvid_count_visual_tokens_alike(runs, family):
    vanilla = [s["token_counts"][0]["visual_tokens_in"] for s in _samples(runs(family, False))]
    flashvid = [s["token_counts"][0]["visual_tokens_in"] for s in _samples(runs(family, True))]
    assert vanilla == flashvid


def test_runs_are_deterministic(tiny_checkpoint, evaluate, runs):
    again = evaluate("flashvid_qwen3_vl", model_args(tiny_checkpoint("qwen3_vl"), "qwen3_vl", True), TASKS)
    first = runs("qwen3_vl", True)
    assert [s["resps"] for s in _samples(again)] == [s["resps"] for s in _samples(first)]


# ------------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_key_fails_before_loading(family, tmp_path):
    from lmms_eval.models import get_model

    model_class = get_model(f"flashvid_{family}")
    missing = tmp_path / "no-checkpoint"  # loading would fail differently: the key must be refused first
    with pytest.raises(
        ValueError, match=r"unknown model_args key 'retention_ratoi'.*did you mean 'retention_ratio'"
    ):
        model_class.create_from_arg_string(f"pretrained={missing},retention_ratoi=0.1")


@pytest.mark.parametrize(
    ("args", "key"),
    [("retention_ratio=1.5", "retention_ratio"), ("token_selection_method=best", "token_selection_method"),
     ("min_segment_num=two", "min_segment_num"), ("enable_flashvid=perhaps", "enable_flashvid"),
     ("batch_size=2", "batch_size"), ("dtype=float7", "dtype")],
)  # fmt: skip
def test_bad_value_fails_before_loading(args, key, tmp_path):
    from lmms_eval.models import get_model

    model_class = get_model("flashvid_qwen2_5_vl")
    with pytest.raises(ValueError, match=key):
        model_class.create_from_arg_string(f"pretrained={tmp_path / 'no-checkpoint'},{args}")


def _task_with_visual(tmp_path, doc_to_visual: str) -> None:
    """A one-task folder reading the LongVideoBench smoke docs with the given doc_to_visual."""
    from conftest import SMOKE_TASKS_DIR

    (tmp_path / "lvb_probe.yaml").write_text(
        f"include: {SMOKE_TASKS_DIR / 'longvideobench_val_v_smoke.yaml'}\n"
        "task: lvb_probe\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {SMOKE_TASKS_DIR / 'data' / 'longvideobench.jsonl'}\n"
        f"doc_to_visual: !function {doc_to_visual}\n"
    )


def test_missing_video_names_its_path(tmp_path, tiny_checkpoint, evaluate, monkeypatch):
    # the built-in LongVideoBench doc_to_visual returns $HF_HOME/datasets/longvideobench/videos/<path> unchecked
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    _task_with_visual(tmp_path, "lmms_eval.tasks.longvideobench.utils.longvideobench_doc_to_visual_v")
    args = model_args(tiny_checkpoint("qwen3_vl"), "qwen3_vl", False)
    expected = tmp_path / "hf-home" / "datasets" / "longvideobench" / "videos" / "smoke-lvb-0001.mp4"
    with pytest.raises(FileNotFoundError, match=re.escape(str(expected))):
        evaluate("flashvid_qwen3_vl", args, ["lvb_probe"], include_path=tmp_path)


def test_unreadable_video_is_an_error_not_an_empty_answer(tmp_path, tiny_checkpoint, evaluate, monkeypatch):
    """lmms-eval's llava_hf answers "" when loading or generating fails; the suite's class raises instead."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    (tmp_path / "probe_visual.py").write_text(f"def doc_to_visual(doc):\n    return [{str(broken)!r}]\n")
    _task_with_visual(tmp_path, "probe_visual.doc_to_visual")
    args = model_args(tiny_checkpoint("llava_onevision"), "llava_onevision", False)
    with pytest.raises(Exception) as raised:
        evaluate("flashvid_llava_onevision", args, ["lvb_probe"], include_path=tmp_path)
    assert "broken.mp4" in str(raised.value) or "broken.mp4" in repr(raised.value.__cause__)
