"""PruneVID (Huang et al., 2024): spatial-temporal token merging before the LLM, question-guided pruning inside it.

Before the LLM (`prunevid_compress`):
1. Temporal segments: DPC-kNN clusters the frames (descriptor: the mean of a frame's tokens) into floor(γ·F)
   clusters; each cluster is then made one contiguous run of frames (`contiguous_clusters`); the runs are the
   segments.
2. Static/dynamic split: in a segment of ℓ >= 2 frames, a token position whose tokens are similar across the
   segment (mean pairwise cosine > τ) is static: its ℓ tokens are merged into their mean. The other positions
   stay dynamic, one token per frame.
3. Spatial merging: DPC-kNN clusters each segment's static tokens, and each frame's dynamic tokens, into cluster
   means (the cluster counts share the budget in proportion to the groups' sizes).
Inside the LLM (`patches.llm_pruning.QuestionAttentionPruner`): from layer K on only the α share of the video
tokens with the largest attention from the question (the tokens after the video; max over heads and over those
queries, at layer K − 1) is kept.

Budget (docs/baselines.md): R is the average share of visual tokens per LLM layer. K layers see the M tokens
entering the LLM and the L − K after see α·M, so M = β·F·N with β = R·L / (K + α(L − K)) at the paper's depth
L = 28 (App. C.1's cluster ratios 40.7/32.5/24.4/16.3% for R = 25/20/15/10%). Per frame b = floor(N·β); the video
keeps exactly M = F·b tokens: the cluster counts are the budget's largest-remainder split over the groups, and
temporal merging never goes below the budget (`cap_static_merging`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flashvid_core.clustering import dpc_knn, dpc_knn_ragged, draw_density_noise
from flashvid_core.merging import index_sum
from flashvid_core.pipeline import Compression
from lmms_eval_models.methods.base import (
    FLOOR_SLACK,
    FrameBudget,
    LLMPruning,
    Method,
    check_features,
    check_integer_fields,
    check_interval,
    check_positive_int,
    check_retention_ratio,
    make_compression,
    sorted_by_index,
    store_real_fields,
)
from lmms_eval_models.methods.random_selection import SeedOptions
from lmms_eval_models.methods.registry import register

# The LLM depth at which R is turned into the cluster ratio β: the paper's 7B LLMs (Qwen2-7B, Qwen2.5-7B) have 28
# layers. The compression runs before the LLM and does not see the model (as FlashVID's r = 0.3, derived at L = 28).
PAPER_LLM_LAYERS = 28
# The in-LLM pruner that ranks the video tokens by the question's attention (`patches.llm_pruning`).
QUESTION_SCORING = "question"
# torch.cdist computes distances directly up to this many points and through a matrix product above: groups on
# either side are clustered in separate calls, so each group's distances are those of a call on it alone.
CDIST_DIRECT_MAX_POINTS = 25


@dataclass(frozen=True)
class PruneVIDOptions:
    """App. C.1's PruneVID settings.

    prunevid_threshold (τ = 0.8): a token position of a segment is static when the mean pairwise cosine similarity
        of its tokens across the segment's frames exceeds τ.
    prunevid_segment_ratio (γ = 0.25): the frames are clustered into floor(γ·F) (>= 1) clusters.
    prunevid_selection_ratio (α = 0.4): the share of the video tokens kept inside the LLM from layer K on.
    prunevid_layer (K = 10): the first LLM layer that sees only the kept tokens (ranked at layer K − 1); K layers
        see every token. Beyond the LLM: no pruning inside it.
    prunevid_density_neighbours (k = 7): the neighbours of DPC-kNN's density (capped at the points clustered).
    seed: the DPC-kNN density tie-breaker's seed (shared with `random` and `fastvid`).
    """

    prunevid_threshold: float = 0.8
    prunevid_segment_ratio: float = 0.25
    prunevid_selection_ratio: float = 0.4
    prunevid_layer: int = 10
    prunevid_density_neighbours: int = 7
    seed: int = SeedOptions.seed

    def __post_init__(self) -> None:
        check_integer_fields(self, ("prunevid_layer", "prunevid_density_neighbours"), 1)
        store_real_fields(self, ("prunevid_threshold", "prunevid_segment_ratio", "prunevid_selection_ratio"))
        SeedOptions(self.seed)
        check_interval("prunevid_threshold", self.prunevid_threshold, -1.0, 1.0)
        for name in ("prunevid_segment_ratio", "prunevid_selection_ratio"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range: allowed (0, 1]")


# ------------------------------------------------------------------------------------------------ budget
def prunevid_cluster_ratio(
    retention_ratio: float, pruning_layer: int = 10, selection_ratio: float = 0.4,
    num_llm_layers: int = PAPER_LLM_LAYERS,
) -> float:
    """β, the share of the F·N video tokens entering the LLM, so that the per-layer average over L layers is R.

    The first K layers see β·F·N tokens and the L − K after them α·β·F·N: R·L = β·K + α·β·(L − K), so
    β = R·L / (K + α·(L − K)); β = R when K >= L (nothing is pruned inside the LLM). At most 1 (every token).
    """
    check_retention_ratio(retention_ratio)
    check_positive_int("pruning_layer", pruning_layer)
    check_positive_int("num_llm_layers", num_llm_layers)
    if pruning_layer >= num_llm_layers:
        return float(retention_ratio)
    layers_per_token = pruning_layer + selection_ratio * (num_llm_layers - pruning_layer)
    return min(1.0, retention_ratio * num_llm_layers / layers_per_token)


def prunevid_frame_budget(num_tokens_per_frame: int, retention_ratio: float, settings: PruneVIDOptions | None = None
                          ) -> int:
    """b = floor(N·β) (1..N) with β from `prunevid_cluster_ratio` at the paper's depth: the video keeps F·b."""
    settings = settings or PruneVIDOptions()
    check_positive_int("num_tokens_per_frame", num_tokens_per_frame)
    ratio = prunevid_cluster_ratio(retention_ratio, settings.prunevid_layer, settings.prunevid_selection_ratio)
    return min(num_tokens_per_frame, max(1, math.floor(num_tokens_per_frame * ratio + FLOOR_SLACK)))


