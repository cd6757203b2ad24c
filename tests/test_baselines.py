"""Baselines (lmms_eval_models.methods): budget arithmetic, hand-worked FastV/VisionZip cases, determinism."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashvid_core.config import FlashVIDConfig
from flashvid_core.pipeline import Compression
from lmms_eval_models.methods import (
    METHODS,
    MethodSettings,
    budget_for_method,
    compress_with_method,
    frame_budget,
    llm_pruning_plan,
)
from lmms_eval_models.methods.divprune import divprune_select
from lmms_eval_models.methods.fastv import fastv_keep_positions, fastv_llm_retention_ratio
from lmms_eval_models.methods.fastvid import fastvid_anchor_counts, fastvid_compress, fastvid_token_count
from lmms_eval_models.methods.random_selection import random_select
from lmms_eval_models.methods.uniform import uniform_pool, uniform_pool_grid
from lmms_eval_models.methods.visionzip import visionzip_select, visionzip_split

# Per-frame token grids after each model's own pooling: the tiny checkpoints (LLaVA-OV 7×7 SigLIP bilinear-pooled
# to 4×4, LLaVA-Video average-pooled to 3×3, Qwen2.5-VL/Qwen3-VL 2×2 merged tokens) and the real models
# (14×14, 13×13), plus odd shapes.
TINY_GRIDS = [(4, 4), (3, 3), (2, 2)]
GRIDS = [*TINY_GRIDS, (14, 14), (13, 13), (2, 3), (3, 5)]
RATIOS = [0.1, 0.15, 0.2, 0.25, 0.5, 0.75, 1.0]
TINY_LLM_LAYERS = 4  # the tiny checkpoints' text model


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    # torch.allclose rather than torch.testing.assert_close, whose first call costs seconds of imports.
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)


def _video(num_frames: int, grid: tuple[int, int], dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    num_tokens = grid[0] * grid[1]
    features = torch.randn(num_frames, num_tokens, dim, generator=generator)
    attention = torch.rand(num_frames, num_tokens, generator=generator)
    return features, attention


# ------------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize(
    ("num_tokens", "ratio", "expected"),
    [(196, 0.25, 49), (196, 0.2, 39), (196, 0.15, 29), (196, 0.1, 19), (169, 0.1, 16), (16, 0.25, 4),
     (9, 0.25, 2), (4, 0.25, 1), (4, 0.1, 1), (100, 0.29, 29), (7, 1.0, 7)],
)  # fmt: skip
def test_frame_budget_is_floor_of_n_times_r_at_least_one(num_tokens, ratio, expected):
    # 100 · 0.29 is 28.999999999999996 in float64: the slack keeps it at 29.
    assert frame_budget(num_tokens, ratio) == expected


@pytest.mark.parametrize(("budget", "expected"), [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)),
                                                  (49, (41, 8)), (4, (3, 1)), (1, (1, 0)), (0, (0, 0))])  # fmt: skip
def test_visionzip_split_keeps_54_to_10(budget, expected):
    assert visionzip_split(budget) == expected


@pytest.mark.parametrize(
    ("grid", "budget", "expected"),
    [((14, 14), 49, (7, 7)), ((14, 14), 39, (6, 6)), ((14, 14), 29, (4, 7)), ((14, 14), 19, (3, 6)),
     ((13, 13), 42, (6, 7)), ((4, 4), 4, (2, 2)), ((4, 4), 8, (2, 4)), ((3, 3), 2, (1, 2)), ((2, 2), 1, (1, 1)),
     ((2, 3), 3, (1, 3)), ((4, 4), 16, (4, 4))],
)  # fmt: skip
def test_uniform_pool_grid(grid, budget, expected):
    pooled = uniform_pool_grid(grid, budget)
    assert pooled == expected
    assert pooled[0] * pooled[1] <= budget


@pytest.mark.parametrize("ratio", [0.1, 0.15, 0.2, 0.25])
def test_fastv_ratio_aligns_the_per_layer_average(ratio):
    # R·L = K + r·(L − K) with K = 2, L = 28 (the paper's 7B LLMs).
    kept = fastv_llm_retention_ratio(ratio, num_llm_layers=28, fastv_layer=2)
    assert ratio * 28 == pytest.approx(2 + kept * 26)
    budget = budget_for_method("fastv", 196, 32, ratio)
    assert budget.tokens_entering_llm == 32 * 196
    assert budget.llm_pruning.pruning_layer == 2
    assert budget.tokens_after_pruning == math.ceil(32 * 196 * kept)
    # Only the ceiling of the kept count separates the average from R exactly.
    assert budget.effective_retention_ratio == pytest.approx(ratio, abs=26 / 28 / (32 * 196))


def test_fastv_worked_budget_at_r_25_percent():
    # r = (0.25·28 − 2) / 26 = 5/26; 32·196 = 6272 tokens; ceil(6272·5/26) = ceil(1206.15) = 1207 after layer 2;
    # per layer (6272·2 + 1207·26) / 28 = 1568.79 ≈ 0.25 · 6272 = 1568.
    budget = budget_for_method("fastv", 196, 32, 0.25)
    assert budget.llm_pruning.llm_retention_ratio == pytest.approx(5 / 26)
    assert budget.tokens_after_pruning == 1207
    assert budget.average_tokens_per_layer == pytest.approx((6272 * 2 + 1207 * 26) / 28)


def test_fastv_paper_rule_keeps_r_equal_to_R():
    assert fastv_llm_retention_ratio(0.1, 28, 2, rule="paper") == 0.1
    plan = llm_pruning_plan("fastv", 0.1, 28, MethodSettings(fastv_ratio_rule="paper"))
    assert plan.llm_retention_ratio == 0.1


def test_fastv_refuses_a_budget_below_its_full_layers():
    # The tiny LLM has 4 layers: with K = 2 the first two layers alone average 0.5, so R must exceed 0.5.
    with pytest.raises(ValueError, match=r"retention_ratio=0.25 is out of range for FastV"):
        fastv_llm_retention_ratio(0.25, num_llm_layers=TINY_LLM_LAYERS, fastv_layer=2)
    with pytest.raises(ValueError, match=r"fastv_layer=4 is out of range"):
        fastv_llm_retention_ratio(0.5, num_llm_layers=4, fastv_layer=4)
    with pytest.raises(ValueError, match=r"unless R > 1/4"):
        fastv_llm_retention_ratio(0.25, num_llm_layers=TINY_LLM_LAYERS, fastv_layer=1)  # r would be 0


def test_flashvid_budget_follows_eq_13_to_15():
    # LLaVA-OV at R = 10%: ceil(196·0.1·1.25) = 25 per frame enter; 30% of them from layer 20 on.
    budget = budget_for_method("flashvid", 196, 32, 0.1)
    assert budget.tokens_per_frame == 25
    assert (budget.num_selected, budget.num_merged) == (18, 7)
    assert budget.llm_pruning.pruning_layer == 20 and budget.llm_pruning.llm_retention_ratio == 0.3
    assert budget.tokens_after_pruning == math.ceil(800 * 0.3)
    assert budget.average_tokens_per_layer == pytest.approx((800 * 20 + 240 * 8) / 28)
    # A pruning layer beyond a tiny LLM means no inner pruning.
    assert budget_for_method("flashvid", 16, 4, 0.25, num_llm_layers=TINY_LLM_LAYERS).llm_pruning is None


@pytest.mark.parametrize("method", ["visionzip", "divprune", "random", "fastvid"])
def test_pre_llm_budgets_keep_floor_n_r_per_frame_for_every_layer(method):
    budget = budget_for_method(method, 196, 32, 0.2)
    assert budget.tokens_per_frame == 39
    assert budget.llm_pruning is None
    assert budget.average_tokens_per_layer == 39 * 32
    assert budget.num_selected + budget.num_merged == 39


def test_settings_parse_model_arg_strings():
    parsed = MethodSettings.from_options({"fastv_layer": "1", "fastvid_merging_factor": "0.5", "visionzip_merge": "mean"})
    assert (parsed.fastv_layer, parsed.fastvid_merging_factor, parsed.visionzip_merge) == (1, 0.5, "mean")
    assert MethodSettings().to_dict()["fastvid_anchor_step"] == 4
    with pytest.raises(ValueError, match=r"seed='x' is invalid: expected an integer"):
        MethodSettings.from_options({"seed": "x"})
    with pytest.raises(ValueError, match=r"fastvid_merging_factor=1.5 is out of range: allowed \[0.0, 1.0\]"):
        MethodSettings.from_options({"fastvid_merging_factor": "1.5"})
    report = budget_for_method("fastv", 196, 32, 0.1).to_dict()
    assert report["llm_pruning"]["pruning_layer"] == 2 and report["tokens_after_pruning"] == 193


def test_none_keeps_everything():
    budget = budget_for_method("none", 169, 64, 0.1)
    assert budget.tokens_entering_llm == 169 * 64 and budget.effective_retention_ratio == 1.0


def test_invalid_arguments_name_the_key_and_range():
    features, attention = _video(2, (4, 4))
    with pytest.raises(ValueError, match=r"method='tome' is invalid: allowed flashvid, fastv, visionzip"):
        compress_with_method("tome", features, attention, 0.25)
    with pytest.raises(ValueError, match=r"unknown baseline option\(s\) \['sead'\]"):
        compress_with_method("random", features, attention, 0.25, sead=1)
    with pytest.raises(ValueError, match=r"retention_ratio=1.5 is out of range: allowed \(0, 1\]"):
        compress_with_method("random", features, attention, 1.5)
    with pytest.raises(ValueError, match=r"visionzip_merge='sum' is invalid"):
        MethodSettings(visionzip_merge="sum")
    with pytest.raises(ValueError, match=r"needs the attention statistic"):
        compress_with_method("visionzip", features, None, 0.25)
    with pytest.raises(ValueError, match=r"grid_hw=\(3, 4\) is invalid"):
        compress_with_method("uniform", features, None, 0.25, grid_hw=(3, 4))
    with pytest.raises(ValueError, match=r"grid_hw is required for uniform pooling"):
        budget_for_method("uniform", 6, 2, 0.5)


# --------------------------------------------------------------------- every method, counts match the budget
def _check_compression(result: Compression, num_frames: int, num_tokens: int, dim: int, strict: bool = True) -> None:
    assert result.tokens.shape == (result.indices.shape[0], dim)
    assert result.indices.dtype == torch.int64
    steps = result.indices[1:] - result.indices[:-1]
    # FlashVID's own output may repeat an index (a cluster centre that is also a selected token); baselines never.
    assert bool((steps > 0).all() if strict else (steps >= 0).all()), "indices must be ascending"
    assert int(result.indices.min()) >= 0 and int(result.indices.max()) < num_frames * num_tokens
    assert int(result.segment_lengths.sum()) == num_frames
    assert int(result.segment_num_tokens.sum()) == result.indices.shape[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from([m for m in METHODS if m != "flashvid"]),
    grid=st.sampled_from(GRIDS),
    num_frames=st.integers(1, 6),
    ratio=st.sampled_from(RATIOS),
)
def test_token_counts_match_the_budget_arithmetic(method, grid, num_frames, ratio):
    num_tokens = grid[0] * grid[1]
    features, attention = _video(num_frames, grid)
    result = compress_with_method(method, features, attention, ratio, grid_hw=grid)
    _check_compression(result, num_frames, num_tokens, features.shape[-1])
    budget = budget_for_method(method, num_tokens, num_frames, ratio, grid_hw=grid)
    assert result.token_budget == budget.tokens_per_frame
    assert (result.num_selected, result.num_merged) == (budget.num_selected, budget.num_merged)
    if method == "fastvid":
        # Anchor frames share a segment's contextual budget with floor division: never above b per frame.
        assert result.indices.numel() == fastvid_token_count(result.segment_lengths, num_tokens, ratio)
        assert result.indices.numel() <= budget.tokens_entering_llm
        return
    assert result.indices.numel() == budget.tokens_entering_llm
    if method == "prunevid":  # F·b over the video: a segment's static tokens sit at its first frame
        return
    per_frame = torch.bincount(result.indices // num_tokens, minlength=num_frames)
    assert per_frame.tolist() == [budget.tokens_per_frame] * num_frames


@pytest.mark.parametrize("grid", TINY_GRIDS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_the_tiny_checkpoint_grids(method, grid):
    """Each method at R = 0.5 on the tiny checkpoints' per-frame grids, 4 frames, the tiny 4-layer LLM."""
    num_tokens, num_frames, ratio = grid[0] * grid[1], 4, 0.5
    features, attention = _video(num_frames, grid, seed=3)
    options = {"fastv_layer": 1}  # the tiny LLM has 4 layers: K = 2 would need R > 2/4
    result = compress_with_method(method, features, attention, ratio, grid_hw=grid, **options)
    _check_compression(result, num_frames, num_tokens, features.shape[-1], strict=method != "flashvid")
    budget = budget_for_method(method, num_tokens, num_frames, ratio, TINY_LLM_LAYERS, grid_hw=grid,
                               settings=MethodSettings(**options))  # fmt: skip
    if method == "flashvid":
        # FlashVID's count is data-dependent (ADTS/DPC ceilings): at least the nominal budget, at most all tokens.
        assert budget.tokens_entering_llm <= result.indices.numel() <= num_frames * num_tokens
    elif method == "fastvid":
        assert result.indices.numel() == fastvid_token_count(result.segment_lengths, num_tokens, ratio)
    else:
        assert result.indices.numel() == budget.tokens_entering_llm
    if method == "fastv":
        # r = (0.5·4 − 1) / 3 = 1/3 from layer 1 on: the per-layer average is R up to the ceiling.
        assert budget.llm_pruning.llm_retention_ratio == pytest.approx(1 / 3)
        assert budget.tokens_after_pruning == math.ceil(num_frames * num_tokens / 3 - 1e-9)


