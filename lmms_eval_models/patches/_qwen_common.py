"""Plumbing shared by the Qwen2.5-VL and Qwen3-VL patches (see `qwen2_5_vl.py` / `qwen3_vl.py` for the API).

One model instance is patched by giving its inner `Qwen*VLModel` a subclass whose `forward`

- on a video prefill: runs the stock `get_video_features` (and `get_image_features` for images, untouched) while a
  forward pre-hook on the *last* vision block's attention computes the attention statistic there only (only for
  the methods that read it: flashvid, visionzip, fastvid); compresses each video with the patch's method
  (`lmms_eval_models.methods.compress_with_method`, FlashVID's `compress` for "flashvid") on its merged-token grid
  (h, w) = (grid_h, grid_w) / spatial_merge_size; puts the compressed token of global index g at the g-th video
  placeholder of that video (duplicated indices insert both rows there), drops the other video placeholders;
  gathers the 3-D M-RoPE position ids of the stock model (`get_rope_index`), the attention mask and (Qwen3-VL)
  the deepstack features at those positions; and calls the language model with `inputs_embeds` and
  `position_ids`, inside the inner-LLM pruner's `prefill` scope;
- on a decoding call that continues the KV cache such a prefill filled: translates the generation bookkeeping,
  which still describes the original prompt, onto the shortened sequence (attention mask columns, cache
  positions) and gives position ids continuing the original positions, then runs the stock `forward`;
- on anything else (text, images only, other caches): runs the stock `forward` unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flashvid_core.backend import Backend
from lmms_eval_models.patches.common import (
    PATCH_ATTR,
    STATS_ATTR,
    FlashVIDStats,
    MethodPlan,
    attach_planned_pruning,
    bind_arguments,
    check_supported_class,
    coerce_config,
    plan_method,
    restore_class,
    rotate_half,
    softmax_float32,
    swap_class,
    synchronize,
)
from lmms_eval_models.patches.llm_pruning import LLMPruner

_STATE_ATTR = "_flashvid_state"  # on the inner Qwen*VLModel, the same object as PATCH_ATTR on the outer model

# Arguments of the stock forward that the video prefill consumes itself; every other one goes to the language model.
_PREFILL_ARGUMENTS = frozenset(
    {
        "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache",
        "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "rope_deltas",
        "cache_position", "second_per_grid_ts", "mm_token_type_ids", "mm_encoder_outputs", "return_dict",
    }
)


# ------------------------------------------------------------------------------------- family description


@dataclass(frozen=True)
class QwenFamily:
    """What differs between Qwen2.5-VL and Qwen3-VL."""

    supported_class: str
    output_class_name: str  # the inner model's output dataclass in 4.57 (5.x returns the LM output as is)
    # (inner model, per-patch attention in vision-block order (S,), video_grid_thw) -> (S / merge_unit,) raster
    attention_to_raster: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    has_deepstack: bool


# ------------------------------------------------------------------------------------- vision statistic


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


class _VisionStatisticHook:
    """Forward pre-hook on one vision attention module; computes the statistic only inside `capture()`."""

    def __init__(self, attention: nn.Module) -> None:
        self.captured: list[torch.Tensor] = []
        self._active = False
        self._handle = attention.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._active:
            return None
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad():
            self.captured.append(
                vision_attention_received(module, hidden_states, kwargs["cu_seqlens"], kwargs["position_embeddings"])
            )
        return None

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        self.captured, self._active = [], True
        try:
            yield self.captured
        finally:
            self._active = False

    def remove(self) -> None:
        self._handle.remove()


# ------------------------------------------------------------------------------------- patch state


@dataclass
class _DecodeLayout:
    """How the original prompt maps onto the shortened prefill sequence whose KV cache is being continued."""

    source_positions: torch.Tensor  # (L',) original position of each row of the shortened sequence
    original_length: int  # L

    @property
    def compressed_length(self) -> int:
        return int(self.source_positions.numel())


@dataclass
class _VideoStatistic:
    """The statistic of the latest `get_video_features` call, and the features it belongs to."""

    features: weakref.ref  # the first video's embeddings tensor of that call's output
    attention: torch.Tensor | None  # (total merged tokens,) raster order; None for methods that do not read it
    grid_thw: torch.Tensor

    def matches(self, first_features: torch.Tensor) -> bool:
        return self.features() is first_features


@dataclass
class QwenPatchState:
    config: Any  # flashvid_core.FlashVIDConfig, or None for method "none"
    family: QwenFamily
    options: dict[str, Any]
    method: MethodPlan
    vision_hook: _VisionStatisticHook
    pruner: LLMPruner | None
    owner: weakref.ref
    layouts: weakref.WeakKeyDictionary = dataclasses.field(default_factory=weakref.WeakKeyDictionary)
    video_statistic: _VideoStatistic | None = None

    def publish(self, stats: FlashVIDStats) -> None:
        owner = self.owner()
        if owner is not None:
            setattr(owner, STATS_ATTR, stats)


# ------------------------------------------------------------------------------------- apply / remove


def apply(
    model: Any,
    config: Any,
    family: QwenFamily,
    options: dict[str, Any],
    method: str = "flashvid",
    baseline_options: Mapping[str, Any] | None = None,
    backend: Backend | None = None,
) -> Any:
    """Patch one instance (see the family modules); everything is validated before the model is touched.

    config: a `FlashVIDConfig`, a mapping of its fields (`FlashVIDConfig.from_mapping`), or None for method "none".
    """
    check_supported_class(model, family.supported_class)
    config = coerce_config(config)  # None: plan_method says which methods need a config
    inner = model.model
    language_model = inner.language_model
    plan = plan_method(method, baseline_options, config, len(language_model.layers), backend)
    if getattr(model, PATCH_ATTR, None) is not None:
        remove(model)
    state = QwenPatchState(
        config=config,
        family=family,
        options=dict(options),
        method=plan,
        vision_hook=_VisionStatisticHook(inner.visual.blocks[-1].attn),
        # None when the method does not prune inside the LLM (FlashVID: K beyond the LLM, as the official code)
        pruner=attach_planned_pruning(language_model.layers, plan),
        owner=weakref.ref(model),
    )
    swap_class(inner, _make_subclass)
    setattr(inner, _STATE_ATTR, state)
    setattr(model, PATCH_ATTR, state)
    setattr(model, STATS_ATTR, None)
    return model


def remove(model: Any) -> Any:
    state = getattr(model, PATCH_ATTR, None)
    if state is None:
        return model
    inner = model.model
    state.vision_hook.remove()
    if state.pruner is not None:
        state.pruner.remove()
    restore_class(inner)
    for target, name in ((inner, _STATE_ATTR), (model, PATCH_ATTR), (model, STATS_ATTR)):
        if name in target.__dict__:
            delattr(target, name)
    return model


@functools.cache
def _make_subclass(original: type) -> type:
    """One subclass per original class, made once: re-applying or patching a second instance reuses it."""
    video_features_signature = inspect.signature(original.get_video_features)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _patched_forward(self, original.forward, args, kwargs)

    def get_video_features(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # also called on its own by 5.x `generate` before the prefill (`mm_encoder_outputs`): the statistic is
        # computed here and handed to the forward that receives these features
        state: QwenPatchState = getattr(self, _STATE_ATTR)
        grid_thw = bind_arguments(video_features_signature, self, args, kwargs)["video_grid_thw"]
        _check_one_video(grid_thw)  # before any vision work (5.x generate encodes a batch's videos first)
        if not state.method.needs_statistic:  # the hook stays idle: these methods never read the statistic
            output = original.get_video_features(self, *args, **kwargs)
            state.video_statistic = _VideoStatistic(weakref.ref(_features(output)[0][0]), None, grid_thw)
            return output
        with state.vision_hook.capture() as captured:
            output = original.get_video_features(self, *args, **kwargs)
        if len(captured) != 1:
            raise RuntimeError(f"expected one pass through the last vision block, saw {len(captured)}")
        first = _features(output)[0][0]
        attention = state.family.attention_to_raster(self, captured[0], grid_thw)
        state.video_statistic = _VideoStatistic(weakref.ref(first), attention, grid_thw)
        return output

    functools.update_wrapper(get_video_features, original.get_video_features)  # generate reads its signature
    methods = {"forward": forward, "get_video_features": get_video_features}
    return type(f"FlashVID{original.__name__}", (original,), methods)


# ------------------------------------------------------------------------------------- forward


def _patched_forward(inner: nn.Module, stock_forward: Callable, args: tuple, kwargs: dict) -> Any:
    state: QwenPatchState = getattr(inner, _STATE_ATTR)
    call = bind_arguments(inspect.signature(stock_forward), inner, args, kwargs)
    precomputed = call.get("mm_encoder_outputs") or {}
    if call.get("pixel_values_videos") is not None or precomputed.get("video") is not None:
        with state.method.scope():
            return _video_prefill(inner, state, call)
    cache = call.get("past_key_values")
    layout = state.layouts.get(cache) if cache is not None else None
    if layout is not None and not _continues(layout, call):
        # The cache object was reset or refilled since the FlashVID prefill: this call starts something else.
        del state.layouts[cache]
        layout = None
    if layout is not None:
        call = _translate_decode_call(inner, stock_forward, layout, call)
    return stock_forward(inner, **call)


def _continues(layout: _DecodeLayout, call: dict[str, Any]) -> bool:
    """Whether this call continues the cache a FlashVID prefill filled (and not a reset/reused cache object)."""
    cached = call["past_key_values"].get_seq_length()
    if cached < layout.compressed_length:
        return False
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        decoded = cached - layout.compressed_length
        return mask.shape[1] == layout.original_length + decoded + _query_length(call)
    return True


# ------------------------------------------------------------------------------------- decoding


def _query_length(call: dict[str, Any]) -> int:
    tokens = call.get("input_ids")
    return int(tokens.shape[1] if tokens is not None else call["inputs_embeds"].shape[1])


def _translate_decode_call(
    inner: nn.Module, stock_forward: Callable, layout: _DecodeLayout, call: dict[str, Any]
) -> dict[str, Any]:
    """Continue a FlashVID prefill's cache: the caller's mask and positions describe the original prompt."""
    cache = call["past_key_values"]
    query_length = _query_length(call)
    cached = cache.get_seq_length()  # layer 0: the shortened prefill plus the tokens decoded since
    decoded = cached - layout.compressed_length
    original_start = layout.original_length + decoded
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        expected = original_start + query_length
        if mask.shape[1] != expected:
            raise ValueError(
                f"attention_mask has {mask.shape[1]} columns; continuing a FlashVID prefill of a "
                f"{layout.original_length}-token prompt after {decoded} decoded tokens expects {expected}"
            )
        source = layout.source_positions.to(mask.device)
        call["attention_mask"] = torch.cat([mask.index_select(1, source), mask[:, layout.original_length :]], 1)
    if call.get("position_ids") is None:
        # the stock fallback would count positions from the (shorter) cache; continue the original ones instead
        batch = int((call.get("input_ids") if call.get("input_ids") is not None else call["inputs_embeds"]).shape[0])
        device = _call_device(call)
        positions = torch.arange(original_start, original_start + query_length, device=device).view(1, 1, -1)
        deltas = inner.rope_deltas.to(device) if inner.rope_deltas is not None else 0
        call["position_ids"] = (positions + deltas).expand(3, batch, -1)
    if "cache_position" in inspect.signature(stock_forward).parameters:
        call["cache_position"] = torch.arange(cached, cached + query_length, device=_call_device(call))
    return call


def _call_device(call: dict[str, Any]) -> torch.device:
    tokens = call.get("input_ids")
    return tokens.device if tokens is not None else call["inputs_embeds"].device


# ------------------------------------------------------------------------------------- video prefill


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


def _rope_index(inner: nn.Module, call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
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


def _check_one_video(grid_thw: torch.Tensor | None) -> None:
    if grid_thw is not None and grid_thw.shape[0] != 1:
        raise ValueError(
            f"FlashVID compresses one video per call (batch size 1, as the official code); got {grid_thw.shape[0]} "
            "videos. Call the model once per sample, or remove_flashvid(model) to run the stock model"
        )


def _check_prefill_call(call: dict[str, Any]) -> None:
    input_ids = call.get("input_ids")
    if input_ids is None:
        raise ValueError("FlashVID needs input_ids (the video placeholders locate the video); got inputs_embeds only")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"FlashVID compresses one video per call (batch size 1, as the official code); got a batch of "
            f"{input_ids.shape[0]}. Call the model once per sample"
        )
    _check_one_video(call.get("video_grid_thw"))
    cache = call.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("FlashVID compresses a video in a prefill from an empty KV cache; got a non-empty cache")


@dataclass
class _Layout:
    """The shortened sequence: which original position each row comes from, and what fills the video rows."""

    source_positions: torch.Tensor  # (L',)
    video_rows: torch.Tensor  # (L',) bool
    embeds: torch.Tensor  # (1, L', D)
    deepstack_source: torch.Tensor | None  # (L',) row of the joint deepstack table, -1 for non-visual rows


def _build_layout(
    input_ids: torch.Tensor,
    embeds: torch.Tensor,
    video_positions: list[torch.Tensor],
    compressions: list[Any],
    drop: torch.Tensor,
    image_token_id: int,
    image_count: int,
    want_deepstack: bool,
) -> _Layout:
    """Vectorised assembly: kept non-video rows and each video's compressed rows, ordered by original position
    (a stable sort keeps duplicated indices in compress order)."""
    ids = input_ids[0]
    keep_rows = torch.nonzero(~drop).flatten()
    positions = [keep_rows] + [video_positions[v][c.indices.to(ids.device)] for v, c in enumerate(compressions)]
    rows = [embeds[0, keep_rows]] + [c.tokens.to(embeds.device, embeds.dtype) for c in compressions]
    all_positions = torch.cat(positions)
    order = torch.sort(all_positions, stable=True).indices
    is_video = torch.cat([torch.zeros_like(keep_rows, dtype=torch.bool)] + [
        torch.ones_like(p, dtype=torch.bool) for p in positions[1:]
    ])[order]
    deepstack_source = None
    if want_deepstack:
        # joint table = image deepstack rows, then every video's rows in original order
        image_rank = torch.cumsum(ids == image_token_id, 0) - 1 if image_count else None
        video_offsets = [image_count]
        for vp in video_positions[:-1]:
            video_offsets.append(video_offsets[-1] + int(vp.numel()))
        text_source = torch.full_like(keep_rows, -1)
        if image_rank is not None:
            is_image = ids[keep_rows] == image_token_id
            text_source = torch.where(is_image, image_rank[keep_rows], text_source)
        sources = [text_source] + [c.indices.to(ids.device) + video_offsets[v] for v, c in enumerate(compressions)]
        deepstack_source = torch.cat(sources)[order]
    return _Layout(
        source_positions=all_positions[order],
        video_rows=is_video,
        embeds=torch.cat(rows)[order].unsqueeze(0),
        deepstack_source=deepstack_source,
    )


def _per_video_statistic(
    attention: torch.Tensor | None, frames: list[int], tokens_per_frame: list[int]
) -> list[torch.Tensor | None]:
    """The raster statistic of the call split into one (F, N) tensor per video (None each when not computed)."""
    if attention is None:
        return [None] * len(frames)
    sizes = [f * n for f, n in zip(frames, tokens_per_frame)]
    return [scores.view(f, n) for scores, f, n in zip(torch.split(attention, sizes), frames, tokens_per_frame)]


def _merged_grids(video_grid_thw: torch.Tensor, merge_size: int) -> list[tuple[int, int]]:
    """(h, w) of each video's merged-token grid, in raster order: the patch grid over the merge size."""
    return [(int(h) // merge_size, int(w) // merge_size) for h, w in video_grid_thw[:, 1:].tolist()]


def _video_prefill(inner: nn.Module, state: QwenPatchState, call: dict[str, Any]) -> Any:
    _check_prefill_call(call)
    config = inner.config
    input_ids = call["input_ids"]
    ids = input_ids[0]
    embeds = inner.get_input_embeddings()(input_ids)

    precomputed = call.get("mm_encoder_outputs") or {}

    # images: exactly the stock route
    image_deepstack = None
    image_count = 0
    image_output = precomputed.get("image")
    if image_output is None and call.get("pixel_values") is not None:
        image_output = inner.get_image_features(call["pixel_values"], call["image_grid_thw"])
    if image_output is not None:
        image_embeds, image_deepstack = _features(image_output)
        image_embeds = torch.cat(image_embeds).to(embeds.device, embeds.dtype)
        image_mask = (ids == config.image_token_id).view(1, -1, 1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds)
        image_count = image_embeds.shape[0]

    # videos: stock features; the statistic comes from our `get_video_features` (5.x generate calls it first)
    video_output = precomputed.get("video")
    if video_output is None:
        video_output = inner.get_video_features(call["pixel_values_videos"], call["video_grid_thw"])
    video_embeds, video_deepstack = _features(video_output)
    statistic = state.video_statistic  # kept: 5.x generate without a cache re-sends the same features each step
    if statistic is None or not statistic.matches(video_embeds[0]):
        raise ValueError("FlashVID needs the video features computed by this patched model's get_video_features")
    attention, video_grid_thw = statistic.attention, statistic.grid_thw
    if call.get("video_grid_thw") is None:
        call["video_grid_thw"] = video_grid_thw  # 5.x generate pops it once the features are computed
    merge_unit = inner.visual.spatial_merge_size**2
    frames = video_grid_thw[:, 0].tolist()
    tokens_per_frame = (video_grid_thw[:, 1] * video_grid_thw[:, 2] // merge_unit).tolist()
    attention_per_video = _per_video_statistic(attention, frames, tokens_per_frame)
    grids = _merged_grids(video_grid_thw, inner.visual.spatial_merge_size)
    placeholder_rows = torch.nonzero(ids == config.video_token_id).flatten()
    if placeholder_rows.numel() != sum(e.shape[0] for e in video_embeds):
        raise ValueError(
            f"{placeholder_rows.numel()} video placeholders in input_ids but the video features have "
            f"{sum(e.shape[0] for e in video_embeds)} tokens"
        )
    video_positions = list(torch.split(placeholder_rows, [e.shape[0] for e in video_embeds]))

    synchronize(embeds.device)
    started = time.perf_counter()
    compressions = [
        state.method.compress(features.view(f, n, -1), scores, grid_hw, state.config)
        for features, scores, grid_hw, f, n in zip(
            video_embeds, attention_per_video, grids, frames, tokens_per_frame
        )
    ]
    drop = ids == config.video_token_id
    if state.options.get("drop_vision_delimiters"):
        drop = drop | _video_delimiters(ids, config)
    layout = _build_layout(
        input_ids, embeds, video_positions, compressions, drop, config.image_token_id, image_count,
        state.family.has_deepstack,
    )
    synchronize(embeds.device)
    compression_ms = (time.perf_counter() - started) * 1000.0 if state.method.compresses else 0.0

    # positions of the stock model at the kept rows (3-D M-RoPE), plus contiguous text positions in front
    given = call.get("position_ids")
    if given is not None:
        full_positions = given[-3:] if given.dim() == 3 else given.unsqueeze(0).expand(3, -1, -1)
        # the decoding calls after this prefill continue these positions (`_translate_decode_call`)
        inner.rope_deltas = _rope_deltas(full_positions, call.get("attention_mask"))
    else:
        full_positions, rope_deltas = _rope_index(inner, call)
        inner.rope_deltas = rope_deltas
    source = layout.source_positions
    length = source.numel()
    text_positions = torch.arange(length, device=source.device).view(1, 1, -1)
    position_ids = torch.cat([text_positions.to(full_positions), full_positions.index_select(-1, source)], 0)
    mask = call.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    mask = mask.index_select(1, source.to(mask.device))

    lm_kwargs = {key: value for key, value in call.items() if key not in _PREFILL_ARGUMENTS}
    if "cache_position" in inspect.signature(type(inner.language_model).forward).parameters:
        lm_kwargs["cache_position"] = torch.arange(length, device=embeds.device)
    if state.family.has_deepstack:
        lm_kwargs.update(_deepstack_kwargs(layout, image_deepstack, video_deepstack, image_count))
    visual_rows = torch.nonzero(layout.video_rows).flatten()
    pruning = state.pruner.prefill(visual_positions=visual_rows) if state.pruner is not None else None
    with pruning if pruning is not None else contextlib.nullcontext() as pruning_result:
        outputs = inner.language_model(
            input_ids=None,
            inputs_embeds=layout.embeds,
            position_ids=position_ids,
            attention_mask=mask,
            past_key_values=call.get("past_key_values"),
            use_cache=call.get("use_cache"),
            **lm_kwargs,
        )
    cache = getattr(outputs, "past_key_values", None)
    if cache is not None:
        state.layouts[cache] = _DecodeLayout(source_positions=source, original_length=int(ids.numel()))
    compressed = int(visual_rows.numel())
    state.publish(
        FlashVIDStats(
            visual_tokens_in=int(placeholder_rows.numel()),
            visual_tokens_compressed=compressed,
            visual_tokens_after_pruning=pruning_result.visual_tokens_kept if pruning_result is not None else compressed,
            num_segments=sum(int(c.segment_lengths.numel()) for c in compressions),
            compression_ms=compression_ms,
        )
    )
    return _model_output(inner, state, outputs)


def _video_delimiters(ids: torch.Tensor, config: Any) -> torch.Tensor:
    """<|vision_start|> / <|vision_end|> tokens that bracket video placeholders (the official Qwen3-VL code drops
    them with the video placeholders)."""
    is_video = ids == config.video_token_id
    next_is_video = torch.zeros_like(is_video)
    next_is_video[:-1] = is_video[1:]
    previous_is_video = torch.zeros_like(is_video)
    previous_is_video[1:] = is_video[:-1]
    return ((ids == config.vision_start_token_id) & next_is_video) | ((ids == config.vision_end_token_id) & previous_is_video)


def _deepstack_kwargs(
    layout: _Layout,
    image_deepstack: list[list[torch.Tensor]] | None,
    video_deepstack: list[list[torch.Tensor]] | None,
    image_count: int,
) -> dict[str, Any]:
    """Qwen3-VL: the visual-row mask of the shortened sequence and the deepstack features of those rows (a merged
    token takes its centre's features: the row of its global index)."""
    if video_deepstack is None:
        return {}
    source = layout.deepstack_source
    assert source is not None
    visual = source >= 0
    tables = []
    for layer, video_layer in enumerate(video_deepstack):
        parts = ([torch.cat(image_deepstack[layer])] if image_deepstack is not None and image_count else []) + [
            torch.cat(video_layer)
        ]
        table = torch.cat(parts)
        tables.append(table.index_select(0, source[visual].to(table.device)))
    return {"visual_pos_masks": visual.unsqueeze(0), "deepstack_visual_embeds": tables}


def _model_output(inner: nn.Module, state: QwenPatchState, outputs: Any) -> Any:
    """4.57's inner models return their own dataclass with `rope_deltas`; 5.x returns the LM output."""
    output_class = getattr(sys.modules[type(inner).__mro__[1].__module__], state.family.output_class_name, None)
    if output_class is None:
        return outputs
    names = {f.name for f in dataclasses.fields(output_class)}
    values = {name: getattr(outputs, name, None) for name in names if name != "rope_deltas"}
    if "rope_deltas" in names:
        values["rope_deltas"] = inner.rope_deltas
    return output_class(**values)


def video_compression_inputs(
    model: Any, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What a patched model hands its method's compression for each video: features (F, N, D) and the attention
    statistic (F, N), None for methods that do not read it (for inspection and tests; the model must be patched)."""
    inner = model.model
    state: QwenPatchState = getattr(inner, _STATE_ATTR)
    embeds, _ = _features(inner.get_video_features(pixel_values_videos, video_grid_thw))
    statistic = state.video_statistic
    merge_unit = inner.visual.spatial_merge_size**2
    frames = video_grid_thw[:, 0].tolist()
    tokens_per_frame = (video_grid_thw[:, 1] * video_grid_thw[:, 2] // merge_unit).tolist()
    attention = _per_video_statistic(statistic.attention, frames, tokens_per_frame)
    return [
        (features.view(f, n, -1), scores) for features, scores, f, n in zip(embeds, attention, frames, tokens_per_frame)
    ]
