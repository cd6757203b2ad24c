"""The visual-feature store as the model classes use it (lmms_eval_models.models.visual_store), in process.

Entries and processor records round-trip exactly; one shared model, reconfigured for every registered method,
answers as a fresh model per method does, while each video is decoded and encoded once (twice where a method
needs the attention statistic the first entry lacks: that entry is recomputed and replaced); a memory budget
smaller than any entry keeps nothing and changes nothing; `reconfigure` refuses anything but compression settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import SMOKE_TASKS_DIR

from lmms_eval_models.feature_store import FeatureStore
from lmms_eval_models.methods import METHODS
from lmms_eval_models.models.visual_store import (
    VisualEntry,
    VisualStore,
    from_json_tensor,
    from_jsonable,
    json_tensor,
    to_jsonable,
)
from lmms_eval_models.patches.prefill import EncodedVideo, VideoLayout

# Every registered method at R = 0.4 (FastV at K = 1 of the tiny LLM's 4 layers needs R > 1/4); vanilla first and
# a method without the statistic next, so the first statistic reader finds an entry without it.
FIRST = ("none", "divprune")
METHOD_ORDER = (*FIRST, *(method for method in METHODS if method not in FIRST))
POINT_OPTIONS = {"retention_ratio": 0.4, "fastv_layer": 1}


# ------------------------------------------------------------------------------------------------ records


def test_entries_round_trip_exactly_through_the_disk_store(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    encoded = EncodedVideo(
        features=torch.randn(2, 6, 8, generator=generator).to(torch.bfloat16),
        statistic=torch.rand(2, 6, generator=generator),
        layout=VideoLayout((2, 3)),
        side_features=(torch.randn(12, 4, generator=generator), torch.randn(12, 4, generator=generator)),
    )
    record = {"frame_times": torch.tensor([0.0, 1 / 3], dtype=torch.float64),
              "video_seconds": torch.tensor(2 / 3, dtype=torch.float64),  # 0-dim
              "metadata": json_tensor({"fps": 1 / 3})}  # fmt: skip
    FeatureStore(directory=tmp_path).put("k", VisualEntry(encoded, record).to_tensors())
    back = VisualEntry.from_tensors(FeatureStore(directory=tmp_path).get("k"))
    assert back.encoded.layout == encoded.layout
    for got, expected in ((back.encoded.features, encoded.features), (back.encoded.statistic, encoded.statistic),
                          *zip(back.encoded.side_features, encoded.side_features)):  # fmt: skip
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert back.record.keys() == record.keys()
    assert all(torch.equal(back.record[name], record[name]) for name in record)
    assert from_json_tensor(back.record["metadata"]) == {"fps": 1 / 3}


def test_processor_values_round_trip_with_their_types() -> None:
    from transformers.video_utils import VideoMetadata

    value = {"video_metadata": [VideoMetadata(total_num_frames=16, fps=8.0, frames_indices=[0, 5, 10, 15])],
             "grid": torch.tensor([[4, 8, 8]]), "fps": [1 / 3, 2.0], "indices": np.arange(4, dtype=np.int64),
             "pair": (1, None), "flag": False}  # fmt: skip
    back = from_jsonable(from_json_tensor(json_tensor(to_jsonable(value))))
    assert back["video_metadata"] == value["video_metadata"]
    assert back["grid"].dtype == torch.int64 and torch.equal(back["grid"], value["grid"])
    assert back["fps"] == value["fps"] and back["pair"] == (1, None) and back["flag"] is False
    assert back["indices"].dtype == np.int64 and np.array_equal(back["indices"], value["indices"])
    with pytest.raises(TypeError, match="cannot record a object"):
        to_jsonable(object())


def test_an_entry_that_cannot_serve_is_a_miss_and_stays_for_replacement() -> None:
    store = VisualStore(FeatureStore())
    encoded = EncodedVideo(torch.zeros(1, 4, 2), None, VideoLayout((2, 2)))
    store.put("k", VisualEntry(encoded, {}))
    assert store.lookup("k", needs_statistic=True) is None  # no statistic: the method's call recomputes it
    assert store.lookup("k", needs_statistic=False) is not None
    stats = store.store.stats
    assert (stats.refused, stats.misses, stats.hits) == (1, 1, 1)
    store.store.put("broken", {"grid_hw": torch.tensor([2, 2])})  # not an entry: no features
    assert store.lookup("broken", needs_statistic=False) is None


# ------------------------------------------------------------------------------------------------ models


def evaluate(lm: Any, model_args: str) -> list[tuple]:
    """lmms-eval's evaluator on one smoke document with this model object: each sample's answer and figures."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(SMOKE_TASKS_DIR), include_defaults=False)
    results = simple_evaluate(model=lm, model_args=model_args, tasks=["videomme_smoke"], batch_size=1, limit=1,
                              task_manager=manager, log_samples=True)  # fmt: skip
    return [(sample["doc_id"], sample["filtered_resps"],
             {name: value for name, value in sample["token_counts"][0].items() if not name.endswith("_ms")})
            for sample in results["samples"]["videomme_smoke"]]  # fmt: skip


def method_args(method: str) -> dict[str, Any]:
    return {"enable_flashvid": False} if method == "none" else {"method": method, **POINT_OPTIONS}