def test_fastv_on_the_tiny_llm_with_k_1():
    # L = 4, K = 1, R = 0.625: r = (2.5 − 1) / 3 = 0.5; 4 frames of 16 tokens: 64 enter, ceil(32) after layer 1.
    budget = budget_for_method("fastv", 16, 4, 0.625, TINY_LLM_LAYERS, settings=MethodSettings(fastv_layer=1))
    assert budget.llm_pruning.llm_retention_ratio == 0.5
    assert (budget.tokens_entering_llm, budget.tokens_after_pruning) == (64, 32)
    assert budget.average_tokens_per_layer == (64 * 1 + 32 * 3) / 4 == 0.625 * 64


# ------------------------------------------------------------------------------------------ FastV, by hand
def test_fastv_keep_positions_hand_worked():
    # Sequence of 10: text 0–2, visual 3–8 (6 tokens), text 9. Tiny LLM (L = 4), K = 1, R = 0.625 -> r = 0.5,
    # so ceil(6 · 0.5) = 3 visual tokens stay. Visual attention: 3:.05 4:.30 5:.01 6:.20 7:.02 8:.10 -> the top
    # three are 4, 6, 8. Text is always kept: [0, 1, 2, 4, 6, 8, 9].
    attention = torch.tensor([0.2, 0.1, 0.1, 0.05, 0.30, 0.01, 0.20, 0.02, 0.10, 0.9])
    plan = llm_pruning_plan("fastv", 0.625, TINY_LLM_LAYERS, MethodSettings(fastv_layer=1))
    assert (plan.pruning_layer, plan.llm_retention_ratio) == (1, 0.5)
    kept = fastv_keep_positions(attention, visual_start=3, visual_length=6, llm_retention_ratio=plan.llm_retention_ratio)
    assert kept.tolist() == [0, 1, 2, 4, 6, 8, 9]


