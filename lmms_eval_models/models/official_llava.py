"""The paper's LLaVA input path (LLaVA-NeXT's model code run by lmms-eval 0.5.0's `llava_onevision` and `llava_vid`
classes), restated so that the suite's LLaVA classes feed the LLM the same prompt, frames and pixels.

What the official path does, per video question (read from LLaVA-NeXT and the FlashVID repository's lmms-eval 0.5.0):

- frames: decord, `linspace(0, total - 1, max_frames_num)` truncated to int (llava_onevision always; llava_vid with
  `force_sample=True` or when one frame per `1/video_fps` seconds would give more than `max_frames_num`); otherwise
  one frame every `round(average_fps / video_fps)` frames (`sample_frames`).
- pixels: each frame resized to the vision tower's square input with PIL bicubic, scaled by 1/255, normalised with
  mean 0.5 and std 0.5 (LLaVA-NeXT's SigLIP processor fixes them, whatever the checkpoint's processor says), then cast
  to float16 (`preprocess_frames`).
- prompt: `<image>\\n` before the task's text unless the text already holds `<image>`, with llava_vid's time
  instruction in front of the text when `add_time_instruction` is on, rendered with LLaVA-NeXT's `qwen_1_5`
  conversation (`qwen_1_5_prompt`); each chunk around `<image>` is tokenized on its own and the video's tokens go
  where `<image>` was (`tokenize_with_video`).
- layout: `mm_spatial_pool_mode` (bilinear: ceil(h/2) x ceil(w/2); average: 2x2 average pooling) and
  `mm_newline_position` (one_token: one newline embedding after the video; frame: one after each frame) — the
  suite's patch implements (bilinear, one_token) and (average, frame), the official scripts' two settings
  (`LlavaNextSettings.video_layout`).

Everything here is a pure function of its arguments, so the equivalence tests can check each rule on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flashvid_core.values import parse_text
from lmms_eval_models.models.common import parse_bool

IMAGE_PLACEHOLDER = "<image>"

# LLaVA-NeXT's `qwen_1_5` conversation: ChatML with a fixed system turn; the assistant turn is left open.
QWEN_1_5_SYSTEM = "<|im_start|>system\nYou are a helpful assistant."
QWEN_1_5_SEPARATOR = "<|im_end|>"
QWEN_1_5_ROLES = ("<|im_start|>user", "<|im_start|>assistant")

# conv_template values: LLaVA-NeXT's conversation, or "hf": the checkpoint's (or `chat_template`'s) Jinja template.
CONV_TEMPLATES = ("qwen_1_5", "hf")
# (mm_spatial_pool_mode, mm_newline_position) -> the patch's video layout (lmms_eval_models.patches.llava_onevision)
VIDEO_LAYOUTS = {("bilinear", "one_token"): "onevision", ("average", "frame"): "llava_video"}
POOL_MODES = ("bilinear", "average")
NEWLINE_POSITIONS = ("one_token", "frame")
# LLaVA-NeXT's values we cannot honour yet, and why (named in the error).
_UNSUPPORTED_POOL_MODES = {"max": "2x2 max pooling"}
_UNSUPPORTED_NEWLINE_POSITIONS = {"grid": "a newline after each row of each frame", "no_token": "no newline at all"}

# Model-name substrings that make LLaVA-NeXT's loader pick another language model before it reaches "qwen"
# (llava/model/builder.py tests them in this order), and those that pick Qwen's mixture-of-experts variant.
_LOADERS_BEFORE_QWEN = ("mixtral", "mistral", "zephyr", "llama", "yi", "nous-hermes", "llava-v1.6-34b", "llava-v1.5")
_QWEN_MOE_MARKERS = ("moe", "a14b")


@dataclass(frozen=True)
class LlavaNextSettings:
    """The official LLaVA model_args the suite's LLaVA classes take, validated.

    conv_template: "qwen_1_5" (LLaVA-NeXT's conversation, the official scripts') or "hf" (a Jinja chat template).
    model_name: LLaVA-NeXT's loader switch; only names that select its Qwen2 loader are accepted (None: not given).
    mm_spatial_pool_mode, mm_newline_position: the video layout, see `video_layout`.
    mm_spatial_pool_stride: 2 only (LLaVA-NeXT's video path pools with stride 2 whatever this key says).
    force_sample, video_fps, max_frames_num: frame sampling (`sample_frames`).
    add_time_instruction: llava_vid's sentence on the video's length and frame times before the question.
    """

    conv_template: str = "qwen_1_5"
    model_name: str | None = None
    mm_spatial_pool_mode: str = "bilinear"
    mm_spatial_pool_stride: int = 2
    mm_newline_position: str = "one_token"
    force_sample: bool = True
    add_time_instruction: bool = False
    max_frames_num: int = 32
    video_fps: int = 1

    @classmethod
    def from_model_args(cls, values: Mapping[str, Any]) -> LlavaNextSettings:
        """Parse and validate (strings as lmms-eval passes them, or typed values); ValueError naming the key."""
        conv_template = str(values.get("conv_template", cls.conv_template))
        if conv_template not in CONV_TEMPLATES:
            raise ValueError(
                f"conv_template={conv_template!r} is not supported: allowed {', '.join(CONV_TEMPLATES)} "
                "(qwen_1_5: LLaVA-NeXT's conversation for the Qwen2 LLaVA models; hf: the checkpoint's or "
                "chat_template's Jinja template)"
            )
        model_name = values.get("model_name")
        if model_name is not None:
            check_model_name(str(model_name))
        pool_mode = str(values.get("mm_spatial_pool_mode", cls.mm_spatial_pool_mode))
        newline = str(values.get("mm_newline_position", cls.mm_newline_position))
        _check_layout(pool_mode, newline)
        stride = _positive_int("mm_spatial_pool_stride", values.get("mm_spatial_pool_stride", 2))
        if stride != 2:
            raise ValueError(
                f"mm_spatial_pool_stride={stride} is not supported: allowed 2 (LLaVA-NeXT's video path pools with "
                "stride 2 whatever this key says, and so do the suite's layouts)"
            )
        return cls(
            conv_template=conv_template,
            model_name=None if model_name is None else str(model_name),
            mm_spatial_pool_mode=pool_mode,
            mm_spatial_pool_stride=stride,
            mm_newline_position=newline,
            force_sample=parse_bool("force_sample", values.get("force_sample", cls.force_sample)),
            add_time_instruction=parse_bool(
                "add_time_instruction", values.get("add_time_instruction", cls.add_time_instruction)
            ),
            max_frames_num=_positive_int("max_frames_num", values.get("max_frames_num", cls.max_frames_num)),
            video_fps=_positive_int("video_fps", values.get("video_fps", cls.video_fps)),
        )

    @property
    def video_layout(self) -> str:
        """The patch's layout for (mm_spatial_pool_mode, mm_newline_position): "onevision" or "llava_video"."""
        return VIDEO_LAYOUTS[self.mm_spatial_pool_mode, self.mm_newline_position]


def _positive_int(key: str, value: Any) -> int:
    number = parse_text(key, value, int)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"{key}={value!r} is invalid: expected an integer >= 1")
    return number


