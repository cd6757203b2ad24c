"""Every compression method (FlashVID and the issue-8 baselines) through every family patch, on tiny checkpoints.

One forward per case (sdpa, CPU). What is checked: the visual tokens the LLM receives (and keeps after FastV's
pruning) are what `budget_for_method` promises; `method="flashvid"` is the default patch exactly; `none` is the
stock model; `random` is reproducible from its seed; methods that do not read the attention statistic never
compute it; bad methods and options are refused before the model is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from flashvid_core import FlashVIDConfig
from lmms_eval_models.methods import METHODS, MethodSettings, budget_for_method
from lmms_eval_models.methods.fastvid import fastvid_token_count
from lmms_eval_models.patches import apply_flashvid, is_patched, remove_flashvid
from lmms_eval_models.patches.common import PATCH_ATTR

FAMILIES = ("llava_onevision", "llava_video", "qwen2_5_vl", "qwen3_vl")
LLAVA_PROMPT = "<|im_start|>user\n<video>\nWhat happens in the video?<|im_end|>\n<|im_start|>assistant\n"
LLAVA_FRAMES = 4
QWEN_FRAMES = 4  # two temporal patch groups
# Non-square Qwen frames (height, width): a 4 × 2 merged-token grid, so raster order and grid_hw matter.
QWEN_FRAME_HW = {"qwen2_5_vl": (112, 56), "qwen3_vl": (128, 64)}
RETENTION_RATIO = 0.4
# The tiny LLM has 4 layers: FastV at K = 1 keeps r = (0.4 · 4 − 1) / 3 = 0.2 of the video from layer 1 on.
BASELINE_OPTIONS = {"fastv_layer": 1}


@dataclass
class Case:
    """One loaded family: a model (re-patched per test), its video inputs and the video's token geometry."""

    family: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    num_frames: int
    grid_hw: tuple[int, int]
    newlines: int  # LLaVA newline embeddings in the video's span (layout, not visual tokens)
    apply_options: dict[str, Any]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def num_llm_layers(self) -> int:
        return len(self.model.model.language_model.layers)

    def apply(self, config: Any, **options: Any) -> nn.Module:
        return apply_flashvid(self.model, config, **self.apply_options, **options)


def _llava_case(family: str, path: Path) -> Case:
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    video = np.random.default_rng(0).integers(0, 255, (LLAVA_FRAMES, 64, 64, 3), dtype=np.uint8)
    inputs = dict(AutoProcessor.from_pretrained(path)(text=LLAVA_PROMPT, videos=[video], return_tensors="pt"))
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    if family == "llava_video":  # average pooling with stride 2 (floor), one newline per frame
        grid, newlines, options = side // 2, LLAVA_FRAMES, {"video_layout": "llava_video"}
    else:  # bilinear pooling (ceil), one newline after the video
        grid, newlines, options = math.ceil(side / 2), 1, {}
    return Case(family, model, inputs, LLAVA_FRAMES, (grid, grid), newlines, options)


