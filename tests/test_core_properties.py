"""Property tests over random shapes (hypothesis): budget arithmetic, alpha extremes, degenerate videos, and
agreement with the independent loop-style implementation."""

from __future__ import annotations

import math

import core_cases as cc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashvid_core as fc

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
LOOP = cc.loop_reference()

methods = st.sampled_from(fc.TOKEN_SELECTION_METHODS)


def make_video(seed: int, frames: int, tokens: int, dim: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(1, tokens, dim, generator=generator)
    features = base + 0.5 * torch.randn(frames, tokens, dim, generator=generator)  # correlated frames
    attention = torch.rand(frames, tokens, generator=generator) + 1e-3
    return features.to(dtype), attention.to(dtype)


@st.composite
def videos_and_configs(draw, max_frames=7, max_tokens=30):
    frames = draw(st.integers(1, max_frames))
    tokens = draw(st.integers(1, max_tokens))
    dim = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 10_000))
    retention = draw(st.sampled_from([0.1, 0.15, 0.25, 0.5, 0.8]))
    config = fc.FlashVIDConfig(
        retention_ratio=retention,
        expansion=draw(st.sampled_from([1.0, 1.25])) if retention <= 0.5 else 1.0,
        alpha=draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0])),
        temporal_threshold=draw(st.sampled_from([0.3, 0.7, 0.8, 0.95])),
        token_selection_method=draw(methods),
        do_segment=draw(st.booleans()),
        segment_threshold=draw(st.sampled_from([0.5, 0.9, 0.99])),
        min_segment_num=draw(st.integers(1, 10)),
        complementary_segment=draw(st.booleans()),
    )
    features, attention = make_video(seed, frames, tokens, dim)
    return features, attention, config


@SETTINGS
@given(videos_and_configs())
def test_token_count_follows_the_budget_arithmetic(case):
    features, attention, config = case
    frames, tokens, _ = features.shape
    if config.token_budget(tokens) > tokens:
        with pytest.raises(ValueError):
            fc.compress(features, attention, config)
        return
    out = fc.compress(features, attention, config)
    budget, selected, merged = config.budgets(tokens)
    assert (out.token_budget, out.num_selected, out.num_merged) == (budget, selected, merged)
    assert int(out.segment_lengths.sum()) == frames
    assert int(out.segment_num_tokens.sum()) == out.num_tokens == out.tokens.shape[0]
    # Never fewer than the budget; the per-frame ceilings add less than one token per frame.
    assert frames * budget <= out.num_tokens <= frames * budget + (frames if merged > 0 else 0)
    if merged == 0:
        assert out.num_tokens == frames * budget
    if all(length <= 1 for length in out.segment_lengths.tolist()) and merged > 0:
        # One-frame segments: all N tokens are clustered with ratio merged / N (float, as the official code).
        ratio = merged / tokens
        clusters = math.ceil(tokens * ratio) if ratio < 1.0 else tokens
        assert out.num_tokens == frames * (selected + clusters)
    assert torch.all(out.indices[1:] >= out.indices[:-1])
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < frames * tokens
    assert out.tokens.dtype == features.dtype and out.indices.dtype == torch.int64


