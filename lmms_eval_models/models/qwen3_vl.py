"""`flashvid_qwen3_vl`: lmms-eval's own `qwen3_vl` (simple) class with FlashVID applied after loading.

lmms-eval changed this class's video path between 0.5.0 (the paper's, run by the official scripts) and 0.7.3;
`protocol` picks one:

- `protocol=paper` (default), lmms-eval 0.5.0's: qwen-vl-utils reads the video at 2 fps (within `min_pixels` /
  `max_pixels`), at most `max_num_frames` of those frames are kept (linspace, duplicates dropped, the last kept),
  and the processor gets them without video metadata. The Qwen3-VL processor then samples frames itself (its
  `do_sample_frames`, on in the released checkpoints, at 2 fps of an assumed 24 fps video: 4 of 32 frames) and
  writes timestamps from 24 fps. The answer is cleaned as 0.5.0 does (`reasoning_answer`). `fps`, `total_pixels`,
  `enable_thinking` and `interleave_visuals`, which 0.5.0 does not read, are refused.
- `protocol=lmms_eval`: lmms-eval 0.7.3's (`max_num_frames` frames read directly, the real timestamps, no
  resampling by the processor).

On transformers 5, whose Qwen3-VL processor wraps each frame in vision markers inside the template's own pair, the
template's pair around the video is dropped first, so the paper protocol's prompt is transformers 4.57's.

With a visual store attached (a sweep group), a request about one video takes the protocol's steps for one request
with its decoding and processing in one replaceable step, as `qwen2_5_vl.QwenStoreCalls` describes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL, _is_video_path

from lmms_eval_models.models.common import FlashVIDModel
from lmms_eval_models.models.qwen2_5_vl import (
    QwenStoreCalls,
    QwenVideoRequest,
    check_protocol,
    cut_at_stop_strings,
    is_video_file,
    keep_frames,
    load_qwen_common,
    load_qwen_weights,
    messages_with,
    reasoning_answer,
    stop_strings,
    stored_video_path,
)
from lmms_eval_models.models.visual_store import settings_digest
from lmms_eval_models.patches.prefill import supplying_video

__all__ = ["FlashVIDQwen3_VL", "keep_frames"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov")  # what lmms-eval 0.5.0's class treats as a video file
# keys of lmms-eval 0.7.3's class that 0.5.0's does not read, with their "not given" values
_LMMS_EVAL_ONLY_KEYS = {"fps": None, "total_pixels": None, "enable_thinking": None, "interleave_visuals": False}


class FlashVIDQwen3_VL(QwenStoreCalls, FlashVIDModel, Qwen3_VL):
    """Qwen3-VL through lmms-eval's prompting and qwen-vl-utils video loading, under the chosen `protocol`.

    Keys: the base class's (pretrained, max_num_frames, min_pixels, max_pixels, total_pixels, fps, ...), `dtype`
    (default bfloat16, as the base class hard-codes), `protocol`, `enable_flashvid`, `method`, the FlashVID keys and
    the baseline keys (docs/baselines.md).
    """

    model_name = "flashvid_qwen3_vl"
    base_class = Qwen3_VL
    suite_defaults: ClassVar[dict[str, Any]] = {"dtype": "bfloat16", "device": None, "device_map": None}
    extra_keys: ClassVar[dict[str, Any]] = {"protocol": "paper"}

    def _check_settings(self, settings: dict[str, Any]) -> None:
        super()._check_settings(settings)
        self.protocol = check_protocol(settings)
        if self.protocol == "paper":
            for key, unset in _LMMS_EVAL_ONLY_KEYS.items():
                if settings.get(key) not in (unset, None, "None", "False", False):
                    raise ValueError(
                        f"{key}={settings[key]!r} is read by lmms-eval 0.7.3's qwen3_vl only, not by the paper's "
                        "0.5.0 one: pass protocol=lmms_eval with it, or leave it out"
                    )

    def _load(self, settings: dict[str, Any]) -> None:
        from transformers import Qwen3VLForConditionalGeneration

        load_qwen_common(self, settings)
        self.total_pixels = settings["total_pixels"]
        self.enable_thinking = settings["enable_thinking"]
        load_qwen_weights(self, settings, Qwen3VLForConditionalGeneration)

    def _generate_one(self, request: Instance) -> str:
        is_video = is_video_file if self.protocol == "paper" else _is_video_path
        path = stored_video_path(self, request, is_video)
        if path is None or self.interleave_visuals:
            with self._inner_call():
                return Qwen3_VL.generate_until(self, [request])[0]
        return self._generate_with_store(request, path)

    def _generate_with_store(self, request: Instance, video_path: str) -> str:
        """lmms-eval's `Qwen3_VL.generate_until` for one request about one video (batch size 1), its video decoding
        and processing done by `_video_call` (served from the store on a hit)."""
        chunk = [request.args]
        build = self._paper_request if self.protocol == "paper" else self._lmms_eval_request
        video_request, contexts, gen_kwargs, until = build(chunk)
        inputs, supply = self._video_call(video_request, video_path)
        inputs = inputs.to("cuda" if self.device_map == "auto" else self.device)
        with supplying_video(supply):
            output = self.model.generate(**inputs, **self._build_generate_kwargs(gen_kwargs))
        answer = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)[0]  # fmt: skip
        answer = self._strip_thinking(cut_at_stop_strings(answer, until))
        self.cache_hook.add_partial("generate_until", (contexts[0], gen_kwargs), answer)
        return answer

    def visual_settings(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "max_num_frames": self.max_num_frames, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "total_pixels": self.total_pixels, "fps": self.fps,
                "video_processor": settings_digest(self.processor.video_processor)}  # fmt: skip

    # ----------------------------------------------------------------------------- the paper's protocol

    def _strip_thinking(self, answer: str) -> str:
        if self.protocol == "paper":
            return reasoning_answer(answer)
        return Qwen3_VL._strip_thinking(self, answer)

    def _preprocess_chunk(self, chunk: Any) -> tuple[Any, list[str], dict[str, Any], list[str]]:
        """lmms-eval 0.7.3's preprocessing step (messages, video decoding, tokenization), under `protocol`."""
        if self.protocol != "paper":
            return Qwen3_VL._preprocess_chunk(self, chunk)
        request, contexts, gen_kwargs, until = self._paper_request(chunk)
        image_inputs, video_inputs, decoded_kwargs = self._decode_video(request)
        inputs = self.processor(text=request.texts, images=image_inputs, videos=video_inputs, **decoded_kwargs,
                                **request.processor_kwargs)  # fmt: skip
        return inputs, contexts, gen_kwargs, until

    def _unpack_chunk(self, chunk: Any) -> tuple[list[str], dict[str, Any], list[str], list[list[Any]]]:
        """A chunk of lmms-eval requests as (contexts without `<image>`, gen_kwargs, stop strings, each request's
        visuals), as lmms-eval's Qwen3-VL class reads them."""
        contexts, all_gen_kwargs, doc_to_visual, doc_id, task, split = zip(*chunk)
        gen_kwargs = all_gen_kwargs[0]
        until = stop_strings(gen_kwargs, self.tokenizer.decode(self.eot_token_id))
        contexts = [context.replace("<image>", "") for context in contexts]
        if self.reasoning_prompt:
            contexts = [context.strip() + self.reasoning_prompt for context in contexts]
        visuals = [to_visual(self.task_dict[task_name][split_name][doc]) or []
                   for to_visual, doc, task_name, split_name in zip(doc_to_visual, doc_id, task, split)]  # fmt: skip
        return contexts, gen_kwargs, until, visuals

    def _paper_request(self, chunk: Any) -> tuple[QwenVideoRequest, list[str], dict[str, Any], list[str]]:
        """lmms-eval 0.5.0's messages and prompt texts for a chunk of requests, before any video is read."""
        contexts, gen_kwargs, until, visuals_per_request = self._unpack_chunk(chunk)
        messages = []
        for context, visuals in zip(contexts, visuals_per_request):
            messages.append([
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": [*self._visual_parts(visuals), {"type": "text", "text": context}]},
            ])  # fmt: skip
        texts = [self.video_prompt(text) for text in
                 self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]  # fmt: skip
        padding = {"padding": True, "padding_side": "left"} if self.batch_size > 1 else {}
        request = QwenVideoRequest(texts, messages, {"do_resize": False, "return_tensors": "pt", **padding})
        return request, contexts, gen_kwargs, until

    def _decode_video(self, request: QwenVideoRequest) -> tuple[Any, Any, dict[str, Any]]:
        """The protocol's decoding: (images, videos, the processor keyword arguments read from the videos)."""
        from qwen_vl_utils import process_vision_info

        if self.protocol == "paper":  # lmms-eval 0.5.0: 2 fps without metadata, the first video thinned
            image_inputs, video_inputs = process_vision_info(
                request.messages, return_video_kwargs=False, image_patch_size=16, return_video_metadata=False
            )
            if video_inputs is not None:
                video_inputs[0] = video_inputs[0][keep_frames(video_inputs[0].shape[0], self.max_num_frames)]
            return image_inputs, video_inputs, {}
        messages = messages_with(request.messages, self._cap_frames)
        image_inputs, videos, video_kwargs = process_vision_info(
            messages, return_video_kwargs=True, image_patch_size=16, return_video_metadata=True
        )
        if videos is None:
            return image_inputs, None, {"video_metadata": None, **video_kwargs}
        video_inputs, metadata = map(list, zip(*videos))
        return image_inputs, video_inputs, {"video_metadata": metadata, **video_kwargs}

    def _lmms_eval_request(self, chunk: Any) -> tuple[QwenVideoRequest, list[str], dict[str, Any], list[str]]:
        """lmms-eval 0.7.3's messages and prompt texts for one request about one video, before the video is read
        (its cap of `nframes` at the video's length is applied when decoding: `_cap_frames`)."""
        contexts, gen_kwargs, until, visuals_per_request = self._unpack_chunk(chunk)
        video_kwargs = self._build_video_kwargs()
        messages = []
        for context, visuals in zip(contexts, visuals_per_request):
            parts = [{"type": "video", "video": visual, **video_kwargs} for visual in visuals if _is_video_path(visual)]
            messages.append([
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": [*parts, {"type": "text", "text": context}]},
            ])  # fmt: skip
        texts = self._apply_chat_template(messages)
        request = QwenVideoRequest(texts, messages, {"do_resize": False, "return_tensors": "pt"})
        return request, contexts, gen_kwargs, until

    @staticmethod
    def _cap_frames(part: dict[str, Any]) -> None:
        """lmms-eval 0.7.3 caps a video's `nframes` at its frame count (decord reads the count)."""
        if part.get("type") == "video" and "nframes" in part:
            import decord

            part["nframes"] = min(part["nframes"], len(decord.VideoReader(part["video"])))

    def _visual_parts(self, visuals: list[Any]) -> list[dict[str, Any]]:
        pixels = {"max_pixels": self.max_pixels, "min_pixels": self.min_pixels}
        parts = []
        for visual in visuals:
            if isinstance(visual, str) and visual.endswith(VIDEO_EXTENSIONS):
                parts.append({"type": "video", "video": visual, **pixels})
            elif not isinstance(visual, str):
                parts.append({"type": "image", "image": visual, **pixels})
        return parts

    def video_prompt(self, text: str) -> str:
        """The chat template's text as transformers 4.57's processor expands it: transformers 5's processor puts
        each frame's own vision markers inside the template's pair, so the pair is dropped first there."""
        if not hasattr(self.processor, "replace_video_token"):  # 4.57: the processor replaces the whole pair
            return text
        processor = self.processor
        pair = f"{processor.vision_start_token}{processor.video_token}{processor.vision_end_token}"
        return text.replace(pair, processor.video_token)
