"""Tree-based Spatiotemporal Token Merging (TSTM), vectorised over all frames and segments of a video.

Each token of frame t (t >= 1 within its segment) links to its most similar token of frame t - 1; it merges into
that parent when the similarity is above the threshold, otherwise it is a tree root and is kept. Frame 0 of a
segment only holds roots. The official aggregation is kept by default: a root's value is the sum over its whole
tree divided by 1 + (number of its direct children).

Instead of walking frames from last to first, the trees are resolved by pointer jumping (log2(F) gathers) and
summed with one index_add (on CUDA, whose index_add order varies run to run, with a fixed-order segment sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._transfer import int_tensors
from .backend import current_backend, fast_path

# The floor threshold is clamped to at least this, as in the official code (so similarity -1 never merges).
MIN_FLOOR_THRESHOLD = -1.0 + 1e-6


def frame_layout(segment_lengths: list[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-frame segment structure, in one transfer. Returns segment_of_frame (F,) int64, is_segment_start (F,)
    bool, frame_segment_length (F,) int64 and segment_lengths (S,) int64 (zero-length segments own no frame)."""
    segment_of_frame: list[int] = []
    starts: list[int] = []
    frame_length: list[int] = []
    for segment, length in enumerate(segment_lengths):
        segment_of_frame.extend([segment] * length)
        starts.extend([1] + [0] * (length - 1) if length > 0 else [])
        frame_length.extend([length] * length)
    ids, start, frame_len, lengths = int_tensors(device, segment_of_frame, starts, frame_length, segment_lengths)
    return ids, start.bool(), frame_len, lengths


def spatial_window_mask(num_tokens: int, window: int, device: torch.device) -> Tensor:
    """(N, N) bool: [n, m] True when token m lies in the window x window neighbourhood of token n on a square
    grid of N = side * side tokens (raster order)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"tstm_spatial_window needs a square token grid, but a frame has {num_tokens} tokens (not a square)"
        )
    rows = torch.arange(num_tokens, device=device) // side
    cols = torch.arange(num_tokens, device=device) % side
    radius = window // 2
    near_rows = (rows.unsqueeze(1) - rows.unsqueeze(0)).abs() <= radius
    near_cols = (cols.unsqueeze(1) - cols.unsqueeze(0)).abs() <= radius
    return near_rows & near_cols


def temporal_parents(
    features: Tensor,
    selected: Tensor,
    segment_starts: Tensor,
    spatial_window: int | None = None,
    normalized: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Each token's most similar token in the previous frame, and that similarity, in the input dtype.

    features: (F, N, D); selected: (F, N) bool, ADTS-selected tokens (excluded on both sides: similarity -1);
    segment_starts: (F,) bool. Returns max_sim (F, N) (-1 on the first frame of each segment) and parent (F, N)
    int64, the parent's within-frame index (0 where max_sim is -1 on a segment's first frame).
    spatial_window: opt-in, parents only within that neighbourhood (see spatial_window_mask); None = anywhere.
    normalized: optional precomputed features / their L2 norm in the input dtype.
    """
    num_tokens = features.shape[1]
    if features.shape[0] < 2:
        return parents_from_similarities(features.new_empty(0, num_tokens, num_tokens), selected, segment_starts)
    normed = normalized if normalized is not None else features / features.norm(p=2, dim=-1, keepdim=True)
    return parents_from_similarities(previous_frame_similarities(normed), selected, segment_starts, spatial_window)


def previous_frame_similarities(normalized: Tensor) -> Tensor:
    """Cosine similarities between consecutive frames: normalized (F, N, D) unit-norm features -> (F - 1, N, N),
    [t - 1, n, m] compares token n of frame t with token m of frame t - 1, in the input dtype."""
    return torch.bmm(normalized[1:], normalized[:-1].transpose(-1, -2))


