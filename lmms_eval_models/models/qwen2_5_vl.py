"""`flashvid_qwen2_5_vl`: lmms-eval's own `qwen2_5_vl` (simple) class with FlashVID applied after loading.

lmms-eval 0.7.3's video path for this class is the one of lmms-eval 0.5.0 (the paper's): qwen-vl-utils reads the video
at 2 fps, at most `max_num_frames` of those frames are kept (linspace, duplicates dropped, the last frame kept), and
the processor resizes and patches them. The one difference, the answer's clean-up, follows `protocol`:

- `protocol=paper` (default): as lmms-eval 0.5.0, an answer holding `<answer>…</answer>` or `\\boxed{…}` is cut to
  its content (`reasoning_answer`);
- `protocol=lmms_eval`: the answer as lmms-eval 0.7.3 returns it.

With a visual store attached (a sweep group, `FlashVIDModel.attach_visual_store`), a request about one video goes
through `generate_with_store`, the base class's steps for one request with the video's decoding and processing
in one replaceable step (`QwenStoreCalls`): on a hit, the processor expands the prompt from the recorded video
processor output (no decoding) and the prefill takes the stored features.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

from lmms_eval_models.models.common import FlashVIDModel, resolve_attn_implementation, resolve_dtype
from lmms_eval_models.models.visual_store import (
    VIDEO_STAND_IN,
    RecordingVideoProcessor,
    ReplayVideoProcessor,
    from_json_tensor,
    from_jsonable,
    json_tensor,
    processor_with,
    settings_digest,
    to_jsonable,
)
from lmms_eval_models.patches.prefill import supplying_video

PROTOCOLS = ("paper", "lmms_eval")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov")  # what lmms-eval's Qwen2.5-VL class (and 0.5.0's Qwen3-VL) reads as a video
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{\s*(.*?)\s*\}", re.DOTALL)


def reasoning_answer(answer: str) -> str:
    """lmms-eval 0.5.0's answer clean-up for the Qwen classes: the text inside the first `<answer>` tags, else
    inside the first `\\boxed{}`, else the answer unchanged."""
    match = _ANSWER_TAG.search(answer) or _BOXED.search(answer)
    return match.group(1) if match else answer


def check_protocol(settings: dict[str, Any]) -> str:
    protocol = settings.get("protocol", "paper")
    if protocol not in PROTOCOLS:
        raise ValueError(
            f"protocol={protocol!r} is invalid: allowed paper (lmms-eval 0.5.0's rules, as the official scripts ran) "
            "or lmms_eval (the installed lmms-eval's)"
        )
    return protocol


@dataclass(frozen=True)
class QwenVideoRequest:
    """One request about one video, all but the video's decoding: the processor's texts, the chat messages (from
    which qwen-vl-utils reads the video) and the processor call's own keyword arguments."""

    texts: list[str]
    messages: list[Any]
    processor_kwargs: dict[str, Any]


class QwenStoreCalls:
    """The Qwen classes' calls with a visual store: the processor's video processor recorded on a miss and
    replayed on a hit (then the processor expands the prompt from the recording, without the video)."""

    processor: Any

    def _decode_video(self, request: QwenVideoRequest) -> tuple[Any, Any, dict[str, Any]]:
        """(images, videos, processor keyword arguments read from the video) of the request's messages."""
        raise NotImplementedError

    def _decoded_call(self, request: QwenVideoRequest) -> tuple[Any, dict[str, torch.Tensor]]:
        image_inputs, video_inputs, decoded_kwargs = self._decode_video(request)
        recorder = RecordingVideoProcessor(self.processor.video_processor)
        call = processor_with(self.processor, recorder)(text=request.texts, images=image_inputs, videos=video_inputs,
                                                        **decoded_kwargs, **request.processor_kwargs)  # fmt: skip
        record = {} if recorder.recorded is None else {"video_processor": recorder.recorded}
        try:
            record["decoded_kwargs"] = json_tensor(to_jsonable(decoded_kwargs))
        except TypeError:  # not recordable: the call is not stored (`_video_call` finds it cannot be rebuilt)
            record.pop("video_processor", None)
        return call, record

    def _recorded_call(self, request: QwenVideoRequest, record: dict[str, torch.Tensor]) -> Any:
        if "video_processor" not in record or "decoded_kwargs" not in record:
            return {}
        replay = ReplayVideoProcessor(self.processor.video_processor, record["video_processor"])
        decoded_kwargs = from_jsonable(from_json_tensor(record["decoded_kwargs"]))
        return processor_with(self.processor, replay)(text=request.texts, videos=[VIDEO_STAND_IN.clone()],
                                                      **decoded_kwargs, **request.processor_kwargs)  # fmt: skip