def test_fastv_keeps_every_token_before_the_llm():
    features, attention = _video(3, (4, 4))
    result = compress_with_method("fastv", features, attention, 0.25)
    assert result.indices.tolist() == list(range(48))
    assert torch.equal(result.tokens, features.reshape(48, -1))
    assert llm_pruning_plan("none", 0.25) is None and llm_pruning_plan("visionzip", 0.25) is None


# --------------------------------------------------------------------------------------- VisionZip, by hand
# One frame of 8 tokens in 2-D. Attention picks the dominant tokens 1 (0.40) and 4 (0.30). The remaining tokens in
# index order are [0, 2, 3, 5, 6, 7]; with 2 contextual tokens, step = 6 // 2 = 3, so the targets are remaining
# positions 0 and 3: tokens 0 = (1, 0) and 5 = (0, 1). Members by cosine: 2 = (2, 0) -> 0 (cos 1 vs 0);
# 3 = (3, 1) -> 0 (0.95 vs 0.32); 6 = (0, 2) -> 5; 7 = (1, 3) -> 5 (0.32 vs 0.95).
# official: token 0 -> (1, 0) + mean((2, 0), (3, 1)) = (3.5, 0.5); token 5 -> (0, 1) + mean((0, 2), (1, 3)) = (0.5, 3.5).
# mean:     token 0 -> ((1, 0) + (2, 0) + (3, 1)) / 3 = (2, 1/3); token 5 -> (1/3, 2).
VZ_FEATURES = torch.tensor([[1.0, 0.0], [5.0, 5.0], [2.0, 0.0], [3.0, 1.0], [-1.0, 2.0], [0.0, 1.0], [0.0, 2.0], [1.0, 3.0]])
VZ_ATTENTION = torch.tensor([0.10, 0.40, 0.05, 0.02, 0.30, 0.03, 0.04, 0.06])


