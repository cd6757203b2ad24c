"""Uniform spatial pooling of each frame's token grid to the largest grid within the budget.

Budget: the largest pooled grid with h'·w' <= floor(N·R) near the frame's aspect (`uniform_pool_grid`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmms_eval_models.methods.base import (
    FrameBudget,
    Method,
    check_grid,
    check_positive_int,
    frame_budget,
    per_frame_compression,
)
from lmms_eval_models.methods.registry import register


def uniform_pool_grid(grid_hw: tuple[int, int], budget: int) -> tuple[int, int]:
    """The pooled grid (h', w') for uniform pooling: h'·w' <= budget, as large as possible near the frame's shape.

    h' starts at round(h · sqrt(budget / (h·w))); with w' = min(w, budget // h'), the candidates h' − 1, h',
    h' + 1 are compared by h'·w' (larger first), then by how far h'/w' is from h/w, then smaller h'. 14×14 at
    budget 49 gives 7×7; at 39, 6×6 (36 tokens); at 29, 4×7 (28).
    """
    height, width = grid_hw
    check_positive_int("grid height", height)
    check_positive_int("grid width", width)
    check_positive_int("budget", budget)
    budget = min(budget, height * width)
    start = min(height, max(1, round(height * math.sqrt(budget / (height * width)))))
    candidates = []
    for pooled_height in (start - 1, start, start + 1):
        if not 1 <= pooled_height <= height:
            continue
        pooled_width = min(width, budget // pooled_height)
        if pooled_width < 1:
            continue
        distortion = abs(math.log((pooled_height / pooled_width) / (height / width)))
        candidates.append((-pooled_height * pooled_width, distortion, pooled_height, pooled_width))
    _, _, pooled_height, pooled_width = min(candidates)
    return pooled_height, pooled_width


@torch.no_grad()
def uniform_pool(features: Tensor, grid_hw: tuple[int, int], pooled_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Adaptive average pooling of each frame's (h, w) token grid to pooled_hw.

    features: (F, h·w, D) in raster order. Output window (i, j) covers rows floor(i·h/h')..ceil((i+1)·h/h') − 1
    (columns likewise) and is the mean of its tokens, in the features' dtype; its index is the window's centre
    token (rows and columns (start + end − 1) // 2), strictly increasing in raster order.
    Returns tokens (F, h'·w', D) and within-frame indices (h'·w',) int64.
    """
    num_frames, num_tokens, dim = features.shape
    height, width = check_grid(grid_hw, num_tokens)
    pooled_height, pooled_width = pooled_hw
    if not (1 <= pooled_height <= height and 1 <= pooled_width <= width):
        raise ValueError(f"pooled_hw={tuple(pooled_hw)!r} is out of range: allowed 1..{height} × 1..{width}")
    grid = features.reshape(num_frames, height, width, dim).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, (pooled_height, pooled_width))
    tokens = pooled.permute(0, 2, 3, 1).reshape(num_frames, pooled_height * pooled_width, dim)
    rows = _window_centres(height, pooled_height, features.device)
    columns = _window_centres(width, pooled_width, features.device)
    indices = (rows.unsqueeze(-1) * width + columns.unsqueeze(0)).reshape(-1)
    return tokens, indices


def _window_centres(size: int, pooled_size: int, device: torch.device) -> Tensor:
    """Centre position of each adaptive-pooling window along one axis: (pooled_size,) int64."""
    positions = torch.arange(pooled_size, device=device)
    starts = (positions * size) // pooled_size
    ends = ((positions + 1) * size + pooled_size - 1) // pooled_size
    return (starts + ends - 1) // 2


@register
class Uniform(Method):
    name = "uniform"
    label = "Uniform"
    order = 5

    def frame_budget(self, num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config) -> FrameBudget:
        pooled = uniform_pool_grid(check_grid(grid_hw, num_tokens_per_frame),
                                   frame_budget(num_tokens_per_frame, retention_ratio))
        size = pooled[0] * pooled[1]
        return FrameBudget(size, size, 0, pooled_grid=pooled)

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        num_frames, num_tokens, _ = features.shape
        budget = self.frame_budget(num_tokens, retention_ratio, grid_hw, settings, flashvid_config)
        tokens, pooled_indices = uniform_pool(features, check_grid(grid_hw, num_tokens), budget.pooled_grid)
        return per_frame_compression(tokens, pooled_indices.unsqueeze(0).expand(num_frames, -1), num_tokens, budget)