def stored_video_path(model: Any, request: Instance, is_video: Callable[[Any], bool]) -> str | None:
    """The request's one video (by the base class's own test `is_video`) when a store is attached and the request
    has no other visual; None otherwise (the request then takes the base class's path)."""
    if model.visual_store is None:
        return None
    _context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
    visuals = list(doc_to_visual(model.task_dict[task][split][doc_id]) or [])
    return visuals[0] if len(visuals) == 1 and is_video(visuals[0]) else None


def is_video_file(visual: Any) -> bool:
    """lmms-eval's Qwen2.5-VL class's (and 0.5.0's Qwen3-VL class's) test for a video: a path ending in .mp4, .avi
    or .mov (case-sensitive)."""
    return isinstance(visual, str) and visual.endswith(VIDEO_EXTENSIONS)


def stop_strings(gen_kwargs: dict[str, Any], end_of_text: str) -> list[str]:
    """lmms-eval's Qwen stop strings: the task's `until` (default the end-of-text token), without a blank line."""
    until = gen_kwargs.get("until", [end_of_text])
    if isinstance(until, str):
        until = [until]
    elif not isinstance(until, list):
        raise ValueError(f"Expected `gen_kwargs['until']` to be of type Union[str, list], but got {type(until)}")
    return [term for term in until if term != "\n\n"]


def cut_at_stop_strings(answer: str, until: list[str]) -> str:
    for term in until:
        if term:
            answer = answer.split(term)[0]
    return answer


def keep_frames(total_frames: int, max_num_frames: int) -> np.ndarray:
    """lmms-eval's choice among the frames qwen-vl-utils read: linspace(0, total - 1, max_num_frames) truncated,
    duplicates dropped, the last frame appended if missing (sorted, unique)."""
    indices = np.unique(np.linspace(0, total_frames - 1, max_num_frames, dtype=int))
    if total_frames - 1 not in indices:
        indices = np.unique(np.append(indices, total_frames - 1))
    return indices


def messages_with(messages: list[Any], update: Any) -> list[Any]:
    """A copy of chat messages with `update(part)` applied to each content part (the originals are untouched)."""
    copied = copy.deepcopy(messages)
    for conversation in copied:
        for turn in conversation:
            if isinstance(turn.get("content"), list):
                for part in turn["content"]:
                    update(part)
    return copied


