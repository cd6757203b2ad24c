"""`flashvid_llava_video`: HF-format LLaVA-Video (`llava-hf/LLaVA-Video-7B-Qwen2-hf`) in the paper's layout.

Same transformers class as LLaVA-OneVision; what differs is how the video is laid out for the LLM: average
pooling with stride 2 (27×27 → 13×13 per frame) and one newline embedding after each frame. That layout is
applied to the model instance even with FlashVID off, so the vanilla baseline runs the paper's setting too.
64 frames sampled uniformly over the whole video (the official `force_sample=True`) and no time instruction
(`add_time_instruction=False`): the base class's loader already samples that way and adds no time prompt.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_eval_models.models.llava_onevision import FlashVIDLlavaOneVision


class FlashVIDLlavaVideo(FlashVIDLlavaOneVision):
    model_name = "flashvid_llava_video"
    suite_defaults: ClassVar[dict[str, Any]] = {"device": None, "device_map": None, "max_frames_num": 64}
    family_options: ClassVar[dict[str, Any]] = {"video_layout": "llava_video"}
