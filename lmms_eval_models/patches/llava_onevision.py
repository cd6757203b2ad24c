"""FlashVID inside transformers' `LlavaOnevisionForConditionalGeneration` (LLaVA-OneVision and LLaVA-Video).

Public API (also reached through `lmms_eval_models.patches.apply_flashvid` / `remove_flashvid`):

    apply(model, config, video_layout="onevision", method="flashvid", baseline_options=None) -> model
    remove(model) -> model

`video_layout` — the family option (keyword) choosing how a video's tokens are pooled and laid out:

- ``"onevision"`` (default): transformers' own layout for LLaVA-OneVision checkpoints — projector, then bilinear
  pooling to ceil(h/2)×ceil(w/2) (27×27 → 14×14 = 196 per frame), the (compressed) tokens in global order, then
  ONE newline embedding at the end.
- ``"llava_video"``: the LLaVA-Video paper setting — projector, then average pooling with stride 2
  (27×27 → 13×13 = 169 per frame); each frame's (kept) tokens are followed by one newline embedding, also for a
  frame left with no token.

`config` is a `flashvid_core.FlashVIDConfig` (or a mapping of its fields, built with `FlashVIDConfig.from_mapping`
as the Qwen patches do), or ``None`` for no compression at all: every token is kept and
only the layout applies. ``apply(model, None, video_layout="llava_video")`` is therefore the paper's *vanilla*
LLaVA-Video run (64 frames × (169 + 1) tokens); it is the same as ``method="none"``.

`method` (keyword, default ``"flashvid"``) — any method of the registry `lmms_eval_models.methods`: flashvid, fastv,
visionzip, divprune, fastvid, uniform, random, none. Every method compresses the pooled (F, N, D) features
through `compress_with_method` at ``config.retention_ratio`` on the pooled square grid of the layout, and its
inner-LLM pruning comes from `llm_pruning_plan` (FlashVID: config K and r; FastV: K = ``fastv_layer`` and the r
that aligns the per-layer average with R, over the whole uncompressed video; the others: none). ``"none"`` keeps
every token and prunes nothing. `baseline_options` (a mapping of `MethodSettings` fields, typed or strings)
sets the baselines' parameters. An unknown method or option raises ValueError at apply time.

How it works, for one model instance only (other instances of the class are untouched):

- The model's class is swapped for a subclass whose `forward` intercepts calls that carry `pixel_values_videos`:
  it runs the stock `get_video_features` (so the projector is transformers' own; the inner model's pooling is
  swapped for the layout's, which for "onevision" is transformers' bilinear pooling, bit-identical, computed on
  the channels-last view), takes the attention statistic from the last *used* SigLIP layer, compresses with the
  method, replaces the whole run of video placeholders by the compressed tokens and newline(s), and calls the
  stock `forward` with `inputs_embeds`, a matching attention mask and contiguous positions 0..L'-1 of the
  shortened sequence.
- Only that one SigLIP attention module computes attention probabilities (its class is swapped too, and it
  computes them only while a FlashVID call is running, and only for the methods that read the statistic:
  flashvid, visionzip, fastvid). Its output still comes from its own (fast) attention implementation; the
  statistic is computed beside it from the query/key projections, in query chunks of bounded memory.
- `generate` keeps tracking the original (longer) `input_ids` / `attention_mask` / positions. Decoding calls that
  continue the cache filled by a FlashVID prefill are translated back onto the shortened sequence; the state is
  per instance and replaced at every prefill.
- Inner-LLM pruning (FlashVID when `config.pruning_layer` lies inside the LLM; FastV) goes through
  `llm_pruning.attach_llm_pruning` on this instance's decoder layers. Its visual tokens are the M compressed
  tokens (all F·N for FastV); the newline embeddings count as text (for the OneVision layout this is the
  official span [start, start + M)); from layer K on, ceil(M · llm_retention_ratio) of them remain, and the
  layers >= K cache only the pruned sequence.
- `model.flashvid_stats` (a `FlashVIDStats`, None before the first video call) describes the last video prefill:
  visual_tokens_in = F·N pooled tokens, visual_tokens_compressed = M, visual_tokens_after_pruning = the visual
  tokens left from layer K on (M without pruning), newline embeddings not counted; num_segments; compression_ms
  (CUDA-synchronised wall time of the method's compression). The config is never written.
- transformers 5's `generate` would pre-encode the video through the stock `get_video_features`
  (`mm_encoder_outputs`); the patched forward hides that parameter so the raw pixels reach it, as on 4.57.
  Static (compileable) caches, whose 4-D masks are built in the original coordinates, are refused.

Batch size: one video prompt per call (the official code supports batch size 1 only); a larger batch with video
is refused with a ValueError before any model work. Calls without video (text, images) run the stock model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flashvid_core.backend import Backend, current_backend
from lmms_eval_models.patches._statistic_kernel import fused_attention_received
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
    softmax_float32,
    swap_class,
    synchronize,
)

VIDEO_LAYOUTS: tuple[str, ...] = ("onevision", "llava_video")
SUPPORTED_CLASS = "LlavaOnevisionForConditionalGeneration"

__all__ = ["SUPPORTED_CLASS", "VIDEO_LAYOUTS", "apply", "pooled_grid", "remove"]


# --------------------------------------------------------------------------------------------- patch state


@dataclass
class _DecodeMap:
    """How the original prompt maps onto the shortened one, for the decoding steps after a FlashVID prefill.

    The original placeholders [start, start + original_run) became `video_len` tokens; everything after them
    moves left by `shift`. `cache` identifies the KV cache that prefill filled: only calls continuing it are
    translated.
    """

    cache: weakref.ref
    start: int
    original_run: int
    video_len: int

    @property
    def shift(self) -> int:
        return self.original_run - self.video_len

    def continues(self, arguments: dict[str, Any]) -> bool:
        """Whether a call continues that cache, in the original prompt's coordinates."""
        cache = arguments.get("past_key_values")
        if cache is None or self.cache() is not cache:
            return False
        # A reused cache object (reset or cropped for another prompt) must not be translated: where the call
        # says how long the sequence is, it must be the cached one (layer 0 is never pruned) plus the shift.
        mask = arguments.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            inputs = arguments.get("input_ids")
            if inputs is None:
                inputs = arguments.get("inputs_embeds")
            return inputs is None or mask.shape[1] - inputs.shape[1] == cache.get_seq_length() + self.shift
        return True


