"""DivPrune per frame: pure Max-Min diversity on 1 − cosine (FlashVID's `div` selector, no re-picks).

Budget: b = floor(N·R) (>= 1) per frame, for every LLM layer.
"""

from __future__ import annotations

from torch import Tensor

from flashvid_core.selection import gather_tokens, select_tokens
from lmms_eval_models.methods.base import Method, per_frame_compression
from lmms_eval_models.methods.registry import register


def divprune_select(features: Tensor, num_keep: int) -> Tensor:
    """features (F, N, D) -> within-frame indices (F, num_keep) int64, ascending within each frame."""
    return select_tokens(features, None, num_keep, "div")


@register
class DivPrune(Method):
    name = "divprune"
    label = "DivPrune"
    order = 3

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        budget = self.frame_budget(features.shape[1], retention_ratio, grid_hw, settings, flashvid_config)
        frame_indices = divprune_select(features, budget.tokens_per_frame)
        return per_frame_compression(gather_tokens(features, frame_indices), frame_indices, features.shape[1], budget)
