"""What the suite's four model classes feed the model equals what the paper's path feeds it (LLaVA-NeXT's model code
run by the FlashVID repository's lmms-eval 0.5.0, transformers 4.57.3, qwen-vl-utils 0.0.14).

Each oracle below restates one rule of the paper's path, read from that code (not from the suite's), and is compared
with the inputs our class passes to the model's `generate` (captured on the real model, during a real `generate_until` on a
tiny checkpoint and a synthetic video): the prompt's token ids, the frames (through the pixels,
every synthetic frame being different) and the pixel values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

VIDEO_FRAMES, VIDEO_FPS, FRAME_SIZE = 40, 8, 64
CONTEXT = "What happens in the video?\nA. cooking\nB. running\nAnswer with the option's letter."
IMAGE_TOKEN_INDEX = -200  # LLaVA-NeXT's placeholder id for an image or video in the prompt
QWEN_PIXELS = "min_pixels=3136,max_pixels=12544"


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lmms_eval_models.tasks.synthetic_videos import synthetic_frames, write_video

    path = tmp_path_factory.mktemp("equivalence") / "video.mp4"
    write_video(path, synthetic_frames("equivalence", VIDEO_FRAMES, FRAME_SIZE), fps=VIDEO_FPS)
    return str(path)


def decode(path: str, indices: Any) -> np.ndarray:
    """The frames decord returns for `indices` (F, H, W, 3) uint8, as both paths decode."""
    from decord import VideoReader, cpu

    return VideoReader(path, ctx=cpu(0)).get_batch(list(map(int, indices))).asnumpy()


def average_fps(path: str) -> float:
    from decord import VideoReader, cpu

    return float(VideoReader(path, ctx=cpu(0)).get_avg_fps())


def build(model_name: str, args: str) -> Any:
    from lmms_eval.models import get_model

    return get_model(model_name).create_from_arg_string(args)


def fed(model: Any, context: str, path: str) -> dict[str, Any]:
    """The tensors our class passes to the model's `generate` while it answers `context` about `path`."""
    from lmms_eval.api.instance import Instance

    model.task_dict = {"equivalence": {"test": [{"video": path}]}}
    request = Instance(
        request_type="generate_until",
        arguments=(context, {"max_new_tokens": 1}, lambda doc: [doc["video"]], 0, "equivalence", "test"),
        idx=0,
        metadata={"task": "equivalence", "doc_id": 0, "repeats": 1},
    )
    calls: list[dict[str, Any]] = []
    hf_model = model.model
    generate = hf_model.generate  # the suite's instrumented generate (an instance attribute)

    def capture(*args: Any, **kwargs: Any) -> Any:
        calls.append({key: value for key, value in kwargs.items() if torch.is_tensor(value)})
        return generate(*args, **kwargs)

    hf_model.generate = capture
    try:
        model.generate_until([request])
    finally:
        hf_model.generate = generate
    assert len(calls) == 1, "one generate call per question"
    return calls[0]


def collapse_run(ids: list[int], token: int) -> tuple[list[int], int]:
    """`ids` with its one contiguous run of `token` replaced by LLaVA-NeXT's single placeholder; and the run's length."""
    positions = [index for index, value in enumerate(ids) if value == token]
    start, end = positions[0], positions[-1] + 1
    assert end - start == len(positions), "the video's placeholders must form one run"
    return [*ids[:start], IMAGE_TOKEN_INDEX, *ids[end:]], len(positions)


# -------------------------------------------------------------------------------------------- LLaVA oracles


def llava_vid_frames(total: int, fps: float, max_frames: int, force_sample: bool) -> tuple[list[int], list[float]]:
    """lmms-eval 0.5.0 `LlavaVid.load_video` (video_fps=1): indices and the times its instruction states."""
    step = round(fps / 1)
    indices = list(range(0, total, step))
    times = [index / step for index in indices]
    if len(indices) > max_frames or force_sample:
        indices = np.linspace(0, total - 1, max_frames, dtype=int).tolist()
        times = [index / fps for index in indices]
    return indices, times


