"""`compress`'s eager stage, from the DySeg segments to the tokens passed on to DPC-kNN.

On the CPU it works one segment at a time, as the official code does. Per segment the unit-norm features are formed
once, in a workspace the size of the longest segment, and feed both matrix products: the selection's (L, N, N)
distances (their lower block triangle, mirrored), then the segment's greedy selection, then TSTM's (L - 1, N, N)
consecutive-frame similarities for the unselected tokens only (pairs across a cut are never formed; see
cpu_products). Then the merge decisions are made for the whole video, and the passed-on tokens' values are formed
batch by batch when DPC-kNN asks for them, only for those tokens. No temporary holds the whole
video: none is large enough for the C allocator to hand it back to the OS after every call (glibc does that above
32 MB, and faulting such blocks in again cost a third of the time on a 2-core host).

Every number is the official code's: the same operations on the same per-frame operands, each segment's unit-norm
features starting at the start of a buffer as the official per-segment tensors do (BLAS results can depend on an
operand's alignment), event relevance formed as it forms it (`segment_relevance`), and the smaller products only
where this machine's BLAS gives the whole products' entries in them (checked once per shape). The float32 products
come from the accel layer's C kernel where it gives the same entries as torch's (`cpu_products.native_products`).

On CUDA the stage runs the whole-video reference stages (`select_tokens`, `spatiotemporal_merge`), whose matrix
products are those of the accel layer's CUDA stage: the fast paths and this path give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .backend import current_backend
from .cpu_products import (
    front_width,
    native_gram,
    native_products,
    previous_frame_similarities_of_front,
    symmetric_gram,
    unselected_first,
    use_front_products,
    use_symmetric_gram,
)
from .merging import (
    bag_layout,
    direct_child_counts,
    frame_layout,
    index_sum,
    limit_breadth,
    limit_depth,
    merge_decisions,
    parents_from_similarities,
    previous_frame_similarities,
    row_sums,
    spatiotemporal_merge,
    take_rows,
    tree_roots,
    walked_root_increments,
)
from .selection import calibrated_distances, diversity_picks, segment_relevance, select_tokens

if TYPE_CHECKING:
    from .pipeline import VideoPlan

# Selection methods whose distances are scaled by event relevance (which needs the segment's frame means).
RELEVANCE_METHODS = ("attn_div_v2", "div_er")


@dataclass(frozen=True)
class PassedTokens:
    """The tokens TSTM passes on to DPC-kNN, frame after frame, each frame's in index order (P in all).

    token_index: (P,) int64 within-frame indices; counts: tokens per frame (F Python ints, summing to P);
    values: rows (R,) int64 positions in 0..P-1 -> (R, D) their values in the input dtype (a TSTM root's value is
    its tree's sum / its divisor), formed when asked for.
    """

    token_index: Tensor
    counts: list[int]
    values: Callable[[Tensor], Tensor]


def eager_stage(
    features: Tensor, attention: Tensor, plan: VideoPlan, frame_means: Tensor | None = None
) -> tuple[Tensor | None, PassedTokens | None]:
    """Selection and TSTM for one video. features (F, N, D); attention (F, N); frame_means: (F, D) float32 the
    frames' mean tokens if the caller holds them (float32 features only: DySeg's means).

    Returns keep (F, K) ascending within-frame indices of the selected tokens (None without selection) and the
    passed-on tokens (None without merged tokens).
    """
    if features.is_cuda:
        return whole_video_stage(features, attention, plan)
    num_frames, num_tokens, _ = features.shape
    method = plan.config.token_selection_method
    keep = None
    if plan.num_selected > 0 and method == "attn":  # attention top-k: no products
        keep = select_tokens(features, attention, plan.num_selected, method)
    tstm = plan.num_merged > 0 and plan.multi_frame
    keep, similarities = segment_stage(features, attention, plan, frame_means, keep, tstm)
    if plan.num_merged == 0:
        return keep, None
    selected = torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=features.device)
    if keep is not None:
        selected.scatter_(1, keep, True)
    return keep, passed_tokens(features, selected, similarities, plan)


def segment_stage(
    features: Tensor,
    attention: Tensor,
    plan: VideoPlan,
    frame_means: Tensor | None,
    keep: Tensor | None,
    tstm: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The matrix products and the greedy selection, segment by segment.

    keep: (F, K) the selection if it needs no products (attention top-k), else None. Returns keep (F, K) (None
    without selection) and TSTM's similarities (F - 1, N, N) in the input dtype, [t - 1] comparing frame t with
    t - 1, -1 where t starts a segment (None without TSTM).

    Each segment's selection is made before its TSTM products, which are then formed for its unselected tokens
    only (see cpu_products). Workspaces, each the size of the longest segment: the float32 unit-norm features
    (selection, and TSTM for float32 features; for other dtypes a float32 copy of the segment, normalised in place
    once event relevance has read it) and the unit-norm features in the input dtype (TSTM for other dtypes: its
    similarities are formed in the features' dtype).
    """
    num_frames, num_tokens, dim = features.shape
    float32_input = features.dtype == torch.float32
    config = plan.config
    method = config.token_selection_method
    diversity = plan.num_selected > 0 and method != "attn"
    forbid_repick = True if config.adts_forbid_repick else None
    longest = max(plan.segment_lengths)
    if diversity:
        keep = features.new_empty((num_frames, plan.num_selected), dtype=torch.long)
    similarities = None
    if tstm:  # pairs across a cut are never formed: -1
        similarities = features.new_empty((num_frames - 1, num_tokens, num_tokens))
        cut_rows = [start - 1 for start in prefix_sums(plan.segment_lengths)[1:] if 0 < start < num_frames]
        similarities[cut_rows] = -1.0
    unit32 = unit_native = None
    if diversity or (tstm and float32_input):
        unit32 = features.new_empty((longest, num_tokens, dim), dtype=torch.float32)
    if tstm and not float32_input:
        unit_native = features.new_empty((longest, num_tokens, dim))
    start = 0
    for length in plan.segment_lengths:
        frames = slice(start, start + length)
        start += length
        if length == 0:
            continue
        segment = features[frames]
        normalized32 = None
        if unit32 is not None:
            segment32 = segment if float32_input else unit32[:length].copy_(segment)
            relevance = None
            if diversity and method in RELEVANCE_METHODS:
                # A fresh (L, D) tensor, as the official code's: the product's operands sit where its do.
                means = frame_means[frames].clone() if frame_means is not None else segment32.mean(dim=1)
                relevance = segment_relevance(segment32, means)
            normalized32 = unit_norm(segment32, out=unit32[:length])
            if diversity:  # (the features are only read through their unit-norm form and relevance)
                gram = native_gram(normalized32)
                if gram is None and use_symmetric_gram(normalized32):
                    gram = symmetric_gram(normalized32)
                distances = calibrated_distances(normalized32, attention[frames], method, normalized=normalized32,
                                                 relevance=relevance, similarities=gram)
                keep[frames] = diversity_picks(distances, plan.num_selected, method, forbid_repick)
        if similarities is not None and length > 1:
            normalized = normalized32 if float32_input else unit_norm(segment, out=unit_native[:length])
            similarities[frames.start : frames.stop - 1] = segment_similarities(normalized, keep, frames)
    return keep, similarities


