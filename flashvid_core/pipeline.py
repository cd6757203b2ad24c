"""`compress`: FlashVID's vision-side compression of a whole video (spec sections 1-6).

Stages: budgets (host arithmetic) -> DySeg segment lengths and the input check (one or two small device reads) ->
token selection for all frames at once -> TSTM for all multi-frame segments at once -> per-frame cluster counts
(one device sync) -> DPC-kNN for all frames that need it, padded into at most two batches -> output ordered by
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
from .merging import frame_layout, spatiotemporal_merge
from .segmentation import lengths_from_cuts, transition_cuts
from .selection import select_tokens


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


@dataclass(frozen=True)
class PassedTokens:
    """The tokens TSTM passes on to DPC-kNN: their values, token_order (F, N) (each frame's passed tokens first,
    in index order) and passed_counts (F,) on the device."""

    values: _RootValues
    token_order: Tensor
    passed_counts: Tensor


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
        _raise_unless_finite(_finite_flags(features, attention).tolist())


def _finite_flags(features: Tensor, attention: Tensor) -> Tensor:
    """(2,) bool on the device, nothing read: features finite, attention finite."""
    # Any NaN or inf reaches its frame's mean (one reduction instead of an elementwise pass over features).
    frame_means = features.mean(dim=1, dtype=torch.float32)
    return torch.stack([torch.isfinite(frame_means).all(), torch.isfinite(attention).all()])


def _raise_unless_finite(flags: list[bool]) -> None:
    if not flags[0]:
        raise ValueError("features contain NaN or inf")
    if not flags[1]:
        raise ValueError("attention contains NaN or inf")


def _checked_segment_lengths(
    features: Tensor, attention: Tensor, config: FlashVIDConfig, check_finite: bool
) -> list[int]:
    """DySeg's segment lengths (`video_segment_lengths`), with the inputs' finiteness check in the same device read:
    one read instead of two (a second only for complementary cuts). Raises ValueError on NaN or inf."""
    if not config.do_segment:
        if check_finite:
            _raise_unless_finite(_finite_flags(features, attention).tolist())
        return [features.shape[0]]
    similarities, is_cut = transition_cuts(features.mean(dim=1), config.segment_threshold)
    flags: list[bool] = (
        torch.cat([_finite_flags(features, attention), is_cut]).tolist() if check_finite else is_cut.tolist()
    )
    if check_finite:
        _raise_unless_finite(flags[:2])
        flags = flags[2:]
    return lengths_from_cuts(
        similarities, is_cut, flags, config.min_segment_num, config.complementary_segment
    )


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

    segment_lengths = _checked_segment_lengths(features, attention, config, check_finite)
    return _compress(features, attention,
                     VideoPlan(config, tuple(segment_lengths), num_selected, num_merged, generator, dpc_noise))


def _compress(features: Tensor, attention: Tensor, plan: VideoPlan) -> Compression:
    """Select, merge, cluster and assemble one video (segments already cut): the eager path, or the accel
    layer's CUDA stage up to the passed-on tokens where it applies."""
    num_frames, num_tokens, _ = features.shape
    device = features.device
    config, segment_lengths = plan.config, list(plan.segment_lengths)
    num_selected, num_merged = plan.num_selected, plan.num_merged
    frame_arange = torch.arange(num_frames, device=device)

    fast_stage = fast_path("compress_stage") if plan.budget > 0 and features.is_cuda else None
    if fast_stage is not None:
        stage = fast_stage(features, attention, plan)
        if stage is not None:
            passed = None
            if num_merged > 0:
                passed = PassedTokens(_RootValues(stage.sums, stage.counts, features.dtype), stage.token_order,
                                      stage.passed_counts)
            return _finish(features, stage.keep, passed, plan)
    # Token selection for every frame at once (event relevance is per segment).
    selected = torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=device)
    # One float32 copy serves selection distances and TSTM sums (a no-op for float32 inputs); for float32 inputs
    # selection and TSTM normalise identically, so the unit-norm features are computed once.
    features_float32 = features.float()
    normalized = None
    if features.dtype == torch.float32 and num_selected > 0 and num_merged > 0 and max(segment_lengths) > 1:
        normalized = features / features.norm(p=2, dim=-1, keepdim=True)
    keep = None
    if num_selected > 0:
        keep = select_tokens(
            features_float32,
            attention,
            num_selected,
            config.token_selection_method,
            segment_lengths,
            forbid_repick=True if config.adts_forbid_repick else None,
            normalized=normalized,
        )  # (F, K)
        selected[frame_arange.unsqueeze(-1), keep] = True
    passed = None
    if num_merged > 0:
        passed = _passed_tokens(features, features_float32, normalized, selected, segment_lengths, config,
                                plan.budget)
    return _finish(features, keep, passed, plan)


