"""Inner-LLM pruning (FastV-style): which sequence positions survive at the pruning layer K."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def last_query_attention_from_probabilities(attentions: Tensor) -> Tensor:
    """The last query's attention over the keys, averaged over heads.

    attentions: softmax attention probabilities (B, H, L, L) or (H, L, L). Returns (B, L) or (L,) float32.
    """
    if attentions.dim() not in (3, 4):
        raise ValueError(f"attentions must have shape (B, H, L, L) or (H, L, L), got {tuple(attentions.shape)}")
    return attentions[..., -1, :].float().mean(dim=-2)


def llm_keep_positions(
    last_query_attention: Tensor,
    visual_start: int,
    visual_length: int,
    llm_retention_ratio: float,
) -> Tensor:
    """Positions kept at the pruning layer: every text position plus the top visual ones, ascending.

    last_query_attention: (L,) attention of the last query over the sequence (averaged over heads).
    The visual tokens occupy [visual_start, visual_start + visual_length); the ceil(visual_length * ratio) with
    the largest attention are kept (torch.topk, as the official code). Returns (L',) int64.
    """
    if not isinstance(last_query_attention, Tensor) or last_query_attention.dim() != 1:
        shape = tuple(last_query_attention.shape) if isinstance(last_query_attention, Tensor) else None
        raise ValueError(f"last_query_attention must be a 1-D tensor (L,), got shape {shape}")
    length = last_query_attention.shape[0]
    for name, value in (("visual_start", visual_start), ("visual_length", visual_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 0")
    if visual_start + visual_length > length:
        raise ValueError(
            f"visual span [{visual_start}, {visual_start + visual_length}) exceeds the sequence length {length}"
        )
    if isinstance(llm_retention_ratio, bool) or not isinstance(llm_retention_ratio, (int, float)) or not (
        0.0 < llm_retention_ratio <= 1.0
    ):
        raise ValueError(f"llm_retention_ratio={llm_retention_ratio!r} is out of range: allowed (0, 1]")
    if not bool(torch.isfinite(last_query_attention[visual_start : visual_start + visual_length]).all()):
        raise ValueError("last_query_attention contains NaN or inf over the visual span")
    device = last_query_attention.device
    num_keep = math.ceil(visual_length * llm_retention_ratio)
    visual = last_query_attention[visual_start : visual_start + visual_length]
    top = torch.topk(visual, k=num_keep).indices + visual_start
    positions = torch.arange(length, device=device)
    is_text = (positions < visual_start) | (positions >= visual_start + visual_length)
    return torch.cat([positions[is_text], top]).sort().values
