"""The stages as pure functions: incremental greedy vs full recompute, TSTM vs a frame-by-frame walk, the opt-in
variants (tree depth / breadth, true tree mean, no re-pick, "w/ E.R."), and the inner-LLM keep positions."""

from __future__ import annotations

import math

import core_cases as cc
import pytest
import segment_reference
import torch

import flashvid_core as fc

LOOP = cc.loop_reference()


def random_distances(seed: int, batch: int = 3, tokens: int = 17) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, 6, generator=generator)
    return fc.cosine_distances(x) * torch.rand(batch, 1, tokens, generator=generator)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("forbid_repick", [True, False])
def test_incremental_greedy_equals_full_recompute(seed, forbid_repick):
    distances = random_distances(seed)
    k = 9
    got = fc.max_min_diversity(distances, k, forbid_repick)
    for b in range(distances.shape[0]):
        d = distances[b]
        picks = [int(torch.topk(d, 2, dim=0, largest=False).values[1].argmax())]
        while len(picks) < k:
            score = d[picks].min(dim=0).values
            if forbid_repick:
                score[picks] = -1.0
            picks.append(int(score.argmax()))
        assert got[b].tolist() == picks


def test_second_smallest_matches_topk_with_repeated_minimum():
    d = torch.tensor([[[0.0, 2.0], [0.0, 1.0], [3.0, 1.0]]])  # column 0: minimum 0 twice
    expected = torch.topk(d, 2, dim=1, largest=False).values[:, 1, :]
    assert torch.equal(fc.selection.second_smallest_per_column(d), expected)


@pytest.mark.parametrize("method", fc.TOKEN_SELECTION_METHODS)
def test_select_tokens_matches_per_frame_loop(method):
    features, attention = LOOP.synthetic_video(4, 30, 12, "cpu", torch.float32, seed=7)
    keep = fc.select_tokens(features, attention, 8, method, [4])
    segment_means = features.float().mean(dim=1)
    for t in range(4):
        assert keep[t].tolist() == LOOP.loop_select(features[t], attention[t], 8, method, segment_means)


def test_attn_div_v2_can_repick_and_the_option_forbids_it():
    # One large token opposite to fifteen small ones: the frame mean points its way, so the others' event
    # relevance is negative, their calibrated distances are <= 0, and the official v2 re-picks the large token.
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(12, generator=generator)
    features = direction + 0.05 * torch.randn(2, 16, 12, generator=generator)
    features[:, 0] = -100.0 * direction
    attention = torch.rand(2, 16, generator=generator)
    official = fc.select_tokens(features, attention, 5, "attn_div_v2")
    assert all(len(set(row.tolist())) < 5 for row in official)
    forbidden = fc.select_tokens(features, attention, 5, "attn_div_v2", forbid_repick=True)
    assert all(len(set(row.tolist())) == 5 for row in forbidden)
    through_config = fc.compress(features, attention, fc.FlashVIDConfig(alpha=1.0, retention_ratio=0.25,
                                                                        expansion=1.25, adts_forbid_repick=True))
    assert through_config.indices.unique().numel() == through_config.num_tokens


def test_div_er_calibrates_by_event_relevance_only():
    features, attention = LOOP.synthetic_video(3, 25, 8, "cpu", torch.float32, seed=3)
    relevance = fc.event_relevance(features)
    expected = fc.cosine_distances(features) * relevance.unsqueeze(1)
    assert torch.allclose(fc.calibrated_distances(features, attention, "div_er"), expected)
    # Attention does not enter it.
    assert torch.equal(fc.select_tokens(features, attention, 6, "div_er"),
                       fc.select_tokens(features, torch.rand_like(attention), 6, "div_er"))