def segment_similarities(normalized: Tensor, keep: Tensor | None, frames: slice) -> Tensor:
    """TSTM's similarities of one segment's consecutive frames: normalized (L, N, D) its unit-norm workspace (may
    be overwritten), keep the selection (F, K) or None -> (L - 1, N, N), the official products' entries where
    neither token is selected (the official mask sets the others to -1; see cpu_products)."""
    num_tokens = normalized.shape[1]
    if keep is not None and keep.shape[1] > 0:
        selected = torch.zeros(normalized.shape[:2], dtype=torch.bool, device=normalized.device)
        selected.scatter_(1, keep[frames], True)
        width = front_width(selected)
        if width < num_tokens and use_front_products(normalized, width):
            row = unselected_first(normalized, selected, width)
            return previous_frame_similarities_of_front(normalized, width, row)
    whole = native_products(normalized[1:], normalized[:-1], [(num_tokens, num_tokens, normalized.shape[2])])
    return whole if whole is not None else previous_frame_similarities(normalized)


def unit_norm(features: Tensor, out: Tensor) -> Tensor:
    """features / their L2 norm over the last dim, written into out (same shape; the values of
    `features / features.norm(p=2, dim=-1, keepdim=True)`)."""
    return torch.div(features, features.norm(p=2, dim=-1, keepdim=True), out=out)


