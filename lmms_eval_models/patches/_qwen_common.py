"""The Qwen-VL family shared by the Qwen2.5-VL and Qwen3-VL patches (`qwen2_5_vl.py` / `qwen3_vl.py`: the API).

`QwenFamily` supplies to the prefill base (`prefill.py`, which does the rest for every family):

- encode: the stock `get_video_features` (vision tower, merger) while the base's `StatisticCapture` arms a forward
  pre-hook on the *last* vision block's attention (only for the methods that read the statistic); the features
  (F, N, D) on the merged-token grid (h, w) = (grid_h, grid_w) / spatial_merge_size in raster order, the
  statistic (F, N) put back into raster order by the family's `attention_to_raster`, and (Qwen3-VL) the
  deepstack features of the video's tokens.
- splice: the compressed token of global index g goes to the g-th video placeholder (duplicated indices insert
  both rows there), the other video placeholders are dropped; images go the stock route (`get_image_features`,
  scattered at their placeholders). Every kept row keeps the 3-D M-RoPE position the stock model gives it
  (`get_rope_index`; `rope_deltas` set as the stock prefill sets them), contiguous text positions in front; for
  Qwen3-VL the deepstack rows of the kept tokens and the matching `visual_pos_masks` reach the language model.
- decoding continues the original positions: a continuing call without position ids gets the original ones plus
  the rope deltas.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from flashvid_core.pipeline import Compression
from lmms_eval_models.patches import prefill
from lmms_eval_models.patches.common import rotate_half, softmax_float32
from lmms_eval_models.patches.prefill import EncodedVideo, Family, Prompt, Spliced, StatisticCapture

__all__ = ["QwenFamily", "QwenVideoInputs", "vision_attention_received"]


@dataclass(frozen=True)
class QwenVideoInputs(prefill.VideoInputs):
    """pixel_values_videos (S, C) flattened patches; video_grid_thw (videos, 3) temporal, height, width patches."""

    video_grid_thw: torch.Tensor


@dataclass(frozen=True)
class _Images:
    """The prompt's images, spliced the stock way: how many image tokens, their deepstack rows per layer (or None)."""

    count: int = 0
    deepstack: list[list[torch.Tensor]] | None = None


@dataclass(frozen=True)
class _Rows:
    """The shortened sequence: which original position each row comes from, which rows hold video tokens, the
    embeddings, and each row's row in the joint image-then-video deepstack table (-1: not visual; Qwen3-VL)."""

    source_positions: torch.Tensor  # (L',)
    video_rows: torch.Tensor  # (L',) bool
    embeds: torch.Tensor  # (1, L', D)
    deepstack_source: torch.Tensor  # (L',)


