"""FastVID (DySeg + STPrune: salient top-k + density-based token merging with anchor frames).

Budget: b = floor(N·R) per frame at most: salient b − floor(b·d), contextual floor(b·d) per frame on average,
given to anchor frames (the exact count: `fastvid_token_count`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flashvid_core.clustering import dpc_knn
from flashvid_core.merging import index_sum
from flashvid_core.pipeline import Compression
from flashvid_core.segmentation import segment_lengths as dyseg_segment_lengths
from flashvid_core.selection import gather_tokens
from lmms_eval_models.methods.base import (
    FLOOR_SLACK,
    FrameBudget,
    Method,
    check_features,
    check_integer_fields,
    check_interval,
    frame_budget,
    global_indices,
    make_compression,
    sorted_by_index,
    store_real_fields,
)
from lmms_eval_models.methods.random_selection import SeedOptions
from lmms_eval_models.methods.registry import register


@dataclass(frozen=True)
class FastVIDOptions:
    """fastvid_min_segments (c = 8), fastvid_segment_threshold (τ = 0.9): DySeg, shared with FlashVID.
    fastvid_contextual_share (d = 0.4): App. C.1 calls d the "salient token ratio"; the official FastVID code
        uses it as the contextual share: contextual = floor(budget · d), salient = budget − contextual.
    fastvid_anchor_step (p = 4): every p-th frame of a segment, counted back from its last frame, is an anchor.
    fastvid_merging_factor (α = 0.6): a contextual token's own weight is max(α, 1 / (members + 1)).
    fastvid_density_neighbours: k of FastVID's DPC-kNN density (official: 4; capped at the frame's tokens).
    seed: the density tie-breaker's seed (shared with `random`).
    """

    fastvid_min_segments: int = 8
    fastvid_segment_threshold: float = 0.9
    fastvid_contextual_share: float = 0.4
    fastvid_anchor_step: int = 4
    fastvid_merging_factor: float = 0.6
    fastvid_density_neighbours: int = 4
    seed: int = SeedOptions.seed

    def __post_init__(self) -> None:
        check_integer_fields(self, ("fastvid_min_segments", "fastvid_anchor_step", "fastvid_density_neighbours"), 1)
        store_real_fields(self, ("fastvid_segment_threshold", "fastvid_contextual_share", "fastvid_merging_factor"))
        SeedOptions(self.seed)
        check_interval("fastvid_segment_threshold", self.fastvid_segment_threshold, -1.0, 1.0)
        check_interval("fastvid_contextual_share", self.fastvid_contextual_share, 0.0, 1.0)
        check_interval("fastvid_merging_factor", self.fastvid_merging_factor, 0.0, 1.0)


def fastvid_contextual_per_frame(budget: int, contextual_share: float = 0.4) -> int:
    """FastVID's contextual tokens per frame: floor(budget · d) (the official `int(retain * d)`)."""
    return math.floor(budget * contextual_share + FLOOR_SLACK)


def fastvid_anchor_counts(segment_lengths: Tensor, num_contextual: int, anchor_step: int) -> Tensor:
    """Contextual tokens each frame contributes as an anchor; 0 for frames that are no anchor.

    segment_lengths: (S,) positive. In a segment of ℓ frames the anchors are the frames whose distance to the
    segment's last frame is a multiple of p (the last frame always is); each gets floor(c·ℓ / ceil(ℓ / p)).
    Returns (F,) int64.
    """
    lengths = segment_lengths.to(torch.long)
    num_frames = int(lengths.sum())
    device = lengths.device
    ends = torch.cumsum(lengths, dim=0)
    frame_lengths = torch.repeat_interleave(lengths, lengths, output_size=num_frames)
    frame_ends = torch.repeat_interleave(ends, lengths, output_size=num_frames)
    distance_to_last = frame_ends - 1 - torch.arange(num_frames, device=device)
    is_anchor = distance_to_last % anchor_step == 0
    num_anchors = (frame_lengths + anchor_step - 1) // anchor_step
    per_anchor = (num_contextual * frame_lengths) // num_anchors
    return torch.where(is_anchor, per_anchor, torch.zeros_like(per_anchor))