def _finish(features: Tensor, keep: Tensor | None, passed: PassedTokens | None, plan: VideoPlan) -> Compression:
    """From the selected tokens (keep (F, K) or None) and the passed-on tokens (None without merged tokens):
    DPC-kNN per frame, then every token ordered by global index (new tensors: nothing aliases the inputs or a
    CUDA graph's buffers)."""
    num_frames, num_tokens, dim = features.shape
    device = features.device
    segment_lengths, num_selected, num_merged = list(plan.segment_lengths), plan.num_selected, plan.num_merged
    pieces_tokens: list[Tensor] = []
    pieces_indices: list[Tensor] = []
    if keep is not None:
        frame_arange = torch.arange(num_frames, device=device)
        pieces_tokens.append(features[frame_arange.unsqueeze(-1), keep].reshape(-1, dim))
        pieces_indices.append((frame_arange.unsqueeze(-1) * num_tokens + keep).reshape(-1))
    segment_num_tokens = [num_selected * length for length in segment_lengths]
    if passed is not None:
        counts: list[int] = passed.passed_counts.tolist()  # the device read: cluster counts are host arithmetic
        cluster_tokens, cluster_indices, per_segment = _cluster_passed(
            passed.values, passed.token_order, counts, segment_lengths, num_merged, plan.generator, plan.dpc_noise
        )
        pieces_tokens.extend(cluster_tokens)
        pieces_indices.extend(cluster_indices)
        segment_num_tokens = [a + b for a, b in zip(segment_num_tokens, per_segment)]
    if pieces_indices:
        all_indices = torch.cat(pieces_indices)
        all_tokens = torch.cat(pieces_tokens)
        order = torch.argsort(all_indices, stable=True)
        tokens, indices = all_tokens[order], all_indices[order]
    else:
        tokens = features.new_zeros(0, dim)
        indices = torch.zeros(0, dtype=torch.long, device=device)
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


def _passed_tokens(
    features: Tensor,
    features_float32: Tensor,
    normalized: Tensor | None,
    selected: Tensor,
    segment_lengths: list[int],
    config: FlashVIDConfig,
    budget: int,
) -> PassedTokens:
    """TSTM: the tokens each frame passes on to DPC-kNN."""
    num_frames, num_tokens, _ = features.shape
    device, dtype = features.device, features.dtype
    layout = frame_layout(segment_lengths, device)  # one transfer, shared with TSTM
    single_frame = layout[2] == 1  # (F,) a one-frame segment passes ALL its tokens on (selected included)

    if max(segment_lengths) > 1:
        tree = spatiotemporal_merge(
            features,
            selected,
            segment_lengths,
            config.temporal_threshold,
            budget,
            max_depth=config.tstm_max_depth,
            max_breadth=config.tstm_max_breadth,
            spatial_window=config.tstm_spatial_window,
            true_mean=config.tstm_true_mean,
            features_float32=features_float32,
            normalized=normalized,
            # The float32 copy is ours (not the caller's features) and selection is done with it.
            reuse_features_float32=features.dtype != torch.float32,
            float32_sums=config.tstm_float32_sums,
            layout=layout,
        )
        passed = torch.where(single_frame.unsqueeze(-1), True, ~tree.merged & ~selected)
        values = _RootValues(tree.sums, tree.counts, dtype)
    else:
        passed = torch.ones(num_frames, num_tokens, dtype=torch.bool, device=device)
        values = _RootValues(features, None, dtype)
    # Per frame, the passed-on tokens first, in index order (a stable sort of the "not passed" flags).
    token_order = torch.argsort((~passed).to(torch.int8), dim=-1, stable=True)  # (F, N)
    return PassedTokens(values, token_order, passed.sum(dim=-1))


def _cluster_passed(
    values: _RootValues,
    token_order: Tensor,
    passed_counts: list[int],
    segment_lengths: list[int],
    num_merged: int,
    generator: torch.Generator | None,
    dpc_noise: Tensor | None,
) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """Per-frame DPC-kNN of the passed-on tokens (token_order (F, N): each frame's passed tokens first, their
    counts on the host). Returns token pieces, index pieces and tokens per segment."""
    num_frames, num_tokens = token_order.shape
    device, dtype = token_order.device, values.dtype
    ratios, clusters = _cluster_counts(num_merged, segment_lengths, passed_counts)
    frame_ratio = [ratio for ratio, length in zip(ratios, segment_lengths) for _ in range(length)]
    # Official rule: cluster a frame when it gets clusters and the ratio is below 1; else pass its tokens on.
    clustered = [clusters[f] > 0 and frame_ratio[f] < 1.0 for f in range(num_frames)]
    dpc_frames = [f for f in range(num_frames) if clustered[f]]
    pass_frames = [f for f in range(num_frames) if not clustered[f]]
    per_frame_out = [clusters[f] if clustered[f] else passed_counts[f] for f in range(num_frames)]

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
    noise_offset: dict[int, int] = {}
    running = 0
    for frame, size in zip(dpc_frames, draw_sizes):
        noise_offset[frame] = running
        running += size

    pieces_tokens: list[Tensor] = []
    pieces_indices: list[Tensor] = []
    small = [f for f in dpc_frames if passed_counts[f] <= CDIST_DIRECT_MAX_POINTS]
    large = [f for f in dpc_frames if passed_counts[f] > CDIST_DIRECT_MAX_POINTS]
    for group in (small, large):
        if not group:
            continue
        tokens, indices = _cluster_frames(
            values, token_order, group, passed_counts, clusters, noise_flat, noise_offset, num_tokens
        )
        pieces_tokens.append(tokens.to(dtype))
        pieces_indices.append(indices)
    if pass_frames:
        # Flat positions of the passed tokens from per-frame counts (no boolean-mask indexing, which would sync).
        pass_index, pass_counts = int_tensors(device, pass_frames, [passed_counts[f] for f in pass_frames])
        owner, slots = _ragged_slots(pass_counts, sum(passed_counts[f] for f in pass_frames))
        rows = pass_index[owner]
        cols = token_order[rows, slots]
        pieces_tokens.append(values.gather(rows, cols).to(dtype))
        pieces_indices.append(rows * num_tokens + cols)

    per_segment: list[int] = []
    offset = 0
    for length in segment_lengths:
        per_segment.append(sum(per_frame_out[offset : offset + length]))
        offset += length
    return pieces_tokens, pieces_indices, per_segment