@pytest.mark.parametrize(
    ("merge", "contextual_0", "contextual_5"),
    [("official", [3.5, 0.5], [0.5, 3.5]), ("mean", [2.0, 1 / 3], [1 / 3, 2.0])],
)
def test_visionzip_hand_worked(merge, contextual_0, contextual_5):
    tokens, indices = visionzip_select(VZ_FEATURES[None], VZ_ATTENTION[None], 2, 2, merge=merge)
    assert indices.tolist() == [[0, 1, 4, 5]]
    expected = torch.tensor([contextual_0, [5.0, 5.0], [-1.0, 2.0], contextual_5])
    _assert_close(tokens[0], expected)


def test_visionzip_target_without_members_stays_itself():
    # Dominant: 1 and 4. Remaining [0, 2, 3, 5, 6, 7] with 3 contextual: step 6 // 3 = 2, targets at remaining
    # positions 0, 2, 4: tokens 0 = (1, 0), 3 = (3, 1), 6 = (0, 2). Members: 2 = (2, 0) -> 0 (cos 1 vs 0.95 vs 0);
    # 5 = (0, 1) -> 6 (0 vs 0.32 vs 1); 7 = (1, 3) -> 6 (0.32 vs 0.6 vs 0.95). Target 3 has no member: it stays
    # (3, 1); token 0 -> (1, 0) + (2, 0) = (3, 0); token 6 -> (0, 2) + mean((0, 1), (1, 3)) = (0.5, 4).
    tokens, indices = visionzip_select(VZ_FEATURES[None], VZ_ATTENTION[None], 2, 3)
    assert indices.tolist() == [[0, 1, 3, 4, 6]]
    _assert_close(tokens[0, 2], torch.tensor([3.0, 1.0]))
    _assert_close(tokens[0, 0], torch.tensor([3.0, 0.0]))
    _assert_close(tokens[0, 4], torch.tensor([0.5, 4.0]))