def parents_from_similarities(
    similarity: Tensor, selected: Tensor, segment_starts: Tensor, spatial_window: int | None = None
) -> tuple[Tensor, Tensor]:
    """`temporal_parents` from the consecutive-frame similarities (F - 1, N, N) (see previous_frame_similarities;
    the values in the rows of frames that start a segment are ignored). selected (F, N) bool, segment_starts (F,)
    bool. Returns max_sim (F, N) in the similarities' dtype and parent (F, N) int64."""
    num_frames, num_tokens = selected.shape
    max_sim = torch.full((num_frames, num_tokens), -1.0, dtype=similarity.dtype, device=similarity.device)
    parent = torch.zeros(num_frames, num_tokens, dtype=torch.long, device=similarity.device)
    if num_frames < 2:
        return max_sim, parent
    excluded = selected[1:].unsqueeze(-1) | selected[:-1].unsqueeze(1)
    if spatial_window is not None:
        excluded = excluded | ~spatial_window_mask(num_tokens, spatial_window, similarity.device)
    similarity = similarity.masked_fill(excluded, -1.0)
    best, best_index = similarity.max(dim=-1)
    first = segment_starts[1:].unsqueeze(-1)
    max_sim[1:] = torch.where(first, torch.full_like(best, -1.0), best)
    parent[1:] = torch.where(first, torch.zeros_like(best_index), best_index)
    return max_sim, parent


