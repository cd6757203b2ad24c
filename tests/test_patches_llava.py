"""FlashVID inside LLaVA-OneVision / LLaVA-Video (transformers' LlavaOnevisionForConditionalGeneration).

Runs on the tiny random-weight checkpoints (SigLIP 7×7 patches: bilinear pooling → 4×4, average pooling → 3×3)
under the installed transformers, for eager and sdpa attention. References are built independently of the patch:
features and the attention statistic from a stock eager model's hidden states and attention probabilities,
compression from `flashvid_core.compress`, and decoding from step-by-step full forwards of the stock LLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from flashvid_core import FlashVIDConfig, compress
from lmms_eval_models.patches import apply_flashvid, llava_onevision, remove_flashvid
from lmms_eval_models.patches.llava_onevision import last_used_vision_layer, newline_per_frame

ATTENTIONS = ("eager", "sdpa")
LAYOUT_FAMILY = {"onevision": "llava_onevision", "llava_video": "llava_video"}
PROMPT = "<|im_start|>user\n<video>\nWhat happens in the video?<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PROMPT = "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
FRAMES = 6


# ------------------------------------------------------------------------------------------- helpers


def load(path: Path, attention: str) -> nn.Module:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation=attention).eval()


def video_inputs(
    path: Path, frames: int = FRAMES, prompts: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    rng = np.random.default_rng(seed)
    videos = [rng.integers(0, 255, (frames, 64, 64, 3), dtype=np.uint8) for _ in range(prompts)]
    return dict(processor(text=[PROMPT] * prompts, videos=videos, return_tensors="pt", padding=True))


def flashvid_config(model: nn.Module, **overrides: Any) -> Any:
    """Paper defaults with R = 0.25 and the inner-LLM pruning layer out of range (off) unless overridden."""
    settings: dict[str, Any] = {
        "retention_ratio": 0.25,
        "pruning_layer": model.config.text_config.num_hidden_layers,
    }
    settings.update(overrides)
    return FlashVIDConfig(**settings)


@contextmanager
def llm_inputs(model: nn.Module) -> Iterator[list[dict[str, Any]]]:
    """Record the keyword arguments of every call of the model's language model."""
    calls: list[dict[str, Any]] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda _module, _args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    try:
        yield calls
    finally:
        handle.remove()


def reference_video(reference: nn.Module, pixel_values_videos: torch.Tensor, config: Any, layout: str):
    """The video part of the LLM input, from a stock eager model: (sequence (V, D), compression or None)."""
    inner = reference.model
    frames = pixel_values_videos.flatten(0, 1)
    with torch.no_grad():
        out = inner.vision_tower(frames, output_hidden_states=True, output_attentions=True)
        received = out.attentions[-1].mean(dim=(1, 2))  # tiny config: vision_feature_layer -1, "full"
        projected = inner.multi_modal_projector(out.hidden_states[-1])
    side = math.isqrt(projected.shape[1])

    def pooled(values: torch.Tensor) -> torch.Tensor:  # (F, side², C) -> (F, n, C)
        grid = values.view(values.shape[0], side, side, -1).permute(0, 3, 1, 2)
        if layout == "llava_video":
            grid = nn.functional.avg_pool2d(grid, 2)
        else:
            grid = nn.functional.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
        return grid.flatten(2).transpose(1, 2)

    features, statistic = pooled(projected), pooled(received[..., None])[..., 0]
    newline = inner.image_newline.detach()
    compression = None
    if config is None:
        tokens = features.reshape(-1, features.shape[-1])
        indices = torch.arange(tokens.shape[0])
    else:
        torch.manual_seed(
            0
        )  # the DPC-kNN tie-breaker draws from the default generator, as in the patched call
        compression = compress(features, statistic, config)
        tokens, indices = compression.tokens, compression.indices
    if layout == "onevision":
        return torch.cat((tokens, newline[None])), compression
    frame_of = indices // features.shape[1]
    parts = []
    for frame in range(features.shape[0]):  # a plain loop: an independent reference of the layout
        parts += [tokens[frame_of == frame], newline[None]]
    return torch.cat(parts), compression