def _check_layout(pool_mode: str, newline: str) -> None:
    if pool_mode in _UNSUPPORTED_POOL_MODES or pool_mode not in POOL_MODES:
        why = f" ({_UNSUPPORTED_POOL_MODES[pool_mode]} is not implemented)" if pool_mode in _UNSUPPORTED_POOL_MODES else ""
        raise ValueError(f"mm_spatial_pool_mode={pool_mode!r} is not supported{why}: allowed {', '.join(POOL_MODES)}")
    if newline not in NEWLINE_POSITIONS:
        why = (
            f" ({_UNSUPPORTED_NEWLINE_POSITIONS[newline]} is not implemented)"
            if newline in _UNSUPPORTED_NEWLINE_POSITIONS
            else ""
        )
        raise ValueError(
            f"mm_newline_position={newline!r} is not supported{why}: allowed {', '.join(NEWLINE_POSITIONS)}"
        )
    if (pool_mode, newline) not in VIDEO_LAYOUTS:
        allowed = "; ".join(f"mm_spatial_pool_mode={p} with mm_newline_position={n}" for p, n in VIDEO_LAYOUTS)
        raise ValueError(
            f"mm_spatial_pool_mode={pool_mode} with mm_newline_position={newline} is not supported: allowed {allowed} "
            "(the official LLaVA-OneVision and LLaVA-Video settings)"
        )


def check_model_name(model_name: str) -> None:
    """Refuse a `model_name` that would make LLaVA-NeXT's loader build anything but its LLaVA-Qwen2 model."""
    name = model_name.lower()
    other = next((marker for marker in _LOADERS_BEFORE_QWEN if marker in name), None)
    if other is not None or not ("qwen" in name or "quyen" in name):
        reason = f"it contains {other!r}, which" if other else "without 'qwen' in it,"
        raise ValueError(
            f"model_name={model_name!r} is not supported: {reason} selects another LLaVA-NeXT loader than the "
            "LLaVA-Qwen2 one this suite runs; give a name containing 'qwen' (e.g. llava_qwen) or leave it out"
        )
    if any(marker in name for marker in _QWEN_MOE_MARKERS):
        raise ValueError(
            f"model_name={model_name!r} is not supported: it selects LLaVA-NeXT's Qwen mixture-of-experts loader; "
            "the suite runs the dense LLaVA-Qwen2 models"
        )


# ------------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameSample:
    """Which frames the official path decodes: indices (F,), each frame's time in seconds as llava_vid states it
    in its time instruction, and the video's length in seconds."""

    indices: list[int]
    times: list[float]
    video_seconds: float