def merge_decisions(
    max_sim: Tensor,
    temporal_threshold: float,
    segment_lengths: list[int],
    kept_per_frame_floor: int,
    layout: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Which tokens merge into their parent: max_sim > threshold, with the official lower bound on kept tokens.

    max_sim: (F, N). kept_per_frame_floor: (num_selected + num_merged), the per-frame budget. If a segment of L
    frames would keep fewer than floor * L tokens (selected tokens included), its threshold becomes the
    (L * N - floor * L)-th largest max_sim of the segment, clamped to >= -1 + 1e-6, still compared with a
    strict '>'. layout: frame_layout(segment_lengths) if the caller holds it. Returns merged (F, N) bool.
    """
    segment_of_frame, _, frame_length, lengths = layout if layout is not None else frame_layout(
        segment_lengths, max_sim.device
    )
    segment_start = (torch.cumsum(lengths, 0) - lengths)[segment_of_frame]
    return merge_decisions_by_frame(
        max_sim, temporal_threshold, segment_of_frame, segment_start, frame_length, kept_per_frame_floor
    )


def merge_decisions_by_frame(
    max_sim: Tensor,
    temporal_threshold: float,
    segment_ids: Tensor,
    segment_start: Tensor,
    segment_length: Tensor,
    kept_per_frame_floor: int,
) -> Tensor:
    """`merge_decisions` with the segments given per frame as device tensors: fixed shapes, no host data (what a
    CUDA graph can capture). segment_ids, segment_start (first frame of the frame's segment), segment_length:
    (F,) int64. Returns merged (F, N) bool (merge_decisions is this with the segments from their lengths)."""
    num_frames, num_tokens = max_sim.shape
    # Thresholds live in max_sim's dtype, as the reference compares a tensor of that dtype with a Python float.
    merged = max_sim > torch.full((), temporal_threshold, dtype=max_sim.dtype, device=max_sim.device)
    same_segment = (segment_ids.unsqueeze(1) == segment_ids.unsqueeze(0)).long()  # (F, F)
    kept = (same_segment * (~merged).sum(dim=-1).unsqueeze(0)).sum(dim=-1)  # tokens kept in the frame's segment
    lower_bound = segment_length * kept_per_frame_floor
    floor_used = (kept < lower_bound) & (segment_length > 1)
    # k-th largest max_sim per segment: one stable sort on (segment, -max_sim); float64 keys are exact here.
    num_largest = segment_length * num_tokens - lower_bound  # (F,) per frame, of its segment
    token_segment = segment_ids.unsqueeze(-1).expand(-1, num_tokens).reshape(-1)
    keys = token_segment.double() * 4.0 - max_sim.flatten().double()
    sorted_sims = max_sim.flatten()[torch.argsort(keys, stable=True)]
    position = (segment_start * num_tokens + num_largest - 1).clamp(0, max(num_frames * num_tokens - 1, 0))
    floor_threshold = torch.clamp_min(sorted_sims[position], MIN_FLOOR_THRESHOLD)
    # A floor asking to merge nothing (budget == N) keeps everything (the official code fails there).
    floor_threshold = torch.where(num_largest > 0, floor_threshold, torch.full_like(floor_threshold, math.inf))
    threshold = torch.where(floor_used, floor_threshold, torch.full_like(floor_threshold, temporal_threshold))
    return max_sim > threshold.unsqueeze(-1)


def limit_breadth(merged: Tensor, parent: Tensor, max_sim: Tensor, max_children: int) -> Tensor:
    """Opt-in (paper Table 12): each node keeps at most max_children children, the most similar ones (ties: lower
    index); the others become roots. merged, parent, max_sim: (F, N). Returns the new merged mask (F, N)."""
    num_frames, num_tokens = merged.shape
    frame = torch.arange(num_frames, device=merged.device).unsqueeze(-1)
    parent_key = ((frame - 1) * num_tokens + parent).flatten()
    # Sort the merged tokens by (parent, -similarity); a token's rank inside its parent's group decides.
    flat_merged = merged.flatten()
    keys = torch.where(flat_merged, parent_key.double() * 4.0 - max_sim.flatten().double(), math.inf)
    order = torch.argsort(keys, stable=True)
    sorted_parent = torch.where(flat_merged[order], parent_key[order], -1)
    position = torch.arange(order.numel(), device=merged.device)
    group_start = torch.ones_like(flat_merged)
    group_start[1:] = sorted_parent[1:] != sorted_parent[:-1]
    start_position = torch.cummax(torch.where(group_start, position, 0), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - start_position
    return merged & (rank.view(num_frames, num_tokens) < max_children)


def limit_depth(merged: Tensor, parent: Tensor, max_depth: int) -> Tensor:
    """Opt-in (paper Table 11): trees have at most max_depth levels (a root alone is 1 level); a token that would
    sit deeper becomes a root. merged, parent: (F, N). Returns the new merged mask. Loops over frames (the depth
    of frame t depends on frame t - 1), vectorised over tokens."""
    merged = merged.clone()
    level = torch.ones(merged.shape[1], dtype=torch.long, device=merged.device)
    for frame in range(merged.shape[0]):
        candidate = level[parent[frame]] + 1 if frame > 0 else torch.ones_like(level)
        too_deep = candidate > max_depth
        merged[frame] &= ~too_deep
        level = torch.where(merged[frame], candidate, torch.ones_like(candidate))
    return merged


def stepwise_walk(values: Tensor, children_of: Tensor) -> None:
    """In place, last frame to first: add the running sums of frame t's merged tokens into their parents in
    t - 1, rounding to the dtype of values at each step (product, then addition) as the official code does.
    values (F, N, D); children_of (F, N, N): [t, p, c] = 1 where token c of frame t merges into p of t - 1."""
    for frame in range(values.shape[0] - 1, 0, -1):
        values[frame - 1] += children_of[frame] @ values[frame]


def stepwise_tree_sums(
    features: Tensor, merged: Tensor, parent: Tensor, segment_lengths: list[int] | None = None
) -> tuple[Tensor, Tensor]:
    """The official frame-by-frame tree sums and their divisors, in the input dtype: values (F, N, D), counts (F, N).

    A root's value is values / counts, both in the input dtype (divide only the rows you need). Child counts do
    not depend on the sums, so only the additions are sequential over frames. Segments are independent, so step
    s adds frame L - s into L - s - 1 of every segment at once (max segment length - 1 batched steps); with few
    segments the per-frame walk is used instead, on CUDA captured once per shape in a CUDA graph and replayed.
    On CUDA the accel layer walks every segment in one Triton kernel (fast path "walk_tree_sums", the same
    roundings), or replays the per-frame walk from a CUDA graph ("stepwise_walk").
    """
    num_frames = features.shape[0]
    children_of, counts = children_and_counts(features, merged, parent)
    values = features.clone()
    lengths = segment_lengths if segment_lengths is not None else [num_frames]
    steps = max(lengths, default=1) - 1
    if steps == 0:
        return values, counts
    triton_walk = fast_path("walk_tree_sums") if features.is_cuda else None
    if triton_walk is not None and triton_walk(values, children_of, lengths):  # one launch, in place
        return values, counts
    if steps <= (num_frames - 1) // 2:
        _walk_by_segments(values, children_of, lengths)
        return values, counts
    graph_walk = fast_path("stepwise_walk") if features.is_cuda else None
    walked = graph_walk(values, children_of) if graph_walk is not None else None
    if walked is not None:
        return walked, counts
    stepwise_walk(values, children_of)
    return values, counts


def children_and_counts(features: Tensor, merged: Tensor, parent: Tensor) -> tuple[Tensor, Tensor]:
    """children_of (F, parent, child) 0/1 and counts (F, N) (one per direct child), in the input dtype."""
    num_frames, num_tokens, _ = features.shape
    dtype = features.dtype
    candidates = torch.arange(num_tokens, device=features.device)
    links = (parent.unsqueeze(-1) == candidates) & merged.unsqueeze(-1)  # (F, child, parent)
    children_of = links.transpose(1, 2).to(dtype).contiguous()  # (F, parent, child)
    counts = torch.ones(num_frames, num_tokens, dtype=dtype, device=features.device)
    counts[:-1] += children_of[1:].sum(dim=-1)  # one per direct child, in the input dtype as the official code
    return children_of, counts


def _walk_by_segments(values: Tensor, children_of: Tensor, segment_lengths: list[int]) -> None:
    """`stepwise_walk` with the segments walked side by side: in place, max length - 1 batched steps.

    Frames of different segments never link (a segment's first frame takes no children from the previous one),
    and each segment's frames are still added last to first, each step's sum rounded as one frame step."""
    starts = [sum(segment_lengths[:index]) for index in range(len(segment_lengths))]
    step_frames = [
        [start + length - step for start, length in zip(starts, segment_lengths) if length > step]
        for step in range(1, max(segment_lengths))
    ]
    frames_per_step = int_tensors(values.device, *step_frames)
    parents_per_step = int_tensors(values.device, *[[frame - 1 for frame in frames] for frames in step_frames])
    for frames, parents in zip(frames_per_step, parents_per_step):
        product = torch.bmm(children_of.index_select(0, frames), values.index_select(0, frames))
        values.index_copy_(0, parents, values.index_select(0, parents) + product)


def fixed_order_index_sum(values: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """out[r] = sum of values[i] over i with index[i] == r, in ascending i: the same result on every run.

    values: (P, D); index: (P,) int64 in [0, num_rows). Returns (num_rows, D) in values' dtype (0 for rows that
    nothing maps to). index_add_ on CUDA accumulates with atomics, so its float rounding varies run to run; here
    a stable sort groups the rows and a segment reduction sums each group in order (no host sync: integer
    index_add_ is exact in any order, and unsafe=True skips segment_reduce's length check, true by construction).
    """
    order = torch.argsort(index, stable=True)
    group_sizes = torch.zeros(num_rows, dtype=torch.long, device=index.device)
    group_sizes.index_add_(0, index, torch.ones_like(index))
    return torch.segment_reduce(values[order], "sum", lengths=group_sizes, axis=0, unsafe=True)


def index_sum(values: Tensor, index: Tensor, num_rows: int) -> Tensor:
    """zeros(num_rows, D).index_add_(0, index, values) on CPU; fixed_order_index_sum on CUDA (deterministic)."""
    if values.is_cuda or current_backend().fixed_order_sums_on_cpu:
        return fixed_order_index_sum(values, index, num_rows)
    if values.dim() == 2 and values.dtype == torch.float32:
        return row_sums(values, torch.arange(values.shape[0], device=values.device), index, num_rows)
    return torch.zeros(num_rows, *values.shape[1:], dtype=values.dtype, device=values.device).index_add_(
        0, index, values
    )


def row_sums(table: Tensor, rows: Tensor, owner: Tensor, num_sums: int) -> Tensor:
    """out[k] = the sum of table[rows[i]] over the i with owner[i] == k, added to zero in ascending i: (num_sums, D).

    table (R, D) float32; rows, owner (P,) int64 (owner in [0, num_sums)). The additions and their order are those
    of zeros(num_sums, D).index_add_(0, owner, table[rows]) on the CPU, whose scatter form costs several times more:
    here each sum is one bag of an embedding_bag, read straight from the table.
    """
    order = torch.argsort(owner, stable=True)
    sizes = torch.bincount(owner, minlength=num_sums)
    offsets = torch.cumsum(sizes, 0) - sizes
    return torch.nn.functional.embedding_bag(rows[order], table, offsets, mode="sum")


def tree_roots(merged: Tensor, parent: Tensor, max_segment_length: int) -> Tensor:
    """Root (global index f * N + n) of every token's tree, by pointer jumping. merged, parent: (F, N).
    Returns (F * N,) int64; a root points to itself."""
    num_frames, num_tokens = merged.shape
    frame = torch.arange(num_frames, device=merged.device).unsqueeze(-1)
    own = torch.arange(num_frames * num_tokens, device=merged.device)
    pointer = torch.where(merged, (frame - 1) * num_tokens + parent, own.view(num_frames, num_tokens)).flatten()
    for _ in range(max(math.ceil(math.log2(max(max_segment_length, 1))), 0)):
        pointer = pointer[pointer]
    return pointer


def direct_child_counts(merged: Tensor, parent: Tensor) -> Tensor:
    """(F * N,) int64: the number of tokens of frame t + 1 merged into each token of frame t. merged, parent (F, N)."""
    num_frames, num_tokens = merged.shape
    frame = torch.arange(num_frames, device=merged.device).unsqueeze(-1)
    parent_global = ((frame - 1) * num_tokens + parent)[merged]
    return torch.bincount(parent_global, minlength=num_frames * num_tokens)


def bag_layout(roots_of: Tensor, passed_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The trees of the passed-on roots as bags for `row_sums`. roots_of (F * N,) (see tree_roots); passed_index
    (P,) ascending global indices of roots. Returns members (M,) global indices, each tree's in ascending index order
    (its root first: merged tokens lie in later frames), trees in passed_index order; bag_start and bag_size (P,)."""
    slot_of = torch.full_like(roots_of, -1)
    slot_of[passed_index] = torch.arange(passed_index.numel(), device=roots_of.device)
    in_tree = torch.nonzero(slot_of[roots_of] >= 0).flatten()
    owner = slot_of[roots_of[in_tree]]
    members = in_tree[torch.argsort(owner, stable=True)]
    bag_size = torch.bincount(owner, minlength=passed_index.numel())
    return members, torch.cumsum(bag_size, 0) - bag_size, bag_size


# Same-size integer dtypes for torch's row gathers: its bfloat16/float16 index_select is several times slower than
# its int16 one (the bits moved are the same).
GATHER_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def take_rows(table: Tensor, index: Tensor) -> Tensor:
    """table.index_select(0, index): table (R, D), index (I,) int64 -> (I, D), a new tensor."""
    view = GATHER_VIEWS.get(table.dtype)
    if view is None:
        return table.index_select(0, index)
    return table.view(view).index_select(0, index).view(table.dtype)


def walked_root_increments(features: Tensor, merged: Tensor, parent: Tensor, segment_lengths: list[int]
                           ) -> tuple[Tensor, Tensor]:
    """The official frame-by-frame TSTM sums, in the input dtype, touching only the merged tokens and their parents.

    features (F, N, D); merged, parent (F, N); segment_lengths: host-side, summing to F. A token's running value is
    its feature plus the sum of its direct children's running values, that sum formed in float32 in child order and
    rounded to the input dtype, then added in the input dtype (the official frame step: a one-hot product, then
    +=). `stepwise_tree_sums` forms the same sums with an (N, N) one-hot product per frame over a copy of all
    tokens (equal wherever float32 holds the children's sum exactly, as it does unless their values lie about 2^16
    apart). Segments are walked side by side: step s adds frame L - s of every segment longer than s into frame
    L - s - 1. A sole child's running value is its parent's children's sum as it is (no float32 round trip).
    Returns root_index (I,) global indices of the roots that have children, in no particular order, and their
    children's sums (I, D) in the input dtype (a root's running value is its feature + that sum, rounded).
    """
    num_frames, num_tokens, dim = features.shape
    device = features.device
    flat = features.reshape(num_frames * num_tokens, dim)
    merged_flat = merged.flatten()
    frame = torch.arange(num_frames, device=device).unsqueeze(-1)
    parent_global = ((frame - 1) * num_tokens + parent).flatten()
    # The step at which each frame is a child frame: L - (position in its segment); merged tokens sorted by step.
    (step_of_frame,) = int_tensors(device, [length - position for length in segment_lengths
                                            for position in range(length)])
    merged_index = torch.nonzero(merged_flat).flatten()
    merged_step = step_of_frame[merged_index // num_tokens]
    merged_index = merged_index[torch.argsort(merged_step, stable=True)]
    num_steps = max(segment_lengths, default=1) - 1
    step_sizes: list[int] = torch.bincount(merged_step, minlength=num_steps + 1).tolist()
    carry_index = torch.zeros(0, dtype=torch.long, device=device)  # tokens of this step's child frames with children
    carry = features.new_zeros(0, dim)  # their children's sums, in the input dtype
    root_index: list[Tensor] = []
    root_sums: list[Tensor] = []
    offset = 0
    for step in range(1, num_steps + 1):
        children = merged_index[offset : offset + step_sizes[step]]  # ascending
        offset += step_sizes[step]
        carried_child = merged_flat[carry_index]
        roots = torch.nonzero(~carried_child).flatten()
        root_index.append(carry_index.index_select(0, roots))
        root_sums.append(take_rows(carry, roots))
        values = take_rows(flat, children)
        carried = torch.nonzero(carried_child).flatten()
        position = torch.searchsorted(children, carry_index.index_select(0, carried))
        values.index_add_(0, position, take_rows(carry, carried))  # one addition per row: a + b, rounded
        carry_index, carry = children_sums(values, parent_global[children])
    root_index.append(carry_index)  # the segments' first frames: roots only
    root_sums.append(carry)
    return torch.cat(root_index), torch.cat(root_sums)


def children_sums(values: Tensor, parents: Tensor) -> tuple[Tensor, Tensor]:
    """Each parent's children's sum, formed in float32 in child order, rounded to the values' dtype.

    values (C, D) the children's running values in child order; parents (C,) int64 their parents. Returns the
    parents (P,) (those with one child first) and their sums (P, D): a sole child's value is its sum as it is.
    """
    _, inverse, counts = torch.unique(parents, sorted=True, return_inverse=True, return_counts=True)
    sole = counts.index_select(0, inverse) == 1
    if bool(sole.all()):
        return parents, values
    sole_rows = torch.nonzero(sole).flatten()
    shared_rows = torch.nonzero(~sole).flatten()
    shared_parents, owner = torch.unique(parents.index_select(0, shared_rows), sorted=True, return_inverse=True)
    sums = index_sum(take_rows(values, shared_rows).float(), owner, shared_parents.numel()).to(values.dtype)
    return torch.cat([parents.index_select(0, sole_rows), shared_parents]), torch.cat(
        [take_rows(values, sole_rows), sums]
    )


@dataclass(frozen=True)
class TreeMerge:
    """TSTM result for a video. All (F, N) except where noted.

    merged: the token merged into its parent; sums: (F, N, D), the sum over each root's tree; counts: (F, N), its
    divisor (only meaningful where roots & ~selected). Both float32, or both in the input dtype for the official
    frame-by-frame sums of bfloat16/float16 inputs. A root's value is sums / counts (divide only the rows you
    need).
    """

    merged: Tensor
    sums: Tensor
    counts: Tensor

    @property
    def root_values(self) -> Tensor:
        """(F, N, D): sums / counts for every token (roots are the meaningful rows), in the sums' dtype."""
        return self.sums / self.counts.clamp_min(1.0).unsqueeze(-1)


def spatiotemporal_merge(
    features: Tensor,
    selected: Tensor,
    segment_lengths: list[int],
    temporal_threshold: float,
    kept_per_frame_floor: int,
    max_depth: int | None = None,
    max_breadth: int | None = None,
    true_mean: bool = False,
    features_float32: Tensor | None = None,
    spatial_window: int | None = None,
    normalized: Tensor | None = None,
    reuse_features_float32: bool = False,
    float32_sums: bool = False,
    layout: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> TreeMerge:
    """TSTM over all segments of a video at once.

    features: (F, N, D); selected: (F, N) bool, ADTS-selected tokens (they never merge and take no children);
    segment_lengths: host-side lengths summing to F; kept_per_frame_floor: the per-frame budget (see
    merge_decisions). Similarities use the input dtype; sums and divisions float32 (the official code rounds to
    the input dtype after each frame step: identical for float32 inputs, within rounding for bf16/fp16).
    features_float32: optional float32 copy of features that the caller already holds (saves a conversion);
    reuse_features_float32: that copy is the caller's scratch and may be overwritten (saves another copy).
    normalized: optional precomputed features / their L2 norm in the input dtype.
    Sums: float32 inputs are summed over each tree at once (pointer jumping + one index_add; equal to the
    official frame-by-frame sums within float32 rounding). bf16/fp16 inputs are summed frame by frame in the
    input dtype (frame by frame, `stepwise_tree_sums`), rounding as the official code does, unless float32_sums (opt-in: one
    float32 sum per tree, faster and more accurate) or true_mean is set.
    layout: frame_layout(segment_lengths, device) if the caller already holds it (saves a transfer).
    """
    num_frames, num_tokens, dim = features.shape
    device = features.device
    layout = layout if layout is not None else frame_layout(segment_lengths, device)
    max_sim, parent = temporal_parents(features, selected, layout[1], spatial_window, normalized)
    merged = merge_decisions(max_sim, temporal_threshold, segment_lengths, kept_per_frame_floor, layout)
    if max_breadth is not None:
        merged = limit_breadth(merged, parent, max_sim, max_breadth)
    if max_depth is not None:
        merged = limit_depth(merged, parent, max_depth)
    if features.dtype != torch.float32 and not float32_sums and not true_mean:
        # Low-precision inputs: round as the official code rounds, frame step by frame step, in the input dtype.
        values, counts = stepwise_tree_sums(features, merged, parent, segment_lengths)
        return TreeMerge(merged=merged, sums=values, counts=counts)
    roots_of = tree_roots(merged, parent, max(segment_lengths, default=1))
    if features_float32 is not None:
        flat = features_float32.reshape(num_frames * num_tokens, dim)
        reusable = reuse_features_float32
    else:
        flat = features.float().reshape(num_frames * num_tokens, dim)
        reusable = features.dtype != torch.float32  # .float() made a fresh copy
    if flat.is_cuda or current_backend().fixed_order_sums_on_cpu:
        # One sum over all tokens (each root adds itself): no host sync for the merged tokens' positions.
        sums = fixed_order_index_sum(flat, roots_of, num_frames * num_tokens)
    else:
        # Roots start from their own value; only the merged tokens are added (no zero fill, fewer adds).
        merged_index = torch.nonzero(merged.flatten()).flatten()
        sums = flat if reusable else flat.clone()
        sums.index_add_(0, roots_of[merged_index], flat[merged_index])
    if true_mean:
        counts = torch.bincount(roots_of, minlength=num_frames * num_tokens).to(torch.float32)
    else:
        # Official rule: a node's count grows by one per direct child, whatever that child accumulated.
        frame = torch.arange(num_frames, device=device).unsqueeze(-1)
        parent_global = torch.where(merged, (frame - 1) * num_tokens + parent, num_frames * num_tokens).flatten()
        counts = torch.ones(num_frames * num_tokens + 1, dtype=torch.float32, device=device)
        counts.index_add_(0, parent_global, torch.ones_like(parent_global, dtype=torch.float32))
        counts = counts[:-1]
    return TreeMerge(
        merged=merged,
        sums=sums.view(num_frames, num_tokens, dim),
        counts=counts.view(num_frames, num_tokens),
    )


