"""Tiny random-weight checkpoints of the four model families, built offline for tests and smoke runs.

No machine here can download weights, so tests exercise the real loading code (`from_pretrained(path)`, lmms-eval's
own model classes) on checkpoints this module writes: a real config of the family's architecture at toy sizes, a
byte-level BPE tokenizer with the family's special tokens, the family's processor with a chat template and a
`GenerationConfig`. A checkpoint saved by transformers 5.x does not load in 4.57, so the cache is keyed by the
installed transformers version.

    flashvid-tiny-checkpoints --family qwen2_5_vl --cache-dir /tmp/ckpts

`llava_next` is the llava_onevision checkpoint's model in LLaVA-NeXT's format (lmms-lab's): its config.json, its tensor
names and a SigLIP tower config beside it, built from the same weights, so the conversion to the HF format can be
checked against the HF tiny checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

FAMILIES = ("llava_onevision", "llava_video", "qwen2_5_vl", "qwen3_vl")
# Not a family: the llava_onevision tiny's weights as a LLaVA-NeXT (lmms-lab) checkpoint, for the conversion.
LLAVA_NEXT = "llava_next"
CHECKPOINTS = (*FAMILIES, LLAVA_NEXT)
LLAVA_NEXT_TOWER = "vision_tower"  # the SigLIP tower's folder inside the llava_next checkpoint

# Special tokens first, so their ids are small and known (0..8) in every family.
SPECIAL_TOKENS = (
    "<|endoftext|>",  # pad
    "<|im_start|>",
    "<|im_end|>",  # eos
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
)
TOKEN_ID = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = 512

# Bumped whenever a change here changes what is built, so caches kept across sessions (CI) are rebuilt.
BUILDER_VERSION = 2
BUILD_MARKER = "flashvid_tiny_build.json"

# Text model shared by all families; 4 layers so inner-LLM pruning at a layer K in 1..3 is testable.
TEXT_SIZES = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}

# SigLIP at 98 px / patch 14 gives a 7×7 grid: odd, so bilinear pooling (ceil → 4×4) and average pooling with
# stride 2 (floor → 3×3) differ, as 27×27 → 14×14 vs 13×13 do for the real LLaVA models.
LLAVA_IMAGE_SIZE = 98
LLAVA_PATCH_SIZE = 14

# Qwen pixel budgets: a 64×64 frame is resized to 2×2 merged tokens per temporal patch (cheap on CPU).
QWEN2_5_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
QWEN3_PIXELS = {"shortest_edge": 64 * 64, "longest_edge": 64 * 64 * 64}

_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "Answer with the option's letter from the given choices directly.",
    "Select the best answer to the following multiple-choice question based on the video.",
    "A person walks into the kitchen, opens the fridge and takes out a bottle of milk.",
    "What is the main activity shown in the video? (A) cooking (B) running (C) reading (D) painting",
    "Only give the best option. Best option: (",
    "The answer is A. The answer is B. The answer is C. The answer is D. The answer is E.",
    "user assistant system video image frame seconds question options answer",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 . , : ; ? ! ( ) [ ] < > - _",
)

# Chat template shared by the tokenizer and the processor. A video part becomes the family's placeholder
# (VIDEO_PLACEHOLDER / IMAGE_PLACEHOLDER are substituted per family).
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'video' -%}{{ 'VIDEO_PLACEHOLDER' }}"
    "{%- elif part['type'] == 'image' -%}{{ 'IMAGE_PLACEHOLDER' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _is_v5() -> bool:
    return Version(transformers.__version__) >= Version("5.0.0")


def chat_template(family: str) -> str:
    """The family's Jinja chat template (Qwen: vision markers around a pad token; LLaVA: `<video>` + newline)."""
    if family.startswith("qwen"):
        video, image = (
            "<|vision_start|><|video_pad|><|vision_end|>",
            "<|vision_start|><|image_pad|><|vision_end|>",
        )
    else:
        video, image = "<video>\n", "<image>\n"
    return _CHAT_TEMPLATE.replace("VIDEO_PLACEHOLDER", video).replace("IMAGE_PLACEHOLDER", image)


