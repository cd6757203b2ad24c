"""`flashvid_llava_onevision`: LLaVA-OneVision through transformers' `LlavaOnevisionForConditionalGeneration`, fed
exactly what the paper's path (LLaVA-NeXT run by lmms-eval 0.5.0's `llava_onevision`) feeds its LLM.

The official scripts' model_args work as they are, e.g. `pretrained=lmms-lab/llava-onevision-qwen2-7b-ov,
conv_template=qwen_1_5,mm_spatial_pool_mode=bilinear,max_frames_num=32,attn_implementation=flash_attention_2`:

- `pretrained`: an HF-format checkpoint (`llava-hf/...-hf`) or a LLaVA-NeXT one (`lmms-lab/...`), converted once into
  a cache (`lmms_eval_models.conversion.llava_next`);
- the official keys (`conv_template`, `model_name`, `mm_spatial_pool_mode`, `mm_spatial_pool_stride`,
  `mm_newline_position`, `force_sample`, `video_fps`, `add_time_instruction`, `max_frames_num`) keep their meaning
  (`official_llava.LlavaNextSettings`); a value the suite cannot honour is refused naming the key and the allowed
  values;
- `attn_implementation=flash_attention_2` runs sdpa off CUDA, with a warning (see `resolve_attn_implementation`);
- `device_map`: "auto" (or "balanced_low_0") spreads one process's model over the GPUs, a device name places it;
- `dtype` defaults to float16, the official loader's.

Prompt, frames and pixels follow `official_llava` (the equivalence tests check each against the official rules);
generation follows the official class: greedy unless the task samples, stop at `<|im_end|>`, the task's `until`
strings are not applied (the official class drops them), the answer is stripped. lmms-eval's `llava_hf` class is the
base for its loading attributes and helpers; its own prompt and video code are not used.
"""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.models.simple.llava_hf import LlavaHf

from lmms_eval_models.conversion.llava_next import SIGLIP_MEAN, SIGLIP_STD
from lmms_eval_models.models.common import FlashVIDModel, resolve_attn_implementation, resolve_dtype
from lmms_eval_models.models.official_llava import (
    IMAGE_PLACEHOLDER,
    FrameSample,
    LlavaNextSettings,
    preprocess_frames,
    question_with_video,
    qwen_1_5_prompt,
    read_video_frames,
    sample_frames,
    time_instruction,
    tokenize_with_video,
    video_token_count,
)
from lmms_eval_models.patches.prefill import supplying_video

DEFAULT_MAX_NEW_TOKENS = 1024  # the official class's default when a task sets none
# device_map values that spread one process's model over the GPUs (passed to from_pretrained as they are)
SPREADING_DEVICE_MAPS = ("auto", "balanced_low_0")


