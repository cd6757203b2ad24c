"""Model presets: the published 7B shapes and small CPU shapes of the same architectures.

Cost does not depend on weight values, so a model built from the published config values with random weights
times like the released checkpoint. The small shapes keep each family's token geometry (SigLIP 384/14 → 27×27
patches → 14×14 after pooling; Qwen's 14-px patches merged 2×2) and the 7B's head ratio (kv/heads = 1/7) and
pruning-layer ratio (K/L = 20/28), shrinking only widths and depths so that a CPU run takes seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import transformers
from packaging.version import Version

FAMILY_LLAVA = "llava_onevision"
FAMILY_QWEN2_5 = "qwen2_5_vl"

# Token ids of the released checkpoints (Qwen2 tokenizer); the small shapes use the same values, so their
# vocabulary is cut below none of them: ids are remapped in `small_token_ids`.
LLAVA_VIDEO_TOKEN_ID = 151647
LLAVA_IMAGE_TOKEN_ID = 151646
QWEN_TOKEN_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
SMALL_VOCAB = 2048


@dataclass(frozen=True)
class ModelPreset:
    """A named model shape: how to build its config and how the paper ran it."""

    name: str
    family: str  # FAMILY_LLAVA or FAMILY_QWEN2_5
    small: bool  # True: CPU shape; False: the published 7B shape
    build_config: Callable[[], Any]
    default_frames: int
    llava_video_layout: bool = False  # LLaVA-Video: average pooling 13×13 + one newline per frame
    paper_table: str | None = None  # id in results/efficiency/paper_table6.csv ("table6" / "table10")
    description: str = ""


def _is_v5() -> bool:
    return Version(transformers.__version__) >= Version("5.0.0")


def _rope(theta: float, mrope_section: list[int] | None = None) -> dict[str, Any]:
    """Rope keys in the installed transformers' spelling (5.x `rope_parameters`, 4.57 `rope_scaling`)."""
    if mrope_section is None:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}} if _is_v5() else {"rope_theta": theta}
    scaling = {"rope_type": "default", "mrope_section": mrope_section}
    if _is_v5():
        return {"rope_parameters": {**scaling, "rope_theta": theta}}
    return {"rope_scaling": {**scaling, "type": "mrope"}, "rope_theta": theta}


# Qwen2-7B (LLaVA-OneVision-7B / LLaVA-Video-7B LLM) and Qwen2.5-7B (Qwen2.5-VL-7B LLM): published values.
QWEN2_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
# SigLIP so400m patch14 384 with its last layer dropped (26 of 27 layers are used by LLaVA-OneVision).
SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}
# Small CPU shapes: 7 layers with pruning at 5 keeps K/L = 20/28; 7 heads over 1 KV head keeps g/h = 4/28.
SMALL_TEXT = {
    "vocab_size": SMALL_VOCAB,
    "hidden_size": 224,
    "intermediate_size": 1184,
    "num_hidden_layers": 7,
    "num_attention_heads": 7,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
SMALL_SIGLIP = {**SIGLIP_SO400M, "hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 3,
                "num_attention_heads": 4}  # fmt: skip
# Small-shape special ids (inside SMALL_VOCAB).
SMALL_IDS = {"image": 10, "video": 11, "vision_start": 12, "vision_end": 13}


def _llava_config(vision: dict[str, Any], text: dict[str, Any], small: bool) -> Any:
    from transformers import LlavaOnevisionConfig

    text = {"model_type": "qwen2", **text, **_rope(1_000_000.0)}
    ids = (SMALL_IDS["image"], SMALL_IDS["video"]) if small else (LLAVA_IMAGE_TOKEN_ID, LLAVA_VIDEO_TOKEN_ID)
    return LlavaOnevisionConfig(
        vision_config=dict(vision),
        text_config=text,
        image_token_index=ids[0],
        video_token_index=ids[1],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def llava_7b_config() -> Any:
    """LLaVA-OneVision-7B / LLaVA-Video-7B (same weights' shapes; they differ in pooling and layout)."""
    return _llava_config(SIGLIP_SO400M, QWEN2_7B_TEXT, small=False)


def llava_small_config() -> Any:
    return _llava_config(SMALL_SIGLIP, SMALL_TEXT, small=True)


def _qwen2_5_config(vision: dict[str, Any], text: dict[str, Any], small: bool) -> Any:
    from transformers import Qwen2_5_VLConfig

    token_ids = (
        {"image_token_id": SMALL_IDS["image"], "video_token_id": SMALL_IDS["video"],
         "vision_start_token_id": SMALL_IDS["vision_start"], "vision_end_token_id": SMALL_IDS["vision_end"]}
        if small else dict(QWEN_TOKEN_IDS)
    )  # fmt: skip
    # M-RoPE sections are in units of head_dim / 2 (7B: 128 / 2 = 64 = 16 + 24 + 24; small: 32 / 2 = 16).
    mrope = [4, 6, 6] if small else [16, 24, 24]
    text = {**text, **_rope(1_000_000.0, mrope)}
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision), tie_word_embeddings=False, **token_ids)


