"""Inner-LLM pruning on the decoder stacks of Qwen2 (LLaVA's LLM), Qwen2.5-VL and Qwen3-VL text models (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers  # a hard dependency: a broken install must fail, not skip

from lmms_eval_models.patches.llm_pruning import attach_llm_pruning
from lmms_eval_models.tiny_checkpoints import llava_config, qwen2_5_vl_config, qwen3_vl_config

LENGTH, VISUAL_START, VISUAL_LENGTH = 30, 4, 20
PRUNING_LAYER, RATIO = 2, 0.3


def _text_model(kind: str, implementation: str, seed: int = 0):
    if kind == "qwen2":
        from transformers import Qwen2Model as model_class

        config = llava_config().text_config
    elif kind == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel as model_class

        config = qwen2_5_vl_config().text_config
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel as model_class

        config = qwen3_vl_config().text_config
    torch.manual_seed(seed)
    return model_class._from_config(config, attn_implementation=implementation).eval()


def _positions(kind: str, start: int, length: int) -> torch.Tensor:
    """1-D positions for Qwen2; for the VL models 3-D ones whose height/width rows differ from the temporal row
    inside the 'visual' span, so the M-RoPE composition matters."""
    base = torch.arange(start, start + length)
    if kind == "qwen2":
        return base.view(1, -1)
    rows = base.view(1, 1, -1).repeat(3, 1, 1)
    span = (base >= VISUAL_START) & (base < VISUAL_START + VISUAL_LENGTH)
    rows[1, 0, span] = VISUAL_START + (base[span] - VISUAL_START) // 5
    rows[2, 0, span] = VISUAL_START + (base[span] - VISUAL_START) % 5
    return rows


KINDS = ("qwen2", "qwen2_5_vl", "qwen3_vl")


@pytest.mark.parametrize("kind", KINDS)
def test_last_query_attention_equals_eager_probabilities(kind):
    model = _text_model(kind, "eager")
    pruner = attach_llm_pruning(model.layers, PRUNING_LAYER, RATIO)
    embeds = torch.randn(1, LENGTH, model.config.hidden_size)
    with torch.no_grad(), pruner.prefill(VISUAL_START, VISUAL_LENGTH) as result:
        outputs = model(
            inputs_embeds=embeds, position_ids=_positions(kind, 0, LENGTH), output_attentions=True, use_cache=False
        )
    eager = outputs.attentions[PRUNING_LAYER - 1][0, :, -1, :].mean(dim=0)
    torch.testing.assert_close(result.last_query_attention, eager, atol=1e-6, rtol=1e-5)
    kept = math.ceil(VISUAL_LENGTH * RATIO)
    keep = result.keep_positions
    assert keep.numel() == LENGTH - VISUAL_LENGTH + kept and result.visual_tokens_kept == kept
    visual = keep[(keep >= VISUAL_START) & (keep < VISUAL_START + VISUAL_LENGTH)]
    expected = torch.topk(eager[VISUAL_START : VISUAL_START + VISUAL_LENGTH], kept).indices + VISUAL_START
    assert torch.equal(visual, torch.sort(expected).values)
    # after layer K the sequence is the kept positions only
    assert outputs.last_hidden_state.shape[1] == keep.numel()
    pruner.remove()


def _decode(model, kind, pruner, embeds, new_embeds, chunks):
    """Prefill with pruning, then feed `new_embeds` in chunks of the given sizes with the cache; returns the last
    hidden states of every new token and the cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    length = embeds.shape[1]
    with pruner.prefill(VISUAL_START, VISUAL_LENGTH):
        model(
            inputs_embeds=embeds,
            position_ids=_positions(kind, 0, length),
            attention_mask=torch.ones(1, length, dtype=torch.long),
            past_key_values=cache,
            use_cache=True,
        )
    hidden, offset = [], 0
    for size in chunks:
        step = new_embeds[:, offset : offset + size]
        out = model(
            inputs_embeds=step,
            position_ids=_positions(kind, length + offset, size),
            attention_mask=torch.ones(1, length + offset + size, dtype=torch.long),
            past_key_values=cache,
            use_cache=True,
        )
        hidden.append(out.last_hidden_state)
        offset += size
    return torch.cat(hidden, dim=1), cache


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_with_a_pruned_cache_is_consistent_across_implementations(kind):
    embeds = torch.randn(1, LENGTH, 64)
    new_embeds = torch.randn(1, 4, 64)
    results = {}
    with torch.no_grad():
        for implementation in ("eager", "sdpa"):
            model = _text_model(kind, implementation)
            pruner = attach_llm_pruning(model.layers, PRUNING_LAYER, RATIO)
            one_by_one, cache = _decode(model, kind, pruner, embeds, new_embeds, [1, 1, 1, 1])
            # several tokens per call need a real causal mask over the shorter cache of layers >= K
            chunked, _ = _decode(model, kind, pruner, embeds, new_embeds, [2, 2])
            torch.testing.assert_close(chunked, one_by_one, atol=1e-5, rtol=1e-5)
            pruned = VISUAL_LENGTH - math.ceil(VISUAL_LENGTH * RATIO)
            lengths = [cache.get_seq_length(i) for i in range(len(model.layers))]
            assert lengths == [LENGTH + 4] * PRUNING_LAYER + [LENGTH + 4 - pruned] * (len(model.layers) - PRUNING_LAYER)
            results[implementation] = one_by_one
            pruner.remove()
    torch.testing.assert_close(results["eager"], results["sdpa"], atol=1e-5, rtol=1e-5)


