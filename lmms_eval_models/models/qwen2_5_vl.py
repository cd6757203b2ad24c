"""`flashvid_qwen2_5_vl`: lmms-eval's own `qwen2_5_vl` (simple) class with FlashVID applied after loading.

lmms-eval 0.7.3's video path for this class is the one of lmms-eval 0.5.0 (the paper's): qwen-vl-utils reads the video
at 2 fps, at most `max_num_frames` of those frames are kept (linspace, duplicates dropped, the last frame kept), and
the processor resizes and patches them. The one difference, the answer's clean-up, follows `protocol`:

- `protocol=paper` (default): as lmms-eval 0.5.0, an answer holding `<answer>…</answer>` or `\\boxed{…}` is cut to
  its content (`reasoning_answer`);
- `protocol=lmms_eval`: the answer as lmms-eval 0.7.3 returns it.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

from lmms_eval_models.models.common import FlashVIDModel, resolve_attn_implementation, resolve_dtype

PROTOCOLS = ("paper", "lmms_eval")
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


class FlashVIDQwen2_5_VL(FlashVIDModel, Qwen2_5_VL):
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
        with self._inner_call():
            answer = Qwen2_5_VL.generate_until(self, [request])[0]
        return reasoning_answer(answer) if self.protocol == "paper" else answer


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
