"""FlashVID inside transformers' `LlavaOnevisionForConditionalGeneration` (LLaVA-OneVision and LLaVA-Video).

Public API (also reached through `lmms_eval_models.patches.apply_flashvid` / `remove_flashvid`):

    apply(model, config, video_layout="onevision", method=None, baseline_options=None, backend=None) -> model
    remove(model) -> model

`video_layout` — the family option (keyword) choosing how a video's tokens are pooled and laid out:

- ``"onevision"`` (default): transformers' own layout for LLaVA-OneVision checkpoints — projector, then bilinear
  pooling to ceil(h/2)×ceil(w/2) (27×27 → 14×14 = 196 per frame), the (compressed) tokens in global order, then
  ONE newline embedding at the end.
- ``"llava_video"``: the LLaVA-Video paper setting — projector, then average pooling with stride 2
  (27×27 → 13×13 = 169 per frame); each frame's (kept) tokens are followed by one newline embedding, also for a
  frame left with no token.

`config` is a `flashvid_core.FlashVIDConfig` (or a mapping of its fields, built with `FlashVIDConfig.from_mapping`),
or ``None`` for no compression at all: every token is kept and only the layout applies.
``apply(model, None, video_layout="llava_video")`` is therefore the paper's *vanilla* LLaVA-Video run
(64 frames × (169 + 1) tokens); it is the same as ``method="none"``.

`method` (keyword; default ``"flashvid"`` with a config, ``"none"`` without) — any method of the registry
`lmms_eval_models.methods`: every method compresses the pooled (F, N, D) features at ``config.retention_ratio`` on
the pooled square grid of the layout, and prunes inside the LLM as the registry says (FlashVID: config K and r;
FastV: K = ``fastv_layer`` and the r that aligns the per-layer average with R, over the whole uncompressed video).
`baseline_options` (a mapping of `MethodSettings` fields, typed or strings) sets the baselines' parameters. An
unknown method or option raises ValueError at apply time.

What this family supplies to the prefill base (`prefill.py`, which does the rest for every family):

- encode: the stock `get_video_features` (transformers' projector; the inner model's pooling is swapped, for this
  instance, to the layout's, which for "onevision" is transformers' bilinear pooling, bit-identical, computed on
  the channels-last view) and, for the methods that read it, the attention statistic of the last *used* SigLIP
  layer, pooled like the features. That layer keeps its own (fast) attention implementation; the statistic is
  computed from its inputs beside it, in query chunks of bounded memory (one fused kernel on CUDA).
- splice: the whole run of video placeholders is replaced by the compressed tokens and newline(s); the shortened
  sequence gets contiguous positions 0..L'-1 (decoding positions move left by the shortening), as the official
  code. The inner-LLM pruner's visual tokens are the M compressed tokens (all F·N for FastV); the newline
  embeddings count as text (for the OneVision layout this is the official span [start, start + M)).
- `model.flashvid_stats`: visual_tokens_in = F·N pooled tokens, newline embeddings not counted.

Batch size: one video prompt per call (the official code supports batch size 1 only); a larger batch with video
is refused with a ValueError before any model work. Calls without video (text, images) run the stock model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from flashvid_core.backend import Backend, current_backend
from flashvid_core.pipeline import Compression
from lmms_eval_models.patches import prefill
from lmms_eval_models.patches._statistic_kernel import fused_attention_received
from lmms_eval_models.patches.common import softmax_float32
from lmms_eval_models.patches.prefill import EncodedVideo, Family, Prompt, Spliced, StatisticCapture

VIDEO_LAYOUTS: tuple[str, ...] = ("onevision", "llava_video")
SUPPORTED_CLASS = "LlavaOnevisionForConditionalGeneration"

__all__ = ["SUPPORTED_CLASS", "VIDEO_LAYOUTS", "LlavaOnevision", "apply", "pooled_grid", "remove"]


# ------------------------------------------------------------------------------------------ registration


def apply(model: nn.Module, config: Any, video_layout: str = "onevision", *, method: str | None = None,
          baseline_options: Mapping[str, Any] | None = None, backend: Backend | None = None) -> nn.Module:
    """Patch this `LlavaOnevisionForConditionalGeneration` instance (see the module docstring); returns it."""
    return prefill.apply(model, LlavaOnevision(video_layout), config, method, baseline_options, backend)


remove = functools.partial(prefill.remove, supported_class=SUPPORTED_CLASS)  # undo `apply` on this instance


# ------------------------------------------------------------------------------------------ the family


@dataclass(frozen=True)
class LlavaVideoInputs(prefill.VideoInputs):
    """pixel_values_videos (1, F, 3, H, W); the call's (or the config's) feature layer(s) and select strategy."""

    vision_feature_layer: int | list[int]
    vision_feature_select_strategy: str
    video_layout: str


@dataclass(frozen=True)
class LlavaOnevision(Family):
    """LLaVA-OneVision / LLaVA-Video; `video_layout` is the family option."""

    video_layout: str = "onevision"

    supported_class: ClassVar[str] = SUPPORTED_CLASS
    keeps_original_positions: ClassVar[bool] = False
    consumed_arguments: ClassVar[frozenset[str]] = frozenset({"pixel_values_videos", "image_sizes_videos"})

    def __post_init__(self) -> None:
        if self.video_layout not in VIDEO_LAYOUTS:
            raise ValueError(f"video_layout must be one of {VIDEO_LAYOUTS}, got {self.video_layout!r}")

    def module_patches(self, model: nn.Module) -> tuple[tuple[nn.Module, Any], ...]:
        return ((model.model, functools.partial(_pooling_class, video_layout=self.video_layout)),)

    def video_inputs(self, model: nn.Module, arguments: Mapping[str, Any]) -> LlavaVideoInputs:
        pixels = arguments["pixel_values_videos"]
        layer = arguments.get("vision_feature_layer")
        strategy = arguments.get("vision_feature_select_strategy")
        return LlavaVideoInputs(
            pixel_values_videos=pixels,
            num_videos=int(pixels.shape[0]),
            vision_feature_layer=model.config.vision_feature_layer if layer is None else layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy if strategy is None else strategy,
            video_layout=self.video_layout,
        )

    def encode(self, model: nn.Module, inputs: LlavaVideoInputs, capture: StatisticCapture | None) -> EncodedVideo:
        """Pooled, projected features (F, N, D) and, with `capture`, the equally pooled statistic (F, N)."""
        inner = model.model
        layer = last_used_vision_layer(inputs.vision_feature_layer, len(_vision_encoder_layers(model)))
        with prefill.capturing(capture, _vision_attentions(model)[layer], siglip_attention_received) as captured:
            # Positional pixel argument: it is named pixel_values in 4.57 and pixel_values_videos in 5.x.
            output = inner.get_video_features(
                inputs.pixel_values_videos,
                vision_feature_layer=inputs.vision_feature_layer,
                vision_feature_select_strategy=inputs.vision_feature_select_strategy,
            )
        layout = prefill.VideoLayout(pooled_grid(model, inputs.video_layout))
        frames = inputs.pixel_values_videos.shape[0] * inputs.pixel_values_videos.shape[1]
        features = _per_frame_features(output, frames, layout.tokens_per_frame)
        if capture is None:  # the statistic layer ran its fast attention alone: this method never reads it
            return EncodedVideo(features, None, layout)
        received = prefill.one_statistic(captured)  # (F, P) over SigLIP patches
        if inputs.vision_feature_select_strategy == "default":
            received = received[:, 1:]  # the features drop the first position in this strategy; so does A
        # the features' own pooling (bilinear or average), on a one-channel map
        return EncodedVideo(features, inner.apply_pooling(received[..., None])[..., 0], layout)

    def splice(self, model: nn.Module, prompt: Prompt, encoded: EncodedVideo, compression: Compression) -> Spliced:
        """The placeholder run replaced by the layout's video rows; positions contiguous over the shortened prompt."""
        input_ids = prompt.input_ids[0]
        start, run = _placeholder_run(input_ids, model.config.video_token_id)
        video, slots = _video_rows(model, self.video_layout, encoded, compression)
        embeddings = prompt.embeddings
        inputs_embeds = torch.cat(
            (embeddings[:, :start], video.to(embeddings.dtype)[None], embeddings[:, start + run :]), dim=1
        )
        # the video rows stand for the placeholder run: they take its (first) mask column
        positions = torch.arange(input_ids.shape[0], device=input_ids.device)
        source = torch.cat(
            (positions[:start], positions.new_full((video.shape[0],), start), positions[start + run :])
        )
        mask = prompt.mask_at(source)
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return Spliced(inputs_embeds, source, slots + start, position_ids)