def test_out_of_range_layer_and_removal_leave_the_model_stock():
    model = _text_model("qwen2", "sdpa")
    assert attach_llm_pruning(model.layers, len(model.layers), RATIO) is None
    embeds = torch.randn(1, LENGTH, model.config.hidden_size)
    with torch.no_grad():
        reference = model(inputs_embeds=embeds).last_hidden_state
        pruner = attach_llm_pruning(model.layers, PRUNING_LAYER, RATIO)
        outside_prefill = model(inputs_embeds=embeds).last_hidden_state  # no prefill scope: nothing pruned
        pruner.remove()
        after = model(inputs_embeds=embeds).last_hidden_state
    assert torch.equal(outside_prefill, reference) and torch.equal(after, reference)
    with pytest.raises(ValueError, match="llm_retention_ratio"):
        attach_llm_pruning(model.layers, PRUNING_LAYER, 0.0)


@pytest.mark.parametrize("implementation", ("eager", "sdpa"))
@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_an_uncached_forward_with_the_same_kept_positions(kind, implementation, monkeypatch):
    """Reference without any cache: the whole sequence again, with layers >= K forced to keep the prefill's kept
    positions plus the new tokens; its last rows must equal what cached decoding produced."""
    model = _text_model(kind, implementation)
    pruner = attach_llm_pruning(model.layers, PRUNING_LAYER, RATIO)
    check_decoding_against_forced_prefills(model, kind, pruner, monkeypatch)
    pruner.remove()


def check_decoding_against_forced_prefills(model, kind: str, pruner, monkeypatch) -> transformers.DynamicCache:
    """Decode 3 tokens after a pruned prefill, then compare each decoded row with an uncached forward of the whole
    sequence whose layers >= K are forced to the prefill's kept positions plus the new tokens. Returns the cache."""
    from lmms_eval_models.patches import llm_pruning

    embeds = torch.randn(1, LENGTH, 64)
    new_embeds = torch.randn(1, 3, 64)
    chosen: list[torch.Tensor] = []
    choose = llm_pruning._keep_positions
    monkeypatch.setattr(llm_pruning, "_keep_positions", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    with torch.no_grad():
        decoded, cache = _decode(model, kind, pruner, embeds, new_embeds, [1, 1, 1])
        keep = chosen[0]
        for step in range(new_embeds.shape[1]):
            forced = torch.cat([keep, torch.arange(LENGTH, LENGTH + step + 1)])
            monkeypatch.setattr(llm_pruning, "_keep_positions", lambda *args, forced=forced: forced)
            length = LENGTH + step + 1
            with pruner.prefill(VISUAL_START, VISUAL_LENGTH):
                reference = model(
                    inputs_embeds=torch.cat([embeds, new_embeds[:, : step + 1]], dim=1),
                    position_ids=_positions(kind, 0, length),
                    attention_mask=torch.ones(1, length, dtype=torch.long),
                    use_cache=False,
                ).last_hidden_state
            torch.testing.assert_close(decoded[:, step], reference[:, -1], atol=1e-5, rtol=1e-5)
    return cache
