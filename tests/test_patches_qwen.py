"""FlashVID inside Qwen2.5-VL and Qwen3-VL, on the tiny random-weight checkpoints (eager and sdpa, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (a hard dependency: a broken install must fail, not skip)

from flashvid_core import FlashVIDConfig, compress
from lmms_eval_models.patches import apply_flashvid, is_patched, remove_flashvid
from lmms_eval_models.patches.prefill import encode_call

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
IMPLEMENTATIONS = ("eager", "sdpa")
FRAME_SIZE = {"qwen2_5_vl": 112, "qwen3_vl": 128}  # 4 x 4 merged tokens per frame group
IDENTITY = FlashVIDConfig(retention_ratio=1.0, token_selection_method="attn", alpha=1.0, expansion=1.0, pruning_layer=99)
COMPRESS = FlashVIDConfig(retention_ratio=0.25, token_selection_method="attn_div", min_segment_num=2, pruning_layer=99)
PRUNE = FlashVIDConfig(
    retention_ratio=0.25, token_selection_method="attn_div", min_segment_num=2, pruning_layer=2, llm_retention_ratio=0.5
)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """Loads (family, attn_implementation) once per module; returns fresh stock models on request."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processors: dict[str, object] = {}

    def load(family: str, implementation: str = "sdpa"):
        path = tiny_checkpoint(family)
        if family not in processors:
            processors[family] = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=implementation).eval()
        return model, processors[family]

    return load


def video_inputs(processor, family: str, frames: int = 4, batch: int = 1, seed: int = 0, image: bool = False):
    rng = np.random.default_rng(seed)
    size = FRAME_SIZE[family]
    videos = [(rng.random((frames, size, size, 3)) * 255).astype(np.uint8) for _ in range(batch)]
    content = [{"type": "video"}, {"type": "text", "text": "What is shown?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kwargs = {}
    if family == "qwen3_vl":
        from transformers.video_utils import VideoMetadata

        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=frames, fps=2.0, frames_indices=list(range(frames)))] * batch
        kwargs["do_sample_frames"] = False
    return processor(text=[text] * batch, videos=videos, return_tensors="pt", padding=True, **kwargs)


def image_inputs(processor, family: str):
    rng = np.random.default_rng(1)
    size = FRAME_SIZE[family]
    picture = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    content = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=[text], images=[picture], return_tensors="pt")


