"""FlashVID (the paper's method): `flashvid_core.compress` before the LLM, attention-guided pruning inside it.

Budget: ceil(N·R·f_e) tokens per frame enter the LLM (`FlashVIDConfig.budgets`); from layer K keep
llm_retention_ratio (R·L = M·K + r·M·(L − K), paper Eq. 13–15). Nominal: FlashVID's ceilings can add a few.
"""

from __future__ import annotations

from flashvid_core.config import FlashVIDConfig
from flashvid_core.pipeline import compress
from lmms_eval_models.methods.base import FrameBudget, LLMPruning, Method
from lmms_eval_models.methods.registry import register


@register
class FlashVID(Method):
    name = "flashvid"
    label = "FlashVID"
    order = 0
    needs_statistic = True

    def frame_budget(self, num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config) -> FrameBudget:
        config = (flashvid_config or FlashVIDConfig()).replace(retention_ratio=retention_ratio)
        return FrameBudget(*config.budgets(num_tokens_per_frame))

    def llm_pruning(self, retention_ratio, num_llm_layers, settings, flashvid_config) -> LLMPruning | None:
        """(config.pruning_layer, config.llm_retention_ratio); None when the pruning layer is beyond the LLM (the
        LLM then runs unpruned, as the official code does)."""
        config = flashvid_config or FlashVIDConfig()
        if config.pruning_layer >= num_llm_layers:
            return None
        return LLMPruning(config.pruning_layer, config.llm_retention_ratio)

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        config = (flashvid_config or FlashVIDConfig()).replace(retention_ratio=retention_ratio)
        return compress(features, attention, config, generator=generator)