def test_visionzip_frames_are_independent():
    features, attention = _video(5, (4, 4), seed=7)
    tokens, indices = visionzip_select(features, attention, 5, 2)
    for frame in range(5):
        one_tokens, one_indices = visionzip_select(features[frame : frame + 1], attention[frame : frame + 1], 5, 2)
        assert torch.equal(one_indices[0], indices[frame])
        _assert_close(one_tokens[0], tokens[frame])


# ---------------------------------------------------------------------------------------- DivPrune, random
def test_divprune_is_max_min_diversity():
    # Distances 1 − cos between 0 = (1, 0), 1 = (1, 0.01), 2 = (−1, 0), 3 = (0, 1), 4 = (0.1, −1). The first pick
    # maximises each column's second-smallest entry (the smallest is the token itself): column 0 and 1 ≈ 0.00005
    # (each other), 2: 1 (to 3), 3: 0.99 (to 1), 4: 0.90 (to 0) -> token 2. Next, the farthest from 2: 0 (2.0)
    # beats 1 (1.99995). Kept, ascending: [0, 2].
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [0.0, 1.0], [0.1, -1.0]]])
    assert divprune_select(features, 2).tolist() == [[0, 2]]


def test_random_is_deterministic_for_a_seed():
    first = random_select(4, 196, 49, seed=123)
    assert torch.equal(first, random_select(4, 196, 49, seed=123))
    assert not torch.equal(first, random_select(4, 196, 49, seed=124))
    assert bool((first[:, 1:] > first[:, :-1]).all())  # distinct, ascending
    features, attention = _video(4, (14, 14), seed=1)
    one = compress_with_method("random", features, attention, 0.25, seed=5)
    two = compress_with_method("random", features, None, 0.25, seed=5)
    assert torch.equal(one.indices, two.indices) and torch.equal(one.tokens, two.tokens)


