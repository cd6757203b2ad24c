"""The `method` model_arg and the baseline keys through lmms-eval (simple_evaluate) on tiny checkpoints.

Every method runs on LLaVA-OneVision over the VideoMME smoke task (3 docs); Qwen2.5-VL runs a pre-LLM and the
in-LLM baseline. Each sample's logged figures must be what `budget_for_method` promises for the video's token
geometry. Bad keys, bad values and a `method` that contradicts `enable_flashvid` fail before any weight loads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from flashvid_core import FlashVIDConfig
from lmms_eval_models.methods import METHODS, MethodSettings, budget_for_method
from lmms_eval_models.methods.fastvid import fastvid_token_count

TASK = "videomme_smoke"
RETENTION_RATIO = 0.5
# FlashVID keys (inner pruning at layer 2 of the tiny 4-layer LLM) and FastV's K = 1 (R = 0.5 > K / L = 0.25) on
# every run: each method reads its own keys and ignores the others', so one sweep base serves every method.
FLASHVID_ARGS = {"retention_ratio": RETENTION_RATIO, "pruning_layer": 2, "llm_retention_ratio": 0.5}
BASELINE_ARGS = {"fastv_layer": 1}
LLAVA_FRAMES = 8
# Qwen: the 64×64 smoke frames upscaled to 112×112 (min_pixels = max_pixels = 112²) give 4×4 merged tokens per
# temporal group; 16 frames at 8 fps sampled at qwen-vl-utils' 2 fps are 4 frames, i.e. 2 temporal groups.
QWEN_ARGS = {"max_num_frames": 8, "min_pixels": 12544, "max_pixels": 12544, "dtype": "float32"}
QWEN_GROUPS, QWEN_GRID = 2, (4, 4)


def render(args: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in args.items())


def expected_budget(method: str, num_frames: int, grid_hw: tuple[int, int], num_llm_layers: int):
    """`budget_for_method` at this file's settings for a video of num_frames frames of grid_hw tokens."""
    return budget_for_method(method, grid_hw[0] * grid_hw[1], num_frames, RETENTION_RATIO, num_llm_layers,
                             grid_hw=grid_hw, settings=MethodSettings.from_options(BASELINE_ARGS),
                             flashvid_config=FlashVIDConfig.from_model_args(FLASHVID_ARGS))  # fmt: skip


def llava_geometry(checkpoint: Path) -> tuple[tuple[int, int], int]:
    """LLaVA-OneVision's pooled grid per frame (bilinear 2× pooling, ceil) and the LLM's depth, from the config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    side = math.ceil(config.vision_config.image_size // config.vision_config.patch_size / 2)
    return (side, side), config.get_text_config().num_hidden_layers


@pytest.fixture(scope="module")
def run(tiny_checkpoint: Callable[[str], Path], evaluate: Callable[..., dict]) -> Callable[..., dict]:
    """`run(family, **model_args)` -> lmms-eval results of TASK; each distinct run evaluates once per module."""
    cache: dict[tuple, dict] = {}

    def get(family: str, **model_args: object) -> dict:
        key = (family, *sorted(model_args.items()))
        if key not in cache:
            args = render({"pretrained": tiny_checkpoint(family), **model_args})
            cache[key] = evaluate(f"flashvid_{family}", args, [TASK])
        return cache[key]

    return get


def llava_run(run: Callable[..., dict], **model_args: object) -> dict:
    return run("llava_onevision", max_frames_num=LLAVA_FRAMES, **FLASHVID_ARGS, **BASELINE_ARGS, **model_args)


def figures_and_answers(results: dict) -> tuple[list[dict], list[str]]:
    samples = results["samples"][TASK]
    assert len(samples) == 3
    return [sample["token_counts"][0] for sample in samples], [sample["resps"][0][0] for sample in samples]


def assert_budget(results: dict, method: str, budget, num_segments: int | None = None) -> None:
    """Every sample (and the throughput means) logs the budget's visual tokens in, out and after pruning."""
    figures, answers = figures_and_answers(results)
    expected_out = budget.tokens_entering_llm
    # FastVID's budget is an upper bound; one-frame segments (c = 8 >= frames) reach it exactly
    if method == "fastvid":
        expected_out = fastvid_token_count(torch.ones(budget.num_frames, dtype=torch.long),
                                           budget.num_tokens_per_frame, RETENTION_RATIO)  # fmt: skip
        assert expected_out == budget.tokens_entering_llm
    for figure, answer in zip(figures, answers):
        assert answer.strip(), method  # lmms-eval's bases answer "" on errors
        assert figure["visual_tokens_in"] == budget.num_frames * budget.num_tokens_per_frame
        assert figure["visual_tokens_out"] == expected_out, method
        assert figure["visual_tokens_after_pruning"] == budget.tokens_after_pruning, method
        assert figure["prefill_ms"] > 0 and figure["output_tokens"] > 0
        if num_segments is not None:
            assert figure["num_segments"] == num_segments
        if method == "none":
            assert figure["compression_ms"] == 0.0
    throughput = results["throughput"]
    assert throughput["avg_visual_tokens_out"] == pytest.approx(expected_out)
    assert throughput["avg_visual_tokens_after_pruning"] == pytest.approx(budget.tokens_after_pruning)


# ------------------------------------------------------------------------------------------------- runs