def expected_llm_input(model: nn.Module, input_ids: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    run = torch.nonzero(input_ids[0] == model.config.video_token_id).flatten()
    start, end = int(run[0]), int(run[-1]) + 1
    with torch.no_grad():
        text = model.get_input_embeddings()(input_ids)
    return torch.cat((text[:, :start], video[None], text[:, end:]), dim=1)


def greedy_without_cache(model: nn.Module, prompt_embeds: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens from full forwards of the stock LLM on the (compressed) prompt, one step at a time."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            generated = model.get_input_embeddings()(torch.tensor([tokens], dtype=torch.long))
            embeds = torch.cat((prompt_embeds, generated), dim=1)
            hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            tokens.append(int(model.lm_head(hidden[:, -1]).argmax(-1)))
    return tokens


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[str], Path]) -> Callable[[str], Path]:
    return lambda layout: tiny_checkpoint(LAYOUT_FAMILY[layout])


# --------------------------------------------------------------------------------------------- tests


def test_other_classes_are_refused_naming_the_supported_ones() -> None:
    with pytest.raises(TypeError, match=r"LlavaOnevisionForConditionalGeneration.*Qwen2_5_VL"):
        apply_flashvid(nn.Linear(2, 2), None)


def test_bad_layout_is_refused(checkpoint: Callable[[str], Path]) -> None:
    model = load(checkpoint("onevision"), "sdpa")
    with pytest.raises(ValueError, match="video_layout must be one of"):
        apply_flashvid(model, None, video_layout="bilinear")


def test_last_used_vision_layer() -> None:
    # LLaVA-OneVision-7B: 26 SigLIP layers, vision_feature_layer -1
    assert last_used_vision_layer(-1, 26) == 25
    assert last_used_vision_layer(-2, 27) == 25
    assert last_used_vision_layer([-5, -2], 26) == 24
    assert last_used_vision_layer(3, 26) == 2
    with pytest.raises(ValueError, match="patch embeddings"):
        last_used_vision_layer(0, 26)


def test_newline_per_frame_gives_an_empty_frame_its_newline() -> None:
    tokens = torch.arange(6, dtype=torch.float32).view(3, 2)
    sequence = newline_per_frame(tokens, torch.tensor([0, 0, 2]), 3, torch.full((2,), -1.0))
    expected = [[0, 1], [2, 3], [-1, -1], [-1, -1], [4, 5], [-1, -1]]
    assert sequence.tolist() == expected


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_not_applied_or_removed_is_stock(checkpoint: Callable[[str], Path], attention: str) -> None:
    path = checkpoint("onevision")
    stock, patched = load(path, attention), load(path, attention)
    inputs = video_inputs(path)
    with torch.no_grad():
        expected = stock(**inputs).logits
        stock_class = type(patched)
        apply_flashvid(patched, flashvid_config(patched, pruning_layer=2), video_layout="llava_video")
        assert patched(**inputs).logits.shape[1] < expected.shape[1]
        remove_flashvid(patched)
        assert type(patched) is stock_class and not hasattr(patched, "flashvid_stats")
        assert torch.equal(patched(**inputs).logits, expected)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_identity_setting_matches_stock(checkpoint: Callable[[str], Path], attention: str) -> None:
    path = checkpoint("onevision")
    stock, patched = load(path, attention), load(path, attention)
    inputs = video_inputs(path)
    identity = flashvid_config(
        patched, retention_ratio=1.0, token_selection_method="attn", alpha=1.0, expansion=1.0
    )
    apply_flashvid(patched, identity)
    with torch.no_grad():
        expected, actual = stock(**inputs).logits, patched(**inputs).logits
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert patched.flashvid_stats.visual_tokens_compressed == patched.flashvid_stats.visual_tokens_in