@dataclass
class _LlavaPatch:
    config: Any  # flashvid_core.FlashVIDConfig or None (layout only)
    video_layout: str
    method: MethodPlan
    pruner: Any = None  # llm_pruning.LLMPruner when the method prunes inside the LLM
    decode: _DecodeMap | None = None


# ------------------------------------------------------------------------------------------ public API


def apply(
    model: nn.Module,
    config: Any,
    video_layout: str = "onevision",
    *,
    method: str | None = None,
    baseline_options: Mapping[str, Any] | None = None,
    backend: Backend | None = None,
) -> nn.Module:
    """Patch this `LlavaOnevisionForConditionalGeneration` instance to compress its videos with `method` at
    `config.retention_ratio` (method None: "flashvid" with a config; without one the layout alone, "none").

    Everything is validated before the model is touched. Re-applying replaces the previous settings. Returns
    the model.
    """
    check_supported_class(model, SUPPORTED_CLASS)
    config = coerce_config(config)
    if video_layout not in VIDEO_LAYOUTS:
        raise ValueError(f"video_layout must be one of {VIDEO_LAYOUTS}, got {video_layout!r}")
    if method is None:
        method = "none" if config is None else "flashvid"  # no config: no compression, as before methods existed
    layers = model.model.language_model.layers
    plan = plan_method(method, baseline_options, config, len(layers), backend)
    if getattr(model, PATCH_ATTR, None) is not None:
        remove(model)
    # None when the method does not prune inside the LLM (FlashVID: K beyond the LLM, as the official code)
    pruner = attach_planned_pruning(layers, plan)
    setattr(model, PATCH_ATTR, _LlavaPatch(config=config, video_layout=video_layout, method=plan, pruner=pruner))
    model.__dict__[STATS_ATTR] = None
    swap_class(model, _flashvid_model_class)
    swap_class(model.model, functools.partial(_pooling_class, video_layout=video_layout))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply` on this instance: afterwards it computes exactly what the stock model computes."""
    check_supported_class(model, SUPPORTED_CLASS)
    patch = getattr(model, PATCH_ATTR, None)
    if patch is not None and patch.pruner is not None:
        patch.pruner.remove()
    for attention in _vision_attentions(model):
        restore_class(attention)
        attention.__dict__.pop("_flashvid_sink", None)
    restore_class(model.model)
    restore_class(model)
    model.__dict__.pop(PATCH_ATTR, None)
    model.__dict__.pop(STATS_ATTR, None)
    return model


# ------------------------------------------------------------------------------ instance-scoped classes


@functools.cache
def _flashvid_model_class(original: type) -> type:
    """Subclass of the model's class whose `forward` routes video calls through FlashVID."""
    stock_forward = original.forward
    signature = inspect.signature(stock_forward)

    # `wraps` keeps the stock signature visible: `generate` inspects it (position_ids, cache_position).
    @functools.wraps(stock_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        patch: _LlavaPatch | None = getattr(self, PATCH_ATTR, None)
        if patch is None:
            return stock_forward(self, *args, **kwargs)
        arguments = bind_arguments(signature, self, args, kwargs)
        if (arguments.get("mm_encoder_outputs") or {}).get("video") is not None:
            raise ValueError(
                "FlashVID needs pixel_values_videos (it takes its attention statistic inside the vision tower), "
                "not pre-encoded video outputs (mm_encoder_outputs)"
            )
        if arguments.get("pixel_values_videos") is not None:
            with patch.method.scope():
                return _video_prefill(self, patch, stock_forward, arguments)
        decode = patch.decode
        if decode is not None and decode.continues(arguments):
            return stock_forward(self, **_translate_decode(decode, arguments))
        return stock_forward(self, **arguments)  # text, images, or another sequence: stock

    # transformers 5 `generate` pre-encodes images and videos (mm_encoder_outputs) when forward accepts them,
    # through the stock get_video_features, which cannot give FlashVID its attention statistic. Hiding that
    # parameter makes `generate` pass the raw pixels to the first forward, as 4.57 always does.
    forward.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "mm_encoder_outputs"]
    )
    return type(original.__name__, (original,), {"forward": forward, "__module__": original.__module__})


@functools.cache
def _pooling_class(original: type, video_layout: str) -> type:
    """Subclass of the inner `LlavaOnevisionModel` whose video pooling is the layout's, computed channels-last.

    "onevision": transformers' bilinear pooling, bit-identical, but on the channels-last view of the features:
    the stock method first copies them channels-first, which makes the interpolation itself far slower on GPU.
    "llava_video": LLaVA-Video's 2×2 average pooling.
    """
    pool = bilinear_pool_half if video_layout == "onevision" else average_pool_stride2

    def apply_pooling(self: nn.Module, image_features: torch.Tensor) -> torch.Tensor:
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return pool(image_features, side, side)

    return type(
        original.__name__, (original,), {"apply_pooling": apply_pooling, "__module__": original.__module__}
    )


@functools.cache
def _statistic_attention_class(original: type) -> type:
    """Subclass of a SigLIP attention module that, while armed, also records FlashVID's attention statistic.

    The module's own (fast) attention computes its output either way; the statistic is computed beside it.
    """

    def forward(
        self: nn.Module, hidden_states: torch.Tensor, attention_mask: Any = None, **kwargs: Any
    ) -> Any:
        outputs = original.forward(self, hidden_states, attention_mask, **kwargs)
        sink: list[torch.Tensor] | None = self.__dict__.get("_flashvid_sink")
        if sink is not None:
            with torch.no_grad():  # the statistic only steers token selection: no graph for its probabilities
                sink.append(attention_received(self, hidden_states, attention_mask))
        return outputs

    return type(original.__name__, (original,), {"forward": forward, "__module__": original.__module__})


# -------------------------------------------------------------------------------- vision-side helpers


def average_pool_stride2(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """LLaVA-Video's spatial pooling: 2×2 average, stride 2, floor (27×27 → 13×13).

    features (B, height·width, D) in raster order -> (B, ⌊height/2⌋·⌊width/2⌋, D).
    """
    batch, _, dim = features.shape
    grid = features.view(batch, height, width, dim).permute(0, 3, 1, 2)
    pooled = nn.functional.avg_pool2d(grid, kernel_size=2, stride=2)
    return pooled.flatten(2).transpose(1, 2)


def bilinear_pool_half(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """LLaVA-OneVision's spatial pooling: bilinear resize to ⌈height/2⌉×⌈width/2⌉ (27×27 → 14×14).

    features (B, height·width, D) in raster order -> (B, ⌈height/2⌉·⌈width/2⌉, D), bit-identical to transformers'
    `apply_pooling`. The (B, D, h, w) grid is left as a channels-last view instead of being copied channels-first:
    the copy and the channels-first kernel dominate the stock pooling's time on GPU.
    """
    batch, _, dim = features.shape
    grid = features.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    size = [math.ceil(height / 2), math.ceil(width / 2)]
    pooled = nn.functional.interpolate(grid, size=size, mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(batch, -1, dim)


def attention_received(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_bytes: int = 1 << 28,
) -> torch.Tensor:
    """The attention each key token of a SigLIP attention module receives, averaged over heads and queries.

    hidden_states (B, N, C), attention_mask None or additive (B or 1, 1, N or 1, N) -> received (B, N) float32.
    Eager attention's probabilities (softmax in float32 of q·kᵀ·scale + mask), summed over heads and query
    positions and divided by their count. The queries go in chunks of at most `max_bytes` of float32
    probabilities, so the full (B, H, N, N) attention never exists. Uses only the module's projections and
    sizes, which are the same in every supported transformers version.
    """
    batch, length, _ = hidden_states.shape

    def heads(projection: nn.Module) -> torch.Tensor:  # (B, N, C) -> (B, H, N, d)
        return (
            projection(hidden_states)
            .view(batch, length, attention.num_heads, attention.head_dim)
            .transpose(1, 2)
        )

    queries, keys = heads(attention.q_proj), heads(attention.k_proj)
    # On CUDA (float16/bfloat16, Triton present) one fused kernel (_statistic_kernel), unless the Backend says no.
    if attention_mask is None and current_backend().fused_statistic:
        fused = fused_attention_received(queries, keys, attention.scale)
        if fused is not None:  # CUDA half/bfloat16 with Triton: no score tensor in memory at all
            return fused / (attention.num_heads * length)
    keys_t = keys.transpose(2, 3)
    rows = max(1, max_bytes // (batch * attention.num_heads * length * 4))
    received = torch.zeros(batch, length, dtype=torch.float32, device=hidden_states.device)
    for first in range(0, length, rows):
        scores = torch.matmul(queries[:, :, first : first + rows], keys_t) * attention.scale
        if attention_mask is not None:
            # a mask broadcast over queries has one row; otherwise take this chunk's rows
            scores = scores + (
                attention_mask if attention_mask.shape[-2] == 1 else attention_mask[..., first : first + rows, :]
            )
        received += softmax_float32(scores).sum(dim=(1, 2))
    return received / (attention.num_heads * length)


def _vision_encoder_layers(model: nn.Module) -> nn.ModuleList:
    tower = model.model.vision_tower
    layers = getattr(getattr(getattr(tower, "vision_model", tower), "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"FlashVID expects a SigLIP-style vision tower (vision_model.encoder.layers), got {type(tower).__name__}"
        )
    return layers


def _vision_attentions(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in _vision_encoder_layers(model)]


def last_used_vision_layer(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """Index of the last encoder layer whose output the features use.

    `hidden_states` holds num_layers + 1 entries (the embeddings, then each layer's output), so hidden state
    i (negative i counted from the end) is the output of layer i - 1.
    """
    selected = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    for index in selected:
        if not -(num_layers + 1) <= index <= num_layers:
            raise ValueError(f"vision_feature_layer {index} is outside [-{num_layers + 1}, {num_layers}]")
    layer = max(index % (num_layers + 1) for index in selected) - 1
    if layer < 0:
        raise ValueError(
            "vision_feature_layer selects only the patch embeddings: no attention to take FlashVID's statistic from"
        )
    return layer


def _video_features(
    model: nn.Module, pixel_values_videos: torch.Tensor, feature_layer: Any, select_strategy: str, video_layout: str
) -> torch.Tensor:
    """Pooled, projected video features (F, N, D), the stock way (for methods that need no statistic)."""
    output = model.model.get_video_features(
        pixel_values_videos, vision_feature_layer=feature_layer, vision_feature_select_strategy=select_strategy
    )
    frames = pixel_values_videos.shape[0] * pixel_values_videos.shape[1]
    height, width = pooled_grid(model, video_layout)
    return _per_frame_features(output, frames, height * width)


def _per_frame_features(output: Any, frames: int, tokens: int) -> torch.Tensor:
    """`get_video_features`' result as (F, N, D), whichever form this transformers version returns.

    4.57 returns the features (1, F·N, D); 5.x a ModelOutput whose pooler_output holds them, with the newline
    embedding appended as one more row in some 5.x releases (5.23) and not in others (5.17). The features are
    always the first F·N rows, so they are taken by count rather than by guessing the version.
    """
    features = output if torch.is_tensor(output) else output.pooler_output
    rows = features.reshape(-1, features.shape[-1])
    expected = frames * tokens
    if rows.shape[0] not in (expected, expected + 1):
        raise RuntimeError(
            f"get_video_features returned {rows.shape[0]} rows for {frames} frames of {tokens} pooled tokens; "
            f"expected {expected} (or {expected + 1} with the newline embedding)"
        )
    return rows[:expected].view(frames, tokens, -1)


def _features_and_statistic(
    model: nn.Module, pixel_values_videos: torch.Tensor, feature_layer: Any, select_strategy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled, projected video features (F, N, D) and the equally pooled attention statistic (F, N)."""
    inner = model.model
    attention = _vision_attentions(model)[
        last_used_vision_layer(feature_layer, len(_vision_encoder_layers(model)))
    ]
    swap_class(attention, _statistic_attention_class)
    sink: list[torch.Tensor] = []
    attention._flashvid_sink = sink
    try:
        # Positional pixel argument: it is named pixel_values in 4.57 and pixel_values_videos in 5.x.
        output = inner.get_video_features(
            pixel_values_videos,
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=select_strategy,
        )
    finally:
        del attention._flashvid_sink
    if len(sink) != 1:
        raise RuntimeError(f"expected one attention statistic from the vision tower, got {len(sink)}")
    received = sink[0]  # (F, P) over SigLIP patches
    if select_strategy == "default":
        received = received[:, 1:]  # the features drop the first position in this strategy; so does A
    # the features' own pooling (bilinear or average), on a one-channel map
    statistic = inner.apply_pooling(received[..., None])[..., 0]
    frames, tokens = statistic.shape
    return _per_frame_features(output, frames, tokens), statistic


# ------------------------------------------------------------------------------------- video prefill


def _video_prefill(
    model: nn.Module, patch: _LlavaPatch, stock_forward: Any, arguments: dict[str, Any]
) -> Any:
    pixel_values_videos = arguments.pop("pixel_values_videos")
    arguments.pop("image_sizes_videos", None)
    input_ids = arguments.get("input_ids")
    _check_video_call(model, input_ids, pixel_values_videos, arguments)
    start, run = _placeholder_run(input_ids[0], model.config.video_token_id)

    feature_layer = _resolved(arguments.get("vision_feature_layer"), model.config.vision_feature_layer)
    select_strategy = _resolved(
        arguments.get("vision_feature_select_strategy"), model.config.vision_feature_select_strategy
    )
    if patch.method.needs_statistic:
        features, statistic = _features_and_statistic(model, pixel_values_videos, feature_layer, select_strategy)
    else:  # the statistic layer keeps its fast attention: these methods never read it
        features = _video_features(model, pixel_values_videos, feature_layer, select_strategy, patch.video_layout)
        statistic = None
    video, token_slots, num_segments, elapsed_ms = _compressed_video(model, patch, features, statistic)

    embeddings = model.get_input_embeddings()(input_ids)
    video = video.to(embeddings.dtype)[None]
    arguments["inputs_embeds"] = torch.cat(
        (embeddings[:, :start], video, embeddings[:, start + run :]), dim=1
    )
    arguments["input_ids"] = None
    _shorten_positions(arguments, start, run, video.shape[1])

    # Inner-LLM pruning sees the compressed tokens as the visual ones; newline embeddings count as text.
    pruning = (
        patch.pruner.prefill(visual_positions=token_slots + start)
        if patch.pruner is not None
        else contextlib.nullcontext()
    )
    with pruning as pruned:
        outputs = stock_forward(model, **arguments)

    # the cache the caller passed (generate always does), else the one the model made (tuple outputs have none)
    cache = arguments.get("past_key_values")
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    patch.decode = (
        _DecodeMap(cache=weakref.ref(cache), start=start, original_run=run, video_len=video.shape[1])
        if cache is not None
        else None
    )
    stats = FlashVIDStats(
        visual_tokens_in=features.shape[0] * features.shape[1],
        visual_tokens_compressed=token_slots.numel(),
        visual_tokens_after_pruning=token_slots.numel() if pruned is None else pruned.visual_tokens_kept,
        num_segments=num_segments,
        compression_ms=elapsed_ms,
    )
    model.__dict__[STATS_ATTR] = stats
    return outputs


def _resolved(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_video_call(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    pixel_values_videos: torch.Tensor,
    arguments: dict[str, Any],
) -> None:
    """Refuse what the patch cannot do, before any model work."""
    if input_ids is None:
        raise ValueError(
            "FlashVID needs input_ids with the video placeholders to build the shortened sequence"
        )
    if input_ids.shape[0] != 1 or pixel_values_videos.shape[0] != 1:
        raise ValueError(
            "FlashVID on LLaVA-OneVision supports batch size 1 with video (one video per call, as the official "
            f"code); got {input_ids.shape[0]} prompts and {pixel_values_videos.shape[0]} videos"
        )
    past = arguments.get("past_key_values")
    if past is not None and past.get_seq_length() > 0:
        raise ValueError("FlashVID compresses a video at prefill: past_key_values must be empty on that call")
    if arguments.get("labels") is not None:
        raise ValueError("FlashVID shortens the sequence, so labels for the original one cannot be scored")
    mask = arguments.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("FlashVID on LLaVA-OneVision takes a 2-D attention_mask (batch, sequence)")


def _placeholder_run(input_ids: torch.Tensor, video_token_id: int) -> tuple[int, int]:
    """(start, length) of the one contiguous run of video placeholders in a prompt."""
    positions = torch.nonzero(input_ids == video_token_id).flatten()
    if positions.numel() == 0:
        raise ValueError("pixel_values_videos given but the prompt has no video placeholder token")
    start, end = int(positions[0]), int(positions[-1]) + 1
    if end - start != positions.numel():
        raise ValueError("FlashVID expects one video per prompt: its placeholder tokens must form one run")
    return start, end - start


def pooled_grid(model: nn.Module, video_layout: str) -> tuple[int, int]:
    """The (h, w) token grid of one pooled frame: bilinear pooling rounds up (27 → 14), average pooling with
    stride 2 rounds down (27 → 13)."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    pooled = side // 2 if video_layout == "llava_video" else math.ceil(side / 2)
    return pooled, pooled


def _compressed_video(
    model: nn.Module, patch: _LlavaPatch, features: torch.Tensor, statistic: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """The video's part of the LLM input in the patch's layout.

    features (F, N, D), statistic (F, N) or None -> (video (V, D), slots of the M compressed tokens in it (M,),
    segments, compression ms); the other V - M slots hold newline embeddings.
    """
    frames, per_frame, _ = features.shape
    grid_hw = pooled_grid(model, patch.video_layout)
    if grid_hw[0] * grid_hw[1] != per_frame:
        raise RuntimeError(f"pooled frames have {per_frame} tokens, not the {grid_hw[0]}×{grid_hw[1]} grid expected")
    synchronize(features.device)
    started = time.perf_counter()
    compression = patch.method.compress(features, statistic, grid_hw, patch.config)
    synchronize(features.device)
    elapsed_ms = (time.perf_counter() - started) * 1e3 if patch.method.compresses else 0.0
    tokens, indices = compression.tokens, compression.indices
    num_segments = len(compression.segment_lengths)
    newline = model.model.image_newline.to(tokens.device, tokens.dtype)
    slots = torch.arange(tokens.shape[0], device=tokens.device)
    if patch.video_layout == "llava_video":
        frame_of_token = torch.div(indices, per_frame, rounding_mode="floor")
        video = newline_per_frame(tokens, frame_of_token, frames, newline)
        slots = slots + frame_of_token
    else:
        video = torch.cat((tokens, newline[None]), dim=0)
    return video, slots, num_segments, elapsed_ms


def newline_per_frame(
    tokens: torch.Tensor, frame_of_token: torch.Tensor, frames: int, newline: torch.Tensor
) -> torch.Tensor:
    """LLaVA-Video layout: each frame's tokens followed by one newline, a frame without tokens included.

    tokens (M, D) ordered by frame, frame_of_token (M,), newline (D,) -> (M + frames, D).
    """
    sequence = newline.expand(tokens.shape[0] + frames, -1).clone()
    # token i is preceded by the newlines of all earlier frames, one each
    sequence[torch.arange(tokens.shape[0], device=tokens.device) + frame_of_token] = tokens
    return sequence


def _shorten_positions(arguments: dict[str, Any], start: int, run: int, video_len: int) -> None:
    """Attention mask, positions and cache positions for the shortened prompt (contiguous 0..L'-1)."""
    mask = arguments.get("attention_mask")
    if mask is not None:
        mask = _spliced_mask(mask, start, run, video_len)
        arguments["attention_mask"] = mask
        positions = mask.long().cumsum(-1) - 1
        arguments["position_ids"] = positions.masked_fill(mask == 0, 1)
    else:
        length = arguments["inputs_embeds"].shape[1]
        arguments["position_ids"] = torch.arange(length, device=arguments["inputs_embeds"].device)[None]
    if arguments.get("cache_position") is not None:  # 4.57 passes it; 5.x has none
        arguments["cache_position"] = torch.arange(
            arguments["inputs_embeds"].shape[1], device=arguments["cache_position"].device
        )


def _spliced_mask(mask: torch.Tensor, start: int, run: int, video_len: int) -> torch.Tensor:
    """The 2-D mask with the placeholder run [start, start + run) replaced by `video_len` attended columns."""
    video = mask.new_ones(mask.shape[0], video_len)
    return torch.cat((mask[:, :start], video, mask[:, start + run :]), dim=1)


# ------------------------------------------------------------------------------------------- decoding


def _translate_decode(decode: _DecodeMap, arguments: dict[str, Any]) -> dict[str, Any]:
    """Map a decoding call from the original prompt's coordinates onto the shortened cache."""
    mask = arguments.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(
                "FlashVID on LLaVA-OneVision decodes with a 2-D attention_mask (batch, sequence)"
            )
        arguments["attention_mask"] = _spliced_mask(mask, decode.start, decode.original_run, decode.video_len)
    for key in ("position_ids", "cache_position"):
        if arguments.get(key) is not None:
            arguments[key] = arguments[key] - decode.shift
    return arguments
