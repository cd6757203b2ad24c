"""PruneVID before the LLM: each stage against a loop-style oracle written from the paper's definitions, the token
count equal to the budget on random shapes, determinism, and the budget arithmetic (App. C.1's cluster ratios).

The oracles below are plain Python loops over frames, positions and points (float64), independent of the
vectorised code: DPC-kNN (density from the k nearest distances, distance to the nearest denser point, centres of
largest product, nearest-centre assignment), the contiguous-cluster refinement, the mean pairwise cosine of a
position across a segment, the static cap, the largest-remainder split and the cluster means.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmms_eval_models.methods import MethodSettings, budget_for_method, compress_with_method, llm_pruning_plan
from lmms_eval_models.methods.prunevid import (
    PAPER_LLM_LAYERS,
    PruneVIDOptions,
    cap_static_merging,
    cluster_counts,
    contiguous_clusters,
    prunevid_cluster_ratio,
    prunevid_compress,
    prunevid_frame_budget,
    run_lengths,
    static_similarity,
    temporal_segments,
    token_groups,
)

# ------------------------------------------------------------------------------------------------- oracles


def oracle_dpc_knn(points: list[list[float]], num_clusters: int, k: int, noise: list[float]) -> tuple[list[int],
                                                                                                      list[int]]:
    """DPC-kNN by its definition: distances |x_i − x_j| / sqrt(D); density ρ_i = exp(−mean of the k smallest d_ij²
    (itself included)) + 1e-6·noise_i; δ_i = distance to the nearest point of larger ρ (the largest distance for
    the densest); centres = the num_clusters largest ρ·δ; every point joins its nearest centre (a centre joins
    itself). Returns (labels, centres)."""
    n, dim = len(points), len(points[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(points[i], points[j]))) / math.sqrt(dim) for j in range(n)]
            for i in range(n)]
    density = []
    for i in range(n):
        nearest = sorted(dist[i])[:k]
        density.append(math.exp(-sum(d * d for d in nearest) / k) + noise[i] * 1e-6)
    largest = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        denser = [dist[i][j] for j in range(n) if density[j] > density[i]]
        delta.append(min(denser) if denser else largest)
    score = [delta[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:num_clusters]
    labels = []
    for i in range(n):
        if i in centres:
            labels.append(centres.index(i))
            continue
        best = 0
        for slot in range(1, num_clusters):
            if dist[i][centres[slot]] < dist[i][centres[best]]:
                best = slot
        labels.append(best)
    return labels, centres


def oracle_contiguous(labels: list[int]) -> list[int]:
    """PruneVID's refinement, step by step: per cluster keep its longest run(s) of consecutive frames unless that
    length is 1; then, left to right, each stretch of unassigned frames takes the label of the longer of the runs
    of equal labels touching it (as filled so far; ties: left; none: 0)."""
    num_frames = len(labels)
    refined = list(labels)
    for label in sorted(set(labels)):
        runs, frame = [], 0
        while frame < num_frames:
            if labels[frame] == label:
                end = frame
                while end + 1 < num_frames and labels[end + 1] == label:
                    end += 1
                runs.append((frame, end))
                frame = end + 1
            else:
                frame += 1
        longest = max(end - start + 1 for start, end in runs)
        for start, end in runs:
            if longest == 1 or end - start + 1 < longest:
                for frame in range(start, end + 1):
                    refined[frame] = -1
    frame = 0
    while frame < num_frames:
        if refined[frame] != -1:
            frame += 1
            continue
        start = frame
        while frame < num_frames and refined[frame] == -1:
            frame += 1
        end = frame - 1
        left_label, left_length = None, 0
        if start > 0:
            left_label = refined[start - 1]
            cursor = start - 1
            while cursor >= 0 and refined[cursor] == left_label:
                cursor -= 1
            left_length = start - 1 - cursor
        right_label, right_length = None, 0
        if end < num_frames - 1:
            right_label = refined[end + 1]
            cursor = end + 1
            while cursor < num_frames and refined[cursor] == right_label:
                cursor += 1
            right_length = cursor - end - 1
        if left_length > right_length:
            new = left_label
        elif right_length > left_length:
            new = right_label
        else:
            new = left_label if left_label is not None else right_label
        for index in range(start, end + 1):
            refined[index] = 0 if new is None else new
    return refined


def oracle_runs(labels: list[int]) -> list[int]:
    lengths = [1]
    for previous, current in itertools.pairwise(labels):
        if current == previous:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def oracle_similarity(features: torch.Tensor, lengths: list[int]) -> list[list[float]]:
    """Mean cosine similarity over the ordered pairs t != t' of a segment's frames, per position (−inf: 1 frame)."""
    table, start = [], 0
    values = features.double()
    for length in lengths:
        row = []
        for position in range(features.shape[1]):
            if length == 1:
                row.append(float("-inf"))
                continue
            total = 0.0
            for t in range(start, start + length):
                for u in range(start, start + length):
                    if t != u:
                        a, b = values[t, position], values[u, position]
                        total += float(a @ b / (a.norm() * b.norm()))
            row.append(total / (length * (length - 1)))
        table.append(row)
        start += length
    return table


def oracle_cap(static: list[list[bool]], similarity: list[list[float]], lengths: list[int], num_tokens: int,
               budget: int) -> list[list[bool]]:
    """Turn the least similar static position dynamic, one at a time, while fewer than `budget` tokens remain."""
    static = [list(row) for row in static]

    def remaining() -> int:
        return sum(length * num_tokens - (length - 1) * sum(row) for row, length in zip(static, lengths))

    while remaining() < budget:
        candidates = [(similarity[s][n], s, n) for s in range(len(static)) for n in range(num_tokens) if static[s][n]]
        _, s, n = min(candidates)
        static[s][n] = False
    return static


def oracle_counts(sizes: list[int], budget: int) -> list[int]:
    """Largest remainder: floor(M·n_g / T) each, the rest one by one to the largest remainders (ties: first)."""
    total = sum(sizes)
    counts = [budget * size // total for size in sizes]
    remainders = [budget * size % total for size in sizes]
    for _ in range(budget - sum(counts)):
        best = max(range(len(sizes)), key=lambda g: (remainders[g], -g))
        counts[best] += 1
        remainders[best] = -1
    return counts


def oracle_compress(features: torch.Tensor, retention_ratio: float, options: PruneVIDOptions) -> tuple[torch.Tensor,
                                                                                                        list[int]]:
    """PruneVID before the LLM from the oracles above, with the tie-breaker draws of a generator seeded like the
    method's: frames first, then each clustered group's points in sequence order. Returns (tokens, indices)."""
    num_frames, num_tokens, _ = features.shape
    generator = torch.Generator().manual_seed(options.seed)
    budget = num_frames * prunevid_frame_budget(num_tokens, retention_ratio, options)
    num_clusters = max(1, math.floor(num_frames * options.prunevid_segment_ratio + 1e-9))
    frame_noise = torch.rand(num_frames, generator=generator).tolist()
    means = features.double().mean(dim=1).tolist()
    labels, _ = oracle_dpc_knn(means, num_clusters, min(options.prunevid_density_neighbours, num_frames), frame_noise)
    lengths = oracle_runs(oracle_contiguous(labels))
    similarity = oracle_similarity(features, lengths)
    static = [[value > options.prunevid_threshold for value in row] for row in similarity]
    static = oracle_cap(static, similarity, lengths, num_tokens, budget)
    # groups in sequence order: (tokens by position, frame they sit at)
    groups, start = [], 0
    for segment, length in enumerate(lengths):
        static_group = []
        for position in range(num_tokens):
            if static[segment][position]:
                mean = features[start : start + length, position].double().mean(dim=0)
                static_group.append((position, mean))
        groups.append((start, static_group))
        for frame in range(start, start + length):
            groups.append((frame, [(position, features[frame, position].double()) for position in range(num_tokens)
                                   if not static[segment][position]]))
        start += length
    counts = oracle_counts([len(members) for _, members in groups], budget)
    out = []
    for (frame, members), count in zip(groups, counts):
        if count == len(members):
            out += [(frame * num_tokens + position, value) for position, value in members]
        elif count > 0:
            noise = torch.rand(len(members), generator=generator).tolist()
            points = [value.float().tolist() for _, value in members]  # the method clusters the dtype's values
            k = min(options.prunevid_density_neighbours, len(members))
            labels, centres = oracle_dpc_knn(points, count, k, noise)
            for slot, centre in enumerate(centres):
                chosen = [members[i][1] for i in range(len(members)) if labels[i] == slot]
                out.append((frame * num_tokens + members[centre][0], sum(chosen) / len(chosen)))
    out.sort(key=lambda item: item[0])
    return torch.stack([value for _, value in out]).float(), [index for index, _ in out]


# ---------------------------------------------------------------------------------------------- test videos


def video(num_frames: int, num_tokens: int, dim: int, seed: int, redundancy: float = 0.0, scenes: int = 2,
          static_share: float = 1.0) -> torch.Tensor:
    """Random features with `scenes` scenes of consecutive frames: within a scene each position drifts around a
    base token by noise, scaled by (1 − redundancy) for the first static_share of the positions (redundancy near
    1 makes them static) and by 1 for the others."""
    generator = torch.Generator().manual_seed(seed)
    scene_of_frame = torch.arange(num_frames) * scenes // max(num_frames, 1)
    bases = torch.randn(scenes, num_tokens, dim, generator=generator)
    noise = torch.randn(num_frames, num_tokens, dim, generator=generator)
    scale = torch.ones(num_tokens, 1)
    scale[: math.ceil(static_share * num_tokens)] = 1.0 - redundancy
    return bases[scene_of_frame] + scale * noise


OPTIONS = PruneVIDOptions()

# ---------------------------------------------------------------------------------------------------- stages


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=24))
def test_contiguous_clusters_equals_the_stepwise_refinement(labels):
    refined = contiguous_clusters(torch.tensor(labels))
    assert refined.tolist() == oracle_contiguous(labels)
    assert run_lengths(refined).tolist() == oracle_runs(oracle_contiguous(labels))


def test_contiguous_clusters_hand_worked():
    # cluster 0: runs of 2 (kept) and 1; cluster 1: runs of 3 (kept) and 1; cluster 2: one run of 1 (removed).
    # Frame 2 (cluster 1, removed) sits between 0,0 (length 2) and 2 (removed) -> stretch [2, 3]: left 0-run of 2,
    # right 1-run of 3 -> label 1. Frame 7 (cluster 0): left 1-run is now 2 + 3 = 5 long, no right -> 1.
    labels = [0, 0, 1, 2, 1, 1, 1, 0]
    assert contiguous_clusters(torch.tensor(labels)).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    # equal lengths on both sides: the left label
    assert contiguous_clusters(torch.tensor([3, 3, 0, 1, 1])).tolist() == [3, 3, 3, 1, 1]
    # no cluster with a run longer than 1: everything is cluster 0, one segment
    assert contiguous_clusters(torch.tensor([2, 1, 2, 1])).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(("num_frames", "seed"), [(4, 0), (9, 1), (16, 2), (32, 3)])
def test_temporal_segments_equal_the_oracle(num_frames, seed):
    features = video(num_frames, 6, 5, seed, redundancy=0.3, scenes=3)
    lengths = temporal_segments(features, 0.25, 7, torch.Generator().manual_seed(seed))
    noise = torch.rand(num_frames, generator=torch.Generator().manual_seed(seed)).tolist()
    labels, _ = oracle_dpc_knn(features.double().mean(dim=1).tolist(), max(1, num_frames // 4),
                               min(7, num_frames), noise)
    assert lengths.tolist() == oracle_runs(oracle_contiguous(labels))


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), num_tokens=st.integers(1, 6),
       seed=st.integers(0, 1000))
def test_static_similarity_equals_the_pairwise_mean(lengths, num_tokens, seed):
    features = video(sum(lengths), num_tokens, 4, seed, redundancy=0.5)
    similarity = static_similarity(features, torch.tensor(lengths))
    expected = torch.tensor(oracle_similarity(features, lengths), dtype=torch.float32)
    torch.testing.assert_close(similarity, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), num_tokens=st.integers(1, 6),
       seed=st.integers(0, 1000), share=st.floats(0.05, 1.0))
def test_cap_turns_the_least_similar_static_positions_dynamic(lengths, num_tokens, seed, share):
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.rand(len(lengths), num_tokens, generator=generator)
    static = (similarity > 0.3) & (torch.tensor(lengths) > 1).unsqueeze(-1)
    budget = max(1, math.floor(share * sum(lengths) * num_tokens))
    capped = cap_static_merging(static, similarity, torch.tensor(lengths), budget)
    expected = oracle_cap(static.tolist(), similarity.tolist(), lengths, num_tokens, budget)
    assert capped.tolist() == expected


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=12).filter(lambda s: sum(s) > 0),
       share=st.floats(0.0, 1.0))
def test_cluster_counts_are_the_largest_remainder_split(sizes, share):
    budget = math.floor(share * sum(sizes))
    counts = cluster_counts(torch.tensor(sizes), budget)
    assert counts.tolist() == oracle_counts(sizes, budget)
    assert int(counts.sum()) == budget and bool((counts <= torch.tensor(sizes)).all())


def test_token_groups_are_in_sequence_order():
    features = video(5, 3, 2, 0)
    static = torch.tensor([[True, False, True], [False, False, False]])  # segments of 3 and 2 frames
    groups = token_groups(features, torch.tensor([3, 2]), static)
    # segment 0: static (at frame 0), frames 0, 1, 2; segment 1: static (empty, at frame 3), frames 3, 4
    assert groups.frames.tolist() == [0, 0, 1, 2, 3, 3, 4]
    assert groups.sizes.tolist() == [2, 1, 1, 1, 0, 3, 3]
    torch.testing.assert_close(groups.tokens[0, 2], features[:3, 2].mean(dim=0))
    assert torch.equal(groups.tokens[2], features[1])


@pytest.mark.parametrize(("shape", "ratio", "redundancy", "scenes", "static_share", "seed"), [
    ((8, 16, 6), 0.25, 0.0, 2, 1.0, 0),   # no redundancy: dynamic groups only
    ((8, 16, 6), 0.1, 0.95, 2, 0.5, 1),   # half the positions static in two scenes: static and dynamic groups
    ((12, 9, 4), 0.5, 0.99, 1, 1.0, 2),   # temporal merging alone would leave too few tokens: the cap acts
    ((6, 40, 5), 0.15, 0.95, 1, 0.2, 3),  # dynamic groups of more than 25 tokens (the other cdist formula)
    ((1, 10, 3), 0.3, 0.0, 1, 1.0, 4),    # one frame
    ((5, 4, 3), 1.0, 0.5, 1, 1.0, 5),     # every token kept
])
def test_compress_equals_the_oracle(shape, ratio, redundancy, scenes, static_share, seed):
    features = video(*shape, seed, redundancy=redundancy, scenes=scenes, static_share=static_share)
    result = prunevid_compress(features, ratio, OPTIONS)
    tokens, indices = oracle_compress(features, ratio, OPTIONS)
    assert result.indices.tolist() == indices
    torch.testing.assert_close(result.tokens, tokens, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_frames=st.integers(1, 12), num_tokens=st.integers(1, 40), dim=st.integers(2, 8),
       ratio=st.floats(0.01, 1.0), redundancy=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       threshold=st.sampled_from([-1.0, 0.5, 0.8]), segment_ratio=st.sampled_from([0.25, 0.5, 1.0]),
       seed=st.integers(0, 10_000))
def test_token_count_equals_the_budget(num_frames, num_tokens, dim, ratio, redundancy, threshold, segment_ratio,
                                       seed):
    features = video(num_frames, num_tokens, dim, seed, redundancy=redundancy)
    options = {"prunevid_threshold": threshold, "prunevid_segment_ratio": segment_ratio, "seed": seed}
    result = compress_with_method("prunevid", features, None, ratio, **options)
    budget = budget_for_method("prunevid", num_tokens, num_frames, ratio, settings=MethodSettings(**options))
    assert result.num_tokens == budget.tokens_entering_llm == num_frames * budget.tokens_per_frame
    assert result.token_budget == budget.tokens_per_frame
    steps = result.indices[1:] - result.indices[:-1]
    assert bool((steps > 0).all()) and int(result.indices.min()) >= 0 and int(result.indices.max()) < features.shape[0] * num_tokens
    assert int(result.segment_lengths.sum()) == num_frames and bool((result.segment_lengths > 0).all())
    assert int(result.segment_num_tokens.sum()) == result.num_tokens
    assert result.tokens.dtype == features.dtype and bool(torch.isfinite(result.tokens).all())


def test_identical_frames_still_give_the_budget():
    # τ = 0.8 makes every position of a multi-frame segment static: temporal merging alone would leave
    # F·N / ℓ tokens, fewer than the budget; the cap keeps exactly F·b.
    features = video(1, 12, 4, 0).expand(8, -1, -1).contiguous()
    result = compress_with_method("prunevid", features, None, 0.5)
    assert result.num_tokens == 8 * prunevid_frame_budget(12, 0.5)


def test_deterministic_for_a_seed():
    features = video(16, 20, 6, 7, redundancy=0.85)
    first = compress_with_method("prunevid", features, None, 0.2, seed=3)
    again = compress_with_method("prunevid", features, None, 0.2, seed=3)
    explicit = compress_with_method("prunevid", features, None, 0.2, seed=3,
                                    generator=torch.Generator().manual_seed(3))
    for other in (again, explicit):
        assert torch.equal(first.tokens, other.tokens) and torch.equal(first.indices, other.indices)
        assert torch.equal(first.segment_lengths, other.segment_lengths)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(compress_with_method("prunevid", features, None, 0.2, seed=3).tokens, first.tokens)


def test_half_precision_keeps_the_dtype_and_count():
    features = video(8, 16, 6, 1, redundancy=0.9).to(torch.bfloat16)
    result = compress_with_method("prunevid", features, None, 0.25)
    assert result.tokens.dtype == torch.bfloat16 and result.num_tokens == 8 * prunevid_frame_budget(16, 0.25)


# --------------------------------------------------------------------------------------------------- budget


def test_cluster_ratios_are_the_papers():
    # App. C.1: beta = 40.7 / 32.5 / 24.4 / 16.3 % for R = 25 / 20 / 15 / 10 % (printed to 0.1 %, 32.56 as 32.5).
    printed = {0.25: 0.407, 0.2: 0.325, 0.15: 0.244, 0.1: 0.163}
    for ratio, beta in printed.items():
        assert abs(prunevid_cluster_ratio(ratio) - beta) < 0.001
        # LLaVA-OneVision (196 tokens per frame): the same tokens per frame as the printed ratio gives
        assert prunevid_frame_budget(196, ratio) == math.floor(196 * beta)
    assert [prunevid_frame_budget(196, r) for r in printed] == [79, 63, 47, 31]


def test_per_layer_average_is_r_on_the_papers_llm():
    for ratio in (0.25, 0.2, 0.15, 0.1):
        budget = budget_for_method("prunevid", 196, 32, ratio, PAPER_LLM_LAYERS)
        assert budget.llm_pruning.pruning_layer == 10 and budget.llm_pruning.llm_retention_ratio == 0.4
        assert budget.tokens_after_pruning == math.ceil(0.4 * budget.tokens_entering_llm)
        # floor per frame keeps it at most R (up to the in-LLM ceiling's fraction of a token)
        assert 0.95 * ratio < budget.effective_retention_ratio <= ratio + 1 / (32 * 196)
    # R = 10 %: 32 · 31 = 992 tokens enter, ceil(0.4 · 992) = 397 from layer 10
    budget = budget_for_method("prunevid", 196, 32, 0.1)
    assert (budget.tokens_entering_llm, budget.tokens_after_pruning) == (992, 397)


def test_llm_pruning_plan():
    plan = llm_pruning_plan("prunevid", 0.25, 28)
    assert (plan.pruning_layer, plan.llm_retention_ratio, plan.scoring) == (10, 0.4, "question")
    assert llm_pruning_plan("fastv", 0.25, 28).scoring == "last_query"
    assert llm_pruning_plan("prunevid", 0.25, 10) is None  # K beyond the LLM: nothing pruned inside it
    assert llm_pruning_plan("prunevid", 0.3, 4, MethodSettings(prunevid_layer=2)).pruning_layer == 2
    # beta follows K and alpha; K beyond the reference depth: beta = R; R too large: every token enters
    assert prunevid_cluster_ratio(0.25, pruning_layer=2, selection_ratio=0.5) == pytest.approx(0.25 * 28 / 15)
    assert prunevid_cluster_ratio(0.25, pruning_layer=28) == 0.25
    assert prunevid_cluster_ratio(0.9) == 1.0 and prunevid_frame_budget(196, 0.9) == 196


@pytest.mark.parametrize(("key", "value", "message"), [
    ("prunevid_threshold", 1.5, r"prunevid_threshold=1\.5 is out of range: allowed \[-1\.0, 1\.0\]"),
    ("prunevid_segment_ratio", 0.0, r"prunevid_segment_ratio=0\.0 is out of range: allowed \(0, 1\]"),
    ("prunevid_selection_ratio", 1.2, r"prunevid_selection_ratio=1\.2 is out of range: allowed \(0, 1\]"),
    ("prunevid_layer", 0, r"prunevid_layer=0 is out of range: allowed integers >= 1"),
    ("prunevid_density_neighbours", 2.5, r"prunevid_density_neighbours=2\.5 is invalid: expected an integer"),
    ("prunevid_threshold", "high", r"prunevid_threshold"),
])
def test_bad_options_name_the_key_and_range(key, value, message):
    with pytest.raises(ValueError, match=message):
        MethodSettings.from_options({key: value})


def test_string_options_parse_as_from_model_args():
    settings_ = MethodSettings.from_options({"prunevid_threshold": "0.7", "prunevid_layer": "12",
                                             "prunevid_selection_ratio": "0.5"})
    options = settings_.options_for("prunevid")
    assert (options.prunevid_threshold, options.prunevid_layer, options.prunevid_selection_ratio) == (0.7, 12, 0.5)
    assert isinstance(options, PruneVIDOptions)