class LanguageModelInputs:
    """Records what the language model receives (forward pre-hook), without changing it."""

    def __init__(self, model) -> None:
        self.calls: list[dict] = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(dict(kwargs))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def logits(model, inputs, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # the DPC-kNN tie-breaker draws from the default generator
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_and_removal_reproduce_stock_logits(loaded, family, implementation):
    model, processor = loaded(family, implementation)
    inputs = video_inputs(processor, family)
    stock = logits(model, inputs)
    apply_flashvid(model, IDENTITY)
    assert is_patched(model)
    identity = logits(model, inputs)
    assert identity.shape == stock.shape
    torch.testing.assert_close(identity, stock, atol=1e-5, rtol=0)
    assert model.flashvid_stats.visual_tokens_compressed == model.flashvid_stats.visual_tokens_in
    apply_flashvid(model, COMPRESS)
    assert logits(model, inputs).shape[1] < stock.shape[1]
    remove_flashvid(model)
    assert not is_patched(model) and not hasattr(model, "flashvid_stats")
    assert not any(type(module).__name__.startswith("FlashVID") for module in model.modules())
    assert torch.equal(logits(model, inputs), stock)


def _stock_positions(model, inputs) -> torch.Tensor:
    """The 3-D positions the stock language model receives for the original prompt."""
    with LanguageModelInputs(model) as recorder, torch.no_grad():
        model(**inputs)
    positions = recorder.calls[0]["position_ids"]
    return positions[-3:] if positions.shape[0] == 4 else positions


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_receives_exactly_the_compressed_tokens(loaded, family, implementation):
    model, processor = loaded(family, implementation)
    inputs = video_inputs(processor, family)
    stock_positions = _stock_positions(model, inputs)
    stock_embeds = model.get_input_embeddings()(inputs["input_ids"])
    apply_flashvid(model, COMPRESS)
    with LanguageModelInputs(model) as recorder:
        logits(model, inputs, seed=3)
    received = recorder.calls[0]
    encoded = encode_call(model, pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
    features, attention = encoded.features, encoded.statistic
    torch.manual_seed(3)
    expected = compress(features, attention, COMPRESS)

    ids = inputs["input_ids"][0]
    video_rows = torch.nonzero(ids == model.config.video_token_id).flatten()
    text_rows = torch.nonzero(ids != model.config.video_token_id).flatten()
    source = torch.sort(torch.cat([text_rows, video_rows[expected.indices]]), stable=True).values
    embeds = received["inputs_embeds"][0]
    assert embeds.shape[0] == source.numel()
    is_video = torch.isin(source, video_rows)
    assert torch.equal(embeds[is_video], expected.tokens)  # duplicated indices included, in order
    assert torch.equal(embeds[~is_video], stock_embeds[0, source[~is_video]])
    positions = received["position_ids"]
    assert torch.equal(positions[-3:], stock_positions[..., source])  # M-RoPE positions of the kept tokens
    assert torch.equal(positions[0, 0], torch.arange(source.numel()))
    stats = model.flashvid_stats
    assert stats.visual_tokens_in == video_rows.numel() and stats.visual_tokens_compressed == expected.indices.numel()
    assert stats.num_segments == expected.segment_lengths.numel() and stats.compression_ms >= 0
    if family == "qwen3_vl":  # deepstack rows follow the kept global indices
        assert torch.equal(received["visual_pos_masks"][0], is_video)
        assert received["deepstack_visual_embeds"][0].shape[0] == expected.indices.numel()


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_full_forwards_of_the_compressed_sequence(loaded, family, implementation):
    model, processor = loaded(family, implementation)
    inputs = video_inputs(processor, family)
    stock_positions = _stock_positions(model, inputs)
    apply_flashvid(model, COMPRESS)
    with LanguageModelInputs(model) as recorder, torch.no_grad():
        torch.manual_seed(0)
        generated = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    prefill = recorder.calls[0]
    new_tokens = generated.sequences[0, inputs["input_ids"].shape[1] :]
    language_model = model.model.language_model
    embeds, positions = prefill["inputs_embeds"], prefill["position_ids"][-3:]
    # contiguous text positions and an explicit mask: 4.57 Qwen3-VL would otherwise read the temporal row as packing
    text_positions = lambda length: torch.arange(length).view(1, 1, -1)  # noqa: E731
    extra = {k: prefill[k] for k in ("visual_pos_masks", "deepstack_visual_embeds") if prefill.get(k) is not None}
    next_position = int(stock_positions.max()) + 1  # decoding continues the original positions
    for step, token in enumerate(new_tokens):
        with torch.no_grad():
            length = embeds.shape[1]
            hidden = language_model(
                inputs_embeds=embeds,
                position_ids=torch.cat([text_positions(length), positions]),
                attention_mask=torch.ones(1, length, dtype=torch.long),
                use_cache=False,
                **extra,
            )
            step_logits = model.lm_head(hidden.last_hidden_state[:, -1])
        torch.testing.assert_close(step_logits, generated.logits[step], atol=1e-4, rtol=1e-4)
        assert int(step_logits.argmax()) == int(token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(token.view(1, 1))], dim=1)
        positions = torch.cat([positions, torch.full((3, 1, 1), next_position + step)], dim=-1)
        if "visual_pos_masks" in extra:
            extra["visual_pos_masks"] = torch.cat([extra["visual_pos_masks"], torch.zeros(1, 1, dtype=torch.bool)], 1)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_at_layer_k_shortens_sequence_and_cache_and_eager_equals_sdpa(loaded, family):
    tokens, scores = {}, {}
    for implementation in IMPLEMENTATIONS:
        model, processor = loaded(family, implementation)
        inputs = video_inputs(processor, family)
        apply_flashvid(model, PRUNE)
        lengths: list[int] = []
        layer = model.model.language_model.layers[PRUNE.pruning_layer]
        handle = layer.register_forward_hook(
            lambda module, args, output, seen=lengths: seen.append(_hidden(output).shape[1])
        )
        with torch.no_grad():
            torch.manual_seed(0)
            generated = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        handle.remove()
        stats = model.flashvid_stats
        compressed, kept = stats.visual_tokens_compressed, stats.visual_tokens_after_pruning
        assert kept == math.ceil(compressed * PRUNE.llm_retention_ratio) < compressed
        cache = generated.past_key_values
        decoded = generated.sequences.shape[1] - inputs["input_ids"].shape[1] - 1  # the last token is not cached
        below = [cache.get_seq_length(i) for i in range(PRUNE.pruning_layer)]
        above = [cache.get_seq_length(i) for i in range(PRUNE.pruning_layer, len(model.model.language_model.layers))]
        assert len(set(below)) == 1 and len(set(above)) == 1
        assert below[0] - above[0] == compressed - kept
        assert lengths[0] == below[0] - decoded - (compressed - kept)  # the prefill after layer K
        assert all(length == 1 for length in lengths[1:])
        tokens[implementation] = generated.sequences
        scores[implementation] = torch.stack(generated.logits)
    assert torch.equal(tokens["eager"], tokens["sdpa"])
    torch.testing.assert_close(scores["eager"], scores["sdpa"], atol=1e-4, rtol=1e-4)


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("family", FAMILIES)
def test_instances_are_independent(loaded, family):
    first, processor = loaded(family)
    second, _ = loaded(family)
    stock, _ = loaded(family)
    inputs = video_inputs(processor, family)
    reference = logits(stock, inputs)
    apply_flashvid(first, COMPRESS)
    apply_flashvid(second, FlashVIDConfig(retention_ratio=0.5, token_selection_method="attn", min_segment_num=2))
    logits(first, inputs)
    logits(second, inputs)
    assert first.flashvid_stats.visual_tokens_compressed < second.flashvid_stats.visual_tokens_compressed
    assert not is_patched(stock) and not hasattr(stock, "flashvid_stats")
    assert torch.equal(logits(stock, inputs), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_video_is_refused_before_model_work(loaded, family):
    model, processor = loaded(family)
    apply_flashvid(model, COMPRESS)
    inputs = video_inputs(processor, family, batch=2)
    vision_calls: list[int] = []
    handle = model.model.visual.register_forward_pre_hook(lambda *args: vision_calls.append(1))
    with pytest.raises(ValueError, match="batch size 1"):
        logits(model, inputs)
    with pytest.raises(ValueError, match="batch size 1"):  # 5.x generate encodes the videos before the forward
        model.generate(**inputs, max_new_tokens=2)
    handle.remove()
    assert vision_calls == []


@pytest.mark.parametrize("family", FAMILIES)
def test_images_untouched_and_short_video_works(loaded, family):
    model, processor = loaded(family)
    pictures = image_inputs(processor, family)
    reference = logits(model, pictures)
    apply_flashvid(model, FlashVIDConfig(retention_ratio=0.25, min_segment_num=8))
    assert torch.equal(logits(model, pictures), reference)
    assert model.flashvid_stats is None
    short = video_inputs(processor, family, frames=2)  # one temporal patch group, fewer than min_segment_num
    out = logits(model, short)
    assert torch.isfinite(out).all()
    assert model.flashvid_stats.visual_tokens_compressed < model.flashvid_stats.visual_tokens_in


def test_unsupported_class_is_a_type_error():
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration"):
        apply_flashvid(torch.nn.Linear(2, 2), COMPRESS)


def test_qwen3_deepstack_after_the_pruning_layer_is_gathered(loaded, tiny_checkpoint):
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    _, processor = loaded("qwen3_vl")
    config = AutoConfig.from_pretrained(tiny_checkpoint("qwen3_vl"))
    config.vision_config.deepstack_visual_indexes = [0, 1]  # deepstack added after LLM layers 0 and 1
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    settings = FlashVIDConfig(retention_ratio=0.25, min_segment_num=2, pruning_layer=1, llm_retention_ratio=0.5)
    apply_flashvid(model, settings)
    layers = model.model.language_model.layers
    seen: dict[str, torch.Tensor] = {}
    handles = [
        layers[1].register_forward_hook(lambda m, a, output: seen.__setitem__("before", _hidden(output).clone())),
        layers[2].register_forward_pre_hook(lambda m, args: seen.__setitem__("after", args[0])),
    ]
    with LanguageModelInputs(model) as recorder:
        logits(model, video_inputs(processor, "qwen3_vl"))
    for handle in handles:
        handle.remove()
    deepstack = recorder.calls[0]["deepstack_visual_embeds"][1]
    added = (seen["after"] - seen["before"])[0]
    rows = torch.nonzero(added.abs().sum(-1) > 0).flatten()
    assert rows.numel() == model.flashvid_stats.visual_tokens_after_pruning
    # (4.57 adds in place, hence the clone) each addition is the deepstack row of a kept visual token, in sequence order
    matches = torch.cdist(added[rows].float(), deepstack.float()).argmin(dim=-1)
    torch.testing.assert_close(added[rows], deepstack[matches], atol=1e-5, rtol=1e-5)
    assert bool((matches[1:] >= matches[:-1]).all())  # a duplicated global index repeats its row


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_without_cache_recompresses_and_agrees(loaded, family):
    model, processor = loaded(family)
    inputs = video_inputs(processor, family)
    # selection only: DPC-kNN's random tie-breaker (exact ties with 1-2 clusters) would differ between the calls
    apply_flashvid(model, FlashVIDConfig(retention_ratio=0.25, alpha=1.0, min_segment_num=2, pruning_layer=99))
    with torch.no_grad():
        torch.manual_seed(0)
        cached = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        torch.manual_seed(0)
        uncached = model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_qwen3_official_delimiter_dropping_is_opt_in(loaded):
    model, processor = loaded("qwen3_vl")
    inputs = video_inputs(processor, "qwen3_vl")
    ids = inputs["input_ids"][0]
    config = model.config
    is_video = ids == config.video_token_id
    delimiters = int(((ids == config.vision_start_token_id) & torch.roll(is_video, -1)).sum()) + int(
        ((ids == config.vision_end_token_id) & torch.roll(is_video, 1)).sum()
    )
    apply_flashvid(model, COMPRESS)
    kept = logits(model, inputs).shape[1]
    apply_flashvid(model, COMPRESS, drop_vision_delimiters=True)
    assert logits(model, inputs).shape[1] == kept - delimiters
    with pytest.raises(ValueError, match="drop_vision_delimiters"):
        apply_flashvid(model, COMPRESS, drop_vision_delimiters="yes")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_statistic_equals_eager_probabilities_of_the_last_vision_block(loaded, family, monkeypatch):
    import importlib

    from lmms_eval_models.patches import qwen2_5_vl, qwen3_vl

    model, processor = loaded(family, "eager")
    inputs = video_inputs(processor, family)
    apply_flashvid(model, COMPRESS)
    visual = model.model.visual
    modeling = importlib.import_module(type(visual.blocks[-1].attn).__module__)
    recorded: list[torch.Tensor] = []
    stock_eager = modeling.eager_attention_forward

    def recording_eager(module, *args, **kwargs):
        output, weights = stock_eager(module, *args, **kwargs)
        if module is visual.blocks[-1].attn:
            recorded.append(weights)  # (1, heads, chunk, chunk) per temporal patch group
        return output, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", recording_eager)
    merged: list[torch.Tensor] = []
    handle = visual.merger.register_forward_hook(lambda module, args, output: merged.append(output))
    encoded = encode_call(model, pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
    features, attention = encoded.features, encoded.statistic
    handle.remove()
    assert len(recorded) == int(inputs["video_grid_thw"][0, 0])  # only the last block, one chunk per group
    per_patch = torch.cat([weights.mean(dim=1).mean(dim=1).flatten() for weights in recorded])
    family_module = qwen2_5_vl if family == "qwen2_5_vl" else qwen3_vl
    expected = family_module.attention_to_raster(model.model, per_patch, inputs["video_grid_thw"])
    torch.testing.assert_close(attention.flatten(), expected, atol=1e-6, rtol=1e-5)
    # the statistic's order is the features' order: the merger's (encoder-order) rows, put back as the model does
    order = (
        torch.argsort(qwen2_5_vl._window_index(visual, inputs["video_grid_thw"]))
        if family == "qwen2_5_vl"
        else torch.arange(features.shape[0] * features.shape[1])
    )
    assert torch.equal(features.flatten(0, 1), merged[0][order])
    frame_sums = attention.sum(dim=-1)  # each group's patch statistics sum to 1; merge-unit means to 1/4
    torch.testing.assert_close(frame_sums, torch.full_like(frame_sums, 0.25), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_and_video_prompt_identity_reproduces_stock(loaded, family):
    model, processor = loaded(family, "eager")
    rng = np.random.default_rng(2)
    size = FRAME_SIZE[family]
    picture = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    video = (rng.random((4, size, size, 3)) * 255).astype(np.uint8)
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Compare them."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kwargs = {}
    if family == "qwen3_vl":
        from transformers.video_utils import VideoMetadata

        kwargs = {"video_metadata": [VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])],
                  "do_sample_frames": False}  # fmt: skip
    inputs = processor(text=[text], images=[picture], videos=[video], return_tensors="pt", **kwargs)
    stock = logits(model, inputs)
    apply_flashvid(model, IDENTITY)
    torch.testing.assert_close(logits(model, inputs), stock, atol=1e-5, rtol=0)
    apply_flashvid(model, PRUNE)  # compressed video and pruning next to an untouched image
    assert torch.isfinite(logits(model, inputs)).all()
    assert model.flashvid_stats.visual_tokens_in == int((inputs["input_ids"] == model.config.video_token_id).sum())


def two_greedy_tokens(model, inputs):
    """generate()'s reference: two greedy tokens with their logits."""
    torch.manual_seed(0)
    return model.generate(
        **inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True
    )


def one_cached_step(model, inputs, prefill):
    """The caller's own decoding step after `prefill`: the greedy token, fed with the original-length mask."""
    token = prefill.logits[:, -1:].argmax(-1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
    return token, model(input_ids=token, attention_mask=mask, past_key_values=prefill.past_key_values, use_cache=True)


def assert_continues_generate(generated, inputs, token, step) -> None:
    assert int(token) == int(generated.sequences[0, inputs["input_ids"].shape[1]])
    torch.testing.assert_close(step.logits[:, -1], generated.logits[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decoding_step_continues_the_compressed_cache(loaded, family):
    """A caller that drives the cache itself (no generate): original-length mask, no positions given."""
    model, processor = loaded(family)
    inputs = video_inputs(processor, family)
    apply_flashvid(model, PRUNE)
    with torch.no_grad():
        generated = two_greedy_tokens(model, inputs)
        torch.manual_seed(0)
        prefill = model(**inputs, use_cache=True)
        token, step = one_cached_step(model, inputs, prefill)
    assert_continues_generate(generated, inputs, token, step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_statistic_with_query_slices_equals_the_whole_chunk(loaded, family, dtype):
    """A budget below one chunk's attention slices its queries; the statistic stays the same (float tolerance)."""
    from lmms_eval_models.patches._qwen_common import vision_attention_received

    model, processor = loaded(family)
    model = model.to(dtype)
    inputs = video_inputs(processor, family)
    attention = model.model.visual.blocks[-1].attn
    calls: list[tuple[tuple, dict]] = []
    handle = attention.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True
    )
    with torch.no_grad():
        model.model.get_video_features(inputs["pixel_values_videos"].to(dtype), inputs["video_grid_thw"])
    handle.remove()
    ((args, kwargs),) = calls
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cu_seqlens, position_embeddings = kwargs["cu_seqlens"], kwargs["position_embeddings"]
    chunk = int(cu_seqlens[1] - cu_seqlens[0])
    with torch.no_grad():
        whole = vision_attention_received(attention, hidden_states, cu_seqlens, position_embeddings)
        sliced = vision_attention_received(
            attention, hidden_states, cu_seqlens, position_embeddings, max_bytes=attention.num_heads * chunk * 4 * 3
        )
    assert chunk > 3  # the budget (3 query rows) is below one chunk's attention: the sliced path runs
    assert sliced.shape == whole.shape and sliced.dtype == whole.dtype == dtype
    tolerance = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(sliced, whole, **tolerance)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reset_cache_reused_for_another_prompt_runs_stock(loaded, family):
    """A cache object that served a FlashVID prefill, reset and reused for a text prompt, is not mistaken for a
    continuation of the video prefill: the patched model answers exactly as the stock one."""
    from transformers import DynamicCache

    stock, processor = loaded(family)
    patched, _ = loaded(family)
    apply_flashvid(patched, COMPRESS)
    cache = DynamicCache()
    torch.manual_seed(0)
    with torch.no_grad():
        patched(**video_inputs(processor, family), past_key_values=cache, use_cache=True)
    cache.reset()
    if cache.get_seq_length():  # 4.57's reset() zeroes the tensors but keeps their length; crop empties them
        cache.crop(0)
    assert cache.get_seq_length() == 0
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                         add_generation_prompt=True)
    text_inputs = processor(text=[text], return_tensors="pt")
    with torch.no_grad():
        reused = patched(**text_inputs, past_key_values=cache, use_cache=True).logits
        expected = stock(**text_inputs, past_key_values=DynamicCache(), use_cache=True).logits
    assert torch.equal(reused, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_with_given_positions_sets_the_rope_deltas_for_decoding(loaded, family):
    """A caller that passes the prompt's position ids to the video prefill, then decodes without positions,
    continues this prompt's positions (not the rope deltas a previous prompt left): as `generate` does."""
    from lmms_eval_models.patches._qwen_common import _rope_index

    model, processor = loaded(family)
    inputs = video_inputs(processor, family)
    apply_flashvid(model, PRUNE)
    with torch.no_grad():
        generated = two_greedy_tokens(model, inputs)
        positions, deltas = _rope_index(model.model, dict(inputs))
        model.model.rope_deltas = deltas + 1000  # what an earlier, longer prompt would have left behind
        torch.manual_seed(0)
        prefill = model(**inputs, position_ids=positions, use_cache=True)
        token, step = one_cached_step(model, inputs, prefill)
    assert torch.equal(model.model.rope_deltas.view(-1), deltas.view(-1).to(model.model.rope_deltas))
    assert_continues_generate(generated, inputs, token, step)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_config_mapping_is_accepted_and_the_patch_class_is_reused(loaded, family):
    """`apply` takes a mapping of FlashVIDConfig fields like the config itself (as the LLaVA patch does); the
    model's patched class (named FlashVID…) is made once per original class, not at every apply."""
    from dataclasses import asdict

    from_config, processor = loaded(family)
    from_mapping, _ = loaded(family)
    inputs = video_inputs(processor, family)
    apply_flashvid(from_config, COMPRESS)
    apply_flashvid(from_mapping, asdict(COMPRESS))
    assert from_mapping.flashvid_stats is None
    assert type(from_mapping) is type(from_config)
    patched_class = type(from_mapping)
    assert patched_class.__name__ == f"FlashVID{patched_class.__mro__[1].__name__}"
    apply_flashvid(from_mapping, COMPRESS)  # re-applying swaps back and forth through the same class
    assert type(from_mapping) is patched_class
    assert torch.equal(logits(from_mapping, inputs), logits(from_config, inputs))
    with pytest.raises(TypeError, match="FlashVIDConfig"):
        apply_flashvid(from_mapping, 0.25)
