"""FlashVID inside transformers' `Qwen3VLForConditionalGeneration` (transformers 4.57 and 5.x).

Public API (also reached through `lmms_eval_models.patches.apply_flashvid` / `remove_flashvid`):

    apply(model, config, drop_vision_delimiters=False, method=None, baseline_options=None, backend=None) -> model
    remove(model) -> model

As Qwen2.5-VL (`qwen2_5_vl.py`; the Qwen family in `_qwen_common.py`), with Qwen3-VL's differences:

- No window reordering in the vision encoder: the statistic of the last vision block is averaged over each run
  of 4 consecutive patches (one 2x2 merge unit) and is already in raster order.
- A video is laid out frame group by frame group (`<t> <|vision_start|> tokens <|vision_end|>` ...), so the
  compressed token of global index g goes to the g-th video placeholder of its video, and the inner-LLM pruning
  treats the (non-contiguous) compressed video rows as the visual set.
- The deepstack features of the video are gathered at the kept global indices (a merged token takes its centre's
  row) and passed with the matching `visual_pos_masks`. If the pruning layer K comes before the last deepstack
  layer, the deepstack additions after K are gathered at the kept positions too (the language model's class is
  swapped, for this instance, to a `FlashVID` subclass that does so).

`method` and `baseline_options` (keywords) choose FlashVID or a baseline exactly as for Qwen2.5-VL (see
`qwen2_5_vl.py`); FastV's visual set is every (non-contiguous) video row.

`drop_vision_delimiters=True` (off by default) also drops the `<|vision_start|>`/`<|vision_end|>` tokens around
the video frames, as the official Qwen3-VL code does; off, the identity setting reproduces the stock logits.
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
from lmms_eval_models.patches.common import PATCH_ATTR
from lmms_eval_models.patches.prefill import flashvid_subclass

SUPPORTED_CLASS = "Qwen3VLForConditionalGeneration"

__all__ = ["SUPPORTED_CLASS", "Qwen3_VL", "apply", "attention_to_raster", "remove"]


def apply(model: nn.Module, config: Any, drop_vision_delimiters: bool = False, *, method: str | None = None,
          baseline_options: Mapping[str, Any] | None = None, backend: Backend | None = None) -> nn.Module:
    """Patch this Qwen3-VL instance to compress videos with `method` at `config`'s retention ratio; returns it."""
    return prefill.apply(model, Qwen3_VL(drop_vision_delimiters), config, method, baseline_options, backend)


remove = functools.partial(prefill.remove, supported_class=SUPPORTED_CLASS)  # undo `apply` on this instance


def attention_to_raster(inner: nn.Module, per_patch: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """(S,) per patch (merge units contiguous, raster order) -> (S / 4,) per merged token."""
    merge_unit = inner.visual.spatial_merge_size**2
    return per_patch.view(-1, merge_unit).mean(dim=-1)


@dataclass(frozen=True)
class Qwen3_VL(QwenFamily):
    """Qwen3-VL: raster-ordered vision blocks, deepstack; `drop_vision_delimiters` is the family option."""

    drop_vision_delimiters: bool = False

    supported_class: ClassVar[str] = SUPPORTED_CLASS
    has_deepstack: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.drop_vision_delimiters, bool):
            raise ValueError(
                f"drop_vision_delimiters={self.drop_vision_delimiters!r} is invalid: expected True or False"
            )

    def attention_to_raster(self, inner: nn.Module, per_patch: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return attention_to_raster(inner, per_patch, grid_thw)

    def dropped_rows(self, input_ids: torch.Tensor, config: Any) -> torch.Tensor:
        dropped = super().dropped_rows(input_ids, config)
        return dropped | _video_delimiters(input_ids, config) if self.drop_vision_delimiters else dropped

    def module_patches(self, model: nn.Module) -> tuple[tuple[nn.Module, Any], ...]:
        return ((model.model.language_model, _deepstack_class),)


def _video_delimiters(ids: torch.Tensor, config: Any) -> torch.Tensor:
    """<|vision_start|> / <|vision_end|> tokens that bracket video placeholders (the official Qwen3-VL code drops
    them with the video placeholders)."""
    is_video = ids == config.video_token_id
    next_is_video = torch.zeros_like(is_video)
    next_is_video[:-1] = is_video[1:]
    previous_is_video = torch.zeros_like(is_video)
    previous_is_video[1:] = is_video[:-1]
    return ((ids == config.vision_start_token_id) & next_is_video) | ((ids == config.vision_end_token_id) & previous_is_video)


@functools.cache
def _deepstack_class(original: type) -> type:
    """`FlashVID<Qwen3VLTextModel>`: deepstack additions after a layer >= K follow the pruned positions."""
    stock_process = original._deepstack_process

    def _deepstack_process(
        self: nn.Module, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor
    ) -> torch.Tensor:
        """The hidden states hold only the kept positions: keep the mask entries and feature rows of those."""
        pruner = self.__dict__[PATCH_ATTR].pruner
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
        return stock_process(self, hidden_states, visual_pos_masks, visual_embeds)

    return flashvid_subclass(original, {"_deepstack_process": _deepstack_process})