# --------------------------------------------------------------------------------------------- uniform
def test_uniform_pool_is_exact_on_constant_and_linear_grids():
    # f(r, c) = 3r + 5c + 1 is linear, so a window's mean is f at the window's centre. 7×7 -> 3×3: windows
    # rows [0, 3), [2, 5), [4, 7) (floor(i·7/3) .. ceil((i+1)·7/3)), centred on rows 1, 3, 5 (columns alike).
    rows, columns = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
    linear = (3 * rows + 5 * columns + 1).reshape(1, 49, 1).double()
    features = torch.cat([linear, torch.full_like(linear, 2.5)], dim=-1).expand(2, -1, -1)
    tokens, indices = uniform_pool(features, (7, 7), (3, 3))
    centres = torch.tensor([1, 3, 5])
    expected_index = (centres[:, None] * 7 + centres[None, :]).reshape(-1)
    assert indices.tolist() == expected_index.tolist()
    expected_value = (3 * centres[:, None] + 5 * centres[None, :] + 1).reshape(-1).double()
    _assert_close(tokens[:, :, 0], expected_value.expand(2, -1))
    _assert_close(tokens[:, :, 1], torch.full((2, 9), 2.5, dtype=torch.float64))
    # 4×4 -> 2×2: disjoint 2×2 windows centred at (0.5, 0.5) etc.; the index is the top-left of the centre.
    rows, columns = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    linear = (3 * rows + 5 * columns + 1).reshape(1, 16, 1)
    tokens, indices = uniform_pool(linear, (4, 4), (2, 2))
    assert indices.tolist() == [0, 2, 8, 10]
    _assert_close(tokens[0, :, 0], torch.tensor([1 + 1.5 + 2.5, 1 + 1.5 + 12.5, 1 + 7.5 + 2.5, 1 + 7.5 + 12.5]))


def test_uniform_through_the_dispatcher_uses_the_grid():
    features, _ = _video(2, (3, 5))
    result = compress_with_method("uniform", features, None, 0.5, grid_hw=(3, 5))
    # b = floor(15·0.5) = 7; start round(3·sqrt(7/15)) = 2 -> 2×3 = 6, 1×5 = 5, 3×2 = 6: 2×3 is closer to 3:5.
    assert budget_for_method("uniform", 15, 2, 0.5, grid_hw=(3, 5)).pooled_grid == (2, 3)
    assert result.indices.numel() == 12


# --------------------------------------------------------------------------------------------- FastVID
def test_fastvid_anchor_counts():
    # Segments 5, 1, 2, 9 with c = 19, p = 4. Anchors sit at distances 0, 4, 8 … from each segment's last frame.
    # 5 frames: anchors 0 and 4, each floor(19·5/2) = 47; 1 frame: 19; 2 frames: the last, 38; 9 frames: 0, 4, 8,
    # each floor(19·9/3) = 57.
    counts = fastvid_anchor_counts(torch.tensor([5, 1, 2, 9]), 19, 4)
    assert counts.tolist() == [47, 0, 0, 0, 47, 19, 0, 38, 57, 0, 0, 0, 57, 0, 0, 0, 57]
    # Official quirk kept: c = 1, ℓ = 3, p = 2 gives floor(3/2) = 1 = c per anchor.
    assert fastvid_anchor_counts(torch.tensor([3]), 1, 2).tolist() == [1, 0, 1]


def test_fastvid_one_frame_hand_worked():
    # N = 8, R = 0.5: b = 4, contextual c = floor(4·0.4) = 1, salient s = 3 (tokens 0, 1, 2 by attention).
    # Candidates 3..7: A = (1, 1), B = (1, 1.1), C = (1.1, 1), D = (1, 0.9), E = (6, 6). A is the densest of the
    # tight cluster (its 4 nearest, self included, are 0, .1, .1, .1) and, being the densest, gets the frame's
    # largest distance as δ: it has the top DPC score and is the one target. All five candidates join it (m = 5):
    # w = max(0.6, 1/6) = 0.6; mean of members = (10.1/5, 10/5) = (2.02, 2.0);
    # token = 0.6·(1, 1) + 0.4·(2.02, 2.0) = (1.408, 1.4). With merging factor 0.1: w = 1/6 -> (1.85, 1.8333…).
    features = torch.tensor(
        [[[9.0, 0.0], [0.0, 9.0], [5.0, 5.0], [1.0, 1.0], [1.0, 1.1], [1.1, 1.0], [1.0, 0.9], [6.0, 6.0]]]
    )
    attention = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.1, 0.2]])
    result = fastvid_compress(features, attention, 0.5)
    assert result.indices.tolist() == [0, 1, 2, 3]
    assert (result.token_budget, result.num_selected, result.num_merged) == (4, 3, 1)
    _assert_close(result.tokens[:3], features[0, :3])
    _assert_close(result.tokens[3], torch.tensor([1.408, 1.4]))
    low = fastvid_compress(features, attention, 0.5, MethodSettings(fastvid_merging_factor=0.1))
    _assert_close(low.tokens[3], torch.tensor([1.85, 1.8 + 1 / 30]))