def llava_onevision_frames(total: int, max_frames: int) -> list[int]:
    """lmms-eval 0.5.0 `Llava_OneVision.load_video`."""
    return np.linspace(0, total - 1, max_frames, dtype=int).tolist()


def llava_prompt_ids(tokenizer: Any, context: str, instruction: str | None = None) -> list[int]:
    """LLaVA-NeXT's `conv_templates["qwen_1_5"]` (CHATML) over `<image>\\n` + the question, through
    `tokenizer_image_token`: each text chunk around `<image>` tokenized alone, the placeholder id between."""
    question = f"{instruction}\n{context}" if instruction else context
    if "<image>" not in question:
        question = "<image>" + "\n" + question
    system, separator = "<|im_start|>system\nYou are a helpful assistant.", "<|im_end|>"
    prompt = system + separator + "\n"
    prompt += "<|im_start|>user" + "\n" + question + separator + "\n"
    prompt += "<|im_start|>assistant" + "\n"
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX, *chunk]
    return ids


def llava_time_instruction(total: int, fps: float, indices: list[int], times: list[float]) -> str:
    frame_time = ",".join([f"{time:.2f}s" for time in times])
    return (
        f"The video lasts for {total / fps:.2f} seconds, and {len(indices)} frames are uniformly sampled from it. "
        f"These frames are located at {frame_time}.Please answer the following questions related to this video."
    )


def llava_pixels(frames: np.ndarray, size: int) -> torch.Tensor:
    """LLaVA-NeXT's `SigLipImageProcessor.preprocess` (transformers' resize, rescale, normalize), then `.half()`."""
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    first = ChannelDimension.FIRST
    processed = []
    for frame in frames:
        image = resize(frame, size=(size, size), resample=PILImageResampling.BICUBIC, data_format=first)
        image = rescale(image, scale=1 / 255, data_format=first)
        processed.append(normalize(image, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), data_format=first))
    return torch.tensor(np.stack(processed)).half()


# ------------------------------------------------------------------------------------------------ LLaVA tests

OV_SCRIPT = "conv_template=qwen_1_5,mm_spatial_pool_mode=bilinear,max_frames_num=32"
VIDEO_SCRIPT = ("conv_template=qwen_1_5,mm_spatial_pool_mode=average,mm_newline_position=frame,max_frames_num=64,"
                "force_sample=True,add_time_instruction=False")  # fmt: skip

LLAVA_CASES = {
    # id: (model, checkpoint, args, context, max_frames, force_sample, time instruction)
    "onevision-script": ("flashvid_llava_onevision", "llava_next", OV_SCRIPT, CONTEXT, 32, True, False),
    "onevision-hf-checkpoint": ("flashvid_llava_onevision", "llava_onevision", OV_SCRIPT, CONTEXT, 32, True, False),
    "onevision-image-in-text": ("flashvid_llava_onevision", "llava_next", "max_frames_num=8",
                                "Look: <image>\nWhich option?", 8, True, False),
    "video-script": ("flashvid_llava_video", "llava_next", VIDEO_SCRIPT, CONTEXT, 64, True, False),
    "video-time-stepped": ("flashvid_llava_video", "llava_video",
                           "max_frames_num=8,force_sample=False,add_time_instruction=True", CONTEXT, 8, False, True),
    "video-time-too-many": ("flashvid_llava_video", "llava_next",
                            "max_frames_num=4,force_sample=False,add_time_instruction=True", CONTEXT, 4, False, True),
    "video-time-forced": ("flashvid_llava_video", "llava_next", "max_frames_num=6,add_time_instruction=True",
                          CONTEXT, 6, True, True),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LLAVA_CASES))