def passed_tokens(features: Tensor, selected: Tensor, similarities: Tensor | None, plan: VideoPlan) -> PassedTokens:
    """TSTM's merge decisions and the tokens it passes on. features (F, N, D); selected (F, N) bool;
    similarities: the consecutive-frame similarities (None when no segment has two frames)."""
    config = plan.config
    num_frames, num_tokens, dim = features.shape
    flat = features.reshape(num_frames * num_tokens, dim)
    segment_lengths = list(plan.segment_lengths)
    if similarities is None:  # one-frame segments only: every token is passed on as it is
        everything = torch.arange(num_frames * num_tokens, device=features.device)
        return PassedTokens(everything % num_tokens, [num_tokens] * num_frames, lambda rows: take_rows(flat, rows))
    layout = frame_layout(segment_lengths, features.device)
    max_sim, parent = parents_from_similarities(similarities, selected, layout[1], config.tstm_spatial_window)
    merged = merge_decisions(max_sim, config.temporal_threshold, segment_lengths, plan.budget, layout)
    if config.tstm_max_breadth is not None:
        merged = limit_breadth(merged, parent, max_sim, config.tstm_max_breadth)
    if config.tstm_max_depth is not None:
        merged = limit_depth(merged, parent, config.tstm_max_depth)
    # A one-frame segment passes ALL its tokens on (selected ones included); elsewhere the unselected roots.
    passed = torch.where((layout[2] == 1).unsqueeze(-1), True, ~merged & ~selected)
    passed_index = torch.nonzero(passed.flatten()).flatten()
    counts: list[int] = passed.sum(dim=-1).tolist()
    token_index = passed_index % num_tokens
    if features.dtype != torch.float32 and not config.tstm_float32_sums and not config.tstm_true_mean:
        return PassedTokens(token_index, counts, walked_values(features, merged, parent, passed_index, segment_lengths))
    roots_of = tree_roots(merged, parent, max(segment_lengths))
    if config.tstm_true_mean:
        divisors = torch.bincount(roots_of, minlength=num_frames * num_tokens)[passed_index].to(torch.float32)
    else:  # the official rule: one per direct child, whatever that child accumulated
        divisors = direct_child_counts(merged, parent)[passed_index].to(torch.float32) + 1.0
    return PassedTokens(token_index, counts, tree_mean_values(features, roots_of, passed_index, divisors))


def tree_mean_values(features: Tensor, roots_of: Tensor, passed_index: Tensor, divisors: Tensor
                     ) -> Callable[[Tensor], Tensor]:
    """PassedTokens.values for float32 tree sums: a root's value is the sum over its tree, in float32, divided by its
    divisor and rounded to the input dtype. features (F, N, D); roots_of (F * N,) (see tree_roots); passed_index (P,)
    ascending global indices of the passed-on roots; divisors (P,) float32.

    Each sum starts from the root's own value and adds its merged tokens in ascending index order (one bag of
    `row_sums` per root, read straight from the features): the sums `spatiotemporal_merge` forms with a copy of
    the whole video.
    """
    num_frames, num_tokens, dim = features.shape
    flat = features.reshape(num_frames * num_tokens, dim)
    table = flat if flat.dtype == torch.float32 else flat.float()
    if current_backend().fixed_order_sums_on_cpu:  # CUDA's summation (tests compare the two): every root at once
        sums = index_sum(table, roots_of, num_frames * num_tokens).index_select(0, passed_index)
        stored = (sums / divisors.clamp_min(1.0).unsqueeze(-1)).to(features.dtype)
        return lambda rows: stored.index_select(0, rows)
    members, bag_start, bag_size = bag_layout(roots_of, passed_index)

    def values(rows: Tensor) -> Tensor:
        sizes = bag_size[rows]
        owner, slot = ragged_slots(sizes, int(sizes.sum()))
        sums = row_sums(table, members[bag_start[rows][owner] + slot], owner, rows.numel())
        return sums.div_(divisors[rows].clamp_min(1.0).unsqueeze(-1)).to(features.dtype)

    return values


def walked_values(features: Tensor, merged: Tensor, parent: Tensor, passed_index: Tensor,
                  segment_lengths: list[int]) -> Callable[[Tensor], Tensor]:
    """PassedTokens.values for the official frame-by-frame sums in the input dtype (see walked_root_increments): a
    root's value is (its feature + its children's sum) / (1 + its direct children), rounded as the official code
    rounds. features (F, N, D); merged, parent (F, N); passed_index (P,) ascending global indices of roots."""
    num_frames, num_tokens, dim = features.shape
    flat = features.reshape(num_frames * num_tokens, dim)
    increment_index, increments = walked_root_increments(features, merged, parent, segment_lengths)
    # Row of each passed-on root in `increments` (-1: no children).
    increment_row = torch.full((passed_index.numel(),), -1, dtype=torch.long, device=features.device)
    increment_row[torch.searchsorted(passed_index, increment_index)] = torch.arange(
        increment_index.numel(), device=features.device
    )
    divisors = torch.ones(passed_index.numel(), dtype=features.dtype, device=features.device)
    divisors += direct_child_counts(merged, parent)[passed_index].to(features.dtype)

    def values(rows: Tensor) -> Tensor:
        roots = take_rows(flat, passed_index[rows])
        with_children = torch.nonzero(increment_row[rows] >= 0).flatten()
        roots[with_children] = roots[with_children] + increments[increment_row[rows][with_children]]
        return roots / divisors[rows].unsqueeze(-1)

    return values