# ------------------------------------------------------------------------------------------------ 1. segments
def cluster_frames(frame_features: Tensor, num_clusters: int, num_neighbours: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """DPC-kNN cluster label of each frame. frame_features: (F, D); k capped at F. Returns (F,) int64."""
    num_frames = frame_features.shape[0]
    labels, _ = dpc_knn(frame_features.unsqueeze(0), num_clusters, k=min(num_neighbours, num_frames),
                        generator=generator)
    return labels[0]


def contiguous_clusters(labels: Tensor) -> Tensor:
    """Make every cluster one contiguous run of frames, as PruneVID's official code does.

    labels: (F,) int64 cluster labels in frame order. A cluster keeps its longest run(s) of consecutive frames
    (every run of that longest length), unless that length is 1: then it keeps none. Each maximal stretch of
    frames whose run was not kept joins the neighbouring label whose run of equal labels around the stretch is
    longer (counting the stretches filled before it, left to right); equal lengths: the left one; no neighbour at
    all: label 0. Returns (F,) int64.
    The run bookkeeping is vectorised; the fill is a left-to-right scan over the runs (each stretch's choice
    depends on how the stretches before it were filled) on host integers, at most F of them.
    """
    num_frames = labels.shape[0]
    starts = torch.ones(num_frames, dtype=torch.bool, device=labels.device)
    starts[1:] = labels[1:] != labels[:-1]
    run_of_frame = torch.cumsum(starts.long(), 0) - 1
    run_start = torch.nonzero(starts).flatten()
    run_length = torch.diff(run_start, append=torch.tensor([num_frames], device=labels.device))
    run_label = labels[run_start]
    longest = torch.zeros(int(labels.max()) + 1, dtype=torch.long, device=labels.device)
    longest = longest.scatter_reduce(0, run_label, run_length, reduce="amax")
    kept = (run_length == longest[run_label]) & (run_length > 1)

    lengths, labels_of_run, is_kept = run_length.tolist(), run_label.tolist(), kept.tolist()
    filled: list[int] = []
    stretch_label, stretch_length = None, 0  # the run of equal labels ending where the scan stands
    run = 0
    while run < len(lengths):
        if is_kept[run]:
            label, length, end = labels_of_run[run], lengths[run], run + 1
        else:
            end = run
            while end < len(lengths) and not is_kept[end]:
                end += 1
            right_label, right_length = (labels_of_run[end], lengths[end]) if end < len(lengths) else (None, 0)
            if stretch_length > right_length or (stretch_length == right_length and stretch_label is not None):
                label = stretch_label
            else:
                label = right_label
            label = 0 if label is None else label
            length = sum(lengths[run:end])
        filled.extend([label] * (end - run))
        stretch_length = stretch_length + length if label == stretch_label else length
        stretch_label = label
        run = end
    return torch.tensor(filled, dtype=torch.long, device=labels.device)[run_of_frame]


def run_lengths(labels: Tensor) -> Tensor:
    """(F,) labels -> (S,) int64 lengths of the runs of equal consecutive labels (the segments)."""
    starts = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    starts[1:] = labels[1:] != labels[:-1]
    run_start = torch.nonzero(starts).flatten()
    return torch.diff(run_start, append=torch.tensor([labels.shape[0]], device=labels.device))


def temporal_segments(features: Tensor, segment_ratio: float = 0.25, num_neighbours: int = 7,
                      generator: torch.Generator | None = None) -> Tensor:
    """PruneVID's segments: features (F, N, D) -> (S,) int64 frame counts summing to F.

    The frames (mean of their tokens) are clustered into max(1, floor(γ·F)) DPC-kNN clusters, made contiguous.
    """
    num_frames = features.shape[0]
    num_clusters = max(1, math.floor(num_frames * segment_ratio + FLOOR_SLACK))
    labels = cluster_frames(features.mean(dim=1), num_clusters, num_neighbours, generator)
    return run_lengths(contiguous_clusters(labels))


# ------------------------------------------------------------------------------------------------ 2. static
def segment_of_frames(segment_lengths: Tensor) -> Tensor:
    """(S,) lengths -> (F,) int64 segment index of each frame."""
    lengths = segment_lengths.to(torch.long)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def static_similarity(features: Tensor, segment_lengths: Tensor) -> Tensor:
    """Mean pairwise cosine similarity of each token position across each segment's frames.

    features: (F, N, D); segment_lengths: (S,) positive. For a segment of ℓ frames with unit tokens x̂_t at a
    position: (Σ_{t ≠ t'} x̂_t·x̂_t') / (ℓ(ℓ − 1)) = (|Σ_t x̂_t|² − ℓ) / (ℓ(ℓ − 1)) (the official code subtracts 1
    per frame for the self-similarity, as here). One-frame segments: −inf (never static). Returns (S, N) float32.
    """
    lengths = segment_lengths.to(device=features.device, dtype=torch.long)
    unit = F.normalize(features.float(), dim=-1)
    sums = torch.zeros(lengths.numel(), *unit.shape[1:], device=features.device)
    sums.index_add_(0, segment_of_frames(lengths), unit)
    count = lengths.float().unsqueeze(-1)
    similarity = (sums.pow(2).sum(-1) - count) / (count * (count - 1)).clamp(min=1)
    return similarity.masked_fill(count == 1, float("-inf"))


def static_positions(similarity: Tensor, threshold: float) -> Tensor:
    """(S, N) similarities -> (S, N) bool: the static token positions of each segment (similarity > τ)."""
    return similarity > threshold


def cap_static_merging(static: Tensor, similarity: Tensor, segment_lengths: Tensor, token_budget: int) -> Tensor:
    """Static positions, with the least similar ones made dynamic until temporal merging leaves >= the budget.

    Merging a static position of an ℓ-frame segment removes ℓ − 1 tokens; F·N − Σ n_s(ℓ_s − 1) remain. When that
    is below `token_budget` (a budget the official code would then not reach), the static positions of lowest
    similarity (ties: segment, then position order) turn dynamic, the fewest that bring the count back to the
    budget. static, similarity: (S, N); segment_lengths: (S,). Returns (S, N) bool.
    """
    num_tokens = static.shape[1]
    saved = (segment_lengths.to(device=static.device, dtype=torch.long) - 1).unsqueeze(-1) * static
    remaining = int(segment_lengths.sum()) * num_tokens - saved.sum()
    deficit = (token_budget - remaining).clamp(min=0).reshape(1)
    order = torch.argsort(similarity.masked_fill(~static, float("inf")).flatten(), stable=True)
    restored = torch.cumsum(saved.flatten()[order], 0)
    # the shortest prefix of that order whose restored tokens cover the deficit (none when there is no deficit)
    num_flips = torch.where(deficit > 0, torch.searchsorted(restored, deficit) + 1, 0)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return static & ~(rank < num_flips).view_as(static)


# ------------------------------------------------------------------------------------------------ 3. groups
@dataclass(frozen=True)
class TokenGroups:
    """The groups PruneVID clusters separately, in sequence order (per segment: its static tokens, then each of its
    frames' dynamic tokens).

    tokens: (G, N, D) in the features' dtype: a static group's row holds the segment's temporal means, a dynamic
    group's row its frame's tokens; members: (G, N) bool, the positions in the group; frames: (G,) int64 the frame
    each group's tokens are placed at (a segment's first frame for its static tokens).
    """

    tokens: Tensor
    members: Tensor
    frames: Tensor

    @property
    def sizes(self) -> Tensor:
        """(G,) int64 tokens per group."""
        return self.members.sum(dim=-1)


def token_groups(features: Tensor, segment_lengths: Tensor, static: Tensor) -> TokenGroups:
    """features (F, N, D), segment_lengths (S,), static (S, N) -> the TokenGroups (G = S + F).

    Static tokens are the temporal means of the segment's frames (float32 sums, cast back).
    """
    device = features.device
    lengths = segment_lengths.to(device=device, dtype=torch.long)
    segment = segment_of_frames(lengths)
    means = torch.zeros(lengths.numel(), *features.shape[1:], device=device)
    means.index_add_(0, segment, features.float())
    means = (means / lengths.view(-1, 1, 1)).to(features.dtype)
    first_frame = torch.cumsum(lengths, 0) - lengths
    frames = torch.arange(features.shape[0], device=device)
    # a segment's static group comes just before its first frame's dynamic group
    order = torch.argsort(torch.cat([2 * first_frame, 2 * frames + 1]))
    return TokenGroups(
        tokens=torch.cat([means, features])[order],
        members=torch.cat([static, ~static[segment]])[order],
        frames=torch.cat([first_frame, frames])[order],
    )


def cluster_counts(group_sizes: Tensor, token_budget: int) -> Tensor:
    """Clusters per group: the budget split in proportion to the group sizes, largest remainders first.

    group_sizes: (G,) int64 in sequence order, summing to T >= token_budget. Each group gets floor(M·n_g / T), and
    the M − Σ floor left go to the groups of largest remainder (ties: sequence order). Returns (G,) int64 summing
    to M = token_budget, each at most its group's size (exact integer arithmetic).
    """
    total = group_sizes.sum()
    quota = token_budget * group_sizes
    base, remainder = quota // total, quota % total
    leftover = token_budget - base.sum()
    order = torch.argsort(-remainder, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return base + (rank < leftover).long()


# ------------------------------------------------------------------------------------------------ 4. spatial
def cluster_means(points: Tensor, sizes: list[int], counts: list[int], num_neighbours: int, noise: Tensor
                  ) -> tuple[Tensor, Tensor]:
    """DPC-kNN on C padded groups at once; each cluster becomes the mean of its members.

    points: (C, n, D), group c valid in [0, sizes[c]); counts[c] clusters (1..sizes[c]); k = min(k, sizes[c]);
    noise: (C, n) the density tie-breaker's uniform draws. Returns means (Σ counts, D) float32, group by group in
    each group's centre order, and centres (Σ counts,) int64: the slot in its group of each cluster's centre.
    """
    device = points.device
    width = points.shape[1]
    neighbours = [min(num_neighbours, size) for size in sizes]
    size_tensor, count_tensor, neighbour_tensor = (torch.tensor(values, device=device)
                                                   for values in (sizes, counts, neighbours))
    assignment, centres = dpc_knn_ragged(points, size_tensor, count_tensor, neighbour_tensor, noise, sizes, counts,
                                         neighbours)  # fmt: skip
    valid = torch.arange(width, device=device).unsqueeze(0) < size_tensor.unsqueeze(-1)  # (C, n)
    offsets = torch.cumsum(count_tensor, 0) - count_tensor
    cluster = (offsets.unsqueeze(-1) + assignment)[valid]  # (P,) flat cluster of each point
    total = sum(counts)
    sums = index_sum(points[valid].float(), cluster, total)
    members = torch.bincount(cluster, minlength=total).float()
    used = torch.arange(centres.shape[1], device=device).unsqueeze(0) < count_tensor.unsqueeze(-1)
    return sums / members.unsqueeze(-1), centres[used]


def merge_groups(groups: TokenGroups, counts: Tensor, num_neighbours: int,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Each group down to its cluster count: kept whole when the count is its size, else DPC-kNN cluster means
    placed at their centres' positions, nothing when 0.

    groups: G groups of N positions; counts: (G,) from `cluster_counts`. The tie-breaker draws come from
    `generator`, group by group in sequence order. Groups of <= 25 and > 25 tokens are clustered in two calls
    (torch.cdist's two formulas). Returns tokens (Σ counts, D) in the groups' dtype and their within-frame
    positions (Σ counts,) int64 and frames (Σ counts,) int64, in no particular order.
    """
    device, dtype = groups.tokens.device, groups.tokens.dtype
    sizes = groups.sizes
    keep_whole = groups.members & (counts == sizes).unsqueeze(-1)
    group_of_kept, position_of_kept = torch.nonzero(keep_whole, as_tuple=True)
    tokens = [groups.tokens[group_of_kept, position_of_kept]]
    positions, frames = [position_of_kept], [groups.frames[group_of_kept]]

    clustered = torch.nonzero((counts > 0) & (counts < sizes)).flatten()
    if clustered.numel():
        host_sizes, host_counts = sizes[clustered].tolist(), counts[clustered].tolist()
        # members first, in position order
        member_positions = torch.argsort((~groups.members[clustered]).to(torch.int8), dim=-1, stable=True)
        draws = draw_density_noise(host_sizes, device, generator)
        noise = torch.zeros(clustered.numel(), groups.tokens.shape[1], device=device)
        noise[torch.arange(noise.shape[1], device=device) < sizes[clustered].unsqueeze(-1)] = draws
        for direct in (True, False):
            part = [c for c, size in enumerate(host_sizes) if (size <= CDIST_DIRECT_MAX_POINTS) == direct]
            if not part:
                continue
            width = max(host_sizes[c] for c in part)
            rows = torch.tensor(part, device=device)
            slots = member_positions[rows, :width]
            points = torch.gather(groups.tokens[clustered[rows]], 1,
                                  slots.unsqueeze(-1).expand(-1, -1, groups.tokens.shape[-1]))
            means, centres = cluster_means(points, [host_sizes[c] for c in part], [host_counts[c] for c in part],
                                           num_neighbours, noise[rows, :width])  # fmt: skip
            group_of_cluster = torch.repeat_interleave(rows, counts[clustered[rows]])
            tokens.append(means.to(dtype))
            positions.append(member_positions[group_of_cluster, centres])
            frames.append(groups.frames[clustered[group_of_cluster]])
    return torch.cat(tokens), torch.cat(positions), torch.cat(frames)


# ------------------------------------------------------------------------------------------------ the method
@torch.no_grad()
def prunevid_compress(features: Tensor, retention_ratio: float, settings: PruneVIDOptions | None = None,
                      generator: torch.Generator | None = None) -> Compression:
    """PruneVID before the LLM: features (F, N, D) -> exactly F·b tokens (b = `prunevid_frame_budget`).

    1. `temporal_segments` (γ, k; the tie-breaker draws first). 2. `static_similarity` > τ per segment and
    position, capped so that F·b tokens remain (`cap_static_merging`). 3. `token_groups` and their
    `cluster_counts`. 4. `merge_groups` (DPC-kNN means at their centres' positions, k neighbours). A static token
    sits at its segment's first frame; the output is ordered by global index f·N + n (no index repeats).
    generator: the tie-breaker draws' generator (default: one seeded with `seed` on the features' device).
    Returns a Compression (token_budget b, num_selected 0, num_merged b).
    """
    check_features(features, None, False, "prunevid")
    settings = settings or PruneVIDOptions()
    num_frames, num_tokens, _ = features.shape
    budget = prunevid_frame_budget(num_tokens, retention_ratio, settings)
    if generator is None:
        generator = torch.Generator(device=features.device).manual_seed(settings.seed)
    lengths = temporal_segments(features, settings.prunevid_segment_ratio, settings.prunevid_density_neighbours,
                                generator)  # fmt: skip
    similarity = static_similarity(features, lengths)
    static = static_positions(similarity, settings.prunevid_threshold)
    static = cap_static_merging(static, similarity, lengths, num_frames * budget)
    groups = token_groups(features, lengths, static)
    counts = cluster_counts(groups.sizes, num_frames * budget)
    tokens, positions, frames = merge_groups(groups, counts, settings.prunevid_density_neighbours, generator)
    tokens, indices = sorted_by_index(tokens, frames * num_tokens + positions)
    return make_compression(tokens, indices, lengths, num_tokens, budget, 0, budget)


@register
class PruneVID(Method):
    name = "prunevid"
    label = "PruneVID"
    order = 3  # after DivPrune (same order, sorted by name), before FastVID: the paper's table order
    Options = PruneVIDOptions

    def frame_budget(self, num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config) -> FrameBudget:
        budget = prunevid_frame_budget(num_tokens_per_frame, retention_ratio, settings)
        return FrameBudget(budget, 0, budget)  # every token is a (temporal and/or spatial) cluster mean

    def llm_pruning(self, retention_ratio, num_llm_layers, settings, flashvid_config) -> LLMPruning | None:
        """(K, α) ranked by the question's attention; None when K is beyond the LLM (no pruning inside it)."""
        if settings.prunevid_layer >= num_llm_layers:
            return None
        return LLMPruning(settings.prunevid_layer, settings.prunevid_selection_ratio, scoring=QUESTION_SCORING)

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        return prunevid_compress(features, retention_ratio, settings, generator)
