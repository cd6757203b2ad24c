"""VisionZip per frame, after the model's pooling: dominant tokens by attention, contextual tokens by merging.

Budget: b = floor(N·R) (>= 1) per frame, split dominant:contextual as VisionZip's 54:10 (`visionzip_split`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flashvid_core.selection import gather_tokens
from lmms_eval_models.methods.base import (
    FrameBudget,
    Method,
    check_at_least,
    check_choice,
    check_integer_fields,
    frame_budget,
    per_frame_compression,
)
from lmms_eval_models.methods.registry import register

VISIONZIP_MERGES: tuple[str, ...] = ("official", "mean")


@dataclass(frozen=True)
class VisionZipOptions:
    """visionzip_dominant, visionzip_contextual: VisionZip's dominant:contextual split of a frame's budget, 54:10
        at its reference budget of 64 tokens, scaled to other budgets by `visionzip_split`.
    visionzip_merge: "official" (released VisionZip: a contextual token = its target + the mean of the tokens
        assigned to it) or "mean" (the target and its assigned tokens averaged together, as in the FlashVID
        authors' refactored copy of VisionZip).
    """

    visionzip_dominant: int = 54
    visionzip_contextual: int = 10
    visionzip_merge: str = "official"

    def __post_init__(self) -> None:
        check_integer_fields(self, ("visionzip_dominant", "visionzip_contextual"), 0)
        if self.visionzip_dominant + self.visionzip_contextual == 0:
            raise ValueError("visionzip_dominant + visionzip_contextual is 0: allowed a sum >= 1")
        check_choice("visionzip_merge", self.visionzip_merge, VISIONZIP_MERGES)


def visionzip_split(budget: int, dominant_share: int = 54, contextual_share: int = 10) -> tuple[int, int]:
    """(num_dominant, num_contextual) for a frame budget, keeping VisionZip's dominant:contextual ratio.

    num_contextual = round-half-up(budget · c / (d + c)), num_dominant = budget − num_contextual, so 64 gives
    54:10, 128 gives 108:20, 192 gives 162:30 (VisionZip's own settings), 49 gives 41:8.
    """
    check_at_least("budget", budget, 0)
    num_contextual = math.floor(budget * contextual_share / (dominant_share + contextual_share) + 0.5)
    return budget - num_contextual, num_contextual


@torch.no_grad()
def visionzip_select(
    features: Tensor, attention: Tensor, num_dominant: int, num_contextual: int, merge: str = "official"
) -> tuple[Tensor, Tensor]:
    """VisionZip per frame: features (F, N, D); attention (F, N).

    Dominant: the num_dominant tokens of largest attention (no [CLS] after pooling, so none is forced in).
    Contextual: of the N − d remaining tokens (in index order), targets are every step-th one,
    step = max(1, (N − d) // c), the first c of them; every other remaining token joins the target of largest
    cosine similarity (ties: the first target). merge="official": target + mean of its members (the released
    VisionZip; a target with no member stays itself); "mean": (target + members) / (1 + count).
    A contextual token keeps its target's index. Similarities and sums run in the features' dtype, as VisionZip.
    Returns tokens (F, d + c, D) and within-frame indices (F, d + c), ascending within each frame.
    """
    check_choice("visionzip_merge", merge, VISIONZIP_MERGES)
    num_frames, num_tokens, _ = features.shape
    if num_dominant < 0 or num_contextual < 0 or num_dominant + num_contextual > num_tokens:
        raise ValueError(
            f"num_dominant={num_dominant}, num_contextual={num_contextual} are out of range: both >= 0 with a sum "
            f"<= {num_tokens} (tokens per frame)"
        )
    dominant = torch.topk(attention, k=num_dominant, dim=-1).indices  # (F, d)
    is_dominant = torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=features.device)
    is_dominant.scatter_(1, dominant, True)
    # A stable sort on the flag lists the remaining tokens first, in index order (VisionZip's masked_select).
    remaining = torch.argsort(is_dominant.to(torch.int8), dim=-1, stable=True)[:, : num_tokens - num_dominant]
    dominant_tokens = gather_tokens(features, dominant)
    if num_contextual == 0:
        tokens, indices = dominant_tokens, dominant
    else:
        num_remaining = remaining.shape[1]
        step = max(1, num_remaining // num_contextual)
        is_target = torch.zeros(num_remaining, dtype=torch.bool, device=features.device)
        is_target[torch.arange(0, num_remaining, step, device=features.device)[:num_contextual]] = True
        targets = remaining[:, is_target]  # (F, c)
        members = remaining[:, ~is_target]  # (F, R − c)
        target_tokens = gather_tokens(features, targets)
        member_tokens = gather_tokens(features, members)
        similarity = torch.bmm(F.normalize(member_tokens, dim=-1), F.normalize(target_tokens, dim=-1).transpose(1, 2))
        assignment = F.one_hot(similarity.argmax(dim=-1), num_contextual).to(features.dtype)  # (F, R − c, c)
        counts = assignment.sum(dim=1).unsqueeze(-1)  # (F, c, 1)
        member_sums = torch.bmm(assignment.transpose(1, 2), member_tokens)
        if merge == "official":
            contextual_tokens = target_tokens + member_sums / counts.clamp(min=1)
        else:
            contextual_tokens = (target_tokens + member_sums) / (counts + 1)
        tokens = torch.cat([dominant_tokens, contextual_tokens], dim=1)
        indices = torch.cat([dominant, targets], dim=1)
    order = torch.argsort(indices, dim=-1)
    return gather_tokens(tokens, order), torch.gather(indices, 1, order)


@register
class VisionZip(Method):
    name = "visionzip"
    label = "VisionZip"
    order = 2
    needs_statistic = True
    Options = VisionZipOptions

    def frame_budget(self, num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config) -> FrameBudget:
        budget = frame_budget(num_tokens_per_frame, retention_ratio)
        return FrameBudget(budget, *visionzip_split(budget, settings.visionzip_dominant,
                                                    settings.visionzip_contextual))

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        budget = self.frame_budget(features.shape[1], retention_ratio, grid_hw, settings, flashvid_config)
        tokens, frame_indices = visionzip_select(features, attention, budget.num_selected, budget.num_merged,
                                                 settings.visionzip_merge)
        return per_frame_compression(tokens, frame_indices, features.shape[1], budget)