def _fastvid_merge_reference(features, attention, result, settings):
    """Loop-by-loop FastVID merge for the targets `result` chose: recomputes every contextual token."""
    num_frames, num_tokens, _ = features.shape
    num_salient = result.num_selected
    salient = torch.topk(attention, num_salient, dim=-1).indices
    candidates = [[n for n in range(num_tokens) if n not in set(salient[f].tolist())] for f in range(num_frames)]
    lengths = result.segment_lengths.tolist()
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    anchors = fastvid_anchor_counts(result.segment_lengths, result.num_merged, settings.fastvid_anchor_step)
    salient_set = {f * num_tokens + int(n) for f in range(num_frames) for n in salient[f]}
    expected = {}
    for start, length in zip(starts, lengths):
        for frame in range(start, start + length):
            if anchors[frame] == 0:
                continue
            targets = [int(g) for g in result.indices if g // num_tokens == frame and int(g) not in salient_set]
            pool_frames = [frame] if anchors[frame] == result.num_merged else range(start, start + length)
            pool = [features[f, n] for f in pool_frames for n in candidates[f]]
            members = {t: [] for t in targets}
            for token in pool:
                sims = [F.cosine_similarity(token, features[t // num_tokens, t % num_tokens], dim=0) for t in targets]
                members[targets[int(torch.stack(sims).argmax())]].append(token)
            for t in targets:
                target = features[t // num_tokens, t % num_tokens]
                weight = max(settings.fastvid_merging_factor, 1 / (len(members[t]) + 1))
                mean = torch.stack(members[t]).mean(dim=0) if members[t] else torch.zeros_like(target)
                expected[t] = weight * target + (1 - weight) * mean
    return expected


@pytest.mark.parametrize("settings_", [MethodSettings(), MethodSettings(fastvid_anchor_step=2)])
def test_fastvid_merging_matches_a_loop_reference(settings_):
    # 9 frames in two scenes (frames 0–4 and 5–8) plus noise; min 3 segments gives a third cut.
    generator = torch.Generator().manual_seed(11)
    scenes = torch.randn(2, 16, 6, generator=generator)
    features = torch.cat([scenes[0].expand(5, -1, -1), scenes[1].expand(4, -1, -1)])
    features = features + 0.3 * torch.randn(9, 16, 6, generator=generator)
    attention = torch.rand(9, 16, generator=generator)
    settings_ = dataclasses.replace(settings_, fastvid_min_segments=3)
    result = fastvid_compress(features, attention, 0.5, settings_)
    assert len(result.segment_lengths) >= 3
    expected = _fastvid_merge_reference(features, attention, result, settings_)
    assert expected, "some frame must be an anchor"
    for position, index in enumerate(result.indices.tolist()):
        if index in expected:
            _assert_close(result.tokens[position], expected[index], rtol=1e-5, atol=1e-5)
    assert result.indices.numel() == fastvid_token_count(result.segment_lengths, 16, 0.5, settings_)


def test_fastvid_is_reproducible():
    features, attention = _video(10, (8, 8), dim=16, seed=5)
    first = fastvid_compress(features, attention, 0.25)
    second = fastvid_compress(features, attention, 0.25)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.tokens, second.tokens)
    third = compress_with_method("fastvid", features, attention, 0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.indices, third.indices) and torch.equal(first.tokens, third.tokens)
    # Salient tokens are the top-s attention tokens of each frame, unchanged.
    salient = torch.topk(attention, first.num_selected, dim=-1).indices
    salient_global = (torch.arange(10)[:, None] * 64 + salient).flatten()
    assert bool(torch.isin(salient_global, first.indices).all())


def test_flashvid_through_the_dispatcher_is_compress():
    from flashvid_core.pipeline import compress

    features, attention = _video(4, (4, 4), seed=2)
    config = FlashVIDConfig(retention_ratio=0.5)
    ours = compress_with_method("flashvid", features, attention, 0.5, generator=torch.Generator().manual_seed(1))
    reference = compress(features, attention, config, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.indices, reference.indices) and torch.equal(ours.tokens, reference.tokens)
