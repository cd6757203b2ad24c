"""FastV: every visual token enters the LLM; from layer K only the top-attention share r of them is kept.

Budget: R·L = K + r·(L − K) (`fastv_llm_retention_ratio`, rule "per_layer"), or r = R (rule "paper": the pruning
ratio 1 − R that App. C.1 prints).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from flashvid_core.llm_pruning import llm_keep_positions
from lmms_eval_models.methods.base import (
    FrameBudget,
    LLMPruning,
    Method,
    check_at_least,
    check_choice,
    check_integer,
    check_positive_int,
    check_retention_ratio,
)
from lmms_eval_models.methods.registry import register
from lmms_eval_models.methods.vanilla import keep_all

FASTV_RATIO_RULES: tuple[str, ...] = ("per_layer", "paper")


@dataclass(frozen=True)
class FastVOptions:
    """fastv_layer: K, the LLM layer from which FastV keeps only the top-attention visual tokens (paper: 2).
    fastv_ratio_rule: "per_layer" (default, issue 8): the kept ratio r after layer K solves R·L = K + r·(L − K),
        so the per-layer average is R. "paper": r = R, i.e. the pruning ratio 1 − R that App. C.1 prints
        (75/80/85/90% for R = 25/20/15/10%); its per-layer average is above R.
    """

    fastv_layer: int = 2
    fastv_ratio_rule: str = "per_layer"

    def __post_init__(self) -> None:
        check_integer("fastv_layer", self.fastv_layer)
        check_at_least("fastv_layer", self.fastv_layer, 1)
        check_choice("fastv_ratio_rule", self.fastv_ratio_rule, FASTV_RATIO_RULES)


def fastv_llm_retention_ratio(
    retention_ratio: float, num_llm_layers: int = 28, fastv_layer: int = 2, rule: str = "per_layer"
) -> float:
    """The share r of visual tokens FastV keeps from layer K on.

    per_layer: R·L = K + r·(L − K), i.e. r = (R·L − K) / (L − K); it needs R > K / L (FastV already spends K
    full layers). paper: r = R (App. C.1 prints FastV's pruning ratio as 1 − R).
    """
    check_retention_ratio(retention_ratio)
    check_positive_int("num_llm_layers", num_llm_layers)
    check_positive_int("fastv_layer", fastv_layer)
    check_choice("fastv_ratio_rule", rule, FASTV_RATIO_RULES)
    if fastv_layer >= num_llm_layers:
        raise ValueError(
            f"fastv_layer={fastv_layer} is out of range: allowed 1..{num_llm_layers - 1} (the LLM has "
            f"{num_llm_layers} layers)"
        )
    if rule == "paper":
        return float(retention_ratio)
    ratio = (retention_ratio * num_llm_layers - fastv_layer) / (num_llm_layers - fastv_layer)
    if ratio <= 0.0:
        raise ValueError(
            f"retention_ratio={retention_ratio!r} is out of range for FastV with fastv_layer={fastv_layer} and "
            f"{num_llm_layers} LLM layers: all visual tokens pass the first {fastv_layer} layers, so the per-layer "
            f"average is above R unless R > {fastv_layer}/{num_llm_layers} = {fastv_layer / num_llm_layers:.4g}"
        )
    return ratio


def fastv_keep_positions(
    last_query_attention: Tensor, visual_start: int, visual_length: int, llm_retention_ratio: float
) -> Tensor:
    """FastV's in-LLM pruning: the sequence positions kept from layer K on.

    last_query_attention: (L,) the last query token's attention over all keys at layer K − 1, averaged over heads.
    Keeps every text position and the ceil(visual_length · r) visual positions of largest attention, in order
    (the same rule as FlashVID's inner pruning, so it reuses `llm_keep_positions`). Returns (L',) int64 ascending.
    """
    return llm_keep_positions(last_query_attention, visual_start, visual_length, llm_retention_ratio)


@register
class FastV(Method):
    name = "fastv"
    label = "FastV"
    order = 1
    depth_sensitive = True  # K and r must fit the checkpoint's LLM depth
    Options = FastVOptions

    def frame_budget(self, num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config) -> FrameBudget:
        return FrameBudget(num_tokens_per_frame, num_tokens_per_frame, 0)  # all enter; the LLM prunes

    def llm_pruning(self, retention_ratio, num_llm_layers, settings, flashvid_config) -> LLMPruning:
        ratio = fastv_llm_retention_ratio(retention_ratio, num_llm_layers, settings.fastv_layer,
                                          settings.fastv_ratio_rule)
        return LLMPruning(settings.fastv_layer, ratio)

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        return keep_all(features)