def _check_family(family: str, allowed: tuple[str, ...] = FAMILIES) -> None:
    if family not in allowed:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(family: str) -> Any:
    """A byte-level BPE (vocab 512) with the special tokens at ids 0..8, wrapped for the installed transformers.

    4.57's Qwen processors type-check for `Qwen2TokenizerFast`; 5.x wants the generic fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    wrapper_kwargs = {
        "tokenizer_object": bpe,
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "bos_token": None,
        "chat_template": chat_template(family),
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "model_max_length": 32768,
        "padding_side": "left",  # batched generation pads on the left
    }
    if _is_v5():
        from transformers import PreTrainedTokenizerFast

        wrapper_kwargs["extra_special_tokens"] = wrapper_kwargs.pop("additional_special_tokens")
        return PreTrainedTokenizerFast(**wrapper_kwargs)
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(**wrapper_kwargs)


# ------------------------------------------------------------------------------------------------- configs


def _rope(mrope_section: list[int] | None, theta: float, **extra: Any) -> dict[str, Any]:
    """Rope settings in the installed version's spelling (5.x: `rope_parameters`; 4.57: `rope_scaling`)."""
    if mrope_section is None:
        return (
            {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
            if _is_v5()
            else {"rope_theta": theta}
        )
    scaling = {"rope_type": "default", "mrope_section": mrope_section, **extra}
    if _is_v5():
        return {"rope_parameters": {**scaling, "rope_theta": theta}}
    return {"rope_scaling": {**scaling, "type": "default"}, "rope_theta": theta}


def _special_ids() -> dict[str, int]:
    return {
        "pad_token_id": TOKEN_ID["<|endoftext|>"],
        "eos_token_id": TOKEN_ID["<|im_end|>"],
        "bos_token_id": TOKEN_ID["<|im_start|>"],
    }


def _qwen_token_ids() -> dict[str, int]:
    return {
        "image_token_id": TOKEN_ID["<|image_pad|>"],
        "video_token_id": TOKEN_ID["<|video_pad|>"],
        "vision_start_token_id": TOKEN_ID["<|vision_start|>"],
        "vision_end_token_id": TOKEN_ID["<|vision_end|>"],
    }


def llava_config() -> Any:
    from transformers import LlavaOnevisionConfig

    grid = [[LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE], [LLAVA_IMAGE_SIZE, 2 * LLAVA_IMAGE_SIZE],
            [2 * LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE], [2 * LLAVA_IMAGE_SIZE, 2 * LLAVA_IMAGE_SIZE]]  # fmt: skip
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": LLAVA_IMAGE_SIZE,
        "patch_size": LLAVA_PATCH_SIZE,
        "vision_use_head": False,
    }
    text = {"model_type": "qwen2", **TEXT_SIZES, **_special_ids(), **_rope(None, 1_000_000.0),
            "tie_word_embeddings": False}  # fmt: skip
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=TOKEN_ID["<image>"],
        video_token_index=TOKEN_ID["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=grid,
        tie_word_embeddings=False,
        **_special_ids(),
    )


def qwen2_5_vl_config() -> Any:
    from transformers import Qwen2_5_VLConfig

    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "out_hidden_size": TEXT_SIZES["hidden_size"],
    }
    text = {**TEXT_SIZES, **_special_ids(), **_rope([2, 3, 3], 1_000_000.0, type="mrope"),
            "tie_word_embeddings": False}  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **_qwen_token_ids(),
        **_special_ids(),
    )


def qwen3_vl_config() -> Any:
    from transformers import Qwen3VLConfig

    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": [0],
        "out_hidden_size": TEXT_SIZES["hidden_size"],
    }
    text = {**TEXT_SIZES, "head_dim": 16, **_special_ids(), **_rope([4, 2, 2], 5_000_000.0, mrope_interleaved=True),
            "tie_word_embeddings": False}  # fmt: skip
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **_qwen_token_ids(),
        **_special_ids(),
    )


def build_config(family: str) -> Any:
    _check_family(family)
    if family.startswith("llava"):
        return llava_config()
    return qwen2_5_vl_config() if family == "qwen2_5_vl" else qwen3_vl_config()


