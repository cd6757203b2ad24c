"""`flashvid_llava_onevision`: lmms-eval's `llava_hf` class for HF-format LLaVA-OneVision, FlashVID applied.

lmms-eval's own `llava_onevision` class needs the LLaVA-NeXT package (not on PyPI); the HF-format checkpoints
(`llava-hf/llava-onevision-qwen2-7b-ov-hf`) run through transformers' `LlavaOnevisionForConditionalGeneration`
and lmms-eval's `llava_hf` class. Its simple class is the base here: it loads videos with decord and honours
`max_frames_num` (the chat class does neither, and passes an empty image list). Answering one request is ours:
the base class renders the prompt with the tokenizer's template as a plain string, which HF LLaVA-OneVision
templates do not accept, and turns any generation error into an empty answer.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.llava_hf import LlavaHf

from lmms_eval_models.models.common import FlashVIDModel, resolve_dtype

DEFAULT_MAX_NEW_TOKENS = 1024  # the base class's default when a task sets none


class FlashVIDLlavaOneVision(FlashVIDModel, LlavaHf):
    """LLaVA-OneVision: 32 uniformly sampled frames (`max_frames_num`), bilinear pooling, one newline at the end.

    Keys: the base class's (pretrained, max_frames_num, dtype, attn_implementation, chat_template, use_cache, ...),
    `enable_flashvid`, `method`, the FlashVID keys and the baseline keys (docs/baselines.md).
    """

    model_name = "flashvid_llava_onevision"
    base_class = LlavaHf
    suite_defaults: ClassVar[dict[str, Any]] = {"device": None, "device_map": None, "max_frames_num": 32}
    family_options: ClassVar[dict[str, Any]] = {}  # transformers' own layout; patched only with FlashVID on
    layout_placeholders: ClassVar[int] = 1  # transformers' layout ends the video with one newline placeholder

    def _load(self, settings: dict[str, Any]) -> None:
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        self._setup_processes(settings.get("device"))
        self.device_map = (
            "auto" if settings.get("device_map") == "auto" and self._world_size == 1 else str(self._device)
        )
        load_kwargs: dict[str, Any] = {
            "revision": settings["revision"],
            "dtype": resolve_dtype(settings["dtype"]),
            "device_map": self.device_map,
            "trust_remote_code": settings["trust_remote_code"],
        }
        if settings.get("attn_implementation") is not None:
            load_kwargs["attn_implementation"] = settings["attn_implementation"]
        self._model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            settings["pretrained"], **load_kwargs
        ).eval()
        self.pretrained = settings["pretrained"]
        self._image_processor = AutoProcessor.from_pretrained(
            settings["pretrained"],
            revision=settings["revision"],
            trust_remote_code=settings["trust_remote_code"],
        )
        self._image_processor.tokenizer.padding_side = "left"
        self._tokenizer = self._image_processor.tokenizer
        self._config = self._model.config
        self.batch_size_per_gpu = int(settings["batch_size"])
        self.chat_template = settings["chat_template"]
        self.use_cache = settings["use_cache"]
        self.max_frames_num = int(settings["max_frames_num"])

    # ------------------------------------------------------------------------------------------- prompt

    def _prompt(self, context: str, num_videos: int) -> str:
        """The processor's chat template over a structured user turn: the videos, then the task's text."""
        content = [{"type": "video"} for _ in range(num_videos)] + [{"type": "text", "text": context}]
        messages = [{"role": "user", "content": content}]
        template = self.chat_template or self._image_processor.chat_template or self.tokenizer.chat_template
        if template is None:
            raise ValueError(
                f"{self.pretrained} has no chat template; pass chat_template=... in --model_args"
            )
        return self._image_processor.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True
        )

    def _generate_one(self, request: Instance) -> str:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
        gen_kwargs = dict(gen_kwargs)
        visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
        videos = [self.load_video(path, self.max_frames_num) for path in visuals if isinstance(path, str)]
        images = [visual for visual in visuals if not isinstance(visual, str)]
        if images:
            raise ValueError(
                f"{self.model_name} answers video questions only; doc {doc_id} of {task} has images"
            )
        text = self._prompt(context.replace("<image>", "").replace("<video>", ""), len(videos))
        inputs = self._image_processor(text=text, videos=videos or None, return_tensors="pt")
        inputs = inputs.to(self._device)
        if "pixel_values_videos" in inputs:
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.model.dtype)
        until = _stop_strings(gen_kwargs.pop("until", None), self.tok_decode(self.eot_token_id))
        output = self.model.generate(
            **inputs, **_generate_kwargs(gen_kwargs, self.use_cache, self.eot_token_id)
        )
        answer = self.tokenizer.batch_decode(
            output[:, inputs["input_ids"].shape[-1] :], skip_special_tokens=True
        )[0]
        for term in until:
            if term:
                answer = answer.split(term)[0]
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answer


def _stop_strings(until: Any, eot: str) -> list[str]:
    if until is None:
        return [eot]
    if isinstance(until, str):
        return [until]
    if not isinstance(until, list):
        raise ValueError(f"Expected gen_kwargs['until'] to be a str or a list, got {type(until).__name__}")
    return until


def _generate_kwargs(gen_kwargs: dict[str, Any], use_cache: bool, eot_token_id: int) -> dict[str, Any]:
    """Greedy unless the task asks for a temperature > 0, as in the base class."""
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    sampling = temperature > 0
    return {
        "do_sample": sampling,
        "temperature": temperature if sampling else None,
        "top_p": gen_kwargs.get("top_p") if sampling else None,
        "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        "use_cache": use_cache,
        "pad_token_id": eot_token_id,
        "eos_token_id": eot_token_id,
    }
