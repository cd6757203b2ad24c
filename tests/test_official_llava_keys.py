"""The official LLaVA scripts' model_args keys on both LLaVA classes: each accepted with its meaning, each value the
suite cannot honour refused (before anything is loaded) naming the key and the allowed values."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lmms_eval_models.models.common import resolve_attn_implementation
from lmms_eval_models.models.official_llava import LlavaNextSettings, check_model_name
from lmms_eval_models.patches.common import PATCH_ATTR

LLAVA_MODELS = ("flashvid_llava_onevision", "flashvid_llava_video")


def build(model_name: str, args: str):
    from lmms_eval.models import get_model

    return get_model(model_name).create_from_arg_string(args)


def test_every_official_key_is_taken_with_its_meaning(tiny_checkpoint):
    args = (f"pretrained={tiny_checkpoint('llava_next')},conv_template=qwen_1_5,model_name=llava_qwen,"
            "mm_spatial_pool_mode=average,mm_spatial_pool_stride=2,mm_newline_position=frame,force_sample=False,"
            "video_fps=2,add_time_instruction=True,max_frames_num=12,attn_implementation=eager,device_map=cpu,"
            "enable_flashvid=False")  # fmt: skip
    model = build("flashvid_llava_onevision", args)
    assert model.llava_settings == LlavaNextSettings(
        conv_template="qwen_1_5", model_name="llava_qwen", mm_spatial_pool_mode="average", mm_spatial_pool_stride=2,
        mm_newline_position="frame", force_sample=False, add_time_instruction=True, max_frames_num=12, video_fps=2,
    )  # fmt: skip
    # the LLaVA-Video layout on the OneVision class, also without compression
    assert getattr(model.model, PATCH_ATTR).family.video_layout == "llava_video"
    assert model.model.config._attn_implementation == "eager"
    assert model.model.device == torch.device("cpu") and model.model.dtype == torch.float16  # the official dtype


@pytest.mark.parametrize("model_name", LLAVA_MODELS)
def test_defaults_are_the_official_scripts(model_name, tiny_checkpoint):
    model = build(model_name, f"pretrained={tiny_checkpoint('llava_onevision')},enable_flashvid=False")
    settings = model.llava_settings
    assert settings.conv_template == "qwen_1_5" and settings.force_sample and not settings.add_time_instruction
    if model_name == "flashvid_llava_onevision":
        assert (settings.mm_spatial_pool_mode, settings.mm_newline_position, settings.max_frames_num) == (
            "bilinear", "one_token", 32)  # fmt: skip
        assert getattr(model.model, PATCH_ATTR, None) is None  # transformers' own OneVision layout
    else:
        assert (settings.mm_spatial_pool_mode, settings.mm_newline_position, settings.max_frames_num) == (
            "average", "frame", 64)  # fmt: skip
        assert getattr(model.model, PATCH_ATTR).family.video_layout == "llava_video"


REFUSED = [
    ("mm_spatial_pool_mode=max", r"mm_spatial_pool_mode='max' is not supported \(2x2 max pooling is not implemented\): allowed bilinear, average"),
    ("mm_newline_position=grid", r"mm_newline_position='grid' is not supported .*: allowed one_token, frame"),
    ("mm_newline_position=no_token", r"mm_newline_position='no_token' is not supported .*: allowed one_token, frame"),
    ("mm_spatial_pool_mode=average,mm_newline_position=one_token",
     r"mm_spatial_pool_mode=average with mm_newline_position=one_token is not supported: allowed "),
    ("mm_spatial_pool_stride=4", r"mm_spatial_pool_stride=4 is not supported: allowed 2"),
    ("conv_template=vicuna_v1", r"conv_template='vicuna_v1' is not supported: allowed qwen_1_5, hf"),
    ("model_name=llava-v1.6-vicuna-7b", r"model_name='llava-v1.6-vicuna-7b' is not supported"),
    ("model_name=llama3-llava-qwen", r"model_name='llama3-llava-qwen' is not supported: it contains 'llama'"),
    ("model_name=llava-qwen-moe", r"model_name='llava-qwen-moe' is not supported: .*mixture-of-experts"),
    ("force_sample=sometimes", r"force_sample='sometimes' is invalid: expected True or False"),
    ("add_time_instruction=2", r"add_time_instruction=.* is invalid: expected True or False"),
    ("max_frames_num=0", r"max_frames_num=0 is invalid: expected an integer >= 1"),
    ("video_fps=half", r"video_fps='half' is invalid: expected an integer"),
    ("attn_implementation=flash_attention_3", r"attn_implementation='flash_attention_3' is invalid: allowed None, eager, sdpa, flash_attention_2"),
    ("device_map=gpu7", r"device_map='gpu7' is invalid: allowed auto, balanced_low_0 or a device"),
    ("chat_template=x,conv_template=qwen_1_5", r"chat_template=\.\.\. applies with conv_template=hf only"),
    ("token_strategy=multiple", r"unknown model_args key 'token_strategy'"),
]  # fmt: skip


@pytest.mark.parametrize("model_name", LLAVA_MODELS)
@pytest.mark.parametrize(("args", "message"), REFUSED, ids=[args for args, _ in REFUSED])
def test_values_the_suite_cannot_honour_are_refused_before_loading(model_name, args, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(model_name, f"pretrained={tmp_path / 'not-loaded'},{args}")


@pytest.mark.parametrize("name", ["llava_qwen", "llava-onevision-qwen2-7b-ov", "LLaVA-Video-7B-Qwen2"])
def test_model_names_of_the_qwen_loader_are_accepted(name):
    check_model_name(name)


def test_flash_attention_off_cuda_runs_sdpa_with_a_warning(tiny_checkpoint):
    from loguru import logger

    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        model = build("flashvid_llava_onevision",
                      f"pretrained={tiny_checkpoint('llava_onevision')},attn_implementation=flash_attention_2")  # fmt: skip
    finally:
        logger.remove(sink)
    assert any("flash_attention_2 needs a CUDA device; running sdpa on cpu" in message for message in messages)
    assert model.attn_implementation == "sdpa"
    assert model.model.config._attn_implementation == "sdpa"


def test_flash_attention_on_cuda_needs_flash_attn():
    """On CUDA the request is kept, and a missing flash-attn package is an error naming the key (never a silent
    fallback on the machines that reproduce the numbers)."""
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="attn_implementation=flash_attention_2 needs the flash-attn package"):
            resolve_attn_implementation("flash_attention_2", torch.device("cuda"))
    else:
        assert resolve_attn_implementation("flash_attention_2", torch.device("cuda")) == "flash_attention_2"
    assert resolve_attn_implementation("sdpa", torch.device("cuda")) == "sdpa"
    assert resolve_attn_implementation("None", torch.device("cpu")) is None


def test_conv_template_hf_renders_the_checkpoint_template(tiny_checkpoint, tmp_path):
    from lmms_eval_models.tasks.synthetic_videos import synthetic_frames, write_video

    path = tmp_path / "v.mp4"
    write_video(path, synthetic_frames("hf-template", 8, 64))
    model = build("flashvid_llava_onevision",
                  f"pretrained={tiny_checkpoint('llava_onevision')},conv_template=hf,max_frames_num=4")  # fmt: skip
    ids = model.video_inputs("Which option?", str(path))["input_ids"][0].tolist()
    video = model.model.config.video_token_id
    start = ids.index(video)
    assert model.tokenizer.decode(ids[:start]) == "<|im_start|>user\n"  # the tiny template: no system turn
    assert model.tokenizer.decode([token for token in ids[start:] if token != video]).startswith("\nWhich option?")