# ---------------------------------------------------------------------------------------------- processors


def build_processor(family: str, tokenizer: Any) -> Any:
    """The family's processor (image + video processor + tokenizer) carrying the chat template."""
    _check_family(family)
    template = chat_template(family)
    if family.startswith("llava"):
        from transformers import (
            LlavaOnevisionImageProcessor,
            LlavaOnevisionProcessor,
            LlavaOnevisionVideoProcessor,
        )

        size = {"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
        image_processor = LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=llava_config().image_grid_pinpoints
        )
        video_processor = LlavaOnevisionVideoProcessor(size=size)
        patches = LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE
        return LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            num_image_tokens=patches * patches,
            vision_feature_select_strategy="full",
            chat_template=template,
        )
    from transformers import Qwen2VLImageProcessor

    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        pixels = QWEN2_5_PIXELS
        image_processor = Qwen2VLImageProcessor(
            size=dict(pixels),
            min_pixels=pixels["shortest_edge"],
            max_pixels=pixels["longest_edge"],
            patch_size=14,
        )
        video_processor = Qwen2VLVideoProcessor(
            size=dict(pixels),
            min_pixels=pixels["shortest_edge"],
            max_pixels=pixels["longest_edge"],
            patch_size=14,
        )
        return Qwen2_5_VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=template,
        )
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    pixels = QWEN3_PIXELS
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128},
        min_pixels=64 * 64,
        max_pixels=128 * 128,
        patch_size=16,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        size=dict(pixels), patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=template,
    )


# --------------------------------------------------------------------------------------------------- model


def _model_class(family: str) -> Any:
    import transformers as tf

    if family.startswith("llava"):
        return tf.LlavaOnevisionForConditionalGeneration
    return (
        tf.Qwen2_5_VLForConditionalGeneration
        if family == "qwen2_5_vl"
        else tf.Qwen3VLForConditionalGeneration
    )


def _silence_tokens(model: Any, tokenizer: Any) -> None:
    """Zero the output rows of the special tokens and of whitespace-only tokens, so greedy decoding never picks one.

    With random weights the first generated token could otherwise be `<|im_end|>` (or a run of newlines), and the
    decoded answer empty after stripping, indistinguishable from lmms-eval's swallowed-exception "" that tests
    must catch.
    """
    silent = [
        index
        for index in range(VOCAB_SIZE)
        if index < len(SPECIAL_TOKENS) or not tokenizer.decode([index]).strip()
    ]
    with torch.no_grad():
        model.get_output_embeddings().weight[silent] = 0.0


def build_model(family: str, seed: int = 0, tokenizer: Any = None) -> Any:
    """The family's model with deterministic random weights for `seed`."""
    config = build_config(family)
    torch.manual_seed(seed)
    model = _model_class(family)(config).eval()
    _silence_tokens(model, tokenizer if tokenizer is not None else build_tokenizer(family))
    return model


def build_generation_config() -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=16, **_special_ids())