class FlashVIDLlavaOneVision(FlashVIDModel, LlavaHf):
    """LLaVA-OneVision: 32 frames uniformly over the video, bilinear pooling, one newline after the video.

    Keys: the official ones above, the base class's (pretrained, revision, dtype, device, device_map,
    attn_implementation, chat_template with conv_template=hf, use_cache, batch_size=1, trust_remote_code),
    `enable_flashvid`, `method`, the FlashVID keys and the baseline keys (docs/baselines.md).
    """

    model_name = "flashvid_llava_onevision"
    base_class = LlavaHf
    suite_defaults: ClassVar[dict[str, Any]] = {"device": None, "device_map": None, "max_frames_num": 32,
                                                "dtype": "float16"}  # fmt: skip
    # The official keys the base class lacks; defaults are the official scripts' LLaVA-OneVision settings.
    extra_keys: ClassVar[dict[str, Any]] = {
        "conv_template": None,  # qwen_1_5, or hf when chat_template is given
        "model_name": None,
        "mm_spatial_pool_mode": "bilinear",
        "mm_spatial_pool_stride": 2,
        "mm_newline_position": "one_token",
        "force_sample": True,  # llava_onevision always samples uniformly
        "add_time_instruction": False,
        "video_fps": 1,
    }
    layout_placeholders: ClassVar[int] = 1  # transformers' layout ends the video with one newline placeholder

    # ------------------------------------------------------------------------------------------ settings

    def _check_settings(self, settings: dict[str, Any]) -> None:
        super()._check_settings(settings)
        conv_template = settings.get("conv_template")
        if conv_template is None:
            conv_template = "hf" if settings.get("chat_template") else "qwen_1_5"
        elif conv_template == "qwen_1_5" and settings.get("chat_template"):
            raise ValueError(
                "chat_template=... applies with conv_template=hf only; conv_template=qwen_1_5 renders LLaVA-NeXT's "
                "conversation (leave one of them out)"
            )
        self.llava_settings = LlavaNextSettings.from_model_args({**settings, "conv_template": conv_template})
        _check_device_map(settings.get("device_map"))
        layout = self.llava_settings.video_layout
        # The LLaVA-Video layout is the patch's own (applied also without compression); OneVision's is transformers'.
        self.family_options = {"video_layout": layout} if layout != "onevision" else {}
        self.layout_placeholders = 1 if layout == "onevision" else 0

    # ------------------------------------------------------------------------------------------- loading

    def _load(self, settings: dict[str, Any]) -> None:
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        from lmms_eval_models.conversion.llava_next import resolve_pretrained

        device_map = settings.get("device_map")
        device = settings.get("device") or (device_map if device_map and device_map not in SPREADING_DEVICE_MAPS
                                            else None)  # fmt: skip
        self._setup_processes(device)
        self.device_map = (
            device_map if device_map in SPREADING_DEVICE_MAPS and self._world_size == 1 else str(self._device)
        )
        self.attn_implementation = resolve_attn_implementation(settings.get("attn_implementation"), self._device)
        path = resolve_pretrained(settings["pretrained"], settings["revision"])
        # a converted copy is a local folder: the revision was the source's
        revision = settings["revision"] if path == settings["pretrained"] else None
        load_kwargs: dict[str, Any] = {
            "revision": revision,
            "dtype": resolve_dtype(settings["dtype"]),
            "device_map": self.device_map,
            "trust_remote_code": settings["trust_remote_code"],
        }
        if self.attn_implementation is not None:
            load_kwargs["attn_implementation"] = self.attn_implementation
        self._model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, **load_kwargs).eval()
        self.pretrained = settings["pretrained"]
        self.checkpoint_path = path
        self._image_processor = AutoProcessor.from_pretrained(
            path, revision=revision, trust_remote_code=settings["trust_remote_code"]
        )
        self._image_processor.tokenizer.padding_side = "left"
        self._tokenizer = self._image_processor.tokenizer
        self._config = self._model.config
        self.batch_size_per_gpu = int(settings["batch_size"])
        self.chat_template = settings["chat_template"]
        self.use_cache = settings["use_cache"]
        self.max_frames_num = self.llava_settings.max_frames_num

    # --------------------------------------------------------------------------------------------- inputs

    def video_inputs(self, context: str, video_path: str) -> dict[str, torch.Tensor]:
        """What the model is fed for one question about one video: input_ids (1, L) with the video's placeholder
        run where the prompt's video goes, attention_mask (1, L), pixel_values_videos (1, F, 3, S, S) in the model's
        dtype."""
        return self._decoded_call((context, video_path))[0]

    def _decoded_call(self, request: tuple[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`video_inputs` and the record of the frames it sampled (for the time instruction and the token count)."""
        context, video_path = request
        settings = self.llava_settings
        rule = partial(sample_frames, max_frames_num=settings.max_frames_num, force_sample=settings.force_sample,
                       video_fps=settings.video_fps)  # fmt: skip
        frames, sample = read_video_frames(video_path, rule)
        pixels = preprocess_frames(frames, self.model.config.vision_config.image_size, SIGLIP_MEAN, SIGLIP_STD)
        call = self._prompt_inputs(context, sample)
        call["pixel_values_videos"] = torch.from_numpy(pixels)[None].to(self._device, self.model.dtype)
        return call, frame_record(sample)

    def _recorded_call(self, request: tuple[str, str], record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same call from the frame record, with an empty pixel stand-in (1, 0, 3, S, S): its prefill takes the
        stored video (`_video_call`)."""
        call = self._prompt_inputs(request[0], sample_of_record(record))
        size = self.model.config.vision_config.image_size
        call["pixel_values_videos"] = torch.empty((1, 0, 3, size, size), device=self._device, dtype=self.model.dtype)
        return call

    def _prompt_inputs(self, context: str, sample: FrameSample) -> dict[str, torch.Tensor]:
        """input_ids (1, L) and attention_mask (1, L) of the prompt for a video sampled as `sample`."""
        settings = self.llava_settings
        vision = self.model.config.vision_config
        instruction = time_instruction(sample) if settings.add_time_instruction else None
        count = video_token_count(len(sample.indices), vision.image_size // vision.patch_size, settings.video_layout)
        if settings.conv_template == "qwen_1_5":
            prompt, marker = qwen_1_5_prompt(question_with_video(context, instruction)), IMAGE_PLACEHOLDER
        else:
            prompt, marker = self._chat_template_prompt(context, instruction), self._image_processor.video_token
        input_ids = tokenize_with_video(prompt, self.tokenizer, marker, self.model.config.video_token_id, count)
        ids = torch.tensor([input_ids], device=self._device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def visual_settings(self) -> dict[str, Any]:
        """Frame sampling and the pooling layout (the pixels follow the checkpoint's config and the official rule)."""
        settings = self.llava_settings
        return {"max_frames_num": settings.max_frames_num, "force_sample": settings.force_sample,
                "video_fps": settings.video_fps, "video_layout": settings.video_layout}  # fmt: skip

    def _chat_template_prompt(self, context: str, instruction: str | None) -> str:
        """conv_template=hf: the Jinja template over a user turn holding the video, then the text."""
        text = context.replace(IMAGE_PLACEHOLDER, "").replace(self._image_processor.video_token, "")
        if instruction is not None:
            text = f"{instruction}\n{text}"
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        template = self.chat_template or self._image_processor.chat_template or self.tokenizer.chat_template
        if template is None:
            raise ValueError(f"{self.pretrained} has no chat template; pass chat_template=... or conv_template=qwen_1_5")
        return self._image_processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)

    def _stop_token_ids(self) -> list[int]:
        """The generation config's end tokens and `<|im_end|>` (the official class stops at the conversation's
        separator)."""
        configured = self.model.generation_config.eos_token_id
        ids = [configured] if isinstance(configured, int) else list(configured or [])
        separator = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(separator, int) and separator != self.tokenizer.unk_token_id and separator not in ids:
            ids.append(separator)
        return ids or [self.eot_token_id]

    # ----------------------------------------------------------------------------------------- generation

    def _generate_one(self, request: Instance) -> str:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
        paths = [visual for visual in visuals if isinstance(visual, str)]
        if len(paths) != 1 or len(visuals) != 1:
            raise ValueError(
                f"{self.model_name} answers questions about one video; doc {doc_id} of {task} has {len(paths)} video "
                f"path(s) and {len(visuals) - len(paths)} other visual(s)"
            )
        inputs, supply = self._video_call((context, paths[0]), paths[0])
        stop_ids = self._stop_token_ids()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stop_ids[0]
        with supplying_video(supply):
            output = self.model.generate(**inputs, **_generate_kwargs(dict(gen_kwargs), self.use_cache, stop_ids,
                                                                      pad_id))  # fmt: skip
        new_tokens = output[:, inputs["input_ids"].shape[-1] :]
        answer = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answer


def _check_device_map(device_map: Any) -> None:
    if device_map in (None, "", *SPREADING_DEVICE_MAPS):
        return
    try:
        torch.device(str(device_map))
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device_map={device_map!r} is invalid: allowed {', '.join(SPREADING_DEVICE_MAPS)} or a device such as "
            "cuda:0 or cpu"
        ) from None


def _generate_kwargs(
    gen_kwargs: dict[str, Any], use_cache: bool, stop_ids: list[int], pad_id: int
) -> dict[str, Any]:
    """Greedy unless the task asks for a temperature > 0 (as the official llava_vid class decides)."""
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    sampling = temperature > 0
    return {
        "do_sample": sampling,
        "temperature": temperature if sampling else None,
        "top_p": gen_kwargs.get("top_p") if sampling else None,
        "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
        "use_cache": use_cache,
        "pad_token_id": pad_id,
        "eos_token_id": stop_ids,
    }


def frame_record(sample: FrameSample) -> dict[str, torch.Tensor]:
    """The sampled frames as a store record: indices (F,) int64, times (F,) float64, the video's length () float64
    (float64 holds the official path's Python floats exactly)."""
    return {
        "frame_indices": torch.tensor(sample.indices, dtype=torch.int64),
        "frame_times": torch.tensor(sample.times, dtype=torch.float64),
        "video_seconds": torch.tensor(sample.video_seconds, dtype=torch.float64),
    }


def sample_of_record(record: dict[str, torch.Tensor]) -> FrameSample:
    return FrameSample(indices=record["frame_indices"].tolist(), times=record["frame_times"].tolist(),
                       video_seconds=float(record["video_seconds"]))  # fmt: skip
