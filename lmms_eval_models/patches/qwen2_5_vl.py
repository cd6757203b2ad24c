"""FlashVID inside transformers' `Qwen2_5_VLForConditionalGeneration` (transformers 4.57 and 5.x).

Public API (also reached through `lmms_eval_models.patches.apply_flashvid` / `remove_flashvid`):

    apply(model, config, method="flashvid", baseline_options=None) -> model
        # config: flashvid_core.FlashVIDConfig (or a mapping of its fields; None only with method="none")
    remove(model) -> model             # the instance is stock again

`method` (keyword): any method of the registry `lmms_eval_models.methods` (flashvid, fastv, visionzip, divprune, fastvid,
uniform, random, none), run through the same plumbing at `config.retention_ratio`: the pre-LLM methods on the
merged-token grid (grid_thw[1] / 2, grid_thw[2] / 2) in raster order; FastV and FlashVID prune inside the LLM as
`llm_pruning_plan` says (FastV over all of the video's rows); "none" keeps every token. `baseline_options`: a
mapping of `MethodSettings` fields (typed or strings). An unknown method or option raises ValueError at apply
time, before the model is touched.

Only this instance changes: its inner `Qwen2_5_VLModel` gets a subclass whose forward compresses the video tokens
of a prefill (spec section 7), hooks sit on the last vision block's attention (the statistic) and on the language
model's layers from K-1 on (inner-LLM pruning, `llm_pruning.py`, when `pruning_layer` < number of LLM layers).
The plumbing shared with Qwen3-VL is in `_qwen_common.py`.

Attention statistic: the last vision block (a full-attention block in the released models: attention within each
temporal patch group), attention received per patch averaged over heads and queries, averaged over each 2x2 merge
unit in the encoder's window order, then put back into raster order: (F = temporal groups, N = h*w/4).

After a call with a video, `model.flashvid_stats` holds a `FlashVIDStats` (the config is never written). One video
per call (batch size 1, as the official code): a batch with video, or several videos in one prompt, is refused with
a ValueError before any model work, also inside 5.x `generate` (which encodes the videos before the forward).
Calls without video (text, images) run the stock model; decoding continues the original (uncompressed) positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flashvid_core.backend import Backend
from lmms_eval_models.patches import _qwen_common

SUPPORTED_CLASS = "Qwen2_5_VLForConditionalGeneration"

__all__ = ["SUPPORTED_CLASS", "apply", "remove"]


def _window_index(visual: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """The vision encoder's merge-unit order (window attention layout) for `grid_thw`: 4.57 has it as a method,
    5.x as a function of `transformers.vision_utils`."""
    if hasattr(visual, "get_window_index"):
        return visual.get_window_index(grid_thw)[0]
    from transformers.vision_utils import get_vision_window_index

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


FAMILY = _qwen_common.QwenFamily(
    supported_class=SUPPORTED_CLASS,
    output_class_name="Qwen2_5_VLModelOutputWithPast",
    attention_to_raster=attention_to_raster,
    has_deepstack=False,
)


def apply(
    model: Any, config: Any, *, method: str = "flashvid", baseline_options: Mapping[str, Any] | None = None,
    backend: Backend | None = None,
) -> Any:
    """Patch this Qwen2.5-VL instance to compress videos with `method` at `config`'s retention ratio; returns it."""
    return _qwen_common.apply(model, config, FAMILY, {}, method, baseline_options, backend)


def remove(model: Any) -> Any:
    """Undo `apply` on this instance."""
    return _qwen_common.remove(model)