def _qwen_case(family: str, path: Path) -> Case:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    height, width = QWEN_FRAME_HW[family]
    video = (np.random.default_rng(0).random((QWEN_FRAMES, height, width, 3)) * 255).astype(np.uint8)
    content = [{"type": "video"}, {"type": "text", "text": "What is shown?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kwargs: dict[str, Any] = {}
    if family == "qwen3_vl":
        from transformers.video_utils import VideoMetadata

        frames = list(range(QWEN_FRAMES))
        kwargs = {"video_metadata": [VideoMetadata(total_num_frames=QWEN_FRAMES, fps=2.0, frames_indices=frames)],
                  "do_sample_frames": False}  # fmt: skip
    inputs = dict(processor(text=[text], videos=[video], return_tensors="pt", **kwargs))
    merge = model.model.visual.spatial_merge_size
    temporal, grid_h, grid_w = inputs["video_grid_thw"][0].tolist()
    return Case(family, model, inputs, temporal, (grid_h // merge, grid_w // merge), 0, {})


@pytest.fixture(scope="module")
def case(tiny_checkpoint: Callable[[str], Path]) -> Callable[[str], Case]:
    """`case(family)`: loaded once per module; every test patches the model itself (apply replaces)."""
    loaded: dict[str, Case] = {}

    def get(family: str) -> Case:
        if family not in loaded:
            build = _llava_case if family.startswith("llava") else _qwen_case
            loaded[family] = build(family, tiny_checkpoint(family))
        current = loaded[family]
        remove_flashvid(current.model)
        return current

    return get


@dataclass
class Forward:
    logits: torch.Tensor
    llm_length: int  # sequence length the language model received (logits cover fewer after inner pruning)
    layer_lengths: list[int]  # sequence length each decoder layer processed
    llm_inputs: torch.Tensor


@contextmanager
def _recorded(model: nn.Module) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
    """Record the language model's keyword inputs and each decoder layer's sequence length."""
    calls: list[dict[str, Any]] = []
    lengths: list[int] = []
    language_model = model.model.language_model
    handles = [language_model.register_forward_pre_hook(lambda _m, _a, k: calls.append(dict(k)), with_kwargs=True)]
    for layer in language_model.layers:
        handles.append(layer.mlp.register_forward_hook(lambda _m, _a, out: lengths.append(out.shape[1])))
    try:
        yield calls, lengths
    finally:
        for handle in handles:
            handle.remove()


def forward(case: Case, seed: int = 0) -> Forward:
    torch.manual_seed(seed)  # FlashVID's DPC-kNN tie-breaker draws from the default generator
    with torch.no_grad(), _recorded(case.model) as (calls, lengths):
        logits = case.model(**case.inputs).logits
    embeds = calls[0]["inputs_embeds"]
    return Forward(logits, embeds.shape[1], lengths, embeds)


def config_for(case: Case, **overrides: Any) -> FlashVIDConfig:
    """R = 0.4; FlashVID's own pruning beyond the LLM unless overridden."""
    values: dict[str, Any] = {"retention_ratio": RETENTION_RATIO, "pruning_layer": case.num_llm_layers}
    values.update(overrides)
    return FlashVIDConfig(**values)


def _statistic_computed(case: Case) -> bool:
    """Whether the patched forwards since the last apply computed the vision attention statistic."""
    return getattr(case.model, PATCH_ATTR).capture.captures > 0


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", [m for m in METHODS if m != "flashvid"])
@pytest.mark.parametrize("family", FAMILIES)
def test_llm_receives_the_method_budget(case: Callable[[str], Case], family: str, method: str) -> None:
    current = case(family)
    config = config_for(current)
    current.apply(config, method=method, baseline_options=BASELINE_OPTIONS)
    result = forward(current)
    stats = current.model.flashvid_stats
    frames, per_frame = current.num_frames, current.tokens_per_frame
    budget = budget_for_method(method, per_frame, frames, RETENTION_RATIO, current.num_llm_layers,
                               grid_hw=current.grid_hw, settings=MethodSettings.from_options(BASELINE_OPTIONS),
                               flashvid_config=config)  # fmt: skip
    expected = budget.tokens_entering_llm
    if method == "fastvid":  # c = 8 > frames: every frame is its own segment and its own anchor
        assert stats.num_segments == frames
        expected = fastvid_token_count(torch.ones(frames, dtype=torch.long), per_frame, RETENTION_RATIO)
        assert expected == budget.tokens_entering_llm  # the upper bound is reached with one-frame segments
    assert stats.visual_tokens_in == frames * per_frame
    assert stats.visual_tokens_compressed == expected
    assert stats.visual_tokens_after_pruning == budget.tokens_after_pruning
    # the LLM's sequence: the prompt without its video placeholders, the kept tokens and LLaVA's newlines
    placeholders = int((current.inputs["input_ids"] == current.model.config.video_token_id).sum())
    text_length = current.inputs["input_ids"].shape[1] - placeholders
    assert result.llm_length == text_length + expected + (current.newlines if family.startswith("llava") else 0)
    pruned_length = result.llm_length - expected + budget.tokens_after_pruning
    if method == "fastv":  # layers from K on see ceil(F·N·r) visual tokens
        assert budget.tokens_after_pruning == math.ceil(frames * per_frame * budget.llm_pruning.llm_retention_ratio)
        assert budget.tokens_after_pruning < expected
        layer = BASELINE_OPTIONS["fastv_layer"]
        assert result.layer_lengths == [result.llm_length] * layer + [pruned_length] * (current.num_llm_layers - layer)
    else:
        assert result.layer_lengths == [result.llm_length] * current.num_llm_layers
    assert _statistic_computed(current) == (method in ("visionzip", "fastvid"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_uniform_pools_the_raster_grid(case: Callable[[str], Case], family: str) -> None:
    from lmms_eval_models.methods import compress_with_method
    from lmms_eval_models.patches.prefill import encode_call

    current = case(family)
    current.apply(config_for(current), method="uniform")
    result = forward(current)
    encoded = encode_call(current.model, pixel_values_videos=current.inputs["pixel_values_videos"],
                          video_grid_thw=current.inputs["video_grid_thw"])  # fmt: skip
    features, statistic = encoded.features, encoded.statistic
    assert statistic is None  # uniform never reads it
    height, width = current.grid_hw
    assert height != width
    expected = compress_with_method("uniform", features, None, RETENTION_RATIO, (height, width))
    ids = current.inputs["input_ids"][0]
    is_video = ids == current.model.config.video_token_id
    video_rows = torch.nonzero(is_video).flatten()
    source = torch.sort(torch.cat([torch.nonzero(~is_video).flatten(), video_rows[expected.indices]])).values
    received = result.llm_inputs[0, torch.isin(source, video_rows)]
    assert torch.equal(received, expected.tokens)
    # the same raster tokens read as a (w, h) grid pool other windows
    misread = compress_with_method("uniform", features, None, RETENTION_RATIO, (width, height))
    assert not torch.allclose(received, misread.tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_generation_keeps_the_pruned_cache(case: Callable[[str], Case], family: str) -> None:
    current = case(family)
    current.apply(config_for(current), method="fastv", baseline_options=BASELINE_OPTIONS)
    steps = 3
    with torch.no_grad(), _recorded(current.model) as (calls, lengths):
        output = current.model.generate(**current.inputs, max_new_tokens=steps, min_new_tokens=steps,
                                        do_sample=False, return_dict_in_generate=True)  # fmt: skip
    stats = current.model.flashvid_stats
    prefill = calls[0]["inputs_embeds"].shape[1]
    pruned = prefill - stats.visual_tokens_compressed + stats.visual_tokens_after_pruning
    layer = BASELINE_OPTIONS["fastv_layer"]
    cache = output.past_key_values
    cached = [cache.get_seq_length(index) for index in range(current.num_llm_layers)]
    assert cached == [prefill + steps - 1] * layer + [pruned + steps - 1] * (current.num_llm_layers - layer)
    assert lengths[current.num_llm_layers :] == [1] * (steps - 1) * current.num_llm_layers  # one token per step
    assert output.sequences.shape[1] == current.inputs["input_ids"].shape[1] + steps


@pytest.mark.parametrize("family", FAMILIES)
def test_flashvid_method_is_the_default_patch(case: Callable[[str], Case], family: str) -> None:
    current = case(family)
    config = config_for(current, pruning_layer=2, llm_retention_ratio=0.5)  # inner pruning on
    current.apply(config)
    default, default_stats = forward(current), current.model.flashvid_stats
    current.apply(config, method="flashvid", baseline_options=BASELINE_OPTIONS)  # options do not touch FlashVID
    explicit = forward(current)
    assert torch.equal(explicit.logits, default.logits)
    assert torch.equal(explicit.llm_inputs, default.llm_inputs)
    assert explicit.layer_lengths == default.layer_lengths
    assert default.layer_lengths[-1] < default.layer_lengths[0]  # pruned at K = 2
    stats = current.model.flashvid_stats
    assert (stats.visual_tokens_compressed, stats.visual_tokens_after_pruning, stats.num_segments) == (
        default_stats.visual_tokens_compressed, default_stats.visual_tokens_after_pruning, default_stats.num_segments
    )  # fmt: skip
    assert _statistic_computed(current)


def _llava_video_reference_logits(current: Case) -> torch.Tensor:
    """Stock modules only: SigLIP, projector, 2×2 average pooling, a newline after each frame, stock LLM."""
    model, inputs = current.model, current.inputs
    inner = model.model
    with torch.no_grad():
        hidden = inner.vision_tower(inputs["pixel_values_videos"].flatten(0, 1), output_hidden_states=True)
        projected = inner.multi_modal_projector(hidden.hidden_states[model.config.vision_feature_layer])
        side = math.isqrt(projected.shape[1])
        grid = projected.view(projected.shape[0], side, side, -1).permute(0, 3, 1, 2)
        pooled = nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (F, n, D)
        newline = inner.image_newline.view(1, 1, -1).expand(pooled.shape[0], 1, -1)
        video = torch.cat((pooled, newline), dim=1).flatten(0, 1)
        ids = inputs["input_ids"][0]
        run = torch.nonzero(ids == model.config.video_token_id).flatten()
        text = model.get_input_embeddings()(inputs["input_ids"])
        embeds = torch.cat((text[:, : int(run[0])], video[None], text[:, int(run[-1]) + 1 :]), dim=1)
        return model(inputs_embeds=embeds).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_none_is_the_stock_model(case: Callable[[str], Case], family: str) -> None:
    current = case(family)
    if family == "llava_video":  # no stock model has this layout: rebuild it from stock modules
        expected = _llava_video_reference_logits(current)
    else:
        expected = forward(current).logits
    current.apply(config_for(current), method="none")
    result = forward(current)
    assert torch.equal(result.logits, expected)
    stats = current.model.flashvid_stats
    assert stats.visual_tokens_in == stats.visual_tokens_compressed == stats.visual_tokens_after_pruning
    assert stats.compression_ms == 0.0  # nothing compressed, as an unpatched run reports
    assert not _statistic_computed(current)
    # no config at all is the same vanilla run
    current.apply(None, method="none")
    assert torch.equal(forward(current).logits, result.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_is_reproducible_from_its_seed(case: Callable[[str], Case], family: str) -> None:
    current = case(family)
    runs = {}
    for name, seed, torch_seed in (("first", 3, 0), ("again", 3, 1), ("other", 4, 0)):
        current.apply(config_for(current), method="random", baseline_options={"seed": seed})
        runs[name] = forward(current, seed=torch_seed)  # the global torch seed plays no part
    assert torch.equal(runs["first"].logits, runs["again"].logits)
    assert torch.equal(runs["first"].llm_inputs, runs["again"].llm_inputs)
    assert not torch.equal(runs["first"].llm_inputs, runs["other"].llm_inputs)


def test_bad_method_and_options_are_refused_before_model_work(case: Callable[[str], Case]) -> None:
    current = case("qwen2_5_vl")
    config = config_for(current)
    current.apply(config, method="divprune")
    patch_before = current.model._flashvid_patch
    with pytest.raises(ValueError, match=r"method='fastvv' is invalid: allowed flashvid, fastv, visionzip"):
        current.apply(config, method="fastvv")
    with pytest.raises(ValueError, match=r"unknown baseline option\(s\) \['seeds'\].*fastv_layer"):
        current.apply(config, method="random", baseline_options={"seeds": 1})
    with pytest.raises(ValueError, match="visionzip_merge='max' is invalid: allowed official, mean"):
        current.apply(config, method="visionzip", baseline_options={"visionzip_merge": "max"})
    with pytest.raises(ValueError, match=r"retention_ratio=0\.4 is out of range for FastV"):  # K = 2 of 4 layers
        current.apply(config, method="fastv")
    with pytest.raises(ValueError, match="method='uniform' needs a FlashVIDConfig"):
        current.apply(None, method="uniform")
    with pytest.raises(ValueError, match=r"unknown family option\(s\) \['video_layout'\].*method, baseline_options"):
        current.apply(config, video_layout="llava_video")
    assert current.model._flashvid_patch is patch_before  # nothing was replaced or removed
    llava = case("llava_onevision")
    with pytest.raises(ValueError, match="method='FastV' is invalid"):
        llava.apply(config_for(llava), method="FastV")
    assert not is_patched(llava.model)


def test_string_baseline_options_as_from_model_args(case: Callable[[str], Case]) -> None:
    current = case("llava_onevision")
    current.apply(config_for(current), method="fastv", baseline_options={"fastv_layer": "1", "fastv_ratio_rule": "paper"})
    result = forward(current)
    visual = current.num_frames * current.tokens_per_frame
    kept = math.ceil(visual * RETENTION_RATIO)  # "paper": r = R
    assert current.model.flashvid_stats.visual_tokens_after_pruning == kept
    assert result.layer_lengths[1:] == [result.llm_length - visual + kept] * (current.num_llm_layers - 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_deleted_patched_model_is_freed_at_once(tiny_checkpoint: Callable[[str], Path], family: str) -> None:
    """The patch (hooks, pruner, decode maps) holds no reference back to the model: a patched model that generated is
    freed as soon as its last reference goes, without waiting for the garbage collector (GPU memory in sweeps)."""
    import gc
    import weakref

    build = _llava_case if family.startswith("llava") else _qwen_case
    current = build(family, tiny_checkpoint(family))
    current.apply(config_for(current, pruning_layer=2, llm_retention_ratio=0.5), method="flashvid")
    with torch.no_grad():
        current.model.generate(**current.inputs, max_new_tokens=2, do_sample=False)
    assert current.model.flashvid_stats.visual_tokens_after_pruning < current.model.flashvid_stats.visual_tokens_in
    model = weakref.ref(current.model)
    gc.disable()
    try:
        current.model = None
        assert model() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("family", FAMILIES)
def test_calls_the_patch_cannot_serve_are_refused_before_model_work(case: Callable[[str], Case], family: str) -> None:
    """Every family refuses, with the reason, what the shortened sequence cannot do: labels of the original
    sequence, pre-encoded video outputs (no statistic), a 4-D mask, a non-empty cache; the vision tower never runs."""
    from transformers import DynamicCache

    current = case(family)
    current.apply(config_for(current))
    inner = current.model.model
    tower = inner.vision_tower if family.startswith("llava") else inner.visual
    vision_calls: list[int] = []
    handle = tower.register_forward_pre_hook(lambda *_: vision_calls.append(1))
    ids, mask = current.inputs["input_ids"], current.inputs["attention_mask"]
    filled = DynamicCache()
    with torch.no_grad():
        current.model.model.language_model(input_ids=ids[:, :3], past_key_values=filled, use_cache=True)
    refused = {
        "labels for the original one cannot be scored": {"labels": ids},
        "not pre-encoded video outputs": {"mm_encoder_outputs": {"video": object()}},
        r"2-D attention_mask \(batch, sequence\), got \(1, 1, \d+, \d+\)": {"attention_mask": mask[:, None, None, :]},
        "prefill from an empty KV cache": {"past_key_values": filled},
    }
    try:
        for message, change in refused.items():
            with torch.no_grad(), pytest.raises(ValueError, match=message):
                current.model(**{**current.inputs, **change})
    finally:
        handle.remove()
    assert vision_calls == []
    assert current.model.flashvid_stats is None