def whole_video_stage(features: Tensor, attention: Tensor, plan: VideoPlan
                      ) -> tuple[Tensor | None, PassedTokens | None]:
    """`eager_stage` with the whole-video reference stages (the CUDA path: their products are the CUDA stage's)."""
    config, segment_lengths = plan.config, list(plan.segment_lengths)
    num_frames, num_tokens, _ = features.shape
    device = features.device
    selected = torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=device)
    # One float32 copy serves selection distances and TSTM sums (a no-op for float32 inputs); for float32 inputs
    # selection and TSTM normalise identically, so the unit-norm features are computed once.
    features_float32 = features.float()
    normalized = None
    if features.dtype == torch.float32 and plan.num_selected > 0 and plan.num_merged > 0 and plan.multi_frame:
        normalized = features / features.norm(p=2, dim=-1, keepdim=True)
    keep = None
    if plan.num_selected > 0:
        keep = select_tokens(features_float32, attention, plan.num_selected, config.token_selection_method,
                             segment_lengths, forbid_repick=True if config.adts_forbid_repick else None,
                             normalized=normalized)  # (F, K)
        selected.scatter_(1, keep, True)
    if plan.num_merged == 0:
        return keep, None
    layout = frame_layout(segment_lengths, device)  # one transfer, shared with TSTM
    if plan.multi_frame:
        tree = spatiotemporal_merge(
            features, selected, segment_lengths, config.temporal_threshold, plan.budget,
            max_depth=config.tstm_max_depth, max_breadth=config.tstm_max_breadth,
            spatial_window=config.tstm_spatial_window, true_mean=config.tstm_true_mean,
            features_float32=features_float32, normalized=normalized,
            # The float32 copy is ours (not the caller's features) and selection is done with it.
            reuse_features_float32=features.dtype != torch.float32, float32_sums=config.tstm_float32_sums,
            layout=layout,
        )
        # A one-frame segment passes ALL its tokens on (selected ones included).
        passed = torch.where((layout[2] == 1).unsqueeze(-1), True, ~tree.merged & ~selected)
        values = RootValues(tree.sums, tree.counts, features.dtype)
    else:
        passed = torch.ones(num_frames, num_tokens, dtype=torch.bool, device=device)
        values = RootValues(features, None, features.dtype)
    # Per frame, the passed-on tokens first, in index order (a stable sort of the "not passed" flags).
    token_order = torch.argsort((~passed).to(torch.int8), dim=-1, stable=True)  # (F, N)
    return keep, gather_passed(values, token_order, passed.sum(dim=-1))


class RootValues:
    """Whole-video tree values, divided only where gathered: sums / counts (TSTM roots) rounded to the input dtype
    as the official code forms them there, or the features themselves (counts None). sums (F, N, D), counts (F, N)."""

    def __init__(self, sums: Tensor, counts: Tensor | None, dtype: torch.dtype) -> None:
        self.sums, self.counts, self.dtype = sums, counts, dtype
        self.num_tokens, self.dim = sums.shape[1], sums.shape[2]

    def gather(self, rows: Tensor, cols: Tensor) -> Tensor:
        """rows, cols: (S,) int64 frame and within-frame indices. Returns (S, D) in the input dtype."""
        flat = rows * self.num_tokens + cols
        value = self.sums.reshape(-1, self.dim).index_select(0, flat)
        if self.counts is None:
            return value
        value = value / self.counts.reshape(-1)[flat].clamp_min(1.0).unsqueeze(-1)
        return value if value.dtype == self.dtype else value.to(self.dtype)


def gather_passed(values: RootValues, token_order: Tensor, passed_counts: Tensor) -> PassedTokens:
    """Whole-video passed-on tokens (token_order (F, N): each frame's passed tokens first, in index order;
    passed_counts (F,)) as PassedTokens, their values gathered at once (the device read of the counts: cluster
    counts are host arithmetic)."""
    counts: list[int] = passed_counts.tolist()
    frame, slot = ragged_slots(passed_counts, sum(counts))
    token_index = token_order[frame, slot]
    stored = values.gather(frame, token_index)
    return PassedTokens(token_index, counts, lambda rows: stored.index_select(0, rows))


def ragged_slots(counts: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For counts (R,) int64 on the device summing to total (a host int): owner (total,), the row each slot
    belongs to, and slot (total,), its position 0..counts[r]-1 within that row; rows in order."""
    rows = torch.arange(counts.numel(), device=counts.device)
    owner = torch.repeat_interleave(rows, counts, output_size=total)
    row_start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(total, device=counts.device) - row_start[owner]
    return owner, slot


def prefix_sums(values: list[int]) -> list[int]:
    """[0, v0, v0 + v1, ...]: where each entry starts when they are laid end to end (len(values) entries)."""
    starts, running = [], 0
    for value in values:
        starts.append(running)
        running += value
    return starts