class QwenFamily(Family):
    """What Qwen2.5-VL and Qwen3-VL share; each supplies `attention_to_raster` and whether it has deepstack."""

    has_deepstack: ClassVar[bool]
    keeps_original_positions: ClassVar[bool] = True
    consumed_arguments: ClassVar[frozenset[str]] = frozenset({"pixel_values", "pixel_values_videos", "mm_encoder_outputs"})

    @abc.abstractmethod
    def attention_to_raster(self, inner: nn.Module, per_patch: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(S,) statistic per patch in vision-block order -> (S / merge unit,) per merged token, raster order."""

    def dropped_rows(self, input_ids: torch.Tensor, config: Any) -> torch.Tensor:
        """(L,) bool: the prompt rows the compressed video replaces (its placeholders)."""
        return input_ids == config.video_token_id

    def video_inputs(self, model: nn.Module, arguments: Mapping[str, Any]) -> QwenVideoInputs:
        grid_thw = arguments.get("video_grid_thw")
        if grid_thw is None:
            raise ValueError("FlashVID needs video_grid_thw (each video's temporal, height and width patches) with "
                             "pixel_values_videos")  # fmt: skip
        return QwenVideoInputs(pixel_values_videos=arguments["pixel_values_videos"], num_videos=int(grid_thw.shape[0]),
                               video_grid_thw=grid_thw)  # fmt: skip

    def encode(self, model: nn.Module, inputs: QwenVideoInputs, capture: StatisticCapture | None) -> EncodedVideo:
        inner = model.model
        merge = inner.visual.spatial_merge_size
        frames, height, width = (int(size) for size in inputs.video_grid_thw[0].tolist())
        layout = prefill.VideoLayout((height // merge, width // merge))
        with prefill.capturing(capture, inner.visual.blocks[-1].attn, qwen_vision_received) as captured:
            output = inner.get_video_features(inputs.pixel_values_videos, inputs.video_grid_thw)
        embeds, deepstack = _features(output)
        features = embeds[0].view(frames, layout.tokens_per_frame, -1)
        side_features = () if deepstack is None else tuple(layer[0] for layer in deepstack)
        if capture is None:  # the hook stays idle: these methods never read the statistic
            return EncodedVideo(features, None, layout, side_features)
        statistic = self.attention_to_raster(inner, prefill.one_statistic(captured), inputs.video_grid_thw)
        return EncodedVideo(features, statistic.view(frames, -1), layout, side_features)

    def splice(self, model: nn.Module, prompt: Prompt, encoded: EncodedVideo, compression: Compression) -> Spliced:
        inner = model.model
        config = inner.config
        ids = prompt.input_ids[0]
        embeds, images = _with_images(inner, prompt)
        placeholders = torch.nonzero(ids == config.video_token_id).flatten()
        video_tokens = encoded.features.shape[0] * encoded.features.shape[1]
        if placeholders.numel() != video_tokens:
            raise ValueError(
                f"{placeholders.numel()} video placeholders in input_ids but the video features have {video_tokens} tokens"
            )
        rows = _assemble(ids, embeds, placeholders, compression, self.dropped_rows(ids, config), images,
                         config.image_token_id)  # fmt: skip
        extra = _deepstack_kwargs(rows, images, encoded.side_features) if self.has_deepstack else {}
        return Spliced(rows.embeds, rows.source_positions, torch.nonzero(rows.video_rows).flatten(),
                       _position_ids(inner, prompt, rows.source_positions), extra)  # fmt: skip

    def decode_position_ids(
        self, model: nn.Module, first_position: int, length: int, batch: int, device: torch.device
    ) -> torch.Tensor:
        """The original positions plus the rope deltas (the stock fallback would count from the shorter cache)."""
        positions = torch.arange(first_position, first_position + length, device=device).view(1, 1, -1)
        deltas = model.model.rope_deltas
        return (positions + (deltas.to(device) if deltas is not None else 0)).expand(3, batch, -1)


# ------------------------------------------------------------------------------------------- splice helpers


def _with_images(inner: nn.Module, prompt: Prompt) -> tuple[torch.Tensor, _Images]:
    """The prompt's embeddings with its images' features at their placeholders (exactly the stock route)."""
    embeds = prompt.embeddings
    image_output = (prompt.arguments.get("mm_encoder_outputs") or {}).get("image")
    if image_output is None and prompt.arguments.get("pixel_values") is not None:
        image_output = inner.get_image_features(prompt.arguments["pixel_values"], prompt.arguments["image_grid_thw"])
    if image_output is None:
        return embeds, _Images()
    image_embeds, image_deepstack = _features(image_output)
    image_embeds = torch.cat(image_embeds).to(embeds.device, embeds.dtype)
    image_mask = (prompt.input_ids[0] == inner.config.image_token_id).view(1, -1, 1).expand_as(embeds)
    return embeds.masked_scatter(image_mask, image_embeds), _Images(image_embeds.shape[0], image_deepstack)


def _assemble(
    ids: torch.Tensor,
    embeds: torch.Tensor,
    placeholders: torch.Tensor,
    compression: Compression,
    drop: torch.Tensor,
    images: _Images,
    image_token_id: int,
) -> _Rows:
    """Vectorised assembly: the kept prompt rows and the compressed rows (at the placeholder of their global index),
    ordered by original position (a stable sort keeps duplicated indices in compression order); and each row's row
    of the joint deepstack table: image rows first, then the video's."""
    keep_rows = torch.nonzero(~drop).flatten()
    indices = compression.indices.to(ids.device)
    all_positions = torch.cat((keep_rows, placeholders[indices]))
    order = torch.sort(all_positions, stable=True).indices
    is_video = torch.cat((torch.zeros_like(keep_rows, dtype=torch.bool), torch.ones_like(indices, dtype=torch.bool)))
    rows = torch.cat((embeds[0, keep_rows], compression.tokens.to(embeds.device, embeds.dtype)))
    text_source = torch.full_like(keep_rows, -1)
    if images.count:
        image_rank = torch.cumsum(ids == image_token_id, 0) - 1
        text_source = torch.where(ids[keep_rows] == image_token_id, image_rank[keep_rows], text_source)
    deepstack_source = torch.cat((text_source, indices + images.count))[order]
    return _Rows(all_positions[order], is_video[order], rows[order].unsqueeze(0), deepstack_source)


def _position_ids(inner: nn.Module, prompt: Prompt, source: torch.Tensor) -> torch.Tensor:
    """(4, 1, L'): contiguous text positions, then the stock model's 3-D positions of the kept rows (the call's
    own, or `get_rope_index`'s); sets the model's rope deltas for the decoding calls, as the stock prefill does."""
    given = prompt.arguments.get("position_ids")
    if given is not None:
        full_positions = given[-3:] if given.dim() == 3 else given.unsqueeze(0).expand(3, -1, -1)
        inner.rope_deltas = _rope_deltas(full_positions, prompt.arguments.get("attention_mask"))
    else:
        full_positions, inner.rope_deltas = _rope_index(inner, prompt.arguments)
    text_positions = torch.arange(source.numel(), device=source.device).view(1, 1, -1)
    return torch.cat([text_positions.to(full_positions), full_positions.index_select(-1, source)], 0)


def _deepstack_kwargs(rows: _Rows, images: _Images, video_deepstack: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Qwen3-VL: the visual-row mask of the shortened sequence and the deepstack features of those rows (a merged
    token takes its centre's features: the row of its global index)."""
    source = rows.deepstack_source
    visual = source >= 0
    tables = []
    for layer, video_table in enumerate(video_deepstack):
        image_part = [torch.cat(images.deepstack[layer])] if images.deepstack is not None and images.count else []
        table = torch.cat([*image_part, video_table])
        tables.append(table.index_select(0, source[visual].to(table.device)))
    return {"visual_pos_masks": visual.unsqueeze(0), "deepstack_visual_embeds": tables}


# ------------------------------------------------------------------------------------------- statistic source


def qwen_vision_received(attention: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The statistic source: `vision_attention_received` from a vision attention module's forward arguments."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return vision_attention_received(attention, hidden_states, kwargs["cu_seqlens"], kwargs["position_embeddings"])


def vision_attention_received(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    max_bytes: int = 1 << 28,
) -> torch.Tensor:
    """Attention each patch receives within its attention chunk, averaged over heads and queries.

    hidden_states: (S, C) the vision attention module's input; cu_seqlens: (G + 1,) chunk boundaries (one
    temporal patch group per chunk in the full-attention blocks). Returns (S,) in the activations' dtype.
    As the official code: q/k rotated in float32 and cast back, logits / sqrt(d), softmax in float32 cast back
    to the activations' dtype, mean over heads then over queries. Chunks of equal length are batched (at most
    `max_bytes` of probabilities at a time); a chunk over that budget on its own has its queries sliced instead.
    """
    length, _ = hidden_states.shape
    num_heads = attention.num_heads
    qkv = attention.qkv(hidden_states).reshape(length, 3, num_heads, -1)
    query, key = qkv[:, 0], qkv[:, 1]  # (S, H, d)
    cos, sin = (table.unsqueeze(-2).float() for table in position_embeddings)
    query = (query.float() * cos + rotate_half(query.float()) * sin).to(qkv.dtype)
    key = (key.float() * cos + rotate_half(key.float()) * sin).to(qkv.dtype)
    head_dim = query.shape[-1]
    chunk_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    received: list[torch.Tensor] = []
    start = 0
    for chunk_length, count in _runs(chunk_lengths):
        per_chunk = num_heads * chunk_length * chunk_length * 4
        if per_chunk > max_bytes:  # high-resolution frames: one chunk's full attention would exceed the budget
            for index in range(count):
                span = slice(start + index * chunk_length, start + (index + 1) * chunk_length)
                received.append(_received_in_query_slices(query[span], key[span], max_bytes))
            start += count * chunk_length
            continue
        batch = max(1, min(count, max_bytes // max(per_chunk, 1)))
        for first in range(0, count, batch):
            size = min(batch, count - first)
            begin = start + first * chunk_length
            span = slice(begin, begin + size * chunk_length)
            q = query[span].view(size, chunk_length, num_heads, head_dim).transpose(1, 2)
            k = key[span].view(size, chunk_length, num_heads, head_dim).transpose(1, 2)
            probs = softmax_float32(q @ k.transpose(-1, -2) / math.sqrt(head_dim))
            received.append(probs.to(q.dtype).mean(dim=1).mean(dim=1).flatten())
        start += count * chunk_length
    return torch.cat(received)


def _received_in_query_slices(query: torch.Tensor, key: torch.Tensor, max_bytes: int) -> torch.Tensor:
    """One attention chunk's statistic, its queries taken in slices of at most `max_bytes` of probabilities.

    query, key (L, H, d) rotated -> (L,) in their dtype. The same per-query values as the unsliced path (softmax
    in float32, cast back, mean over heads); the mean over queries is a float32 sum over slices divided by L.
    """
    length, num_heads, head_dim = query.shape
    queries, keys_t = query.transpose(0, 1), key.transpose(0, 1).transpose(-1, -2)  # (H, L, d), (H, d, L)
    rows = max(1, max_bytes // (num_heads * length * 4))
    total = torch.zeros(length, dtype=torch.float32, device=query.device)
    for first in range(0, length, rows):
        logits = queries[:, first : first + rows] @ keys_t / math.sqrt(head_dim)
        probs = softmax_float32(logits).to(query.dtype)
        total += probs.mean(dim=0).float().sum(dim=0)
    return (total / length).to(query.dtype)


def _runs(values: list[int]) -> Iterator[tuple[int, int]]:
    """(value, repeat count) for each run of equal consecutive values."""
    index = 0
    while index < len(values):
        end = index
        while end < len(values) and values[end] == values[index]:
            end += 1
        yield values[index], end - index
        index = end




def _features(output: Any) -> tuple[list[torch.Tensor], list[list[torch.Tensor]] | None]:
    """Per-item embeddings and per-layer per-item deepstack features, from any version's `get_*_features`."""
    if hasattr(output, "pooler_output"):  # 5.x: a ModelOutput
        embeds = list(output.pooler_output)
        deepstack = getattr(output, "deepstack_features", None)
        return embeds, _per_item_layers(deepstack, embeds) if deepstack is not None else None
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], list):  # 4.57 Qwen3-VL
        embeds = list(output[0])
        return embeds, _per_item_layers(output[1], embeds)
    return list(output), None  # 4.57 Qwen2.5-VL: a tuple of per-item tensors


def _per_item_layers(deepstack: list[Any], embeds: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Deepstack features per layer, per item: 4.57 and some 5.x releases (5.17) give each layer as one tensor
    over all items, later ones (5.23) already split; a tensor is split like the items' embeddings."""
    sizes = [item.shape[0] for item in embeds]
    return [list(torch.split(layer, sizes)) if torch.is_tensor(layer) else list(layer) for layer in deepstack]


def _rope_index(inner: nn.Module, call: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock model's 3-D positions (3, 1, L) and rope deltas for the original prompt, through `get_rope_index`
    (whose arguments differ between transformers versions)."""
    input_ids = call["input_ids"]
    parameters = inspect.signature(inner.get_rope_index).parameters
    kwargs = {
        name: call.get(name)
        for name in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
        if name in parameters
    }
    if "mm_token_type_ids" in parameters:
        token_types = call.get("mm_token_type_ids")
        if token_types is None:  # the processor returns it; rebuild it from the placeholders otherwise
            config = inner.config
            token_types = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
        kwargs["mm_token_type_ids"] = token_types
    return inner.get_rope_index(input_ids, **kwargs)


def _rope_deltas(positions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(1, 1) rope deltas of a one-prompt position table (3, 1, L), as `get_rope_index` defines them in 4.57 and
    5.x: the largest position of the attended tokens + 1 - their count."""
    attended = torch.ones(positions.shape[-1], dtype=torch.bool, device=positions.device)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        attended = attention_mask[0].to(positions.device).bool()
    delta = positions[:, 0, attended].max() + 1 - int(attended.sum())
    return delta.long().view(1, 1)