def test_llava_feeds_the_official_prompt_frames_and_pixels(case, tiny_checkpoint, video):
    model_name, checkpoint, args, context, max_frames, force_sample, with_time = LLAVA_CASES[case]
    model = build(model_name, f"pretrained={tiny_checkpoint(checkpoint)},{args}")
    got = fed(model, context, video)

    fps = average_fps(video)
    if model_name == "flashvid_llava_onevision":
        indices, times = llava_onevision_frames(VIDEO_FRAMES, max_frames), []
    else:
        indices, times = llava_vid_frames(VIDEO_FRAMES, fps, max_frames, force_sample)
    instruction = llava_time_instruction(VIDEO_FRAMES, fps, indices, times) if with_time else None

    ids, run = collapse_run(got["input_ids"][0].tolist(), model.model.config.video_token_id)
    assert ids == llava_prompt_ids(model.tokenizer, context, instruction)
    side = model.model.config.vision_config.image_size // model.model.config.vision_config.patch_size  # 7
    if model_name == "flashvid_llava_onevision":  # every pooled token (bilinear: 4×4) and one newline
        assert run == len(indices) * math.ceil(side / 2) ** 2 + 1
    else:  # the LLaVA-Video layout: 3×3 pooled tokens and a newline per frame
        assert run == len(indices) * ((side // 2) ** 2 + 1)

    expected = llava_pixels(decode(video, indices), model.model.config.vision_config.image_size)
    pixels = got["pixel_values_videos"]
    assert pixels.dtype == torch.float16 and pixels.shape == (1, *expected.shape)
    assert torch.equal(pixels[0], expected)


def test_llava_pixels_in_float32_are_the_official_ones_before_the_half_cast(tiny_checkpoint, video):
    model = build("flashvid_llava_onevision", f"pretrained={tiny_checkpoint('llava_onevision')},max_frames_num=4,"
                  "dtype=float32")  # fmt: skip
    got = fed(model, CONTEXT, video)["pixel_values_videos"][0]
    frames = decode(video, llava_onevision_frames(VIDEO_FRAMES, 4))
    assert torch.allclose(got, llava_pixels(frames, 98).float(), atol=1e-3)  # the oracle's half cast
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    first = ChannelDimension.FIRST
    exact = np.stack([
        normalize(rescale(resize(frame, size=(98, 98), resample=PILImageResampling.BICUBIC, data_format=first),
                          scale=1 / 255, data_format=first), mean=(0.5,) * 3, std=(0.5,) * 3, data_format=first)
        for frame in frames
    ])  # fmt: skip
    assert torch.equal(got, torch.tensor(exact))


@pytest.mark.parametrize(
    ("total", "fps", "max_frames", "force"),
    [(40, 8.0, 32, True), (40, 8.0, 64, True), (40, 8.0, 8, False), (40, 8.0, 4, False), (300, 29.97, 64, False),
     (300, 29.97, 5, False), (7, 25.0, 32, False), (7, 25.0, 32, True), (1000, 30.0, 32, True), (2, 0.6, 3, False)],
)  # fmt: skip
def test_frame_indices_and_times_follow_llava_vid(total, fps, max_frames, force):
    from lmms_eval_models.models.official_llava import sample_frames

    sample = sample_frames(total, fps, max_frames, force)
    indices, times = llava_vid_frames(total, fps, max_frames, force)
    assert sample.indices == indices
    assert sample.times == times
    assert sample.video_seconds == total / fps
    if force:
        assert sample.indices == llava_onevision_frames(total, max_frames)


# --------------------------------------------------------------------------------------------- Qwen oracles


def qwen_utils_indices(total: int, fps: float) -> list[int]:
    """qwen-vl-utils 0.0.14 `fetch_video` with decord and no `nframes`: 2 frames a second, at least 4, at most
    min(768, total), an even count, `torch.linspace(0, total - 1, n).round()`."""
    count = total / fps * 2.0
    least, most = math.ceil(4 / 2) * 2, math.floor(min(768, total) / 2) * 2
    count = math.floor(min(min(max(count, least), most), total) / 2) * 2
    return torch.linspace(0, total - 1, count).round().long().tolist()


def lmms_eval_050_keep(count: int, max_num_frames: int) -> np.ndarray:
    """lmms-eval 0.5.0 (qwen2_5_vl and qwen3_vl): linspace, unique, the last frame appended if missing."""
    kept = np.unique(np.linspace(0, count - 1, max_num_frames, dtype=int))
    if count - 1 not in kept:
        kept = np.unique(np.append(kept, count - 1))
    return kept


def qwen_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize`."""
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_read(path: str, indices: list[int], factor: int) -> torch.Tensor:
    """qwen-vl-utils' frames: decord, then a bicubic antialiased resize to the `smart_resize` size, as floats."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tv_functional

    frames = torch.from_numpy(decode(path, indices)).permute(0, 3, 1, 2)
    height, width = qwen_resize(frames.shape[2], frames.shape[3], factor, 3136, 12544)
    return tv_functional.resize(frames, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True).float()


def qwen_patches(frames: torch.Tensor, mean: Any, std: Any, patch: int, temporal: int = 2, merge: int = 2) -> torch.Tensor:
    """The Qwen-VL video processors' rescale, normalise, pad to a multiple of `temporal` frames (repeating the last)
    and flatten into (grid_t·grid_h·grid_w, C·temporal·patch·patch) patches, merge-window by merge-window."""
    pixels = (frames / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    if pixels.shape[0] % temporal:
        pixels = torch.cat([pixels, pixels[-1:].expand(temporal - pixels.shape[0] % temporal, -1, -1, -1)])
    count, channels, height, width = pixels.shape
    grid_t, grid_h, grid_w = count // temporal, height // patch, width // patch
    pixels = pixels.reshape(grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    pixels = pixels.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return pixels.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)


def qwen_prompt_text(processor: Any, context: str) -> str:
    """lmms-eval 0.5.0's message (system prompt, then the video, then the text) through the checkpoint's template."""
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": context}]}]  # fmt: skip
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def qwen3_processor_sampling(count: int, video_processor: Any) -> list[int]:
    """transformers 4.57's Qwen3-VL video processor on pre-sampled frames without metadata (do_sample_frames on):
    the video is taken as 24 fps and sampled at its `fps` (2), within [min_frames, max_frames] and the frames given,
    `linspace(0, count - 1, n).round()`."""
    wanted = int(count / 24 * video_processor.fps)
    wanted = min(min(max(wanted, video_processor.min_frames), video_processor.max_frames), count)
    return np.linspace(0, count - 1, wanted).round().astype(int).tolist()


# ------------------------------------------------------------------------------------------------- Qwen tests


def test_qwen2_5_vl_feeds_the_official_prompt_frames_and_pixels(tiny_checkpoint, video):
    model = build("flashvid_qwen2_5_vl", f"pretrained={tiny_checkpoint('qwen2_5_vl')},max_num_frames=8,{QWEN_PIXELS},"
                  "dtype=float32,attn_implementation=flash_attention_2")  # fmt: skip
    got = fed(model, CONTEXT, video)

    read = qwen_utils_indices(VIDEO_FRAMES, average_fps(video))
    indices = [read[index] for index in lmms_eval_050_keep(len(read), 8)]
    frames = qwen_read(video, indices, factor=28)
    processor = model.processor.video_processor
    expected = qwen_patches(frames, processor.image_mean, processor.image_std, patch=14)
    grid = [math.ceil(len(indices) / 2), frames.shape[2] // 14, frames.shape[3] // 14]
    assert got["video_grid_thw"].tolist() == [grid]
    assert torch.allclose(got["pixel_values_videos"], expected, atol=1e-5)

    pads = grid[0] * grid[1] * grid[2] // 4
    text = qwen_prompt_text(model.processor, CONTEXT).replace("<|video_pad|>", "<|video_pad|>" * pads)
    assert got["input_ids"][0].tolist() == model.tokenizer(text).input_ids


def test_qwen3_vl_feeds_the_official_prompt_frames_and_pixels(tiny_checkpoint, video):
    model = build("flashvid_qwen3_vl", f"pretrained={tiny_checkpoint('qwen3_vl')},max_num_frames=8,{QWEN_PIXELS},"
                  "dtype=float32,attn_implementation=flash_attention_2")  # fmt: skip
    got = fed(model, CONTEXT, video)

    read = qwen_utils_indices(VIDEO_FRAMES, average_fps(video))
    presampled = [read[index] for index in lmms_eval_050_keep(len(read), 8)]
    processor = model.processor.video_processor
    chosen = qwen3_processor_sampling(len(presampled), processor)
    assert len(chosen) == 4  # of 8: the processor's own sampling, which the paper's path leaves on
    frames = qwen_read(video, [presampled[index] for index in chosen], factor=32)
    expected = qwen_patches(frames, processor.image_mean, processor.image_std, patch=16)
    grid = [2, frames.shape[2] // 16, frames.shape[3] // 16]
    assert got["video_grid_thw"].tolist() == [grid]
    assert torch.allclose(got["pixel_values_videos"], expected, atol=1e-5)

    # transformers 4.57's Qwen3-VL prompt: per temporal patch "<t seconds>" (24 fps assumed, the pair's mean time)
    # and the patch's tokens between vision markers, in place of the template's marked video token
    seconds = [(chosen[pair] / 24 + chosen[pair + 1] / 24) / 2 for pair in range(0, len(chosen), 2)]
    pads = grid[1] * grid[2] // 4
    video_text = "".join(f"<{time:.1f} seconds><|vision_start|>{'<|video_pad|>' * pads}<|vision_end|>" for time in seconds)
    text = qwen_prompt_text(model.processor, CONTEXT).replace("<|vision_start|><|video_pad|><|vision_end|>", video_text)
    assert got["input_ids"][0].tolist() == model.tokenizer(text).input_ids


def test_qwen3_vl_lmms_eval_protocol_reads_max_num_frames_with_real_times(tiny_checkpoint, video):
    """The difference the paper protocol removes: lmms-eval 0.7.3 feeds max_num_frames frames (here 8, not 4)."""
    model = build("flashvid_qwen3_vl", f"pretrained={tiny_checkpoint('qwen3_vl')},max_num_frames=8,{QWEN_PIXELS},"
                  "dtype=float32,protocol=lmms_eval")  # fmt: skip
    got = fed(model, CONTEXT, video)
    assert got["video_grid_thw"][0, 0].item() == 4  # 8 frames in temporal pairs
    expected = torch.linspace(0, VIDEO_FRAMES - 1, 8).round().long().tolist()  # qwen-vl-utils with nframes=8
    frames = qwen_read(video, expected, factor=32)
    processor = model.processor.video_processor
    assert torch.allclose(got["pixel_values_videos"], qwen_patches(frames, processor.image_mean, processor.image_std,
                                                                   patch=16), atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("count", [1, 2, 3, 7, 8, 9, 31, 32, 33, 64, 100, 767])
@pytest.mark.parametrize("max_num_frames", [1, 4, 8, 32])
def test_qwen_frame_thinning_follows_lmms_eval_050(count, max_num_frames):
    from lmms_eval_models.models.qwen3_vl import keep_frames

    assert keep_frames(count, max_num_frames).tolist() == lmms_eval_050_keep(count, max_num_frames).tolist()


def test_reasoning_answers_are_cleaned_as_lmms_eval_050():
    from lmms_eval_models.models.qwen2_5_vl import reasoning_answer

    assert reasoning_answer("thinking...<answer> B </answer>") == "B"
    assert reasoning_answer("so \\boxed{C}.") == "C"
    assert reasoning_answer("<answer>A</answer> \\boxed{C}") == "A"
    assert reasoning_answer("B. running") == "B. running"


def test_paper_protocol_refuses_keys_it_would_ignore(tmp_path):
    with pytest.raises(ValueError, match=r"fps=.*protocol=lmms_eval"):
        build("flashvid_qwen3_vl", f"pretrained={tmp_path / 'none'},fps=2")
    with pytest.raises(ValueError, match="protocol='v2' is invalid: allowed paper"):
        build("flashvid_qwen2_5_vl", f"pretrained={tmp_path / 'none'},protocol=v2")