def _video_rows(
    model: nn.Module, video_layout: str, encoded: EncodedVideo, compression: Compression
) -> tuple[torch.Tensor, torch.Tensor]:
    """The video's rows of the LLM input in the layout: (video (V, D), slots (M,) of the compressed tokens in it);
    the other V - M rows hold newline embeddings."""
    frames, per_frame, _ = encoded.features.shape
    tokens, indices = compression.tokens, compression.indices
    newline = model.model.image_newline.to(tokens.device, tokens.dtype)
    slots = torch.arange(tokens.shape[0], device=tokens.device)
    if video_layout == "llava_video":
        frame_of_token = torch.div(indices, per_frame, rounding_mode="floor")
        return newline_per_frame(tokens, frame_of_token, frames, newline), slots + frame_of_token
    return torch.cat((tokens, newline[None]), dim=0), slots


@functools.cache
def _pooling_class(original: type, video_layout: str) -> type:
    """`FlashVID<LlavaOnevisionModel>` whose video pooling is the layout's, computed channels-last.

    "onevision": transformers' bilinear pooling, bit-identical, but on the channels-last view of the features:
    the stock method first copies them channels-first, which makes the interpolation itself far slower on GPU.
    "llava_video": LLaVA-Video's 2×2 average pooling.
    """
    pool = bilinear_pool_half if video_layout == "onevision" else average_pool_stride2

    def apply_pooling(self: nn.Module, image_features: torch.Tensor) -> torch.Tensor:
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return pool(image_features, side, side)

    return prefill.flashvid_subclass(original, {"apply_pooling": apply_pooling})


# -------------------------------------------------------------------------------- vision-side helpers


def siglip_attention_received(attention: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The statistic source: `attention_received` from a SigLIP attention module's forward arguments."""
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    attention_mask = kwargs["attention_mask"] if "attention_mask" in kwargs else (args[1] if len(args) > 1 else None)
    return attention_received(attention, hidden_states, attention_mask)


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


