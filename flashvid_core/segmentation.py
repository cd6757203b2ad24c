"""Dynamic video segmentation (DySeg): cut the video where consecutive frames differ."""

from __future__ import annotations

import torch
from torch import Tensor


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

    frame_features: (F, D). Returns (S,) int64 summing to F.
    With too few segments and complementary_segment, the transitions with the smallest similarity are added as
    cuts; the already-cut ones count as similarity 1.0 there, so when few transitions remain an existing cut can
    be picked again: a duplicate cut, i.e. a zero-length segment (the official behaviour, kept on purpose).
    """
    num_frames = frame_features.shape[0]
    similarities = transition_similarities(frame_features)
    is_cut = similarities < segment_threshold
    cuts = torch.nonzero(is_cut).flatten()
    num_segments = cuts.numel() + 1
    if num_segments < min_segment_num and complementary_segment:
        filled = similarities.masked_fill(is_cut, 1.0)
        num_extra = min(min_segment_num - num_segments, filled.shape[0])
        # torch.topk's choice among equal similarities is part of the reference behaviour.
        extra = torch.topk(filled, k=num_extra, largest=False).indices
        cuts = torch.cat([cuts, extra]).sort().values
    bounds = torch.cat([cuts.new_tensor([-1]), cuts, cuts.new_tensor([num_frames - 1])])
    return torch.diff(bounds)


def video_segment_lengths(
    features: Tensor,
    segment_threshold: float,
    min_segment_num: int,
    complementary_segment: bool = True,
    do_segment: bool = True,
) -> Tensor:
    """Segment lengths for a video. features: (F, N, D). Returns (S,) int64; [F] when do_segment is False."""
    if not do_segment:
        return torch.tensor([features.shape[0]], dtype=torch.long, device=features.device)
    return segment_lengths(features.mean(dim=1), segment_threshold, min_segment_num, complementary_segment)