def _ragged_slots(counts: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """For counts (R,) int64 on the device summing to total (a host int): owner (total,), the row each slot
    belongs to, and slot (total,), its position 0..counts[r]-1 within that row; rows in order."""
    rows = torch.arange(counts.numel(), device=counts.device)
    owner = torch.repeat_interleave(rows, counts, output_size=total)
    row_start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(total, device=counts.device) - row_start[owner]
    return owner, slot


class _RootValues:
    """The passed-on tokens' values, divided only where gathered: sums / counts (TSTM roots) rounded to the input
    dtype as the official code forms them there, or the features themselves (counts None)."""

    def __init__(self, sums: Tensor, counts: Tensor | None, dtype: torch.dtype) -> None:
        self.sums, self.counts, self.dtype = sums, counts, dtype
        self.device = sums.device
        self.num_tokens, self.dim = sums.shape[1], sums.shape[2]

    def gather(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Rows and cols: broadcastable int64 index tensors of shape S. Returns (*S, D) in the input dtype."""
        flat = (rows * self.num_tokens + cols).expand(torch.broadcast_shapes(rows.shape, cols.shape))
        # index_select on the flattened (F·N, D) rows: one vectorised gather instead of 2-D advanced indexing.
        value = self.sums.reshape(-1, self.dim).index_select(0, flat.reshape(-1)).view(*flat.shape, self.dim)
        if self.counts is None:
            return value
        value = value / self.counts.reshape(-1)[flat].clamp_min(1.0).unsqueeze(-1)
        return value if value.dtype == self.dtype else value.to(self.dtype)


def _cluster_frames(
    values: _RootValues,
    token_order: Tensor,
    frames: list[int],
    passed_counts: list[int],
    clusters: list[int],
    noise_flat: Tensor,
    noise_offset: dict[int, int],
    num_tokens: int,
) -> tuple[Tensor, Tensor]:
    """DPC-kNN on the given frames (one padded batch) and the cluster means. Returns (K_total, D) tokens
    (clusters frame by frame, each frame's in descending score order) and their global indices (the centres')."""
    device = values.device
    dim = values.sums.shape[-1]
    counts_list = [passed_counts[f] for f in frames]
    cluster_list = [clusters[f] for f in frames]
    neighbour_list = [min(k, 7) for k in cluster_list]
    width = max(counts_list)
    max_clusters = max(cluster_list)
    offsets_list = [noise_offset[f] for f in frames] if noise_flat.numel() > 0 else [0] * len(frames)
    frame_index, counts, num_clusters, num_neighbours, offsets = int_tensors(
        device, frames, counts_list, cluster_list, neighbour_list, offsets_list
    )
    # Slot j < K_i of row i, frame by frame: the centres in score order.
    cluster_row, cluster_slot = _ragged_slots(num_clusters, sum(cluster_list))
    pick = cluster_row * max_clusters + cluster_slot
    slots = torch.arange(width, device=device)
    used = slots.unsqueeze(0) < counts.unsqueeze(1)  # (C, n)
    local = token_order[frame_index, :width]  # (C, n) within-frame token indices
    # Padded slots hold other (finite) tokens of the frame: cdist entries of valid pairs never read them.
    members = values.gather(frame_index.unsqueeze(-1), local)  # (C, n, D) input dtype
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
    one_hot = one_hot.to(values.dtype)
    means = torch.bmm(one_hot, members) / one_hot.sum(dim=-1, keepdim=True).clamp_min(1.0)  # (C, K_max, D)
    # Centres, frame by frame, in score order: pick slot j < K_i of row i.
    centre_global = (frame_index.unsqueeze(-1) * num_tokens + local.gather(1, centres)).flatten()[pick]
    return means.reshape(-1, dim)[pick], centre_global
