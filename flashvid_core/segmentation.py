"""Dynamic video segmentation (DySeg): cut the video where consecutive frames differ."""

from __future__ import annotations

import torch
from torch import Tensor

from ._transfer import int_tensors

# frame_descriptors reduces this many bytes of (float32) features at a time.
DESCRIPTOR_CHUNK_BYTES = 8 * 2**20


def frame_descriptors(features: Tensor) -> Tensor:
    """The frames' mean tokens, DySeg's frame descriptors: features (F, N, D) -> (F, D) in the input dtype.

    The values of `features.mean(dim=1)`, computed a few frames at a time: for bfloat16/float16 inputs torch's mean
    first converts the whole input to float32 (a copy of the video, for a (F, D) result); a frame's mean does not
    depend on the other frames (tested bit for bit)."""
    num_frames, num_tokens, dim = features.shape
    frames_per_chunk = max(1, DESCRIPTOR_CHUNK_BYTES // max(1, num_tokens * dim * 4))
    if features.dtype == torch.float32 or frames_per_chunk >= num_frames:
        return features.mean(dim=1)
    return torch.cat([chunk.mean(dim=1) for chunk in features.split(frames_per_chunk)])


def transition_similarities(frame_features: Tensor) -> Tensor:
    """Cosine similarity of consecutive frame descriptors, in the input dtype (as the official code).

    frame_features: (F, D) one descriptor per frame (the mean of the frame's tokens).
    Returns (F - 1,): entry t compares frames t and t + 1.
    """
    normed = frame_features / frame_features.norm(p=2, dim=-1, keepdim=True)
    return (normed[:-1] * normed[1:]).sum(dim=-1)


def segment_lengths(
    frame_features: Tensor,
    segment_threshold: float,
    min_segment_num: int,
    complementary_segment: bool = True,
) -> Tensor:
    """Lengths of the segments, cutting after frame t where the transition similarity is < segment_threshold.

    frame_features: (F, D). Returns (S,) int64 summing to F, on frame_features' device.
    With too few segments and complementary_segment, the transitions with the smallest similarity are added as
    cuts; the already-cut ones count as similarity 1.0 there, so when few transitions remain an existing cut can
    be picked again: a duplicate cut, i.e. a zero-length segment (the official behaviour, kept on purpose).
    """
    lengths = host_segment_lengths(frame_features, segment_threshold, min_segment_num, complementary_segment)
    return int_tensors(frame_features.device, lengths)[0]


def host_segment_lengths(
    frame_features: Tensor,
    segment_threshold: float,
    min_segment_num: int,
    complementary_segment: bool = True,
) -> list[int]:
    """`segment_lengths` as a host list (the caller's control flow needs it): one or two small device reads."""
    similarities, is_cut = transition_cuts(frame_features, segment_threshold)
    return lengths_from_cuts(similarities, is_cut, is_cut.tolist(), min_segment_num, complementary_segment)


def transition_cuts(frame_features: Tensor, segment_threshold: float) -> tuple[Tensor, Tensor]:
    """The first half of `segment_lengths`, nothing read: similarities (F - 1,) and is_cut (F - 1,) bool.

    The caller reads is_cut (possibly with other flags, in one device read) and passes it to lengths_from_cuts.
    """
    similarities = transition_similarities(frame_features)
    return similarities, similarities < segment_threshold


def lengths_from_cuts(
    similarities: Tensor,
    is_cut: Tensor,
    cut_flags: list[bool],
    min_segment_num: int,
    complementary_segment: bool = True,
) -> list[int]:
    """The second half of `segment_lengths`: cut_flags is is_cut read to the host. Reads the complementary cuts
    from the device when there are too few segments."""
    cuts = [t for t, flag in enumerate(cut_flags) if flag]
    num_segments = len(cuts) + 1
    if num_segments < min_segment_num and complementary_segment:
        filled = similarities.masked_fill(is_cut, 1.0)
        num_extra = min(min_segment_num - num_segments, filled.shape[0])
        # torch.topk's choice among equal similarities is part of the reference behaviour.
        extra: list[int] = torch.topk(filled, k=num_extra, largest=False).indices.tolist()
        cuts = sorted(cuts + extra)
    bounds = [-1, *cuts, len(cut_flags)]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def video_segment_lengths(
    features: Tensor,
    segment_threshold: float,
    min_segment_num: int,
    complementary_segment: bool = True,
    do_segment: bool = True,
) -> list[int]:
    """Segment lengths for a video, as a host list. features: (F, N, D). [F] when do_segment is False."""
    if not do_segment:
        return [features.shape[0]]
    return host_segment_lengths(frame_descriptors(features), segment_threshold, min_segment_num, complementary_segment)