def build_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny checkpoint of `family` to `out_dir` (deterministic for `seed`); return the path."""
    _check_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    processor = build_processor(family, tokenizer)
    model = build_model(family, seed, tokenizer)
    model.generation_config = build_generation_config()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(
        out
    )  # also writes the chat template next to the tokenizer (llava_hf reads it there)
    return out


# ------------------------------------------------------------------------------------- LLaVA-NeXT format


def llava_next_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """An HF LLaVA-OneVision model's tensors under LLaVA-NeXT's names: its `LlavaQwenForCausalLM` holds the Qwen2 LLM
    as `model` (with `mm_projector` = Sequential(Linear, GELU, Linear), `image_newline` and `vision_tower`, whose SigLIP
    model is `vision_tower.vision_model`) and `lm_head`."""
    inner = model.model
    siglip = getattr(inner.vision_tower, "vision_model", inner.vision_tower)  # 4.x wraps the transformer, 5.x not
    modules = {
        "model.": inner.language_model,
        "lm_head.": model.lm_head,
        "model.mm_projector.0.": inner.multi_modal_projector.linear_1,
        "model.mm_projector.2.": inner.multi_modal_projector.linear_2,
        "model.vision_tower.vision_tower.vision_model.": siglip,
    }
    state = {prefix + name: tensor for prefix, module in modules.items() for name, tensor in module.state_dict().items()}
    state["model.image_newline"] = inner.image_newline
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def llava_next_config() -> dict[str, Any]:
    """config.json in LLaVA-NeXT's format for the llava_onevision tiny: the Qwen2 keys at the top level, `mm_*` keys,
    model_type "llava", and the SigLIP tower named by a folder beside it (resolved against the checkpoint)."""
    grid = llava_config().image_grid_pinpoints
    return {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        **TEXT_SIZES,
        **_special_ids(),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "image_token_index": TOKEN_ID["<image>"],
        "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [list(pair) for pair in grid],
        "mm_vision_tower": LLAVA_NEXT_TOWER,
        "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_newline_position": "one_token",
        "mm_spatial_pool_mode": "bilinear",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "use_mm_proj": True,
        "torch_dtype": "float32",
    }


def build_tiny_llava_next_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the llava_onevision tiny (same seed, same weights) in LLaVA-NeXT's format to `out_dir`.

    The tower folder holds the full SigLIP (one layer more than stored in the checkpoint, as LLaVA-NeXT drops the
    last layer when it loads the tower) so LLaVA-NeXT's own loader could read it too.
    """
    from safetensors.torch import save_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer("llava_onevision")
    model = build_model("llava_onevision", seed, tokenizer)
    save_file(llava_next_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llava_next_config(), indent=2))
    tokenizer.save_pretrained(out)
    build_generation_config().save_pretrained(out)

    vision = model.config.vision_config
    tower_config = SiglipVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_hidden_layers + 1, num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size, patch_size=vision.patch_size,
    )  # fmt: skip
    torch.manual_seed(seed + 1)
    tower = SiglipVisionModel(tower_config).eval()
    stored = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).state_dict()
    getattr(tower, "vision_model", tower).load_state_dict(stored, strict=False)  # the extra last layer stays random
    tower.save_pretrained(out / LLAVA_NEXT_TOWER)
    return out


# --------------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLASHVID_CACHE") or Path.home() / ".cache" / "flashvid-suite")


def tiny_checkpoint_path(family: str, cache_dir: str | Path | None = None) -> Path:
    """The cached checkpoint of `family` (or `llava_next`) for the installed transformers, built on first use.

    Built in a temporary sibling folder and renamed into place, so a concurrent or interrupted build never
    leaves a half-written checkpoint where readers look.
    """
    _check_family(family, CHECKPOINTS)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "tiny" / f"transformers-{transformers.__version__}" / family
    if _is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
    try:
        if family == LLAVA_NEXT:
            build_tiny_llava_next_checkpoint(staging)
        else:
            build_tiny_checkpoint(family, staging)
        (staging / BUILD_MARKER).write_text(json.dumps({"builder_version": BUILDER_VERSION, "seed": 0}))
        _move_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_current(path: Path) -> bool:
    """Whether `path` holds a complete checkpoint made by this version of the builder."""
    try:
        return json.loads((path / BUILD_MARKER).read_text()).get("builder_version") == BUILDER_VERSION
    except (OSError, ValueError):
        return False


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an outdated `target` is first renamed aside, then deleted."""
    if target.exists() and not _is_current(target):
        outdated = Path(tempfile.mkdtemp(prefix=f".{target.name}-outdated-", dir=target.parent))
        with contextlib.suppress(OSError):  # another process may have moved it first
            target.rename(outdated / target.name)
        shutil.rmtree(outdated, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not _is_current(target):  # lost a race only if the winner finished
            raise


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build (once) and print the tiny offline checkpoints.")
    parser.add_argument(
        "--family", action="append", choices=CHECKPOINTS, help="repeatable; default: all families"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="default: $FLASHVID_CACHE or ~/.cache/flashvid-suite"
    )
    args = parser.parse_args(argv)
    for family in args.family or FAMILIES:
        print(tiny_checkpoint_path(family, args.cache_dir))


if __name__ == "__main__":
    main()