QWEN2_5_VL_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "hidden_act": "silu",
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "out_hidden_size": QWEN2_7B_TEXT["hidden_size"],
}
SMALL_QWEN_VISION = {**QWEN2_5_VL_7B_VISION, "depth": 4, "hidden_size": 96, "intermediate_size": 256,
                     "num_heads": 4, "fullatt_block_indexes": [3], "out_hidden_size": SMALL_TEXT["hidden_size"]}  # fmt: skip
QWEN2_5_7B_TEXT = {**QWEN2_7B_TEXT, "max_position_embeddings": 128000}


def qwen2_5_vl_7b_config() -> Any:
    return _qwen2_5_config(QWEN2_5_VL_7B_VISION, QWEN2_5_7B_TEXT, small=False)


def qwen2_5_vl_small_config() -> Any:
    return _qwen2_5_config(SMALL_QWEN_VISION, SMALL_TEXT, small=True)


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset("llava_onevision_7b", FAMILY_LLAVA, False, llava_7b_config, 64, paper_table="table6",
                    description="LLaVA-OneVision-7B: SigLIP so400m (26 layers) + Qwen2-7B, bilinear 14×14 pooling"),
        ModelPreset("llava_video_7b", FAMILY_LLAVA, False, llava_7b_config, 64, llava_video_layout=True,
                    paper_table="table10",
                    description="LLaVA-Video-7B: SigLIP so400m + Qwen2-7B, average pooling 13×13 + newline per frame"),
        ModelPreset("qwen2_5_vl_7b", FAMILY_QWEN2_5, False, qwen2_5_vl_7b_config, 64,
                    description="Qwen2.5-VL-7B: 32-block windowed ViT (1280) + Qwen2.5-7B"),
        ModelPreset("llava_onevision_small", FAMILY_LLAVA, True, llava_small_config, 16, paper_table="table6",
                    description="LLaVA-OneVision architecture at CPU size (SigLIP 96×3, Qwen2 224×7)"),
        ModelPreset("llava_video_small", FAMILY_LLAVA, True, llava_small_config, 16, llava_video_layout=True,
                    paper_table="table10", description="LLaVA-Video layout at CPU size"),
        ModelPreset("qwen2_5_vl_small", FAMILY_QWEN2_5, True, qwen2_5_vl_small_config, 16,
                    description="Qwen2.5-VL architecture at CPU size (ViT 96×4, Qwen2.5 224×7)"),
    )
}  # fmt: skip


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; a clear error lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown --model {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def family_of_model(model: Any) -> str:
    """The preset family of a transformers model instance (for a loaded checkpoint)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if "LlavaOnevisionForConditionalGeneration" in names:
        return FAMILY_LLAVA
    if "Qwen2_5_VLForConditionalGeneration" in names:
        return FAMILY_QWEN2_5
    raise TypeError(f"flashvid-bench supports LLaVA-OneVision/LLaVA-Video and Qwen2.5-VL models, not {type(model).__name__}")
