"""Vanilla (`method=none`): every visual token, in order; no pruning inside the LLM."""

from __future__ import annotations

import torch
from torch import Tensor

from flashvid_core.pipeline import Compression
from lmms_eval_models.methods.base import FrameBudget, Method, make_compression
from lmms_eval_models.methods.registry import register


def keep_all(features: Tensor) -> Compression:
    """features (F, N, D) -> every token, indices 0..F·N − 1, the video as one segment."""
    num_frames, num_tokens, dim = features.shape
    indices = torch.arange(num_frames * num_tokens, device=features.device)
    one_segment = torch.tensor([num_frames], dtype=torch.long, device=features.device)
    return make_compression(features.reshape(-1, dim), indices, one_segment, num_tokens, num_tokens, num_tokens, 0)


@register
class Vanilla(Method):
    name = "none"
    label = "Vanilla"
    order = 100
    compresses = False

    def frame_budget(self, num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config) -> FrameBudget:
        return FrameBudget(num_tokens_per_frame, num_tokens_per_frame, 0)  # R is ignored

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        return keep_all(features)
