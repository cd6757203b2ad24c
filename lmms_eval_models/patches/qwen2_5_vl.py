"""FlashVID inside transformers' `Qwen2_5_VLForConditionalGeneration` (transformers 4.57 and 5.x).

Public API (also reached through `lmms_eval_models.patches.apply_flashvid` / `remove_flashvid`):

    apply(model, config, method=None, baseline_options=None, backend=None) -> model
        # config: flashvid_core.FlashVIDConfig (or a mapping of its fields); None: method "none"
    remove(model) -> model             # the instance is stock again

`method` (keyword; default "flashvid" with a config, "none" without): any method of the registry
`lmms_eval_models.methods` (`methods.registry.method_names()`), run through the
same plumbing at `config.retention_ratio`: the pre-LLM methods on the merged-token grid (grid_thw[1] / 2,
grid_thw[2] / 2) in raster order; FastV, FlashVID and PruneVID prune inside the LLM as `llm_pruning_plan` says
(FastV over all of the video's rows); "none" keeps every token. `baseline_options`: a mapping of `MethodSettings` fields
(typed or strings). An unknown method or option raises ValueError at apply time, before the model is touched.

Only this instance changes (spec section 7): its class becomes a `FlashVID` subclass whose forward compresses the
video tokens of a prefill (`prefill.py`, with the Qwen family of `_qwen_common.py`); the statistic's pre-hook sits
on the last vision block's attention, the inner-LLM pruner's hooks on the language model's layers from K-1 on
(`llm_pruning.py`, when `pruning_layer` < number of LLM layers).

Attention statistic: the last vision block (a full-attention block in the released models: attention within each
temporal patch group), attention received per patch averaged over heads and queries, averaged over each 2x2 merge
unit in the encoder's window order, then put back into raster order: (F = temporal groups, N = h*w/4).

After a call with a video, `model.flashvid_stats` holds a `FlashVIDStats` (the config is never written). One video
per call (batch size 1, as the official code): a batch with video, or several videos in one prompt, is refused with
a ValueError before any model work, also inside `generate`. Calls without video (text, images) run the stock model;
decoding continues the original (uncompressed) positions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from flashvid_core.backend import Backend
from lmms_eval_models.patches import prefill
from lmms_eval_models.patches._qwen_common import QwenFamily

try:  # transformers 5.x: a function; 4.57 has it as a method of the vision model (`_window_index`)
    from transformers.vision_utils import get_vision_window_index
except ImportError:
    get_vision_window_index = None

SUPPORTED_CLASS = "Qwen2_5_VLForConditionalGeneration"

__all__ = ["SUPPORTED_CLASS", "Qwen2_5_VL", "apply", "attention_to_raster", "remove"]


def apply(model: nn.Module, config: Any, *, method: str | None = None,
          baseline_options: Mapping[str, Any] | None = None, backend: Backend | None = None) -> nn.Module:
    """Patch this Qwen2.5-VL instance to compress videos with `method` at `config`'s retention ratio; returns it."""
    return prefill.apply(model, Qwen2_5_VL(), config, method, baseline_options, backend)


remove = functools.partial(prefill.remove, supported_class=SUPPORTED_CLASS)  # undo `apply` on this instance


def _window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision encoder's merge-unit order (window attention layout) for `grid_thw`."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)[0]
    return get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )[0]


def attention_to_raster(inner: nn.Module, per_patch: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """(S,) per patch in window order -> (S / 4,) per merged token in raster order."""
    visual = inner.visual
    merge_unit = visual.spatial_merge_size**2
    per_token = per_patch.view(-1, merge_unit).mean(dim=-1)
    window_index = _window_index(visual, grid_thw).to(per_token.device)
    return per_token[torch.argsort(window_index)]


@dataclass(frozen=True)
class Qwen2_5_VL(QwenFamily):
    """Qwen2.5-VL: window-ordered vision blocks, no deepstack, no family option."""

    supported_class: ClassVar[str] = SUPPORTED_CLASS
    has_deepstack: ClassVar[bool] = False

    def attention_to_raster(self, inner: nn.Module, per_patch: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return attention_to_raster(inner, per_patch, grid_thw)
