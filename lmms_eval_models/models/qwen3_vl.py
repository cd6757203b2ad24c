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
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL

from lmms_eval_models.models.common import FlashVIDModel
from lmms_eval_models.models.qwen2_5_vl import (
    check_protocol,
    load_qwen_common,
    load_qwen_weights,
    reasoning_answer,
)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov")  # what lmms-eval 0.5.0's class treats as a video file
# keys of lmms-eval 0.7.3's class that 0.5.0's does not read, with their "not given" values
_LMMS_EVAL_ONLY_KEYS = {"fps": None, "total_pixels": None, "enable_thinking": None, "interleave_visuals": False}


def keep_frames(total_frames: int, max_num_frames: int) -> np.ndarray:
    """lmms-eval 0.5.0's choice among the frames qwen-vl-utils read: linspace(0, total - 1, max_num_frames) truncated,
    duplicates dropped, the last frame appended if missing (sorted, unique)."""
    indices = np.unique(np.linspace(0, total_frames - 1, max_num_frames, dtype=int))
    if total_frames - 1 not in indices:
        indices = np.unique(np.append(indices, total_frames - 1))
    return indices


class FlashVIDQwen3_VL(FlashVIDModel, Qwen3_VL):
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
        with self._inner_call():
            return Qwen3_VL.generate_until(self, [request])[0]

    # ----------------------------------------------------------------------------- the paper's protocol

    def _strip_thinking(self, answer: str) -> str:
        if self.protocol == "paper":
            return reasoning_answer(answer)
        return Qwen3_VL._strip_thinking(self, answer)

    def _preprocess_chunk(self, chunk: Any) -> tuple[Any, list[str], dict[str, Any], list[str]]:
        """lmms-eval 0.7.3's preprocessing step (messages, video decoding, tokenization), under `protocol`."""
        if self.protocol != "paper":
            return Qwen3_VL._preprocess_chunk(self, chunk)
        from qwen_vl_utils import process_vision_info

        contexts, all_gen_kwargs, doc_to_visual, doc_id, task, split = zip(*chunk)
        gen_kwargs = all_gen_kwargs[0]
        until = gen_kwargs.get("until", [self.tokenizer.decode(self.eot_token_id)])
        until = [until] if isinstance(until, str) else list(until)
        until = [term for term in until if term != "\n\n"]
        contexts = [context.replace("<image>", "") for context in contexts]
        if self.reasoning_prompt:
            contexts = [context.strip() + self.reasoning_prompt for context in contexts]
        messages = []
        for context, to_visual, doc, task_name, split_name in zip(contexts, doc_to_visual, doc_id, task, split):
            visuals = to_visual(self.task_dict[task_name][split_name][doc]) or []
            messages.append([
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": [*self._visual_parts(visuals), {"type": "text", "text": context}]},
            ])  # fmt: skip
        texts = [self.video_prompt(text) for text in
                 self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]  # fmt: skip
        image_inputs, video_inputs = process_vision_info(
            messages, return_video_kwargs=False, image_patch_size=16, return_video_metadata=False
        )
        if video_inputs is not None:  # lmms-eval 0.5.0 thins the first video only
            video_inputs[0] = video_inputs[0][keep_frames(video_inputs[0].shape[0], self.max_num_frames)]
        padding = {"padding": True, "padding_side": "left"} if self.batch_size > 1 else {}
        inputs = self.processor(text=texts, images=image_inputs, videos=video_inputs, do_resize=False,
                                return_tensors="pt", **padding)  # fmt: skip
        return inputs, contexts, gen_kwargs, until

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
