"""Model inputs for one video: synthetic frames (default) or frames decoded from a file, plus a prompt.

Inputs are built straight from the model config (no processor, no tokenizer): the placeholder count is what the
family's processor would insert, and the prompt is `prompt_tokens` ordinary-text ids around the video, as long
as a VideoMME question with its options. Timing does not depend on which text ids they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmms_eval_models.benchmarking.presets import FAMILY_LLAVA, FAMILY_QWEN2_5

# Qwen2.5-VL's processor normalisation (OpenAI CLIP); SigLIP uses 0.5 / 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT_PREFIX_TOKENS = 14  # system prompt + user header before the video, as in the chat templates


@dataclass
class VideoInputs:
    """Keyword arguments for `model.generate` and what the table needs to know about them."""

    model_kwargs: dict[str, Any]
    visual_tokens: int  # video placeholder tokens in the vanilla sequence (Eq. 12's n)
    sequence_length: int  # whole vanilla prompt length
    frames: int


def synthetic_frames(frames: int, height: int, width: int, seed: int = 0, scenes: int = 4) -> torch.Tensor:
    """A deterministic video in [0, 1], shape (frames, 3, height, width): `scenes` shots of a slowly drifting
    smooth pattern, so adjacent frames are similar within a shot and differ across cuts, like real footage
    (random noise would make every frame its own segment and misrepresent the compression's work).
    """
    generator = torch.Generator().manual_seed(seed)
    shot_of_frame = (torch.arange(frames) * scenes) // max(frames, 1)
    coarse = torch.rand(scenes, 3, 6, 6, generator=generator)
    patterns = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    drift = torch.arange(frames) * max(1, width // 96)  # a few pixels per frame
    video = torch.stack([torch.roll(patterns[s], shifts=int(d), dims=-1) for s, d in zip(shot_of_frame, drift)])
    return video.clamp(0.0, 1.0)


def decode_video(path: str | Path, frames: int) -> torch.Tensor:
    """`frames` uniformly sampled frames of a video file in [0, 1], shape (frames, 3, H, W) (decord)."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    indices = torch.linspace(0, len(reader) - 1, frames).round().long().tolist()
    array = reader.get_batch(indices).asnumpy()  # (F, H, W, 3) uint8
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


def _normalise(video: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (video - mean_t) / std_t


def _resize(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if video.shape[-2:] == (height, width):
        return video
    return torch.nn.functional.interpolate(video, size=(height, width), mode="bilinear", align_corners=False)


def _text_ids(count: int, vocab_size: int, reserved: set[int], seed: int) -> torch.Tensor:
    """`count` ordinary token ids, avoiding the special ones (low ids and the model's reserved ids)."""
    generator = torch.Generator().manual_seed(seed + 1)
    low = min(1000, vocab_size // 4)
    high = min(vocab_size, 150000)  # below the Qwen2 special-token block
    ids = torch.randint(low, high, (count,), generator=generator)
    for token in reserved:  # only hit in small vocabularies
        ids[ids == token] = low
    return ids


def llava_placeholder_count(config: Any, frames: int) -> int:
    """Video tokens the LLaVA-OneVision processor inserts: bilinear-pooled grid per frame + one newline."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    pooled = math.ceil(grid / 2)
    return frames * pooled * pooled + 1


def llava_inputs(config: Any, video: torch.Tensor, prompt_tokens: int, seed: int) -> VideoInputs:
    """LLaVA-OneVision / LLaVA-Video: pixel_values_videos (1, F, 3, S, S) in SigLIP normalisation."""
    size = config.vision_config.image_size
    pixels = _normalise(_resize(video, size, size), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).unsqueeze(0)
    frames = pixels.shape[1]
    visual = llava_placeholder_count(config, frames)
    reserved = {config.video_token_index, config.image_token_index}
    text = _text_ids(prompt_tokens, config.text_config.vocab_size, reserved, seed)
    prefix = min(PROMPT_PREFIX_TOKENS, prompt_tokens)
    video_ids = torch.full((visual,), config.video_token_index, dtype=torch.long)
    input_ids = torch.cat([text[:prefix], video_ids, text[prefix:]]).unsqueeze(0)
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values_videos": pixels}
    return VideoInputs(kwargs, visual, input_ids.shape[1], frames)


def qwen_patchify(pixels: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, list[int]]:
    """Flatten normalised frames (F, 3, H, W) into Qwen2.5-VL's patch rows, in its merge-window order.

    Returns (grid_t·grid_h·grid_w, 3·temporal·patch²) and [grid_t, grid_h, grid_w]; F is padded to a multiple of
    `temporal` by repeating the last frame, as the processor does.
    """
    frames, channels, height, width = pixels.shape
    if frames % temporal:
        pixels = torch.cat([pixels, pixels[-1:].expand(temporal - frames % temporal, -1, -1, -1)])
    grid_t, grid_h, grid_w = pixels.shape[0] // temporal, height // patch, width // patch
    blocks = pixels.reshape(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # -> (t, h-block, w-block, h-in-block, w-in-block, channel, temporal, patch, patch)
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = blocks.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
    return rows, [grid_t, grid_h, grid_w]


def qwen_inputs(config: Any, video: torch.Tensor, frame_size: int, prompt_tokens: int, seed: int) -> VideoInputs:
    """Qwen2.5-VL: frames resized to `frame_size` (a multiple of 28), flattened patches and the grid."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    if frame_size % unit:
        raise ValueError(f"--frame-size must be a multiple of {unit} for Qwen2.5-VL; got {frame_size}")
    pixels = _normalise(_resize(video, frame_size, frame_size), CLIP_MEAN, CLIP_STD)
    rows, grid = qwen_patchify(pixels, vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
    visual = grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2
    reserved = {config.video_token_id, config.image_token_id, config.vision_start_token_id, config.vision_end_token_id}
    text = _text_ids(prompt_tokens, config.text_config.vocab_size, reserved, seed)
    prefix = min(PROMPT_PREFIX_TOKENS, prompt_tokens)
    video_ids = torch.cat([
        torch.tensor([config.vision_start_token_id]),
        torch.full((visual,), config.video_token_id, dtype=torch.long),
        torch.tensor([config.vision_end_token_id]),
    ])  # fmt: skip
    input_ids = torch.cat([text[:prefix], video_ids, text[prefix:]]).unsqueeze(0)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": rows,
        "video_grid_thw": torch.tensor([grid]),
    }
    return VideoInputs(kwargs, visual, input_ids.shape[1], video.shape[0])


def build_inputs(
    family: str, config: Any, video: torch.Tensor, prompt_tokens: int, frame_size: int, seed: int
) -> VideoInputs:
    """The family's generate() inputs for one video (frames in [0, 1], shape (F, 3, H, W))."""
    if family == FAMILY_LLAVA:
        return llava_inputs(config, video, prompt_tokens, seed)
    if family == FAMILY_QWEN2_5:
        return qwen_inputs(config, video, frame_size, prompt_tokens, seed)
    raise ValueError(f"no input builder for family {family!r}")


def to_device(inputs: VideoInputs, device: torch.device, dtype: torch.dtype) -> VideoInputs:
    """Move tensors to `device`; floating pixel tensors also to the model dtype."""
    moved = {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for key, value in inputs.model_kwargs.items()
    }
    return VideoInputs(moved, inputs.visual_tokens, inputs.sequence_length, inputs.frames)
