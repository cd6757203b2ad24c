"""lmms-lab's LLaVA-NeXT checkpoints (`lmms-lab/llava-onevision-qwen2-7b-ov`, `lmms-lab/LLaVA-Video-7B-Qwen2`), the
ones the paper's numbers come from, converted once into transformers' `LlavaOnevisionForConditionalGeneration`
format and cached.

    path = converted_checkpoint("lmms-lab/llava-onevision-qwen2-7b-ov")   # HF-format folder, converted on first use
    python -m lmms_eval_models.conversion.llava_next SOURCE [--cache-dir DIR]

What changes, following the conversion transformers ships for LLaVA-OneVision (`convert_llava_onevision_weights_to_
hf.py`), with three deliberate differences:

- tensor names: LLaVA-NeXT's module tree (`model.layers.*`, `model.mm_projector.{0,2}`, `model.image_newline`,
  `model.vision_tower.vision_tower.vision_model.*`, `lm_head`) renamed to the installed transformers' (resolved
  against the model class itself, so 4.57 and 5.x each get the names they load); the tensors are copied as they
  are, shard by shard (no float16 cast, no model in memory);
- the vocabulary keeps its size: `<image>` and `<video>` are added to the tokenizer inside the rows the embedding
  already has (Qwen2 checkpoints carry unused rows) instead of resizing it with sampled rows. LLaVA-NeXT's loader
  shrinks the embedding to the tokenizer's length, so the rows beyond it (and the two added tokens) go into the
  generation config's `suppress_tokens`: greedy decoding picks from the same vocabulary as the official path;
- the vision tower's size is read from the weights (LLaVA-NeXT drops SigLIP's last layer) and its attention heads
  from `mm_vision_tower`'s config (a folder, relative to the checkpoint or absolute, or the hub's so400m SigLIP).

The processor resizes to the tower's input size with SigLIP's mean and std (0.5), as LLaVA-NeXT's image processor.
The cache folder is keyed by the source's identity (its resolved path, every file's name, size and modification
time, the vision tower config's, the converter's version and the installed transformers version); it is written in
a temporary folder and renamed into place under a file lock, so concurrent processes (one per GPU) convert once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CONVERTER_VERSION = 1
MARKER = "flashvid_conversion.json"

# The LLM keys of LLaVA-NeXT's config (a Qwen2Config subclass), copied into the text config.
_QWEN2_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "sliding_window",
    "use_sliding_window", "max_window_layers", "hidden_act", "attention_dropout", "bos_token_id", "eos_token_id",
    "initializer_range",
)  # fmt: skip
SUPPORTED_ARCHITECTURES = ("LlavaQwenForCausalLM",)
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)

# google/siglip-so400m-patch14-384, the tower of every LLaVA-OneVision / LLaVA-Video checkpoint.
SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
_SIGLIP_SO400M_CONFIG = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}  # fmt: skip
# LLaVA-NeXT's SigLIP image processor normalises with these, whatever the checkpoint says.
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# LLaVA-NeXT's tensor-name prefixes.
_NEXT_VISION = "model.vision_tower.vision_tower.vision_model."
_NEXT_PROJECTOR = "model.mm_projector."
_NEXT_NEWLINE = "model.image_newline"
_PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}  # Sequential(Linear, GELU, Linear)

_SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


# ------------------------------------------------------------------------------------------------ detection


def is_llava_next_config(raw: Mapping[str, Any]) -> bool:
    """Whether a config.json is LLaVA-NeXT's (one flat LLM config with `mm_*` keys), not transformers' nested one."""
    return "mm_vision_tower" in raw and "text_config" not in raw


def llava_next_config(pretrained: str, revision: str | None = None) -> dict[str, Any] | None:
    """`pretrained`'s config.json if it is a LLaVA-NeXT checkpoint (local folder or hub id), else None.

    Any failure to read a config (no such folder, not cached offline) is "not LLaVA-NeXT": the HF loader then reports
    the problem in its own words.
    """
    path = Path(pretrained) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(pretrained), "config.json", revision=revision))
        except Exception:  # any hub or path error means "not a LLaVA-NeXT checkpoint we can see"
            return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and is_llava_next_config(raw) else None


def check_supported(raw: Mapping[str, Any], source: str) -> None:
    """Refuse what the conversion does not cover (ValueError naming the config key and the allowed values)."""
    architectures = raw.get("architectures") or []
    if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise ValueError(
            f"{source}: architectures={architectures} is not supported: allowed {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(LLaVA-NeXT's LLaVA-Qwen2 models: LLaVA-OneVision, LLaVA-Video)"
        )
    projector = raw.get("mm_projector_type", "linear")
    if projector not in SUPPORTED_PROJECTORS:
        raise ValueError(
            f"{source}: mm_projector_type={projector!r} is not supported: allowed {', '.join(SUPPORTED_PROJECTORS)}"
        )
    if raw.get("mm_use_im_start_end", False):
        raise ValueError(f"{source}: mm_use_im_start_end=true is not supported: allowed false")
    if raw.get("add_faster_video", False):
        raise ValueError(f"{source}: add_faster_video=true is not supported: allowed false")


# --------------------------------------------------------------------------------------------------- names


def hf_parameter_name(next_name: str, vision_prefix: str) -> str | None:
    """The installed transformers' name of LLaVA-NeXT tensor `next_name` (None: a tensor the HF model has no use for).

    vision_prefix: where the SigLIP transformer's parameters live in the HF model ("model.vision_tower.vision_model."
    in transformers 4.x, "model.vision_tower." in 5.x).
    """
    if next_name.endswith(".inv_freq"):
        return None  # rotary buffers, recomputed
    if next_name.startswith(_NEXT_VISION):
        rest = next_name[len(_NEXT_VISION) :]
        return None if rest.startswith("head.") else vision_prefix + rest  # LLaVA-NeXT replaces the head
    if next_name.startswith(_NEXT_PROJECTOR):
        index, _, rest = next_name[len(_NEXT_PROJECTOR) :].partition(".")
        if index not in _PROJECTOR_LAYERS:
            raise ValueError(f"unexpected projector tensor {next_name!r}: mlp2x_gelu has layers 0 and 2")
        return f"model.multi_modal_projector.{_PROJECTOR_LAYERS[index]}.{rest}"
    if next_name == _NEXT_NEWLINE:
        return "model.image_newline"
    if next_name.startswith("model.vision_tower.") or next_name.startswith("model.mm_") or "faster_token" in next_name:
        raise ValueError(f"unexpected tensor {next_name!r} in the LLaVA-NeXT checkpoint")
    if next_name.startswith("model."):
        return "model.language_model." + next_name[len("model.") :]
    if next_name.startswith("lm_head."):
        return next_name
    raise ValueError(f"unexpected tensor {next_name!r} in the LLaVA-NeXT checkpoint")


# ----------------------------------------------------------------------------------------------- weights


def _weight_files(source: Path) -> list[str]:
    """The checkpoint's safetensors files, in the order of its index (or the single file)."""
    index = source / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    if (source / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ValueError(
        f"{source}: no model.safetensors or model.safetensors.index.json (the conversion reads safetensors only)"
    )


def _tensor_shapes(source: Path, files: Iterable[str]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(source / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


# ---------------------------------------------------------------------------------------------- configs


def _vision_tower_config(raw: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The SigLIP config `mm_vision_tower` names: a folder (relative to the checkpoint, or absolute) with a config.json,
    or the so400m SigLIP every lmms-lab checkpoint uses, or a hub id already in the local cache."""
    tower = str(raw.get("mm_vision_tower", ""))
    for folder in (source / tower, Path(tower)):
        if tower and (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            break
    else:
        if tower == SIGLIP_SO400M:
            config = dict(_SIGLIP_SO400M_CONFIG)
        else:
            try:
                from huggingface_hub import hf_hub_download

                config = json.loads(Path(hf_hub_download(tower, "config.json")).read_text())
            except Exception as error:  # offline, unknown repo, not a path: say which key to fix
                raise ValueError(
                    f"{source}: mm_vision_tower={tower!r} names no readable SigLIP config: allowed a folder with a "
                    f"config.json (relative to the checkpoint or absolute), {SIGLIP_SO400M}, or a cached hub id"
                ) from error
    if config.get("model_type") == "siglip":
        config = config.get("vision_config", {})
    if "siglip" not in str(config.get("model_type", "siglip_vision_model")):
        raise ValueError(f"{source}: mm_vision_tower={tower!r} is a {config.get('model_type')}, not a SigLIP tower")
    return config


def vision_config(raw: Mapping[str, Any], source: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The HF SigLIP vision config: sizes from the weights (layers as stored: LLaVA-NeXT drops the last one), heads,
    activation and epsilon from the tower's config."""
    tower = _vision_tower_config(raw, source)
    patch_shape = shapes.get(_NEXT_VISION + "embeddings.patch_embedding.weight")
    positions = shapes.get(_NEXT_VISION + "embeddings.position_embedding.weight")
    if patch_shape is None or positions is None:
        raise ValueError(f"{source}: no SigLIP vision tower weights ({_NEXT_VISION}embeddings.*)")
    hidden, patch = patch_shape[0], patch_shape[-1]
    side = math.isqrt(positions[0])
    layer_prefix = _NEXT_VISION + "encoder.layers."
    layers = {name[len(layer_prefix) :].split(".")[0] for name in shapes if name.startswith(layer_prefix)}
    intermediate = shapes[layer_prefix + "0.mlp.fc1.weight"][0]
    heads = int(tower.get("num_attention_heads", 0))
    if tower.get("hidden_size", hidden) != hidden or tower.get("patch_size", patch) != patch or heads < 1:
        raise ValueError(
            f"{source}: mm_vision_tower={raw.get('mm_vision_tower')!r} does not describe the stored tower "
            f"(weights: hidden {hidden}, patch {patch}; config: hidden {tower.get('hidden_size')}, patch "
            f"{tower.get('patch_size')}, heads {tower.get('num_attention_heads')})"
        )
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads,
        "image_size": side * patch,
        "patch_size": patch,
        "hidden_act": tower.get("hidden_act", "gelu_pytorch_tanh"),
        "layer_norm_eps": tower.get("layer_norm_eps", 1e-6),
        "vision_use_head": False,
    }


def text_config(raw: Mapping[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """The Qwen2 config of the LLM; rope_scaling is left out (LLaVA-NeXT's LLaVA-Qwen model sets it to None)."""
    config = {key: raw[key] for key in _QWEN2_KEYS if key in raw}
    config.update(model_type="qwen2", tie_word_embeddings=tie_word_embeddings)
    return config


def official_vocabulary_size(raw: Mapping[str, Any], source_tokens: int, has_patch_token: bool) -> int:
    """The vocabulary LLaVA-NeXT's loader leaves the model: the tokenizer's length, plus its `<im_patch>` token when
    `mm_use_im_patch_token` (default true) adds one."""
    adds_patch_token = bool(raw.get("mm_use_im_patch_token", True)) and not has_patch_token
    return source_tokens + int(adds_patch_token)


# ------------------------------------------------------------------------------------------------- convert


def convert_llava_next(source: str | Path, out_dir: str | Path) -> Path:
    """Write the HF-format conversion of the LLaVA-NeXT checkpoint folder `source` into `out_dir` (created)."""
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tokenizers import AddedToken
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    from lmms_eval_models.tiny_checkpoints import chat_template

    source, out = Path(source), Path(out_dir)
    raw = json.loads((source / "config.json").read_text())
    check_supported(raw, str(source))
    files = _weight_files(source)
    shapes = _tensor_shapes(source, files)
    tie = "lm_head.weight" not in shapes
    vision = vision_config(raw, source, shapes)
    vocab_rows = shapes["model.embed_tokens.weight"][0]

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    source_tokens = len(tokenizer)
    official_size = official_vocabulary_size(raw, source_tokens, "<im_patch>" in tokenizer.get_vocab())
    added = [token for token in ("<image>", "<video>") if token not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in added], special_tokens=True)
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    if max(image_id, video_id) >= vocab_rows:
        raise ValueError(
            f"{source}: the embedding has {vocab_rows} rows, no room for <image> and <video> (ids {image_id}, "
            f"{video_id}); the conversion does not resize embeddings"
        )
    major_5 = int(transformers.__version__.split(".")[0]) >= 5
    dtype_key = "dtype" if major_5 else "torch_dtype"
    config = LlavaOnevisionConfig(
        text_config=text_config(raw, tie),
        vision_config=vision,
        image_token_index=image_id,
        video_token_index=video_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=raw.get("image_aspect_ratio", "anyres_max_9"),
        image_grid_pinpoints=raw.get("image_grid_pinpoints") or [[vision["image_size"]] * 2],
        tie_word_embeddings=tie,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        **{dtype_key: raw.get("torch_dtype", "float16")},
    )

    with torch.device("meta"):
        expected = set(LlavaOnevisionForConditionalGeneration(config).state_dict())
    vision_prefix = (
        "model.vision_tower.vision_model."
        if any(name.startswith("model.vision_tower.vision_model.") for name in expected)
        else "model.vision_tower."
    )
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for file in files:  # one shard in memory at a time
        tensors = {}
        with safe_open(str(source / file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                target = hf_parameter_name(name, vision_prefix)
                if target is not None:
                    tensors[target] = handle.get_tensor(name)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    written = set(weight_map)
    missing = expected - written - ({"lm_head.weight"} if tie else set())
    unexpected = written - expected
    if missing or unexpected:
        raise ValueError(
            f"{source}: the converted tensors do not match {LlavaOnevisionForConditionalGeneration.__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if len(files) > 1 or files[0] != "model.safetensors":
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)

    size = {"height": vision["image_size"], "width": vision["image_size"]}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=config.image_grid_pinpoints, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD),
        num_image_tokens=(vision["image_size"] // vision["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        chat_template=chat_template("llava_onevision"),
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)

    try:
        generation = GenerationConfig.from_pretrained(str(source))
    except OSError:
        generation = GenerationConfig(
            bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"), pad_token_id=raw.get("pad_token_id")
        )
    # LLaVA-NeXT's loader cuts the vocabulary to the tokenizer's length: the rows beyond it, and the two tokens added
    # here, can never be generated there, so they must not be here either.
    suppressed = sorted(set(range(official_size, vocab_rows)) | {i for i in (image_id, video_id) if i >= source_tokens})
    if suppressed:
        generation.suppress_tokens = suppressed
    generation.save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------- cache


def conversion_cache_dir() -> Path:
    """$FLASHVID_CACHE/converted, else <HF_HOME>/flashvid-converted (next to the hub cache)."""
    configured = os.environ.get("FLASHVID_CACHE")
    if configured:
        return Path(configured) / "converted"
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "flashvid-converted"


def _file_identity(folder: Path) -> list[list[Any]]:
    rows = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()  # follows the hub cache's symlinks to the blobs
            rows.append([str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns])
    return rows


def source_identity(source: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    """What the converted copy depends on: the source's files, its vision tower config, the converter and the
    installed transformers (whose tensor names the copy uses)."""
    import transformers

    tower = str(raw.get("mm_vision_tower", ""))
    tower_files = next(
        ((str(folder.resolve()), _file_identity(folder)) for folder in (source / tower, Path(tower))
         if tower and folder.is_dir()),
        (tower, []),
    )  # fmt: skip
    return {
        "source": str(source.resolve()),
        "files": _file_identity(source),
        "vision_tower": tower_files,
        "converter": CONVERTER_VERSION,
        "transformers": transformers.__version__,
    }


def _local_source(pretrained: str, revision: str | None) -> Path:
    folder = Path(pretrained)
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(pretrained), revision=revision, allow_patterns=_SOURCE_PATTERNS))


def _is_complete(folder: Path, key: str) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def converted_checkpoint(
    pretrained: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The HF-format copy of the LLaVA-NeXT checkpoint `pretrained` (folder or hub id), converted on first use.

    Concurrent callers wait on a file lock; the copy is built in a temporary folder and renamed into place, so no
    reader ever sees a half-written one. A source whose files change gets a new key (and a new copy).
    """
    from filelock import FileLock

    source = _local_source(pretrained, revision)
    raw = json.loads((source / "config.json").read_text())
    check_supported(raw, str(pretrained))
    identity = source_identity(source, raw)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else conversion_cache_dir()
    target = root / f"{Path(str(pretrained).rstrip('/')).name}-{key}"
    if _is_complete(target, key):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target, key):  # another process finished while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
        try:
            convert_llava_next(source, staging)
            (staging / MARKER).write_text(json.dumps({"key": key, **identity}, indent=1))
            if target.exists():  # an interrupted copy from before the marker existed
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_pretrained(pretrained: str, revision: str | None = None, cache_dir: str | Path | None = None) -> str:
    """What to load for `pretrained`: itself when it is HF-format, its converted copy when it is LLaVA-NeXT's."""
    if llava_next_config(pretrained, revision) is None:
        return pretrained
    return str(converted_checkpoint(pretrained, revision, cache_dir))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a LLaVA-NeXT (lmms-lab) checkpoint to the HF format, once.")
    parser.add_argument("source", help="a checkpoint folder or hub id, e.g. lmms-lab/llava-onevision-qwen2-7b-ov")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--cache-dir", default=None, help="default: $FLASHVID_CACHE/converted or <HF_HOME>/...")
    args = parser.parse_args(argv)
    print(converted_checkpoint(args.source, args.revision, args.cache_dir))


if __name__ == "__main__":
    main()
