"""Random keep: b = floor(N·R) (>= 1) distinct tokens per frame, uniformly, for a fixed seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flashvid_core.selection import gather_tokens
from lmms_eval_models.methods.base import Method, check_at_least, check_integer, per_frame_compression
from lmms_eval_models.methods.registry import register


@dataclass(frozen=True)
class SeedOptions:
    """seed: seeds `random` and the density tie-breaker of `fastvid` (deterministic outputs for a fixed seed)."""

    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("seed", self.seed)
        check_at_least("seed", self.seed, 0)


def random_select(num_frames: int, num_tokens_per_frame: int, num_keep: int, seed: int) -> Tensor:
    """num_keep distinct tokens per frame from a torch.Generator seeded with `seed`.

    Drawn on the CPU so the same seed gives the same tokens on every device. Returns within-frame indices
    (F, num_keep) int64 on the CPU, ascending within each frame.
    """
    if not 0 <= num_keep <= num_tokens_per_frame:
        raise ValueError(f"num_keep={num_keep} is out of range: allowed 0..{num_tokens_per_frame} (tokens per frame)")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(num_frames, num_tokens_per_frame, generator=generator)
    return torch.topk(scores, k=num_keep, dim=-1).indices.sort(dim=-1).values


@register
class RandomSelection(Method):
    name = "random"
    label = "Random"
    order = 6
    Options = SeedOptions

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        num_frames, num_tokens, _ = features.shape
        budget = self.frame_budget(num_tokens, retention_ratio, grid_hw, settings, flashvid_config)
        frame_indices = random_select(num_frames, num_tokens, budget.tokens_per_frame, settings.seed)
        frame_indices = frame_indices.to(features.device)
        return per_frame_compression(gather_tokens(features, frame_indices), frame_indices, num_tokens, budget)