@pytest.mark.parametrize("layout", ["onevision", "llava_video"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_llm_receives_the_compressed_tokens(
    checkpoint: Callable[[str], Path], attention: str, layout: str
) -> None:
    path = checkpoint(layout)
    model, reference = load(path, attention), load(path, "eager")
    inputs = video_inputs(path)
    config = flashvid_config(model)
    apply_flashvid(model, config, video_layout=layout)
    torch.manual_seed(0)
    with torch.no_grad(), llm_inputs(model) as calls:
        logits = model(**inputs).logits
    video, compression = reference_video(reference, inputs["pixel_values_videos"], config, layout)
    expected = expected_llm_input(reference, inputs["input_ids"], video)
    received = calls[0]["inputs_embeds"]
    assert received.shape == expected.shape == (1, logits.shape[1], expected.shape[2])
    if attention == "eager":  # the statistic layer computes exactly what transformers' eager attention does
        assert torch.equal(received, expected)
    else:  # the other vision layers run sdpa in the patched model, eager in the reference
        torch.testing.assert_close(received, expected, atol=1e-5, rtol=1e-5)
    # LLaVA positions: contiguous 0..L'-1 of the shortened sequence
    assert calls[0]["position_ids"].tolist() == [list(range(expected.shape[1]))]
    stats = model.flashvid_stats
    per_frame = 16 if layout == "onevision" else 9
    assert stats.visual_tokens_in == FRAMES * per_frame
    assert stats.visual_tokens_compressed == compression.tokens.shape[0] < stats.visual_tokens_in
    assert stats.visual_tokens_after_pruning == stats.visual_tokens_compressed  # pruning layer out of range
    assert stats.num_segments == len(compression.segment_lengths)
    assert stats.compression_ms >= 0.0


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_vanilla_llava_video_layout(checkpoint: Callable[[str], Path], attention: str) -> None:
    path = checkpoint("llava_video")
    model, reference = load(path, attention), load(path, "eager")
    inputs = video_inputs(path)
    apply_flashvid(model, None, video_layout="llava_video")
    with torch.no_grad(), llm_inputs(model) as calls:
        model(**inputs)
    video, _ = reference_video(reference, inputs["pixel_values_videos"], None, "llava_video")
    assert video.shape[0] == FRAMES * (9 + 1)  # 3×3 average-pooled tokens and one newline per frame
    torch.testing.assert_close(
        calls[0]["inputs_embeds"], expected_llm_input(reference, inputs["input_ids"], video)
    )


@pytest.mark.parametrize("layout", ["onevision", "llava_video"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cached_generate_matches_uncached_steps(
    checkpoint: Callable[[str], Path], attention: str, layout: str
) -> None:
    path = checkpoint(layout)
    model = load(path, attention)
    inputs = video_inputs(path, seed=1)
    apply_flashvid(model, flashvid_config(model), video_layout=layout)
    steps = 5
    with torch.no_grad(), llm_inputs(model) as calls:
        generated = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    assert len(calls) == steps  # one prefill, then one cached step per further token
    new_tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_tokens == greedy_without_cache(model, calls[0]["inputs_embeds"], steps)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_statistic_only_in_the_last_used_vision_layer(
    checkpoint: Callable[[str], Path], attention: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = checkpoint("onevision")
    model = load(path, attention)
    tower = model.model.vision_tower
    attentions = [layer.self_attn for layer in getattr(tower, "vision_model", tower).encoder.layers]
    stock_classes = [type(module) for module in attentions]
    stock_hooks = [len(module._forward_pre_hooks) for module in attentions]
    computed_in: list[int] = []  # the layer each statistic was computed from
    stock_received = llava_onevision.attention_received

    def recording_received(module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        computed_in.append(attentions.index(module))
        return stock_received(module, *args, **kwargs)

    monkeypatch.setattr(llava_onevision, "attention_received", recording_received)

    def hooked() -> list[bool]:
        return [len(module._forward_pre_hooks) > count for module, count in zip(attentions, stock_hooks)]

    apply_flashvid(model, flashvid_config(model))
    with torch.no_grad():
        model(**video_inputs(path))
    assert computed_in == [1] and hooked() == [False, True]
    assert [type(module) for module in attentions] == stock_classes  # each layer keeps its own attention
    assert model.config.vision_config._attn_implementation == attention  # the fast path stays for the others
    with (
        torch.no_grad()
    ):  # a per-call vision_feature_layer moves the statistic to that call's last used layer
        model(**video_inputs(path), vision_feature_layer=-2)
    assert computed_in == [1, 0] and hooked() == [True, True]
    remove_flashvid(model)
    assert [type(module) for module in attentions] == stock_classes
    assert [len(module._forward_pre_hooks) for module in attentions] == stock_hooks


def test_two_instances_keep_their_own_settings(checkpoint: Callable[[str], Path]) -> None:
    path = checkpoint("onevision")
    quarter, half, stock = load(path, "sdpa"), load(path, "sdpa"), load(path, "sdpa")
    apply_flashvid(quarter, flashvid_config(quarter, retention_ratio=0.25))
    apply_flashvid(half, flashvid_config(half, retention_ratio=0.5), video_layout="llava_video")
    inputs = video_inputs(path)
    with torch.no_grad():
        lengths = [model(**inputs).logits.shape[1] for model in (quarter, half, stock)]
    assert quarter.flashvid_stats.visual_tokens_compressed < half.flashvid_stats.visual_tokens_compressed
    assert lengths[0] < lengths[2] and lengths[1] < lengths[2]
    assert lengths[2] == inputs["input_ids"].shape[1]
    assert not hasattr(stock, "flashvid_stats") and type(stock) is type(load(path, "sdpa"))


def test_batch_above_one_is_refused_before_model_work(checkpoint: Callable[[str], Path]) -> None:
    path = checkpoint("onevision")
    model = load(path, "sdpa")
    apply_flashvid(model, flashvid_config(model))
    vision_calls: list[int] = []
    model.model.vision_tower.register_forward_hook(lambda *_: vision_calls.append(1))
    with torch.no_grad(), pytest.raises(ValueError, match="batch size 1"):
        model(**video_inputs(path, prompts=2))
    assert vision_calls == []


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_image_inputs_are_untouched(checkpoint: Callable[[str], Path], attention: str) -> None:
    from transformers import AutoProcessor

    path = checkpoint("onevision")
    stock, patched = load(path, attention), load(path, attention)
    apply_flashvid(patched, flashvid_config(patched))
    image = np.random.default_rng(2).integers(0, 255, (80, 60, 3), dtype=np.uint8)
    inputs = dict(AutoProcessor.from_pretrained(path)(text=IMAGE_PROMPT, images=[image], return_tensors="pt"))
    with torch.no_grad():
        assert torch.equal(patched(**inputs).logits, stock(**inputs).logits)


@pytest.mark.parametrize("layout", ["onevision", "llava_video"])
def test_video_shorter_than_min_segment_num(checkpoint: Callable[[str], Path], layout: str) -> None:
    path = checkpoint(layout)
    model = load(path, "sdpa")
    config = flashvid_config(model, min_segment_num=8)
    apply_flashvid(model, config, video_layout=layout)
    inputs = video_inputs(path, frames=2)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    assert 0 < model.flashvid_stats.visual_tokens_compressed < model.flashvid_stats.visual_tokens_in


@pytest.mark.parametrize("layout", ["onevision", "llava_video"])
def test_inner_llm_pruning_shortens_layers_from_k_on(checkpoint: Callable[[str], Path], layout: str) -> None:
    path = checkpoint(layout)
    inputs = video_inputs(path, seed=3)
    pruning_layer, llm_retention_ratio, steps = 2, 0.3, 4
    greedy = {}
    for attention in ATTENTIONS:
        model = load(path, attention)
        config = flashvid_config(model, pruning_layer=pruning_layer, llm_retention_ratio=llm_retention_ratio)
        apply_flashvid(model, config, video_layout=layout)
        layers = model.model.language_model.layers
        widths: list[list[int]] = [[] for _ in layers]  # sequence length each layer processed, per call
        for index, layer in enumerate(layers):
            layer.mlp.register_forward_hook(lambda _m, _a, out, seen=widths[index]: seen.append(out.shape[1]))
        torch.manual_seed(0)
        with torch.no_grad(), llm_inputs(model) as calls:
            output = model.generate(
                **inputs,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                return_dict_in_generate=True,
            )
        stats = model.flashvid_stats
        compressed_length = calls[0]["inputs_embeds"].shape[1]
        kept = math.ceil(stats.visual_tokens_compressed * llm_retention_ratio)
        pruned_length = compressed_length - stats.visual_tokens_compressed + kept
        assert stats.visual_tokens_after_pruning == kept < stats.visual_tokens_compressed
        assert [w[0] for w in widths] == [compressed_length] * pruning_layer + [pruned_length] * (
            len(layers) - pruning_layer
        )
        assert all(w[1:] == [1] * (steps - 1) for w in widths)  # cached decoding: one token per step
        cache = output.past_key_values
        assert [cache.get_seq_length(index) for index in range(len(layers))] == [
            compressed_length + steps - 1
        ] * pruning_layer + [pruned_length + steps - 1] * (len(layers) - pruning_layer)
        greedy[attention] = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    assert greedy["eager"] == greedy["sdpa"]


def test_reapplying_replaces_the_settings_and_the_pruning_hooks(checkpoint: Callable[[str], Path]) -> None:
    path = checkpoint("onevision")
    model = load(path, "sdpa")
    inputs = video_inputs(path)
    assert model.__dict__.get("flashvid_stats", "absent") == "absent"
    apply_flashvid(model, flashvid_config(model, pruning_layer=2))
    assert model.flashvid_stats is None  # nothing happened yet
    apply_flashvid(model, flashvid_config(model, retention_ratio=0.5))  # pruning layer out of range again
    layers = model.model.language_model.layers
    widths: list[int] = []
    for layer in layers:
        layer.mlp.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    with torch.no_grad():
        length = model(**inputs).logits.shape[1]
    assert widths == [length] * len(layers)  # the first application's pruning hooks are gone
    stats = model.flashvid_stats
    assert stats.visual_tokens_after_pruning == stats.visual_tokens_compressed


def test_text_prompt_after_a_video_generation_runs_stock(checkpoint: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer

    path = checkpoint("onevision")
    patched, stock = load(path, "sdpa"), load(path, "sdpa")
    apply_flashvid(patched, flashvid_config(patched, pruning_layer=2))
    text = dict(
        AutoTokenizer.from_pretrained(path)(IMAGE_PROMPT.replace("<image>\n", ""), return_tensors="pt")
    )
    settings = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        patched.generate(**video_inputs(path), **settings)
        assert torch.equal(patched.generate(**text, **settings), stock.generate(**text, **settings))


SMOKE_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_smoke_llava.py"


def run_smoke(*arguments: str) -> str:
    import subprocess
    import sys

    completed = subprocess.run(
        [sys.executable, str(SMOKE_SCRIPT), *arguments],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_smoke_7b_shaped_prefill() -> None:
    out = run_smoke("--frames", "32", "--repeats", "1")
    assert "visual_tokens_in=6272" in out and "speed-up" in out


def test_a_config_mapping_is_accepted_like_the_qwen_patches(checkpoint: Callable[[str], Path]) -> None:
    """A mapping of FlashVIDConfig fields is built into the config (as the Qwen patches do); other types are
    refused."""
    from dataclasses import asdict

    path = checkpoint("onevision")
    from_config, from_mapping = load(path, "sdpa"), load(path, "sdpa")
    config = flashvid_config(from_config)
    apply_flashvid(from_config, config)
    apply_flashvid(from_mapping, asdict(config))
    inputs = video_inputs(path)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = from_config(**inputs).logits
        torch.manual_seed(0)
        assert torch.equal(from_mapping(**inputs).logits, expected)
    assert from_mapping.flashvid_stats.visual_tokens_compressed == from_config.flashvid_stats.visual_tokens_compressed
    with pytest.raises(ValueError, match="retention_ratios"):
        apply_flashvid(from_mapping, {"retention_ratios": 0.25})
    with pytest.raises(TypeError, match="FlashVIDConfig"):
        apply_flashvid(from_mapping, 0.25)
