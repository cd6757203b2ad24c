"""Per-segment entry points in the official function's terms, for the golden cases that record one segment.

The public API compresses whole videos (`flashvid_core.compress`); the conformance cases also pin the
official per-segment step, so the tests drive the same internal stages with explicit per-frame budgets.
"""

from __future__ import annotations

import torch
from torch import Tensor

import flashvid_core as fc
from flashvid_core import pipeline
from flashvid_core.merging import spatiotemporal_merge, stepwise_tree_sums


@torch.no_grad()
def compress_segment(
    features: Tensor,
    attention: Tensor,
    config: fc.FlashVIDConfig,
    num_selected: int,
    num_merged: int,
    *,
    generator: torch.Generator | None = None,
    dpc_noise: Tensor | None = None,
    check_finite: bool = True,
) -> fc.Compression:
    """Compress frames that form ONE segment with explicit per-frame budgets (the official per-segment step).

    features: (T, N, D); attention: (T, N). Returns a Compression whose indices are t * N + n, ascending.
    """
    if not isinstance(config, fc.FlashVIDConfig):
        raise ValueError(f"config must be a FlashVIDConfig, got {type(config).__name__}")
    fc.validate_inputs(features, attention, check_finite)
    num_tokens = features.shape[1]
    for name, value in (("num_selected", num_selected), ("num_merged", num_merged)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 0")
    if num_selected + num_merged > num_tokens:
        raise ValueError(
            f"num_selected + num_merged = {num_selected + num_merged} exceeds the {num_tokens} tokens per frame"
        )
    if num_merged > 0 and config.temporal_threshold >= 1.0:
        raise ValueError(f"temporal_threshold={config.temporal_threshold} lets no token merge")
    if num_selected > 0 and config.alpha == 0.0:
        raise ValueError("num_selected > 0 with alpha = 0: the official code runs no selection when alpha is 0")
    plan = pipeline.VideoPlan(config, (features.shape[0],), num_selected, num_merged, generator, dpc_noise)
    return pipeline._compress(features, attention, plan)


def merge_segment(
    features: Tensor, token_mask: Tensor, temporal_threshold: float, num_selected: int, num_merged: int
) -> tuple[Tensor, Tensor, Tensor]:
    """TSTM on one segment, as the official function returns it.

    features: (T, N, D); token_mask: (T, N) bool, False for ADTS-selected tokens. Returns the kept roots'
    values (R, D) in the input dtype, frames concatenated, their within-frame indices (R,), per-frame counts (T,).
    """
    selected = ~token_mask.bool()
    result = spatiotemporal_merge(
        features, selected, [features.shape[0]], temporal_threshold, num_selected + num_merged
    )
    keep = ~result.merged & ~selected
    frame_index, token_index = torch.nonzero(keep, as_tuple=True)
    tokens = result.root_values[frame_index, token_index].to(features.dtype)
    return tokens, token_index, keep.sum(dim=-1)


def stepwise_root_values(features: Tensor, merged: Tensor, parent: Tensor) -> Tensor:
    """Root values summed frame by frame in the input dtype, as the official code does: (F, N, D)."""
    values, counts = stepwise_tree_sums(features, merged, parent)
    return torch.where(merged.unsqueeze(-1), values, values / counts.unsqueeze(-1))
