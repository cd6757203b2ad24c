"""PruneVID inside the LLM: the question-attention pruner on the decoder stacks of the three LLM kinds, and
`method=prunevid` through every family patch on the tiny checkpoints (kept counts, pruned cache, decoding).

The score is checked against the eager attention probabilities the model itself returns; decoding against a
cache-free forward of the whole sequence with the same kept positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from test_llm_pruning import (
    KINDS,
    LENGTH,
    PRUNING_LAYER,
    RATIO,
    VISUAL_LENGTH,
    VISUAL_START,
    _positions,
    check_decoding_against_forced_prefills,
)
from test_llm_pruning import _text_model as text_model
from test_patches_methods import FAMILIES, Case, _recorded, case  # noqa: F401  (the `case` fixture)

from flashvid_core import FlashVIDConfig
from lmms_eval_models.methods import MethodSettings, budget_for_method
from lmms_eval_models.patches import llm_pruning
from lmms_eval_models.patches.llm_pruning import (
    PRUNERS,
    LLMPruner,
    QuestionAttentionPruner,
    attach_llm_pruning,
    layer_question_attention,
)


def eager_question_scores(attentions: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """attentions (1, H, L, L) of one layer -> (n,) the largest probability any head of any token after the last
    visual position gives each visual position."""
    return attentions[0, :, int(visual[-1]) + 1 :, :][..., visual].amax(dim=(0, 1))


@pytest.mark.parametrize("kind", KINDS)
def test_question_attention_equals_eager_probabilities(kind):
    model = text_model(kind, "eager")
    pruner = attach_llm_pruning(model.layers, PRUNING_LAYER, RATIO, "question")
    assert type(pruner) is QuestionAttentionPruner
    embeds = torch.randn(1, LENGTH, model.config.hidden_size)
    with torch.no_grad(), pruner.prefill(VISUAL_START, VISUAL_LENGTH) as result:
        outputs = model(inputs_embeds=embeds, position_ids=_positions(kind, 0, LENGTH), output_attentions=True,
                        use_cache=False)  # fmt: skip
    visual = torch.arange(VISUAL_START, VISUAL_START + VISUAL_LENGTH)
    eager = eager_question_scores(outputs.attentions[PRUNING_LAYER - 1], visual)
    torch.testing.assert_close(result.last_query_attention[visual], eager, atol=1e-6, rtol=1e-5)
    assert not result.last_query_attention[VISUAL_START + VISUAL_LENGTH :].any()  # text positions: no score
    kept = math.ceil(VISUAL_LENGTH * RATIO)
    keep = result.keep_positions
    assert result.visual_tokens_kept == kept and keep.numel() == LENGTH - VISUAL_LENGTH + kept
    expected = torch.sort(torch.topk(eager, kept).indices + VISUAL_START).values
    assert torch.equal(keep[(keep >= VISUAL_START) & (keep < VISUAL_START + VISUAL_LENGTH)], expected)
    # the question's ranking differs from the last query's here: the two pruners keep different tokens
    last_query = outputs.attentions[PRUNING_LAYER - 1][0, :, -1, VISUAL_START : VISUAL_START + VISUAL_LENGTH]
    assert not torch.equal(torch.topk(last_query.mean(0), kept).indices.sort().values, expected - VISUAL_START)
    assert outputs.last_hidden_state.shape[1] == keep.numel()
    pruner.remove()


def test_scattered_visual_positions_and_a_video_at_the_end():
    """Qwen3-VL interleaves timestamps with the frames: the question is what follows the last visual token.
    A video that ends the sequence is scored by the last position alone."""
    model = text_model("qwen3_vl", "eager")
    layer = model.layers[0]
    embeds = torch.randn(1, LENGTH, model.config.hidden_size)
    visual = torch.tensor([3, 4, 5, 8, 9, 10, 14, 15])
    with torch.no_grad():
        outputs = model(inputs_embeds=embeds, position_ids=_positions("qwen3_vl", 0, LENGTH), output_attentions=True,
                        use_cache=False)  # fmt: skip
        captured = {}
        handle = layer.self_attn.register_forward_pre_hook(
            lambda _m, args, kwargs: captured.update(kwargs), with_kwargs=True)
        model(inputs_embeds=embeds, position_ids=_positions("qwen3_vl", 0, LENGTH), use_cache=False)
        handle.remove()
        hidden, rotary = captured["hidden_states"], captured["position_embeddings"]
        scores = layer_question_attention(layer.self_attn, hidden, rotary, visual, query_chunk=4)
        at_end = layer_question_attention(layer.self_attn, hidden, rotary, torch.arange(20, LENGTH))
    torch.testing.assert_close(scores[visual], eager_question_scores(outputs.attentions[0], visual), atol=1e-6,
                               rtol=1e-5)  # fmt: skip
    assert not scores[[0, 6, 7, 11, 20]].any()
    torch.testing.assert_close(at_end[20:], outputs.attentions[0][0, :, -1, 20:].amax(dim=0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("implementation", ("eager", "sdpa"))
@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_an_uncached_forward_with_the_same_kept_positions(kind, implementation, monkeypatch):
    model = text_model(kind, implementation)
    pruner = attach_llm_pruning(model.layers, PRUNING_LAYER, RATIO, "question")
    cache = check_decoding_against_forced_prefills(model, kind, pruner, monkeypatch)
    pruned = VISUAL_LENGTH - math.ceil(VISUAL_LENGTH * RATIO)
    lengths = [cache.get_seq_length(i) for i in range(len(model.layers))]
    assert lengths == [LENGTH + 3] * PRUNING_LAYER + [LENGTH + 3 - pruned] * (len(model.layers) - PRUNING_LAYER)
    pruner.remove()


def test_scoring_picks_the_pruner():
    model = text_model("qwen2", "sdpa")
    assert {"last_query": LLMPruner, "question": QuestionAttentionPruner} == PRUNERS
    assert type(attach_llm_pruning(model.layers, 2, 0.5)) is LLMPruner  # the default, as before
    assert attach_llm_pruning(model.layers, len(model.layers), 0.5, "question") is None
    with pytest.raises(ValueError, match="scoring='questions' is invalid: allowed last_query, question"):
        attach_llm_pruning(model.layers, 2, 0.5, "questions")


# ---------------------------------------------------------------------------------------------- families

OPTIONS = {"prunevid_layer": 2}  # the tiny LLMs have 4 layers
RETENTION_RATIO = 0.3


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_at_k_and_decodes_the_reference(case: Callable[[str], Case], family: str,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the family patch: M = F·b tokens enter, ceil(α·M) stay from layer K = 2, the KV cache of layers >= K
    holds the pruned prompt, and each greedy step's logits equal a cache-free forward of prompt + tokens so far
    whose layers >= K keep the same positions."""
    current = case(family)
    config = FlashVIDConfig(retention_ratio=RETENTION_RATIO)
    current.apply(config, method="prunevid", baseline_options=OPTIONS)
    chosen: list[torch.Tensor] = []
    choose = llm_pruning._keep_positions
    monkeypatch.setattr(llm_pruning, "_keep_positions", lambda *args: chosen.append(choose(*args)) or chosen[-1])
    steps = 3
    with torch.no_grad(), _recorded(current.model) as (calls, lengths):
        output = current.model.generate(**current.inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                        return_dict_in_generate=True, output_logits=True)  # fmt: skip
    stats = current.model.flashvid_stats
    budget = budget_for_method("prunevid", current.tokens_per_frame, current.num_frames, RETENTION_RATIO,
                               current.num_llm_layers, settings=MethodSettings(**OPTIONS))  # fmt: skip
    assert stats.visual_tokens_compressed == budget.tokens_entering_llm
    assert stats.visual_tokens_after_pruning == budget.tokens_after_pruning == math.ceil(0.4 * budget.tokens_entering_llm)
    prefill = calls[0]["inputs_embeds"].shape[1]
    pruned = prefill - budget.tokens_entering_llm + budget.tokens_after_pruning
    layers = current.num_llm_layers
    assert lengths[:layers] == [prefill] * 2 + [pruned] * (layers - 2)
    cache = output.past_key_values
    assert [cache.get_seq_length(i) for i in range(layers)] == [prefill + steps - 1] * 2 + [pruned + steps - 1] * 2
    assert len(chosen) == 1

    keep = chosen[0]
    prompt = current.inputs["input_ids"].shape[1]
    for step in range(steps):
        forced = torch.cat([keep, torch.arange(prefill, prefill + step)])
        monkeypatch.setattr(llm_pruning, "_keep_positions", lambda *args, forced=forced: forced)
        inputs = dict(current.inputs)
        inputs["input_ids"] = output.sequences[:, : prompt + step]
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in inputs:  # transformers 5's Qwen processors: the generated tokens are text (0)
            types = inputs["mm_token_type_ids"]
            inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, step)], dim=1)
        with torch.no_grad():
            reference = current.model(**inputs, use_cache=False).logits[:, -1]
        torch.testing.assert_close(output.logits[step], reference, atol=1e-4, rtol=1e-4)
        assert int(output.sequences[0, prompt + step]) == int(reference.argmax())