class FlashVIDQwen2_5_VL(QwenStoreCalls, FlashVIDModel, Qwen2_5_VL):
    """Qwen2.5-VL through lmms-eval's prompting, qwen-vl-utils video loading and frame sampling.

    Keys: the base class's (pretrained, max_num_frames, min_pixels, max_pixels, fps, system_prompt, ...), `dtype`
    (default bfloat16, as the base class hard-codes), `protocol`, `enable_flashvid`, `method`, the FlashVID keys and
    the baseline keys (docs/baselines.md).
    """

    model_name = "flashvid_qwen2_5_vl"
    base_class = Qwen2_5_VL
    suite_defaults: ClassVar[dict[str, Any]] = {"dtype": "bfloat16", "device": None, "device_map": None}
    extra_keys: ClassVar[dict[str, Any]] = {"protocol": "paper"}

    def _check_settings(self, settings: dict[str, Any]) -> None:
        super()._check_settings(settings)
        self.protocol = check_protocol(settings)

    def _load(self, settings: dict[str, Any]) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        load_qwen_common(self, settings)
        load_qwen_weights(self, settings, Qwen2_5_VLForConditionalGeneration)

    def _generate_one(self, request: Instance) -> str:
        path = stored_video_path(self, request, is_video_file)
        if path is None or self.interleave_visuals:
            with self._inner_call():
                answer = Qwen2_5_VL.generate_until(self, [request])[0]
        else:
            answer = self._generate_with_store(request, path)
        return reasoning_answer(answer) if self.protocol == "paper" else answer

    def _generate_with_store(self, request: Instance, video_path: str) -> str:
        """lmms-eval's `Qwen2_5_VL.generate_until` for one request about one video (batch size 1), its video
        decoding and processing done by `_video_call` (served from the store on a hit)."""
        context, gen_kwargs = request.args[0], request.args[1]
        until = stop_strings(gen_kwargs, self.tokenizer.decode(self.eot_token_id))
        context = context.replace("<image>", "")
        if self.reasoning_prompt:
            context = context.strip() + self.reasoning_prompt
        video = {"type": "video", "video": video_path, "max_pixels": self.max_pixels, "min_pixels": self.min_pixels}
        messages = [[{"role": "system", "content": self.system_prompt},
                     {"role": "user", "content": [video, {"type": "text", "text": context}]}]]  # fmt: skip
        texts = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        video_request = QwenVideoRequest(texts, messages,
                                         {"padding": True, "padding_side": "right", "return_tensors": "pt"})
        inputs, supply = self._video_call(video_request, video_path)
        inputs = inputs.to("cuda" if self.device_map == "auto" else self.device)
        settings = {"max_new_tokens": 32768, "temperature": 0.0, "top_p": None, "num_beams": 1, **gen_kwargs}
        sampling = settings["temperature"] > 0
        with supplying_video(supply):
            output = self.model.generate(
                **inputs, eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                do_sample=sampling, temperature=settings["temperature"] if sampling else None,
                top_p=settings["top_p"] if sampling else None, num_beams=settings["num_beams"],
                max_new_tokens=settings["max_new_tokens"], use_cache=self.use_cache,
            )  # fmt: skip
        answer = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)[0]  # fmt: skip
        answer = cut_at_stop_strings(answer, until)
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answer

    def _decode_video(self, request: QwenVideoRequest) -> tuple[Any, Any, dict[str, Any]]:
        """lmms-eval's decoding: qwen-vl-utils reads the video, then at most `max_num_frames` of its frames."""
        from qwen_vl_utils import process_vision_info

        image_inputs, video_inputs = process_vision_info(request.messages)
        if video_inputs is not None:
            video_inputs[0] = video_inputs[0][keep_frames(video_inputs[0].shape[0], self.max_num_frames)]
        return image_inputs, video_inputs, {}

    def visual_settings(self) -> dict[str, Any]:
        return {"max_num_frames": self.max_num_frames, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
                "video_processor": settings_digest(self.processor.video_processor)}  # fmt: skip


def load_qwen_common(model: Any, settings: dict[str, Any]) -> None:
    """The attributes lmms-eval's Qwen classes read in `generate_until`, set from the validated settings."""
    model._setup_processes(settings.get("device"))
    # device_map="auto" (one process) spreads the model over the GPUs; otherwise the model sits on our device.
    model.device_map = (
        "auto" if settings.get("device_map") == "auto" and model._world_size == 1 else str(model._device)
    )
    model.attn_implementation = resolve_attn_implementation(settings.get("attn_implementation"), model._device)
    model.max_pixels = settings["max_pixels"]
    model.min_pixels = settings["min_pixels"]
    model.max_num_frames = settings["max_num_frames"]
    model.fps = settings["fps"]
    reasoning = settings.get("reasoning_prompt")
    model.reasoning_prompt = reasoning.replace("\\n", "\n") if reasoning else None
    model.system_prompt = settings["system_prompt"]
    model.interleave_visuals = settings["interleave_visuals"]
    model._max_length = 2048
    model.batch_size_per_gpu = int(settings["batch_size"])
    model.use_cache = settings["use_cache"]


def load_qwen_weights(model: Any, settings: dict[str, Any], model_class: type) -> None:
    """The checkpoint (`model_class.from_pretrained`), its processor and tokenizer, as lmms-eval's classes hold them."""
    from transformers import AutoProcessor, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": resolve_dtype(settings["dtype"]), "device_map": model.device_map}
    if model.attn_implementation is not None:
        kwargs["attn_implementation"] = model.attn_implementation
    model._model = model_class.from_pretrained(settings["pretrained"], **kwargs).eval()
    model.processor = AutoProcessor.from_pretrained(
        settings["pretrained"], max_pixels=settings["max_pixels"], min_pixels=settings["min_pixels"]
    )
    model._tokenizer = AutoTokenizer.from_pretrained(settings["pretrained"])
    model._config = model._model.config
