"""`flashvid_llava_video`: LLaVA-Video (`lmms-lab/LLaVA-Video-7B-Qwen2`, or its HF conversion
`llava-hf/LLaVA-Video-7B-Qwen2-hf`) in the paper's setting, fed what lmms-eval 0.5.0's `llava_vid` feeds it.

Same transformers class and input path as LLaVA-OneVision (`llava_onevision.FlashVIDLlavaOneVision`); the defaults
are the official LLaVA-Video script's: 64 frames sampled uniformly over the whole video (`force_sample=True`), no time
instruction (`add_time_instruction=False`), average pooling with stride 2 (27×27 → 13×13 per frame,
`mm_spatial_pool_mode=average`) and one newline embedding after each frame (`mm_newline_position=frame`). That
layout is applied to the model instance even with FlashVID off, so the vanilla baseline runs the paper's setting
too. (The official `llava_vid` class's own defaults differ — 20 frames, `mm_newline_position=grid`, no forced
sampling — the official script overrides them all.)
"""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_eval_models.models.llava_onevision import FlashVIDLlavaOneVision


class FlashVIDLlavaVideo(FlashVIDLlavaOneVision):
    model_name = "flashvid_llava_video"
    suite_defaults: ClassVar[dict[str, Any]] = {"device": None, "device_map": None, "max_frames_num": 64,
                                                "dtype": "float16"}  # fmt: skip
    extra_keys: ClassVar[dict[str, Any]] = {
        **FlashVIDLlavaOneVision.extra_keys,
        "mm_spatial_pool_mode": "average",
        "mm_newline_position": "frame",
        "force_sample": True,
        "add_time_instruction": False,
    }
    layout_placeholders: ClassVar[int] = 0  # the patch's layout: its statistics count the visual tokens