def sample_frames(
    total_frames: int, average_fps: float, max_frames_num: int, force_sample: bool, video_fps: int = 1
) -> FrameSample:
    """llava_vid's frame choice (llava_onevision's is the `force_sample=True` case).

    One frame every round(average_fps / video_fps) frames from frame 0; if that gives more than max_frames_num
    frames, or with force_sample, instead linspace(0, total - 1, max_frames_num) truncated to int (repeats when the
    video is shorter than max_frames_num). Times: index / average_fps for the uniform choice, and index / step for
    the stepped one (llava_vid divides by the step, not the frame rate).
    """
    if total_frames < 1:
        raise ValueError("the video has no frames")
    step = max(1, round(average_fps / video_fps))  # the official code divides by zero below 0.5 fps; we use 1
    indices = list(range(0, total_frames, step))
    times = [index / step for index in indices]
    if len(indices) > max_frames_num or force_sample:
        indices = np.linspace(0, total_frames - 1, max_frames_num, dtype=int).tolist()
        times = [index / average_fps for index in indices]
    return FrameSample(indices=indices, times=times, video_seconds=total_frames / average_fps)


def time_instruction(sample: FrameSample) -> str:
    """llava_vid's time instruction (its wording and number formats, without a space before "Please")."""
    frame_times = ",".join(f"{time:.2f}s" for time in sample.times)
    return (
        f"The video lasts for {sample.video_seconds:.2f} seconds, and {len(sample.indices)} frames are uniformly "
        f"sampled from it. These frames are located at {frame_times}.Please answer the following questions related "
        "to this video."
    )


def preprocess_frames(
    frames: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """LLaVA-NeXT's SigLIP preprocessing: frames (F, H, W, 3) uint8 -> (F, 3, size, size) float32.

    PIL bicubic resize of each uint8 frame to size x size, then x / 255 (computed in float64, stored float32), then
    (x - mean) / std per channel in float32. The official path casts the result to float16 before the model.
    """
    from PIL import Image

    # PIL resizes one image at a time; everything after it is batched
    resized = np.stack([np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC)) for frame in frames])
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean_array = np.asarray(mean, dtype=np.float32)
    std_array = np.asarray(std, dtype=np.float32)
    return ((scaled - mean_array) / std_array).transpose(0, 3, 1, 2)


def read_video_frames(path: str, sample_rule: Any) -> tuple[np.ndarray, FrameSample]:
    """Decode a video with decord (as the official classes do) and pick its frames with `sample_rule`.

    sample_rule(total_frames, average_fps) -> FrameSample. Returns the frames (F, H, W, 3) uint8 and the sample.
    """
    from decord import VideoReader, cpu

    reader = VideoReader(path, ctx=cpu(0), num_threads=1)
    sample = sample_rule(len(reader), float(reader.get_avg_fps()))
    return reader.get_batch(sample.indices).asnumpy(), sample


# ------------------------------------------------------------------------------------------------- prompt


def question_with_video(context: str, instruction: str | None = None) -> str:
    """The user turn: the time instruction (if any) and a newline before the text, `<image>\\n` in front unless the
    text already places `<image>` itself."""
    if instruction is not None:
        context = f"{instruction}\n{context}"
    return context if IMAGE_PLACEHOLDER in context else f"{IMAGE_PLACEHOLDER}\n{context}"


def qwen_1_5_prompt(question: str) -> str:
    """LLaVA-NeXT's `qwen_1_5` conversation with one user turn and the assistant's turn opened."""
    system = QWEN_1_5_SYSTEM + QWEN_1_5_SEPARATOR + "\n"
    user, assistant = QWEN_1_5_ROLES
    # ChatML in LLaVA-NeXT treats an empty message as "no message": the role line alone
    turn = f"{user}\n{question}{QWEN_1_5_SEPARATOR}\n" if question else f"{user}\n"
    return f"{system}{turn}{assistant}\n"


def tokenize_with_video(
    prompt: str, tokenizer: Any, marker: str, video_token_id: int, num_video_tokens: int
) -> list[int]:
    """Token ids of `prompt` with its one `marker` replaced by `num_video_tokens` video placeholders.

    As LLaVA-NeXT's `tokenizer_image_token`: the text on either side of the marker is tokenized on its own (with the
    tokenizer's special tokens); a beginning-of-sequence token, if the tokenizer adds one, is kept once at the start.
    """
    chunks = prompt.split(marker)
    if len(chunks) != 2:
        raise ValueError(
            f"the prompt must hold exactly one {marker!r} for the video, found {len(chunks) - 1}: {prompt!r}"
        )
    first, second = (list(tokenizer(chunk).input_ids) for chunk in chunks)
    bos = tokenizer.bos_token_id
    if bos is not None and first and first[0] == bos:
        first = first[1:]
        second = second[1:] if second and second[0] == bos else second
        return [bos, *first, *([video_token_id] * num_video_tokens), *second]
    return [*first, *([video_token_id] * num_video_tokens), *second]


def video_token_count(num_frames: int, patches_per_side: int, video_layout: str) -> int:
    """How many placeholders the video takes: transformers' count for the OneVision layout (every pooled token and one
    newline), and every pooled token plus one newline per frame for the LLaVA-Video layout."""
    if video_layout == "llava_video":
        return num_frames * (patches_per_side // 2) ** 2 + num_frames
    return num_frames * math.ceil(patches_per_side / 2) ** 2 + 1