@SETTINGS
@given(videos_and_configs(), st.sampled_from(["attn", "div", "attn_div", "div_er"]))
def test_alpha_one_keeps_only_selected_original_tokens(case, method):
    features, attention, config = case
    config = config.replace(alpha=1.0, token_selection_method=method)
    frames, tokens, dim = features.shape
    out = fc.compress(features, attention, config)
    budget = config.token_budget(tokens)
    assert out.num_merged == 0 and out.num_tokens == frames * budget
    assert torch.equal(out.tokens, features.reshape(-1, dim)[out.indices])
    per_frame = torch.bincount(out.indices // tokens, minlength=frames)
    assert torch.all(per_frame == budget)
    assert out.indices.unique().numel() == out.num_tokens  # these methods never pick a token twice


@SETTINGS
@given(videos_and_configs())
def test_alpha_zero_gives_only_merged_tokens(case):
    features, attention, config = case
    config = config.replace(alpha=0.0)
    torch.manual_seed(0)
    out = fc.compress(features, attention, config)
    assert out.num_selected == 0 and out.num_merged == config.token_budget(features.shape[1])
    # Same result whatever the selection method: nothing is selected (same tie-breaker draws).
    torch.manual_seed(0)
    other = fc.compress(features, attention, config.replace(token_selection_method="attn"))
    assert torch.equal(out.indices, other.indices)


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 16), st.integers(0, 1000), methods)
def test_one_frame_video(tokens, dim, seed, method):
    features, attention = make_video(seed, 1, tokens, dim)
    config = fc.FlashVIDConfig(token_selection_method=method, retention_ratio=0.5)
    out = fc.compress(features, attention, config)
    assert out.segment_lengths.tolist() == [1]
    _, selected, merged = config.budgets(tokens)
    ratio = merged / tokens
    assert out.num_tokens == selected + (math.ceil(tokens * ratio) if 0 < ratio < 1 else merged and tokens)


@SETTINGS
@given(st.integers(2, 6), st.integers(2, 20), st.integers(0, 1000))
def test_fewer_frames_than_min_segment_num(frames, tokens, seed):
    features, attention = make_video(seed, frames, tokens, 6)
    config = fc.FlashVIDConfig(min_segment_num=frames + 3, retention_ratio=0.5)
    out = fc.compress(features, attention, config)
    lengths = out.segment_lengths.tolist()
    assert sum(lengths) == frames and len(lengths) >= frames
    assert all(length <= 1 for length in lengths)  # every transition is cut, some twice (zero-length)
    zero = [i for i, length in enumerate(lengths) if length == 0]
    assert all(out.segment_num_tokens[i] == 0 for i in zero)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 1000), methods, st.sampled_from([0.0, 0.5, 1.0]))
def test_single_token_frames(frames, dim, seed, method, alpha):
    features, attention = make_video(seed, frames, 1, dim)
    config = fc.FlashVIDConfig(token_selection_method=method, alpha=alpha)
    out = fc.compress(features, attention, config)
    # N = 1: the budget is one token per frame and it is the frame's only token.
    assert out.token_budget == 1
    assert out.indices.tolist() == list(range(frames))
    assert torch.allclose(out.tokens.float(), features.reshape(frames, dim).float(), atol=1e-6)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 30), st.integers(1, 10), st.integers(0, 1000), st.booleans())
def test_full_retention_with_attn_returns_every_token_in_order(frames, tokens, dim, seed, do_segment):
    features, attention = make_video(seed, frames, tokens, dim)
    config = fc.FlashVIDConfig(retention_ratio=1.0, alpha=1.0, expansion=1.0, token_selection_method="attn",
                               do_segment=do_segment)
    out = fc.compress(features, attention, config)
    assert torch.equal(out.indices, torch.arange(frames * tokens))
    assert torch.equal(out.tokens, features.reshape(-1, dim))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(videos_and_configs(max_frames=6, max_tokens=26))
def test_matches_the_loop_style_implementation(case):
    features, attention, config = case
    if config.token_budget(features.shape[1]) > features.shape[1]:
        return
    torch.manual_seed(3)
    loop_tokens, loop_indices = LOOP.loop_compress(features, attention, config)
    torch.manual_seed(3)
    out = fc.compress(features, attention, config)
    assert torch.equal(out.indices, loop_indices)
    assert torch.allclose(out.tokens, loop_tokens, atol=1e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(videos_and_configs(max_frames=5, max_tokens=20), st.sampled_from([torch.bfloat16, torch.float16]))
def test_low_precision_inputs(case, dtype):
    features, attention, config = case
    if config.token_budget(features.shape[1]) > features.shape[1]:
        return
    out = fc.compress(features.to(dtype), attention.to(dtype), config)
    assert out.tokens.dtype == dtype and out.indices.dtype == torch.int64
    assert torch.isfinite(out.tokens.float()).all()
    assert int(out.segment_num_tokens.sum()) == out.num_tokens