def test_event_relevance_is_the_mean_over_the_segment_frames():
    features, _ = LOOP.synthetic_video(5, 10, 6, "cpu", torch.float32, seed=1)
    got = fc.event_relevance(features, [2, 3])
    for t, (start, stop) in zip(range(5), [(0, 2), (0, 2), (2, 5), (2, 5), (2, 5)]):
        frame_means = features[start:stop].mean(dim=1)  # (L, D)
        expected = (features[t] @ frame_means.T).mean(dim=1)
        assert torch.allclose(got[t], expected, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_tree_merge_equals_frame_by_frame_walk(seed):
    features, attention = LOOP.synthetic_video(6, 24, 8, "cpu", torch.float32, seed=seed)
    keep = fc.select_tokens(features, attention, 5, "attn")
    selected = torch.zeros(6, 24, dtype=torch.bool)
    selected[torch.arange(6).unsqueeze(-1), keep] = True
    tokens, indices, counts = segment_reference.merge_segment(features, ~selected, 0.6, 5, 4)
    walked = LOOP.loop_tstm(features, selected, 0.6, 9)
    assert counts.tolist() == [len(k) for k, _ in walked]
    assert indices.tolist() == [i for k, _ in walked for i in k]
    assert torch.allclose(tokens, torch.cat([v for _, v in walked]), atol=1e-5)


def chain_video() -> torch.Tensor:
    """3 frames, 3 tokens: token 0 drifts slowly (a chain z -> y -> x), tokens 1 and 2 are unrelated."""
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    frames = [x.clone(), x.clone(), x.clone()]
    frames[1][0] = torch.tensor([1.0, 0.1, 0.0, 0.0])
    frames[2][0] = torch.tensor([1.0, 0.2, 0.0, 0.0])
    frames[1][1] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    frames[2][1] = torch.tensor([0.0, -1.0, 0.0, 0.0])
    frames[1][2] = torch.tensor([0.0, 0.0, -1.0, 0.0])
    frames[2][2] = torch.tensor([0.0, 0.0, 0.0, -1.0])
    return torch.stack(frames)


def root_value(features, **options):
    result = fc.spatiotemporal_merge(features, torch.zeros(3, 3, dtype=torch.bool), [3], 0.9, 0, **options)
    return result, result.root_values[0, 0]


def test_official_merge_count_rule_and_true_mean_option():
    features = chain_video()
    result, official = root_value(features)
    assert result.merged[1, 0] and result.merged[2, 0]
    chain_sum = features[0, 0] + features[1, 0] + features[2, 0]
    assert torch.allclose(official, chain_sum / 2)  # the parent's count grows by one per direct child
    _, true_mean = root_value(features, true_mean=True)
    assert torch.allclose(true_mean, chain_sum / 3)


def test_max_depth_option():
    features = chain_video()
    result, _ = root_value(features, max_depth=2)  # root + one level of children: no chains
    assert result.merged[1, 0] and not result.merged[2, 0]
    result, _ = root_value(features, max_depth=1)  # a root alone: no temporal merging at all
    assert not result.merged.any()
    result, _ = root_value(features, max_depth=3)
    assert result.merged[2, 0]


def test_max_breadth_option():
    # Frame 1 has three tokens close to frame 0's token 0; breadth 1 keeps only the most similar child.
    frame0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    frame1 = torch.tensor([[1.0, 0.2, 0.0], [1.0, 0.05, 0.0], [1.0, 0.0, 0.1]])
    features = torch.stack([frame0, frame1])
    none = torch.zeros(2, 3, dtype=torch.bool)
    unlimited = fc.spatiotemporal_merge(features, none, [2], 0.9, 0)
    assert unlimited.merged[1].all()
    limited = fc.spatiotemporal_merge(features, none, [2], 0.9, 0, max_breadth=1)
    assert limited.merged[1].tolist() == [False, True, False]
    two = fc.spatiotemporal_merge(features, none, [2], 0.9, 0, max_breadth=2)
    assert two.merged[1].tolist() == [False, True, True]


def test_spatial_window_option():
    # 3 x 3 grid; frame 1's token 8 (bottom right) resembles frame 0's token 0 (top left) only.
    generator = torch.Generator().manual_seed(0)
    frame0 = torch.randn(9, 16, generator=generator)
    frame1 = torch.randn(9, 16, generator=generator)
    frame1[8] = frame0[0] + 0.01 * torch.randn(16, generator=generator)
    features = torch.stack([frame0, frame1])
    none = torch.zeros(2, 9, dtype=torch.bool)
    anywhere = fc.spatiotemporal_merge(features, none, [2], 0.9, 0)
    assert anywhere.merged[1, 8]
    for window in (1, 3):
        near = fc.spatiotemporal_merge(features, none, [2], 0.9, 0, spatial_window=window)
        assert not near.merged[1, 8]
    assert fc.spatiotemporal_merge(features, none, [2], 0.9, 0, spatial_window=5).merged[1, 8]
    mask = fc.merging.spatial_window_mask(9, 1, torch.device("cpu"))
    assert torch.equal(mask, torch.eye(9, dtype=torch.bool))  # window 1: the same position only
    with pytest.raises(ValueError, match="square token grid"):
        fc.merging.spatial_window_mask(10, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="odd"):
        fc.FlashVIDConfig(tstm_spatial_window=4)


def test_variants_reach_compress_through_the_config():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(8, 49, 16, generator=generator)  # unrelated frames: random parents, many children
    attention = torch.rand(8, 49, generator=generator)
    base = fc.FlashVIDConfig(do_segment=False, alpha=0.3, temporal_threshold=0.0)
    torch.manual_seed(0)
    official = fc.compress(features, attention, base)
    for change in ({"tstm_max_depth": 1}, {"tstm_max_breadth": 1}, {"tstm_true_mean": True},
                   {"tstm_spatial_window": 3}):
        torch.manual_seed(0)
        variant = fc.compress(features, attention, base.replace(**change))
        assert variant.num_tokens >= base.token_budget(49) * 8
        differs = variant.num_tokens != official.num_tokens or not torch.equal(variant.indices, official.indices) or \
            not torch.allclose(variant.tokens, official.tokens)
        assert differs, change


def test_llm_keep_positions_golden_and_arithmetic():
    cc.run_case(cc.cases("fastv_prune")[0])
    attention = torch.tensor([0.5, 0.1, 0.4, 0.3, 0.2, 0.9, 0.05, 0.6])
    keep = fc.llm_keep_positions(attention, visual_start=1, visual_length=5, llm_retention_ratio=0.5)
    # ceil(5 * 0.5) = 3 visual positions of largest attention (2, 3, 5), all text positions (0, 6, 7).
    assert keep.tolist() == [0, 2, 3, 5, 6, 7]
    assert fc.llm_keep_positions(attention, 0, 8, 1.0).tolist() == list(range(8))
    assert fc.llm_keep_positions(attention, 2, 0, 0.3).tolist() == list(range(8))
    assert math.ceil(5 * 0.3) == 2 and len(fc.llm_keep_positions(attention, 1, 5, 0.3)) == 3 + 2


def test_last_query_attention_averages_heads_of_the_last_row():
    probs = torch.softmax(torch.randn(1, 3, 5, 5), dim=-1)
    assert torch.allclose(fc.last_query_attention_from_probabilities(probs)[0], probs[0, :, -1, :].mean(dim=0))
    assert torch.allclose(fc.last_query_attention_from_probabilities(probs[0]), probs[0, :, -1, :].mean(dim=0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_golden_set_with_recorded_noise():
    for case in cc.cases("flashvid_compression"):
        kwargs = {} if case.get("expect_exception") else {"inject_noise": True}
        cc.run_case(case, device="cuda", **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_the_stepwise_loop_implementation(dtype):
    # TSTM sums rounded frame step by frame step in the input dtype, cluster means formed in it: as the
    # loop-style implementation (and the official code) does.
    for seed in range(2):
        features, attention = LOOP.synthetic_video(10, 64, 24, "cpu", dtype, seed=seed)
        config = fc.FlashVIDConfig(min_segment_num=3)
        torch.manual_seed(seed)
        loop_tokens, loop_indices = LOOP.loop_compress(features, attention, config)
        torch.manual_seed(seed)
        out = fc.compress(features, attention, config)
        assert torch.equal(out.indices, loop_indices)
        assert out.tokens.dtype == dtype
        assert torch.allclose(out.tokens.float(), loop_tokens.float(), atol=2e-2, rtol=2e-2)


def test_duplicate_tokens_keep_every_centre_in_its_own_cluster():
    # Exact duplicate tokens (static or padded frames) put two centres at distance 0 from a point. Each centre
    # must still be forced into its own cluster, also in frames clustered with fewer clusters than the batch's
    # widest frame (a regression: such rows' unused centre slots could overwrite the centre at token 0).
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        base = torch.randn(1, 40, 12, generator=generator)
        features = base + 0.3 * torch.randn(14, 40, 12, generator=generator)
        features[:, 1] = features[:, 0]
        attention = torch.rand(14, 40, generator=generator)
        config = fc.FlashVIDConfig(retention_ratio=0.6, alpha=0.0, token_selection_method="attn", min_segment_num=8)
        torch.manual_seed(seed)
        loop_tokens, loop_indices = LOOP.loop_compress(features, attention, config)
        torch.manual_seed(seed)
        out = fc.compress(features, attention, config)
        assert torch.equal(out.indices, loop_indices)
        assert torch.allclose(out.tokens, loop_tokens, atol=1e-5, rtol=1e-5)


def test_ragged_dpc_forces_centres_with_fewer_clusters_than_the_batch():
    # Row 0 makes all 4 of its points centres, using 4 of the batch's 5 cluster slots; its tokens 0 and 1 are
    # duplicates, so token 0 (the less dense: score 0, last slot) lies at distance 0 from token 1's centre too.
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(2, 12, 6, generator=generator)
    points[0, 1] = points[0, 0]
    noise = torch.rand(2, 12, generator=generator)
    noise[0, 0], noise[0, 1] = 0.0, 1.0
    counts, clusters, neighbours = [4, 12], [4, 5], [4, 5]
    assignment, centres = fc.dpc_knn_ragged(
        points, torch.tensor(counts), torch.tensor(clusters), torch.tensor(neighbours), noise, counts, clusters,
        neighbours,
    )
    for row in range(2):
        count = counts[row]
        single_assignment, single_centres = fc.dpc_knn(
            points[row : row + 1, :count], clusters[row], neighbours[row], noise=noise[row : row + 1, :count]
        )
        assert torch.equal(centres[row, : clusters[row]], single_centres[0])
        assert torch.equal(assignment[row, :count], single_assignment[0])
    assert centres[0, 3] == 0 and sorted(assignment[0, :4].tolist()) == [0, 1, 2, 3]


def test_stepwise_and_vectorised_tree_sums_agree():
    features, attention = LOOP.synthetic_video(6, 36, 16, "cpu", torch.float32, seed=2)
    keep = fc.select_tokens(features, attention, 4, "attn")
    selected = torch.zeros(6, 36, dtype=torch.bool)
    selected[torch.arange(6).unsqueeze(-1), keep] = True
    tree = fc.spatiotemporal_merge(features, selected, [6], 0.5, 8)
    _, parent = fc.temporal_parents(features, selected, torch.tensor([True, False, False, False, False, False]))
    stepwise = segment_reference.stepwise_root_values(features, tree.merged, parent)
    roots = ~tree.merged
    assert torch.allclose(stepwise[roots], tree.root_values[roots], atol=1e-5)
    # The opt-in float32 sums for low precision inputs stay within its rounding.
    half = features.to(torch.bfloat16)
    official = fc.spatiotemporal_merge(half, selected, [6], 0.5, 8)
    fast = fc.spatiotemporal_merge(half, selected, [6], 0.5, 8, float32_sums=True)
    assert torch.equal(official.merged, fast.merged)
    keep_rows = ~official.merged & ~selected
    assert torch.allclose(official.root_values[keep_rows].float(), fast.root_values[keep_rows].float(), atol=0.1,
                          rtol=2e-2)


def test_fixed_order_index_sum_equals_index_add():
    # The CUDA summation (stable sort by row + in-order segment sums) against the CPU index_add_.
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(200, 7, generator=generator)
    index = torch.randint(0, 40, (200,), generator=generator)
    index[index == 3] = 4  # a row nothing maps to sums to zero
    expected = torch.zeros(45, 7).index_add_(0, index, values)
    got = fc.merging.fixed_order_index_sum(values, index, 45)
    assert got.shape == (45, 7)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got[3], torch.zeros(7)) and torch.equal(got[40:], torch.zeros(5, 7))
    # Each row sums its members in ascending position: bit-equal to a sequential float32 loop.
    sequential = torch.zeros(45, 7)
    for position in range(200):
        sequential[index[position]] = sequential[index[position]] + values[position]
    assert torch.equal(got, sequential)


@pytest.mark.parametrize("seed", range(2))
def test_cuda_summation_branch_matches_the_cpu_path(monkeypatch, seed):
    # The fixed-order branch that CUDA takes (TSTM tree sums, FastVID member sums), forced on CPU.
    from lmms_eval_models.methods.fastvid import fastvid_compress

    features, attention = LOOP.synthetic_video(8, 36, 16, "cpu", torch.float32, seed=seed)
    config = fc.FlashVIDConfig(min_segment_num=2)
    selected = torch.zeros(8, 36, dtype=torch.bool)
    runs = []
    for forced in (False, True):
        torch.manual_seed(seed)
        with fc.use_backend(fixed_order_sums_on_cpu=forced):
            runs.append((
                fc.compress(features, attention, config),
                fc.spatiotemporal_merge(features, selected, [3, 5], 0.3, 6),
                fastvid_compress(features, attention, 0.5, generator=torch.Generator().manual_seed(seed)),
            ))
    (cpu, cpu_tree, cpu_fastvid), (forced, forced_tree, forced_fastvid) = runs
    assert torch.equal(cpu.indices, forced.indices)
    assert torch.allclose(cpu.tokens, forced.tokens, atol=1e-5)
    assert torch.equal(cpu_tree.merged, forced_tree.merged) and cpu_tree.merged[1:].any()
    assert torch.equal(cpu_tree.counts, forced_tree.counts)
    roots = ~cpu_tree.merged  # only the roots' sums are meaningful (merged rows differ between the branches)
    assert torch.allclose(cpu_tree.sums[roots], forced_tree.sums[roots], atol=1e-5)
    assert torch.equal(cpu_fastvid.indices, forced_fastvid.indices)
    assert torch.allclose(cpu_fastvid.tokens, forced_fastvid.tokens, atol=1e-5)


def test_ragged_slots_and_frame_layout():
    from flashvid_core.eager_stage import ragged_slots

    counts = [3, 0, 2, 1]
    owner, slot = ragged_slots(torch.tensor(counts), sum(counts))
    assert owner.tolist() == [r for r, k in enumerate(counts) for _ in range(k)]
    assert slot.tolist() == [j for k in counts for j in range(k)]
    empty_owner, empty_slot = ragged_slots(torch.zeros(0, dtype=torch.long), 0)
    assert empty_owner.numel() == 0 and empty_slot.numel() == 0
    segment_of_frame, is_start, frame_length, lengths = fc.merging.frame_layout([2, 0, 3], torch.device("cpu"))
    assert segment_of_frame.tolist() == [0, 0, 2, 2, 2]
    assert is_start.tolist() == [True, False, True, False, False]
    assert frame_length.tolist() == [2, 2, 3, 3, 3]
    assert lengths.tolist() == [2, 0, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_segment_batched_tree_walk_equals_the_frame_by_frame_walk(dtype):
    # Segments are walked side by side (max length - 1 batched steps); each frame step rounds as before.
    generator = torch.Generator().manual_seed(3)
    frames, tokens, dim = 12, 30, 40
    scenes = torch.randn(3, tokens, dim, generator=generator)[torch.arange(frames) * 3 // frames]
    features = (scenes + 0.3 * torch.randn(frames, tokens, dim, generator=generator)).to(dtype)
    lengths = [4, 0, 3, 5]  # a zero-length segment included
    starts = torch.zeros(frames, dtype=torch.bool)
    starts[[0, 4, 7]] = True
    max_sim, parent = fc.temporal_parents(features, torch.zeros(frames, tokens, dtype=torch.bool), starts)
    merged = fc.merging.merge_decisions(max_sim, 0.5, lengths, 5)
    assert merged.sum() > 100
    batched_values, batched_counts = fc.merging.stepwise_tree_sums(features, merged, parent, lengths)
    values = features.clone()
    children_of = ((parent.unsqueeze(-1) == torch.arange(tokens)) & merged.unsqueeze(-1)).transpose(1, 2).to(dtype)
    for frame in range(frames - 1, 0, -1):
        values[frame - 1] += children_of[frame] @ values[frame]
    assert torch.equal(batched_values, values)
    assert torch.equal(batched_counts[:-1], 1 + children_of[1:].sum(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("points", [2, 25, 26, 150])
def test_self_cdist_is_torch_cdist_bit_for_bit(dtype, points):
    generator = torch.Generator().manual_seed(points)
    x = (torch.randn(3, points, 70, generator=generator) * 4).to(dtype)
    x[:, 1] = x[:, 0]  # a duplicate point: distance exactly 0 through the clamp
    assert torch.equal(fc.clustering.self_cdist(x), torch.cdist(x.float(), x.float()))


def _random_segments(rng, frames: int) -> list[int]:
    cuts = sorted(rng.sample(range(1, frames), k=rng.randint(0, frames - 1))) if frames > 1 else []
    bounds = [0, *cuts, frames]
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    for _ in range(rng.randint(0, 2)):
        lengths.insert(rng.randint(0, len(lengths)), 0)  # zero-length segments, as duplicate cuts give
    return lengths


def _per_frame(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, starts, sizes, offset = [], [], [], 0
    for segment, length in enumerate(lengths):
        ids += [segment] * length
        starts += [offset] * length
        sizes += [length] * length
        offset += length
    return torch.tensor(ids), torch.tensor(starts), torch.tensor(sizes)


@pytest.mark.parametrize("seed", range(40))
def test_merge_decisions_by_frame_equals_merge_decisions(seed):
    import random

    rng = random.Random(seed)
    frames, tokens = rng.randint(1, 20), rng.randint(1, 12)
    lengths = _random_segments(rng, frames)
    generator = torch.Generator().manual_seed(seed)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    max_sim = (torch.round((torch.rand(frames, tokens, generator=generator) * 2 - 1) * 8) / 8).to(dtype)  # ties
    segment_ids, segment_start, segment_length = _per_frame(lengths)
    max_sim[segment_start == torch.arange(frames)] = -1.0
    threshold, floor = rng.choice([0.0, 0.5, 0.8, 0.99]), rng.randint(0, tokens)
    expected = fc.merging.merge_decisions(max_sim, threshold, lengths, floor)
    got = fc.merging.merge_decisions_by_frame(max_sim, threshold, segment_ids, segment_start, segment_length, floor)
    assert torch.equal(got, expected)


def test_event_relevance_from_ids_agrees_with_event_relevance():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(9, 20, 16, generator=generator)
    lengths = [3, 0, 4, 2]
    segment_ids, _, _ = _per_frame(lengths)
    expected = fc.selection.event_relevance(features, lengths)
    assert torch.allclose(fc.selection.event_relevance_from_ids(features, segment_ids), expected, rtol=1e-5,
                          atol=1e-5)


def test_cuda_stage_code_runs_on_the_cpu_where_it_needs_no_kernel(monkeypatch):
    # The fixed-shape stage is plain PyTorch except the TSTM walk: selection-only and one-frame-segment plans run
    # anywhere, and give what the eager path gives.
    from flashvid_core.accel import stage as _cuda_stage

    features, attention = LOOP.synthetic_video(6, 36, 16, "cpu", torch.float16, seed=1)
    lengths = [2, 0, 3, 1]
    inputs = (features, attention, *_cuda_stage._frame_segments(lengths, features.device))
    for method in ("div", "attn_div"):
        plan = _cuda_stage.Plan(5, 0, method, None, 0.8, 5, True)
        out = _cuda_stage.stage(*inputs, plan)
        assert torch.equal(out.keep, fc.select_tokens(features.float(), attention, 5, method, lengths))
        assert torch.equal(out.selected.sum(dim=-1), torch.full((6,), 5))
    single = _cuda_stage.stage(features, attention, *_cuda_stage._frame_segments([1] * 6, features.device),
                               _cuda_stage.Plan(4, 3, "attn", None, 0.8, 7, False))
    assert single.passed.all() and torch.equal(single.passed_counts, torch.full((6,), 36))
    assert single.sums is features and single.counts is None


def test_cuda_stage_failure_disables_it_with_a_warning(monkeypatch):
    from flashvid_core.accel import stage as _cuda_stage

    monkeypatch.setattr(_cuda_stage, "STATE", _cuda_stage.StageState())
    features, attention = LOOP.synthetic_video(4, 16, 8, "cpu", torch.float16, seed=0)
    plan = _cuda_stage.Plan(2, 2, "attn", None, 0.8, 4, True)  # multi-frame: needs the CUDA walk kernel
    with fc.use_backend(stage_graphs=False), pytest.warns(RuntimeWarning, match="CUDA stage is disabled"):
        assert _cuda_stage.run(features, attention, [4], plan) is None
    assert _cuda_stage.STATE.broken and isinstance(_cuda_stage.STATE.last_error, RuntimeError)
    assert _cuda_stage.run(features, attention, [4], plan) is None  # stays off, silently


def test_lazy_kernel_builds_once_and_stays_off_after_a_failure():
    from flashvid_core.accel.kernels import KernelRegistry

    kernels = KernelRegistry()

    calls = []

    def build():
        calls.append(1)
        return "kernel"

    def broken():
        raise ImportError("no triton")

    assert kernels.get("test-good", build) == "kernel"
    assert kernels.get("test-good", build) == "kernel" and len(calls) == 1
    assert kernels.get("test-broken", broken) is None
    kernels.disable("test-good")
    assert kernels.get("test-good", build) is None and len(calls) == 1


def test_compress_reads_the_device_twice_without_complementary_cuts(monkeypatch):
    # The input check is read with DySeg's cuts, the cluster counts once: two device reads (syncs on a GPU).
    features, attention = LOOP.synthetic_video(16, 49, 32, "cpu", torch.float32, seed=0)
    reads: list[str] = []
    tolist, item = torch.Tensor.tolist, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (reads.append("tolist"), tolist(self))[1])
    monkeypatch.setattr(torch.Tensor, "item", lambda self: (reads.append("item"), item(self))[1])
    fc.compress(features, attention, fc.FlashVIDConfig(min_segment_num=1))
    assert reads == ["tolist", "tolist"]
    reads.clear()
    out = fc.compress(features, attention, fc.FlashVIDConfig(min_segment_num=6))  # complementary cuts: one more read
    assert reads == ["tolist"] * 3 and out.segment_lengths.tolist() == [2, 1, 1, 1, 3, 8]
    reads.clear()
    # One-frame segments only: every token is passed on, the cluster counts need no read.
    fc.compress(features, attention, fc.FlashVIDConfig(min_segment_num=16))
    assert reads == ["tolist"] * 2
    with pytest.raises(ValueError, match="features contain NaN"):
        fc.compress(features.index_fill(1, torch.tensor([3]), float("nan")), attention, fc.FlashVIDConfig())
    with pytest.raises(ValueError, match="attention contains NaN or inf"):
        fc.compress(features, attention.index_fill(1, torch.tensor([3]), float("inf")),
                    fc.FlashVIDConfig(do_segment=False))