def fastvid_token_count(
    segment_lengths: Tensor, num_tokens_per_frame: int, retention_ratio: float, settings: FastVIDOptions | None = None
) -> int:
    """The exact number of tokens `fastvid_compress` returns for these segments (positive lengths)."""
    settings = settings or FastVIDOptions()
    budget = frame_budget(num_tokens_per_frame, retention_ratio)
    num_contextual = fastvid_contextual_per_frame(budget, settings.fastvid_contextual_share)
    num_salient = budget - num_contextual
    anchors = fastvid_anchor_counts(segment_lengths, num_contextual, settings.fastvid_anchor_step)
    anchors = anchors.clamp(max=num_tokens_per_frame - num_salient)
    return int(segment_lengths.sum()) * num_salient + int(anchors.sum())


@torch.no_grad()
def fastvid_compress(
    features: Tensor,
    attention: Tensor,
    retention_ratio: float,
    settings: FastVIDOptions | None = None,
    frame_descriptors: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Compression:
    """FastVID (DySeg + STPrune: salient top-k + density-based token merging with anchor frames).

    features: (F, N, D); attention: (F, N); frame_descriptors: (F, D') for DySeg (default: the mean of each
    frame's tokens, as FlashVID; FastVID's own LLaVA code uses the vision tower's pooled frame embedding).
    Per frame: budget b = floor(N·R), contextual c = floor(b·d), salient s = b − c (top attention).
    1. DySeg (FlashVID's `segment_lengths` with c_min = 8, τ = 0.9; empty segments dropped: FastVID unique-s its
       cuts). Equal to FastVID's own rule (the c − 1 lowest transitions ∪ those below τ) up to ties.
    2. Anchors (`fastvid_anchor_counts`): anchor frame a takes k_a = floor(c·ℓ / ceil(ℓ/p)) contextual tokens
       (capped at its N − s non-salient tokens): the k_a of largest DPC-kNN score δ·ρ among its non-salient tokens
       (FlashVID's `dpc_knn` centres, k = 4 neighbours, seeded tie-breaker).
    3. Merging: every non-salient token of the anchor's pool joins the anchor's most cosine-similar target (ties:
       the first by score); the pool is the whole segment's non-salient tokens, or only the anchor frame's own
       when k_a == c (the official code's test; always true for one-frame segments). A target with m members
       (itself included) becomes w·target + (1 − w)·mean(members), w = max(α, 1 / (m + 1)). A token of a
       segment with several anchors joins one target of each anchor frame, as in the official code.
    Similarities in the features' dtype, member sums in float32. A contextual token keeps its target's index.
    Returns a Compression (token_budget b, num_selected s, num_merged c per frame).
    """
    check_features(features, attention, True, "fastvid")
    settings = settings or FastVIDOptions()
    num_frames, num_tokens, dim = features.shape
    device = features.device
    budget = frame_budget(num_tokens, retention_ratio)
    num_contextual = fastvid_contextual_per_frame(budget, settings.fastvid_contextual_share)
    num_salient = budget - num_contextual
    num_candidates = num_tokens - num_salient  # non-salient tokens per frame

    descriptors = features.mean(dim=1) if frame_descriptors is None else frame_descriptors
    lengths = dyseg_segment_lengths(descriptors, settings.fastvid_segment_threshold, settings.fastvid_min_segments)
    lengths = lengths[lengths > 0]

    salient = torch.topk(attention, k=num_salient, dim=-1).indices  # (F, s)
    salient_tokens = gather_tokens(features, salient)
    salient_indices = global_indices(salient, num_tokens)

    anchor_counts = fastvid_anchor_counts(lengths.to(device), num_contextual, settings.fastvid_anchor_step)
    own_frame_pool = anchor_counts == num_contextual  # the official single-frame test, before the cap
    anchor_counts = anchor_counts.clamp(max=num_candidates)
    anchor_frames = torch.nonzero(anchor_counts > 0).flatten()  # (A,)
    if anchor_frames.numel() == 0:
        tokens, indices = sorted_by_index(salient_tokens, salient_indices)
        return make_compression(tokens, indices, lengths, num_tokens, budget, num_salient, num_contextual)

    # Non-salient tokens of every frame, in index order.
    is_salient = torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=device)
    is_salient.scatter_(1, salient, True)
    candidates = torch.argsort(is_salient.to(torch.int8), dim=-1, stable=True)[:, :num_candidates]  # (F, n')
    candidate_tokens = gather_tokens(features, candidates)  # (F, n', D)

    # Targets: each anchor frame's k_a candidates of largest density score (dpc_knn centres, descending score).
    counts = anchor_counts[anchor_frames]  # (A,)
    max_count = int(counts.max())
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    neighbours = min(settings.fastvid_density_neighbours, num_candidates)
    _, centres = dpc_knn(candidate_tokens[anchor_frames], max_count, k=neighbours, generator=generator)
    slot_used = torch.arange(max_count, device=device).unsqueeze(0) < counts.unsqueeze(-1)  # (A, k_max)
    target_anchor = torch.arange(anchor_frames.numel(), device=device).unsqueeze(-1).expand(-1, max_count)[slot_used]
    target_frame = anchor_frames[target_anchor]  # (T,)
    target_slot = centres[slot_used]  # (T,) position among the frame's candidates
    target_tokens = candidate_tokens[target_frame, target_slot]  # (T, D)
    target_indices = target_frame * num_tokens + candidates[target_frame, target_slot]

    # Pool membership: candidate token t of frame f may join anchor frame a iff same segment, and a's pool is the
    # segment (not only its own frame) or f == a.
    segment_of_frame = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths.to(device))
    pool_tokens = candidate_tokens.reshape(-1, dim)  # (P, D), P = F·n'
    pool_frame = torch.arange(num_frames, device=device).repeat_interleave(num_candidates)
    same_segment = segment_of_frame[pool_frame].unsqueeze(-1) == segment_of_frame[target_frame].unsqueeze(0)
    same_frame = pool_frame.unsqueeze(-1) == target_frame.unsqueeze(0)
    allowed = same_segment & (same_frame | ~own_frame_pool[target_frame].unsqueeze(0))  # (P, T)

    similarity = F.normalize(pool_tokens, dim=-1) @ F.normalize(target_tokens, dim=-1).T  # (P, T), features' dtype
    similarity = similarity.float().masked_fill(~allowed, float("-inf"))
    num_anchors, num_targets = anchor_frames.numel(), target_frame.numel()
    scatter_index = target_anchor.unsqueeze(0).expand(pool_tokens.shape[0], -1)
    best = torch.full((pool_tokens.shape[0], num_anchors), float("-inf"), device=device)
    best = best.scatter_reduce(1, scatter_index, similarity, reduce="amax")
    # The first target (in score order) reaching its anchor's best similarity wins, as argmax does.
    is_best = allowed & (similarity == best.gather(1, scatter_index))
    target_ids = torch.arange(num_targets, device=device).expand_as(is_best)
    chosen = torch.full((pool_tokens.shape[0], num_anchors), num_targets, dtype=torch.long, device=device)
    chosen = chosen.scatter_reduce(1, scatter_index, torch.where(is_best, target_ids, num_targets), reduce="amin")
    member, anchor = torch.nonzero(chosen < num_targets, as_tuple=True)
    joined = chosen[member, anchor]  # (pairs,) target each member joins

    member_counts = torch.zeros(num_targets, dtype=torch.float32, device=device)
    member_counts.index_add_(0, joined, torch.ones_like(joined, dtype=torch.float32))
    # index_add_ on CPU; a fixed-order sum on CUDA, whose index_add_ rounding varies run to run.
    member_sums = index_sum(pool_tokens[member].float(), joined, num_targets)
    member_means = member_sums / member_counts.clamp(min=1).unsqueeze(-1)
    own_weight = (1.0 / (member_counts + 1)).clamp(min=settings.fastvid_merging_factor).unsqueeze(-1)
    contextual_tokens = (own_weight * target_tokens.float() + (1 - own_weight) * member_means).to(features.dtype)

    tokens, indices = sorted_by_index(
        torch.cat([salient_tokens.reshape(-1, dim), contextual_tokens]),
        torch.cat([salient_indices.reshape(-1), target_indices]),
    )
    return make_compression(tokens, indices, lengths, num_tokens, budget, num_salient, num_contextual)


@register
class FastVID(Method):
    name = "fastvid"
    label = "FastVID"
    order = 4
    needs_statistic = True
    Options = FastVIDOptions

    def frame_budget(self, num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config) -> FrameBudget:
        budget = frame_budget(num_tokens_per_frame, retention_ratio)
        num_contextual = fastvid_contextual_per_frame(budget, settings.fastvid_contextual_share)
        return FrameBudget(budget, budget - num_contextual, num_contextual)

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        return fastvid_compress(features, attention, retention_ratio, settings, generator=generator)