def rendered(args: dict[str, Any]) -> str:
    return ",".join(f"{key}={value}" for key, value in args.items())


class Counter:
    """Counts calls of a module's forward (a hook) and of a function (a wrapper that calls it through)."""

    def __init__(self) -> None:
        self.calls = 0

    def hook(self, *args: Any) -> None:
        self.calls += 1

    def wrap(self, function: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return function(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoint) -> Iterator[dict[str, Any]]:
    from lmms_eval_models.models.qwen3_vl import FlashVIDQwen3_VL

    base = {"pretrained": str(tiny_checkpoint("qwen3_vl")), "max_num_frames": 8, "device": "cpu", "dtype": "float32",
            "min_segment_num": 2, "token_selection_method": "attn_div", "batch_size": 1}  # fmt: skip
    references = {}
    for method in METHOD_ORDER:  # a fresh model per method: what one lmms-eval process per run computes
        args = {**base, **method_args(method)}
        references[method] = evaluate(FlashVIDQwen3_VL(**args), rendered(args))
    yield {"cls": FlashVIDQwen3_VL, "base": base, "references": references}


def test_a_shared_model_answers_as_fresh_models_for_every_method(qwen3: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import qwen_vl_utils

    decodes, vision_passes = Counter(), Counter()
    monkeypatch.setattr(qwen_vl_utils, "process_vision_info", decodes.wrap(qwen_vl_utils.process_vision_info))
    base = qwen3["base"]
    lm = qwen3["cls"](**base, **method_args(METHOD_ORDER[0]))
    lm.keep_between_runs()
    lm.model.model.visual.register_forward_hook(vision_passes.hook)
    lm.attach_visual_store(VisualStore(FeatureStore(), keep_statistic=False))
    for method in METHOD_ORDER:
        args = {**base, **method_args(method)}
        lm.reconfigure(**args)
        assert evaluate(lm, rendered(args)) == qwen3["references"][method], method
    stats = lm.visual_store.store.stats
    # vanilla stores the video without the statistic; the first method reading it recomputes and replaces it
    assert (stats.misses, stats.refused, stats.hits) == (2, 1, len(METHOD_ORDER) - 2)
    assert decodes.calls == 2 and vision_passes.calls == 2  # a hit neither decodes nor runs the vision tower


def test_a_tiny_memory_budget_keeps_nothing_and_changes_nothing(qwen3: dict[str, Any]) -> None:
    base = qwen3["base"]
    lm = qwen3["cls"](**base, **method_args("none"))
    lm.keep_between_runs()
    lm.attach_visual_store(VisualStore(FeatureStore(memory_bytes=1024, directory=None), keep_statistic=True))
    for method in ("none", "flashvid"):
        args = {**base, **method_args(method)}
        lm.reconfigure(**args)
        assert evaluate(lm, rendered(args)) == qwen3["references"][method], method
    stats = lm.visual_store.store.stats
    assert (stats.misses, stats.hits, stats.too_large) == (2, 0, 2)  # computed twice, never kept
    assert lm.visual_store.store.memory_used == 0


def test_reconfigure_changes_compression_settings_only(qwen3: dict[str, Any]) -> None:
    base = qwen3["base"]
    lm = qwen3["cls"](**base, **method_args("flashvid"))
    with pytest.raises(ValueError, match=r"max_num_frames: loaded 8, asked 4"):
        lm.reconfigure(**{**base, "max_num_frames": 4})
    with pytest.raises(ValueError, match="retention_ratio"):
        lm.reconfigure(**{**base, "retention_ratio": 1.5})
    args = {**base, **method_args("none")}
    lm.reconfigure(**args)  # the refused calls left the model as it was: it still answers like a fresh one
    assert evaluate(lm, rendered(args)) == qwen3["references"]["none"]


def test_a_llava_hit_reads_no_frames_and_runs_no_vision_tower(tiny_checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmms_eval_models.models import llava_onevision

    reads, vision_passes = Counter(), Counter()
    monkeypatch.setattr(llava_onevision, "read_video_frames", reads.wrap(llava_onevision.read_video_frames))
    base = {"pretrained": str(tiny_checkpoint("llava_onevision")), "max_frames_num": 8, "device": "cpu",
            "dtype": "float32", "add_time_instruction": True, "batch_size": 1}  # fmt: skip
    flashvid = {**base, **method_args("flashvid")}
    expected = evaluate(llava_onevision.FlashVIDLlavaOneVision(**flashvid), rendered(flashvid))
    reads.calls = 0
    lm = llava_onevision.FlashVIDLlavaOneVision(**base, **method_args("none"))
    lm.keep_between_runs()
    lm.model.model.vision_tower.register_forward_hook(vision_passes.hook)
    lm.attach_visual_store(VisualStore(FeatureStore(), keep_statistic=True))
    evaluate(lm, rendered({**base, **method_args("none")}))
    lm.reconfigure(**flashvid)
    assert evaluate(lm, rendered(flashvid)) == expected  # the time instruction rebuilt from the frame record
    assert reads.calls == 1 and vision_passes.calls == 1
    assert (lm.visual_store.store.stats.hits, lm.visual_store.store.stats.misses) == (1, 1)
