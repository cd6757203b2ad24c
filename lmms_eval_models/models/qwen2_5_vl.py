"""`flashvid_qwen2_5_vl`: lmms-eval's own `qwen2_5_vl` (simple) class with FlashVID applied after loading."""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL

from lmms_eval_models.models.common import FlashVIDModel, resolve_dtype


class FlashVIDQwen2_5_VL(FlashVIDModel, Qwen2_5_VL):
    """Qwen2.5-VL through lmms-eval's prompting, qwen-vl-utils video loading and frame sampling.

    Keys: the base class's (pretrained, max_num_frames, min_pixels, max_pixels, fps, system_prompt, ...), `dtype`
    (default bfloat16, as the base class hard-codes), `enable_flashvid`, `method`, the FlashVID keys and
    the baseline keys (docs/baselines.md).
    """

    model_name = "flashvid_qwen2_5_vl"
    base_class = Qwen2_5_VL
    suite_defaults: ClassVar[dict[str, Any]] = {"dtype": "bfloat16", "device": None, "device_map": None}

    def _load(self, settings: dict[str, Any]) -> None:
        from transformers import Qwen2_5_VLForConditionalGeneration

        load_qwen_common(self, settings)
        load_qwen_weights(self, settings, Qwen2_5_VLForConditionalGeneration)

    def _generate_one(self, request: Instance) -> str:
        with self._inner_call():
            return Qwen2_5_VL.generate_until(self, [request])[0]


def load_qwen_common(model: Any, settings: dict[str, Any]) -> None:
    """The attributes lmms-eval's Qwen classes read in `generate_until`, set from the validated settings."""
    attn = settings.get("attn_implementation")
    if attn not in (None, "flash_attention_2", "sdpa", "eager"):
        raise ValueError(
            f"attn_implementation={attn!r} is invalid: allowed None, flash_attention_2, sdpa, eager"
        )
    model._setup_processes(settings.get("device"))
    # device_map="auto" (one process) spreads the model over the GPUs; otherwise the model sits on our device.
    model.device_map = (
        "auto" if settings.get("device_map") == "auto" and model._world_size == 1 else str(model._device)
    )
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
    if settings.get("attn_implementation") is not None:
        kwargs["attn_implementation"] = settings["attn_implementation"]
    model._model = model_class.from_pretrained(settings["pretrained"], **kwargs).eval()
    model.processor = AutoProcessor.from_pretrained(
        settings["pretrained"], max_pixels=settings["max_pixels"], min_pixels=settings["min_pixels"]
    )
    model._tokenizer = AutoTokenizer.from_pretrained(settings["pretrained"])
    model._config = model._model.config
