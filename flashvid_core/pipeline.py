"""`compress`: FlashVID's vision-side compression of a whole video (spec sections 1-6).

Stages: budgets (host arithmetic) -> DySeg segment lengths and the input check (one or two small device reads) ->
selection and TSTM (`eager_stage`: the matrix products segment by segment, the greedy selection and the merge
decisions for all frames at once; or, on CUDA, the accel layer's fixed-shape stage) -> per-frame cluster counts
(one device sync) -> DPC-kNN for the frames that need it, in padded batches of similar sizes -> output ordered by
global index f * N + n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._transfer import int_tensors
from .backend import Backend, fast_path, use_backend
from .clustering import CDIST_DIRECT_MAX_POINTS, dpc_knn_ragged, draw_density_noise
from .config import FlashVIDConfig
from .eager_stage import PassedTokens, RootValues, eager_stage, gather_passed, prefix_sums, ragged_slots
from .merging import take_rows
from .segmentation import frame_descriptors, lengths_from_cuts, transition_cuts

# DPC-kNN pads the frames of one batch to the batch's largest; a batch holds at most this many padded points
# (with D = 3584 about 8 MB per float32 operand), so its temporaries stay small.
DPC_BATCH_POINTS = 600
DPC_BATCH_FILL = 0.9


@dataclass(frozen=True)
class Compression:
    """The compressed video.

    tokens: (M, D) in the input dtype; indices: (M,) int64 global indices f * N + n, ascending (an index can
    appear twice: a one-frame segment clusters all its tokens, so a cluster centre can be a selected token);
    segment_lengths: (S,) int64 frames per segment (a zero-length segment is possible, as in the official code);
    segment_num_tokens: (S,) int64 output tokens per segment; token_budget, num_selected (ADTS tokens per frame)
    and num_merged (contextual tokens per frame) as Python ints.
    """

    tokens: Tensor
    indices: Tensor
    segment_lengths: Tensor
    segment_num_tokens: Tensor
    token_budget: int
    num_selected: int
    num_merged: int

    @property
    def num_tokens(self) -> int:
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class VideoPlan:
    """What one video's compression runs with, besides its tensors: the config, the DySeg segments, the per-frame
    split of the budget and the DPC tie-breaker's source. The eager stages and the accel layer's CUDA stage read
    the same plan."""

    config: FlashVIDConfig
    segment_lengths: tuple[int, ...]
    num_selected: int
    num_merged: int
    generator: torch.Generator | None = None
    dpc_noise: Tensor | None = None

    @property
    def budget(self) -> int:
        return self.num_selected + self.num_merged

    @property
    def multi_frame(self) -> bool:
        """Some segment has more than one frame (TSTM runs)."""
        return max(self.segment_lengths) > 1


def validate_inputs(features: Tensor, attention: Tensor, check_finite: bool = True) -> None:
    """Raise ValueError unless features is (F, N, D) and attention (F, N), floating, finite, F, N, D >= 1."""
    if not isinstance(features, Tensor) or not isinstance(attention, Tensor):
        raise ValueError(
            f"features and attention must be torch tensors, got {type(features).__name__} and "
            f"{type(attention).__name__}"
        )
    if features.dim() != 3:
        raise ValueError(f"features must have shape (F, N, D) (3 dims), got {tuple(features.shape)}")
    if attention.dim() != 2:
        raise ValueError(f"attention must have shape (F, N) (2 dims), got {tuple(attention.shape)}")
    if tuple(attention.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"attention shape {tuple(attention.shape)} does not match features (F, N) = {tuple(features.shape[:2])}"
        )
    num_frames, num_tokens, dim = features.shape
    if num_frames == 0:
        raise ValueError("features has zero frames: nothing to compress")
    if num_tokens == 0 or dim == 0:
        raise ValueError(f"features shape {tuple(features.shape)} has no tokens or no feature dimensions")
    if not features.is_floating_point() or not attention.is_floating_point():
        raise ValueError(f"features and attention must be floating point, got {features.dtype} and {attention.dtype}")
    if features.device != attention.device:
        raise ValueError(f"features ({features.device}) and attention ({attention.device}) are on different devices")
    if check_finite:
        _raise_unless_finite(_finite_flags(features.mean(dim=1, dtype=torch.float32), attention).tolist())


def _finite_flags(frame_means: Tensor, attention: Tensor) -> Tensor:
    """(2,) bool on the device, nothing read: features finite (from their frames' means (F, D): any NaN or inf
    reaches its frame's mean, so no elementwise pass is needed), attention finite."""
    return torch.stack([torch.isfinite(frame_means).all(), torch.isfinite(attention).all()])


def _raise_unless_finite(flags: list[bool]) -> None:
    if not flags[0]:
        raise ValueError("features contain NaN or inf")
    if not flags[1]:
        raise ValueError("attention contains NaN or inf")


def _checked_segment_lengths(
    features: Tensor, attention: Tensor, config: FlashVIDConfig, check_finite: bool
) -> tuple[list[int], Tensor | None]:
    """DySeg's segment lengths (`video_segment_lengths`), with the inputs' finiteness check in the same device read:
    one read instead of two (a second only for complementary cuts). Raises ValueError on NaN or inf.

    DySeg's frame descriptors (the frames' mean tokens, in the input dtype) serve the check too: one pass over the
    features. Also returns them (F, D) for float32 features, where event relevance uses the same means, else None.
    """
    frame_means = frame_descriptors(features) if config.do_segment or check_finite else None
    reusable_means = frame_means if features.dtype == torch.float32 else None
    if not config.do_segment:
        if check_finite:
            _raise_unless_finite(_finite_flags(frame_means, attention).tolist())
        return [features.shape[0]], reusable_means
    similarities, is_cut = transition_cuts(frame_means, config.segment_threshold)
    flags: list[bool] = (
        torch.cat([_finite_flags(frame_means, attention), is_cut]).tolist() if check_finite else is_cut.tolist()
    )
    if check_finite:
        _raise_unless_finite(flags[:2])
        flags = flags[2:]
    lengths = lengths_from_cuts(similarities, is_cut, flags, config.min_segment_num, config.complementary_segment)
    return lengths, reusable_means


def _cluster_counts(num_merged: int, segment_lengths: list[int], passed_counts: list[int]) -> tuple[list[float], list[int]]:
    """Per segment the merge ratio, per frame the cluster count (Python floats, as in the official code).

    ratio = num_merged * L / (tokens passed on in the segment); clusters = ceil(n * ratio).
    """
    ratios: list[float] = []
    clusters: list[int] = []
    offset = 0
    for length in segment_lengths:
        counts = passed_counts[offset : offset + length]
        total = sum(counts)
        ratio = (num_merged * length) / total if length > 0 else 1.0
        ratios.append(ratio)
        clusters.extend(math.ceil(n * ratio) for n in counts)
        offset += length
    return ratios, clusters


@torch.no_grad()
def compress(
    features: Tensor,
    attention: Tensor,
    config: FlashVIDConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    dpc_noise: Tensor | None = None,
    check_finite: bool = True,
    backend: Backend | None = None,
) -> Compression:
    """Compress one video's visual tokens with FlashVID.

    features: (F, N, D) any float dtype (F frames of N tokens); attention: (F, N) the per-token attention
    statistic. config: FlashVIDConfig (default: the official defaults).
    generator: the generator of the DPC density tie-breaker (default: the device's default generator, drawn as
    the official code draws it, so a torch.manual_seed before the call reproduces its outputs exactly).
    dpc_noise: optional injected tie-breaker draws, every call's draws concatenated in call order (overrides
    generator). check_finite: reject NaN/inf inputs (one pass over the inputs). backend: which fast paths this
    call may take (default: the current `Backend`; the numbers are the same either way).
    Nothing is mutated. Returns a Compression.
    """
    if backend is not None:
        with use_backend(backend):
            return compress(features, attention, config, generator=generator, dpc_noise=dpc_noise,
                            check_finite=check_finite)
    config = FlashVIDConfig() if config is None else config
    if not isinstance(config, FlashVIDConfig):
        raise ValueError(f"config must be a FlashVIDConfig, got {type(config).__name__}")
    validate_inputs(features, attention, check_finite=False)  # finiteness: read with DySeg's cuts below
    num_tokens = features.shape[1]
    budget, num_selected, num_merged = config.budgets(num_tokens)
    if budget > num_tokens:
        raise ValueError(
            f"token budget {budget} = ceil({num_tokens} * retention_ratio={config.retention_ratio} * "
            f"expansion={config.expansion}) is larger than the frame's {num_tokens} tokens; lower retention_ratio "
            "or expansion"
        )
    # num_merged > 0 needs alpha < 1, and FlashVIDConfig refuses alpha < 1 with temporal_threshold >= 1.

    segment_lengths, frame_means = _checked_segment_lengths(features, attention, config, check_finite)
    plan = VideoPlan(config, tuple(segment_lengths), num_selected, num_merged, generator, dpc_noise)
    return _compress(features, attention, plan, frame_means)


def _compress(features: Tensor, attention: Tensor, plan: VideoPlan, frame_means: Tensor | None = None) -> Compression:
    """Select, merge, cluster and assemble one video (segments already cut): the eager stage, or the accel
    layer's CUDA stage up to the passed-on tokens where it applies. frame_means: see eager_stage."""
    fast_stage = fast_path("compress_stage") if plan.budget > 0 and features.is_cuda else None
    if fast_stage is not None:
        stage = fast_stage(features, attention, plan)
        if stage is not None:
            passed = None
            if plan.num_merged > 0:
                values = RootValues(stage.sums, stage.counts, features.dtype)
                passed = gather_passed(values, stage.token_order, stage.passed_counts)
            return _finish(features, stage.keep, passed, plan)
    keep, passed = eager_stage(features, attention, plan, frame_means)
    return _finish(features, keep, passed, plan)


def _finish(features: Tensor, keep: Tensor | None, passed: PassedTokens | None, plan: VideoPlan) -> Compression:
    """From the selected tokens (keep (F, K) or None) and the passed-on tokens (None without merged tokens):
    DPC-kNN per frame, then every token ordered by global index (new tensors: nothing aliases the inputs or a
    CUDA graph's buffers)."""
    num_frames, num_tokens, dim = features.shape
    device = features.device
    segment_lengths, num_selected, num_merged = list(plan.segment_lengths), plan.num_selected, plan.num_merged
    selected_index = torch.zeros(0, dtype=torch.long, device=device)
    if keep is not None:
        selected_index = (torch.arange(num_frames, device=device).unsqueeze(-1) * num_tokens + keep).flatten()
    pieces_tokens: list[Tensor] = []
    pieces_indices: list[Tensor] = [selected_index]
    segment_num_tokens = [num_selected * length for length in segment_lengths]
    if passed is not None:
        cluster_tokens, cluster_indices, per_segment = _cluster_passed(
            passed, num_tokens, segment_lengths, num_merged, plan.generator, plan.dpc_noise
        )
        pieces_tokens.extend(cluster_tokens)
        pieces_indices.extend(cluster_indices)
        segment_num_tokens = [a + b for a, b in zip(segment_num_tokens, per_segment)]
    tokens, indices = _in_index_order(features.reshape(num_frames * num_tokens, dim), pieces_indices, pieces_tokens)
    segment_info = int_tensors(device, segment_lengths, segment_num_tokens)
    return Compression(
        tokens=tokens,
        indices=indices,
        segment_lengths=segment_info[0],
        segment_num_tokens=segment_info[1],
        token_budget=num_selected + num_merged,
        num_selected=num_selected,
        num_merged=num_merged,
    )


def _in_index_order(flat: Tensor, pieces_indices: list[Tensor], pieces_tokens: list[Tensor]) -> tuple[Tensor, Tensor]:
    """All output tokens ordered by global index (a stable sort: the selected tokens first among equal indices).

    flat: (F * N, D) the features; pieces_indices: global indices, the selected tokens' first (their values are
    flat's rows), then one piece per entry of pieces_tokens (their values). Returns tokens (M, D) and indices (M,).
    The tokens are written straight to their places: the selected ones by one gather (the places of the others
    gather row 0 first), the others copied in, so the output is the only (M, D) allocation.
    """
    all_indices = torch.cat(pieces_indices)
    order = torch.argsort(all_indices, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    num_selected = pieces_indices[0].numel()
    source_rows = torch.zeros_like(all_indices)
    source_rows[position[:num_selected]] = pieces_indices[0]
    tokens = take_rows(flat, source_rows)
    offset = num_selected
    for piece in pieces_tokens:
        tokens.index_copy_(0, position[offset : offset + piece.shape[0]], piece)
        offset += piece.shape[0]
    return tokens, all_indices[order]


def _cluster_passed(
    passed: PassedTokens,
    num_tokens: int,
    segment_lengths: list[int],
    num_merged: int,
    generator: torch.Generator | None,
    dpc_noise: Tensor | None,
) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """Per-frame DPC-kNN of the passed-on tokens. Returns token pieces, index pieces and tokens per segment."""
    device = passed.token_index.device
    passed_counts = passed.counts
    num_frames = len(passed_counts)
    ratios, clusters = _cluster_counts(num_merged, segment_lengths, passed_counts)
    frame_ratio = [ratio for ratio, length in zip(ratios, segment_lengths) for _ in range(length)]
    # Official rule: cluster a frame when it gets clusters and the ratio is below 1; else pass its tokens on.
    clustered = [clusters[f] > 0 and frame_ratio[f] < 1.0 for f in range(num_frames)]
    dpc_frames = [f for f in range(num_frames) if clustered[f]]
    pass_frames = [f for f in range(num_frames) if not clustered[f]]
    per_frame_out = [clusters[f] if clustered[f] else passed_counts[f] for f in range(num_frames)]
    row_start = prefix_sums(passed_counts)

    # Tie-breaker draws in call order (segment order, then frame order = frame order).
    draw_sizes = [passed_counts[f] for f in dpc_frames]
    if dpc_noise is not None:
        noise_flat = dpc_noise.to(device=device, dtype=torch.float32).flatten()
        if noise_flat.numel() != sum(draw_sizes):
            raise ValueError(
                f"dpc_noise has {noise_flat.numel()} values but the DPC calls draw {sum(draw_sizes)} in total"
            )
    else:
        noise_flat = draw_density_noise(draw_sizes, device, generator)
    noise_offset = dict(zip(dpc_frames, prefix_sums(draw_sizes)))

    pieces_tokens: list[Tensor] = []
    pieces_indices: list[Tensor] = []
    for batch in _dpc_batches(dpc_frames, passed_counts):
        tokens, indices = _cluster_frames(
            passed, batch, row_start, clusters, noise_flat, [noise_offset[f] for f in batch], num_tokens
        )
        pieces_tokens.append(tokens)
        pieces_indices.append(indices)
    if pass_frames:
        # Flat positions of the passed tokens from per-frame counts (no boolean-mask indexing, which would sync).
        frame_index, starts, counts = int_tensors(device, pass_frames, [row_start[f] for f in pass_frames],
                                                  [passed_counts[f] for f in pass_frames])
        owner, slots = ragged_slots(counts, sum(passed_counts[f] for f in pass_frames))
        rows = starts[owner] + slots
        pieces_tokens.append(passed.values(rows))
        pieces_indices.append(frame_index[owner] * num_tokens + passed.token_index[rows])

    per_segment: list[int] = []
    offset = 0
    for length in segment_lengths:
        per_segment.append(sum(per_frame_out[offset : offset + length]))
        offset += length
    return pieces_tokens, pieces_indices, per_segment


def _dpc_batches(frames: list[int], counts: list[int]) -> list[list[int]]:
    """The frames DPC-kNN clusters, in padded batches: the frames on each side of torch.cdist's 25-point switch
    apart (each side's distances are computed as torch.cdist computes them for that size), largest first; a batch
    is closed when its padded points would exceed DPC_BATCH_POINTS or the next frame is below DPC_BATCH_FILL of the
    batch's width (the pairwise work grows with the square of the width)."""
    batches: list[list[int]] = []
    for side in ([f for f in frames if counts[f] <= CDIST_DIRECT_MAX_POINTS],
                 [f for f in frames if counts[f] > CDIST_DIRECT_MAX_POINTS]):
        batch: list[int] = []
        for frame in sorted(side, key=lambda f: -counts[f]):
            width = counts[batch[0]] if batch else 0
            if batch and ((len(batch) + 1) * width > DPC_BATCH_POINTS or counts[frame] < DPC_BATCH_FILL * width):
                batches.append(batch)
                batch = []
            batch.append(frame)
        if batch:
            batches.append(batch)
    return batches


def _cluster_frames(
    passed: PassedTokens,
    frames: list[int],
    row_start: list[int],
    clusters: list[int],
    noise_flat: Tensor,
    noise_offsets: list[int],
    num_tokens: int,
) -> tuple[Tensor, Tensor]:
    """DPC-kNN on the given frames (one padded batch) and the cluster means. Returns (K_total, D) tokens
    (clusters frame by frame, each frame's in descending score order) and their global indices (the centres')."""
    device = passed.token_index.device
    counts_list = [passed.counts[f] for f in frames]
    cluster_list = [clusters[f] for f in frames]
    neighbour_list = [min(k, 7) for k in cluster_list]
    width = max(counts_list)
    max_clusters = max(cluster_list)
    offsets_list = noise_offsets if noise_flat.numel() > 0 else [0] * len(frames)
    frame_index, starts, counts, num_clusters, num_neighbours, offsets = int_tensors(
        device, frames, [row_start[f] for f in frames], counts_list, cluster_list, neighbour_list, offsets_list
    )
    # Slot j < K_i of row i, frame by frame: the centres in score order.
    cluster_row, cluster_slot = ragged_slots(num_clusters, sum(cluster_list))
    pick = cluster_row * max_clusters + cluster_slot
    slots = torch.arange(width, device=device)
    used = slots.unsqueeze(0) < counts.unsqueeze(1)  # (C, n)
    # Padded slots repeat the frame's last token: cdist entries of valid pairs never read them.
    rows = starts.unsqueeze(1) + torch.minimum(slots.unsqueeze(0), counts.unsqueeze(1) - 1)  # (C, n)
    members = passed.values(rows.flatten()).view(len(frames), width, -1)  # input dtype
    local = passed.token_index[rows]  # (C, n) within-frame token indices
    if noise_flat.numel() > 0:
        noise_index = (offsets.unsqueeze(1) + slots.unsqueeze(0)).clamp_max(noise_flat.numel() - 1)
        noise = noise_flat[noise_index].masked_fill(~used, 0.0)
    else:
        noise = torch.zeros(len(frames), width, dtype=torch.float32, device=device)
    assignment, centres = dpc_knn_ragged(
        members, counts, num_clusters, num_neighbours, noise, counts_list, cluster_list, neighbour_list
    )
    # Cluster means as the official code forms them: one-hot (C, K, n) @ members (C, n, D) / member counts.
    one_hot = (assignment.unsqueeze(1) == torch.arange(max_clusters, device=device).view(1, -1, 1)) & used.unsqueeze(1)
    # In the input dtype, as the official code forms them (bf16/fp16 products accumulate in float32, round once).
    one_hot = one_hot.to(members.dtype)
    means = torch.bmm(one_hot, members) / one_hot.sum(dim=-1, keepdim=True).clamp_min(1.0)  # (C, K_max, D)
    # Centres, frame by frame, in score order: pick slot j < K_i of row i.
    centre_global = (frame_index.unsqueeze(-1) * num_tokens + local.gather(1, centres)).flatten()[pick]
    return means.flatten(0, 1)[pick], centre_global
