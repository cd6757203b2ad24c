"""FlashVID inside transformers' `Qwen3VLForConditionalGeneration` (transformers 4.57 and 5.x).

Public API (also reached through `lmms_eval_models.patches.apply_flashvid` / `remove_flashvid`):

    apply(model, config, drop_vision_delimiters=False, method="flashvid", baseline_options=None) -> model
    remove(model) -> model

As Qwen2.5-VL (`qwen2_5_vl.py`, plumbing in `_qwen_common.py`), with Qwen3-VL's differences:

- No window reordering in the vision encoder: the statistic of the last vision block is averaged over each run
  of 4 consecutive patches (one 2x2 merge unit) and is already in raster order.
- A video is laid out frame group by frame group (`<t> <|vision_start|> tokens <|vision_end|>` ...), so the
  compressed token of global index g goes to the g-th video placeholder of its video, and the inner-LLM pruning
  treats the (non-contiguous) compressed video rows as the visual set.
- The deepstack features of the video are gathered at the kept global indices (a merged token takes its centre's
  row) and passed with the matching `visual_pos_masks`. If the pruning layer K comes before the last deepstack
  layer, the deepstack additions after K are gathered at the kept positions too.

`method` and `baseline_options` (keywords) choose FlashVID or a baseline exactly as for Qwen2.5-VL (see
`qwen2_5_vl.py`); FastV's visual set is every (non-contiguous) video row.

`drop_vision_delimiters=True` (off by default) also drops the `<|vision_start|>`/`<|vision_end|>` tokens around
the video frames, as the official Qwen3-VL code does; off, the identity setting reproduces the stock logits.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from flashvid_core.backend import Backend
from lmms_eval_models.patches import _qwen_common
from lmms_eval_models.patches.common import PATCH_ATTR

SUPPORTED_CLASS = "Qwen3VLForConditionalGeneration"

__all__ = ["SUPPORTED_CLASS", "apply", "remove"]


def attention_to_raster(inner: nn.Module, per_patch: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """(S,) per patch (merge units contiguous, raster order) -> (S / 4,) per merged token."""
    merge_unit = inner.visual.spatial_merge_size**2
    return per_patch.view(-1, merge_unit).mean(dim=-1)


FAMILY = _qwen_common.QwenFamily(
    supported_class=SUPPORTED_CLASS,
    output_class_name="Qwen3VLModelOutputWithPast",
    attention_to_raster=attention_to_raster,
    has_deepstack=True,
)


def _pruned_deepstack_process(
    self: nn.Module, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor
) -> torch.Tensor:
    """Deepstack addition after a layer >= K: the hidden states hold only the kept positions, so keep the mask
    entries and the feature rows of those positions."""
    state = self._flashvid_deepstack_state
    pruner = state.pruner
    active = pruner.active if pruner is not None else None
    if (
        active is not None
        and active.keep_positions is not None
        and visual_pos_masks.shape[-1] != hidden_states.shape[1]
    ):
        keep = active.keep_positions.to(visual_pos_masks.device)
        visual_rank = torch.cumsum(visual_pos_masks[0].long(), 0) - 1
        kept_mask = visual_pos_masks[:, keep]
        rows = visual_rank[keep][kept_mask[0]]
        visual_embeds = visual_embeds.index_select(0, rows.to(visual_embeds.device))
        visual_pos_masks = kept_mask
    return type(self)._deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds)


def apply(
    model: Any,
    config: Any,
    drop_vision_delimiters: bool = False,
    *,
    method: str = "flashvid",
    baseline_options: Mapping[str, Any] | None = None,
    backend: Backend | None = None,
) -> Any:
    """Patch this Qwen3-VL instance to compress videos with `method` at `config`'s retention ratio; returns it."""
    if not isinstance(drop_vision_delimiters, bool):
        raise ValueError(f"drop_vision_delimiters={drop_vision_delimiters!r} is invalid: expected True or False")
    options = {"drop_vision_delimiters": drop_vision_delimiters}
    _qwen_common.apply(model, config, FAMILY, options, method, baseline_options, backend)
    language_model = model.model.language_model
    # instance attribute: only this model's text model routes deepstack additions through the gather
    language_model._flashvid_deepstack_state = getattr(model, PATCH_ATTR)
    language_model._deepstack_process = types.MethodType(_pruned_deepstack_process, language_model)
    return model


def remove(model: Any) -> Any:
    """Undo `apply` on this instance."""
    language_model = model.model.language_model
    for name in ("_deepstack_process", "_flashvid_deepstack_state"):
        if name in language_model.__dict__:
            delattr(language_model, name)
    return _qwen_common.remove(model)