@pytest.mark.slow  # end-to-end lmms-eval runs (about 1 s each once the checkpoint is built)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_logs_its_budget(run, tiny_checkpoint, method: str) -> None:
    grid_hw, num_llm_layers = llava_geometry(tiny_checkpoint("llava_onevision"))
    budget = expected_budget(method, LLAVA_FRAMES, grid_hw, num_llm_layers)
    if method in ("fastv", "flashvid"):  # both prune inside the LLM here
        assert budget.tokens_after_pruning < budget.tokens_entering_llm
    if method != "none":
        assert budget.tokens_after_pruning < budget.num_frames * budget.num_tokens_per_frame
    segments = {"fastvid": LLAVA_FRAMES, "none": 0}.get(method)  # none: unpatched, no segmentation
    assert_budget(llava_run(run, method=method), method, budget, segments)


@pytest.mark.slow  # end-to-end lmms-eval runs (about 1 s each once the checkpoint is built)
def test_method_none_is_enable_flashvid_false(run) -> None:
    vanilla = llava_run(run, enable_flashvid=False)
    none = llava_run(run, method="none")
    assert figures_and_answers(vanilla)[1] == figures_and_answers(none)[1]
    visual = ("visual_tokens_in", "visual_tokens_out", "visual_tokens_after_pruning", "num_segments")
    for left, right in zip(figures_and_answers(vanilla)[0], figures_and_answers(none)[0]):
        assert {name: left[name] for name in visual} == {name: right[name] for name in visual}


@pytest.mark.slow  # end-to-end lmms-eval runs (about 1 s each once the checkpoint is built)
def test_baseline_keys_reach_the_method(run, tiny_checkpoint) -> None:
    """fastv_ratio_rule=paper (r = R) keeps ceil(F·N·R) from layer K, more than the per-layer rule's default."""
    grid_hw, _ = llava_geometry(tiny_checkpoint("llava_onevision"))
    figures, _ = figures_and_answers(llava_run(run, method="fastv", fastv_ratio_rule="paper"))
    visual = LLAVA_FRAMES * grid_hw[0] * grid_hw[1]
    kept = math.ceil(visual * RETENTION_RATIO)
    assert [figure["visual_tokens_after_pruning"] for figure in figures] == [kept] * 3
    per_layer, _ = figures_and_answers(llava_run(run, method="fastv"))
    assert per_layer[0]["visual_tokens_after_pruning"] < kept


@pytest.mark.slow  # end-to-end lmms-eval runs (about 1 s each once the checkpoint is built)
@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_qwen2_5_vl_methods_log_their_budget(run, tiny_checkpoint, method: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    num_llm_layers = config.get_text_config().num_hidden_layers
    budget = expected_budget(method, QWEN_GROUPS, QWEN_GRID, num_llm_layers)
    results = run("qwen2_5_vl", **QWEN_ARGS, **FLASHVID_ARGS, **BASELINE_ARGS, method=method)
    assert_budget(results, method, budget)


# --------------------------------------------------------------------------------------------- failures


def _create(family: str, args: str) -> None:
    from lmms_eval.models import get_model

    get_model(f"flashvid_{family}").create_from_arg_string(args)


@pytest.mark.parametrize(
    ("args", "message"),
    [("method=fastvv", r"method='fastvv' is invalid: allowed flashvid, fastv, visionzip, divprune"),
     ("method=FastV", r"method='FastV' is invalid"),
     ("fastv_layr=1", r"unknown model_args key 'fastv_layr'.*did you mean 'fastv_layer'"),
     ("method=fastv,fastv_layer=0", r"fastv_layer=0 is out of range"),
     ("method=visionzip,visionzip_merge=max", r"visionzip_merge='max' is invalid: allowed official, mean"),
     ("method=fastvid,fastvid_segment_threshold=2", r"fastvid_segment_threshold=2\.0 is out of range"),
     ("method=fastvid,fastvid_anchor_step=two", r"fastvid_anchor_step='two' is invalid: expected an integer"),
     ("method=random,seed=-1", r"seed=-1\.0 is invalid: expected an integer"),
     ("method=uniform,retention_ratio=1.5", r"retention_ratio"),
     ("enable_flashvid=False,method=fastv", r"enable_flashvid=False conflicts with method='fastv'"),
     ("enable_flashvid=True,method=none", r"enable_flashvid=True conflicts with method='none'")],
)  # fmt: skip
@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_bad_method_args_fail_before_loading(family: str, args: str, message: str, tmp_path: Path) -> None:
    # No checkpoint at this path: loading would fail differently, so the arguments must be refused first.
    with pytest.raises(ValueError, match=message):
        _create(family, f"pretrained={tmp_path / 'no-checkpoint'},{args}")


@pytest.mark.parametrize(
    ("args", "message"),
    [("method=fastv,fastv_layer=4,retention_ratio=0.75", r"fastv_layer=4 is out of range: allowed 1\.\.3"),
     ("method=fastv,fastv_layer=1,retention_ratio=0.2", r"retention_ratio=0\.2 is out of range for FastV")],
)  # fmt: skip
def test_fastv_is_checked_against_the_llm_depth_before_loading(
    args: str, message: str, tmp_path: Path
) -> None:
    """FastV's K and r depend on the LLM's depth (4 layers): read from config.json alone (no weights here)."""
    from lmms_eval_models.tiny_checkpoints import build_config

    config_only = tmp_path / "config-only"
    build_config("llava_onevision").save_pretrained(config_only)
    with pytest.raises(ValueError, match=message):
        _create("llava_onevision", f"pretrained={config_only},{args}")
