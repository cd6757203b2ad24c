"""`flashvid_qwen3_vl`: lmms-eval's own `qwen3_vl` (simple) class with FlashVID applied after loading."""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL

from lmms_eval_models.models.common import FlashVIDModel
from lmms_eval_models.models.qwen2_5_vl import load_qwen_common, load_qwen_weights


class FlashVIDQwen3_VL(FlashVIDModel, Qwen3_VL):
    """Qwen3-VL through lmms-eval's prompting, qwen-vl-utils video loading and frame sampling.

    Keys: the base class's (pretrained, max_num_frames, min_pixels, max_pixels, total_pixels, fps, ...), `dtype`
    (default bfloat16, as the base class hard-codes), `enable_flashvid`, `method`, the FlashVID keys and
    the baseline keys (docs/baselines.md).
    """

    model_name = "flashvid_qwen3_vl"
    base_class = Qwen3_VL
    suite_defaults: ClassVar[dict[str, Any]] = {"dtype": "bfloat16", "device": None, "device_map": None}

    def _load(self, settings: dict[str, Any]) -> None:
        from transformers import Qwen3VLForConditionalGeneration

        load_qwen_common(self, settings)
        self.total_pixels = settings["total_pixels"]
        self.enable_thinking = settings["enable_thinking"]
        load_qwen_weights(self, settings, Qwen3VLForConditionalGeneration)

    def _generate_one(self, request: Instance) -> str:
        with self._inner_call():
            return Qwen3_VL.generate_until(self, [request])[0]
