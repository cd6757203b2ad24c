"""lmms-lab (LLaVA-NeXT format) checkpoints given as `pretrained`: detected, converted once into a cache keyed by the
source, loaded as HF checkpoints are; the converted tiny model computes what the HF tiny model built from the same
weights computes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from lmms_eval_models.conversion.llava_next import (
    MARKER,
    check_supported,
    converted_checkpoint,
    hf_parameter_name,
    llava_next_config,
    official_vocabulary_size,
    resolve_pretrained,
)


def _model(path: Path | str) -> torch.nn.Module:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def _inputs(video_token_id: int, frames: int = 3) -> dict[str, torch.Tensor]:
    """A prompt with text on both sides of one video (7×7 patches → 4×4 pooled per frame, one newline)."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(9, 512, (20,), generator=generator)
    video = torch.full((frames * 16 + 1,), video_token_id)
    return {
        "input_ids": torch.cat([text[:12], video, text[12:]])[None],
        "pixel_values_videos": torch.randn(1, frames, 3, 98, 98, generator=generator),
    }


def test_only_llava_next_configs_are_detected(tiny_checkpoint, tmp_path):
    assert llava_next_config(str(tiny_checkpoint("llava_next")))["architectures"] == ["LlavaQwenForCausalLM"]
    assert llava_next_config(str(tiny_checkpoint("llava_onevision"))) is None
    assert llava_next_config(str(tmp_path / "missing")) is None
    hf = str(tiny_checkpoint("llava_onevision"))
    assert resolve_pretrained(hf) == hf  # HF-format checkpoints load as they are


def test_converted_model_computes_what_the_hf_model_from_the_same_weights_computes(tiny_checkpoint, tmp_path):
    converted = converted_checkpoint(str(tiny_checkpoint("llava_next")), cache_dir=tmp_path)
    ours, reference = _model(converted), _model(tiny_checkpoint("llava_onevision"))
    assert ours.config.video_token_id == reference.config.video_token_id
    inputs = _inputs(ours.config.video_token_id)
    with torch.no_grad():
        video_logits = ours(**inputs).logits, reference(**inputs).logits
        text_logits = ours(input_ids=inputs["input_ids"][:, :12]).logits, reference(input_ids=inputs["input_ids"][:, :12]).logits
    for got, expected in (video_logits, text_logits):
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted)
    sample = "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n"
    assert processor.tokenizer(sample).input_ids == AutoProcessor.from_pretrained(
        tiny_checkpoint("llava_onevision")
    ).tokenizer(sample).input_ids
    assert list(processor.video_processor.image_mean) == [0.5, 0.5, 0.5]
    # the tiny tokenizer has fewer tokens than the embedding has rows: LLaVA-NeXT would cut those rows off
    assert list(ours.generation_config.suppress_tokens) == list(range(len(processor.tokenizer), 512))


def test_conversion_is_cached_by_source_identity(tiny_checkpoint, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(tiny_checkpoint("llava_next"), source)
    cache = tmp_path / "cache"
    first = converted_checkpoint(str(source), cache_dir=cache)
    marker = (first / MARKER).stat().st_mtime_ns
    assert converted_checkpoint(str(source), cache_dir=cache) == first
    assert (first / MARKER).stat().st_mtime_ns == marker  # not converted again

    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a changed source
    second = converted_checkpoint(str(source), cache_dir=cache)
    assert second != first and second.parent == first.parent
    assert json.loads((second / MARKER).read_text())["source"] == str(source.resolve())
    assert sorted(path.name for path in cache.iterdir() if not path.name.endswith(".lock")) == sorted(
        [first.name, second.name]
    )  # no staging folder left behind


def test_concurrent_processes_convert_once(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llava_next")
    cache = tmp_path / "cache"
    script = (
        "import sys; from lmms_eval_models.conversion.llava_next import converted_checkpoint; "
        "print(converted_checkpoint(sys.argv[1], cache_dir=sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [
        subprocess.Popen([sys.executable, "-c", script, str(source), str(cache)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [error[-2000:] for _, error in outputs]
    paths = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(paths) == 1
    folders = [path for path in cache.iterdir() if path.is_dir()]
    assert [str(folder) for folder in folders] == list(paths)  # one copy, no staging folder left
    assert json.loads((folders[0] / MARKER).read_text())["key"] in folders[0].name


def test_rows_beyond_the_official_vocabulary_are_never_generated(tiny_checkpoint, tmp_path):
    """LLaVA-NeXT's loader cuts the embedding to the tokenizer's length; the conversion keeps the rows and suppresses
    them, so greedy decoding chooses among the same tokens."""
    from safetensors.torch import load_file, save_file

    source = tmp_path / "padded"
    shutil.copytree(tiny_checkpoint("llava_next"), source)
    tensors = load_file(source / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], torch.randn(8, tensors[name].shape[1])])
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vocab_size": 520}))

    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(source))
    converted = _model(converted_checkpoint(str(source), cache_dir=tmp_path / "cache"))
    assert tokens <= 512 and list(converted.generation_config.suppress_tokens) == list(range(tokens, 520))
    reference = _model(tiny_checkpoint("llava_onevision"))
    inputs = _inputs(converted.config.video_token_id)
    with torch.no_grad():
        difference = converted(**inputs).logits[..., :512] - reference(**inputs).logits
    assert difference.abs().max().item() <= 1e-5


def test_official_vocabulary_counts_llava_next_patch_token():
    assert official_vocabulary_size({}, 151646, has_patch_token=False) == 151647  # mm_use_im_patch_token defaults on
    assert official_vocabulary_size({"mm_use_im_patch_token": False}, 151646, has_patch_token=False) == 151646
    assert official_vocabulary_size({"mm_use_im_patch_token": True}, 151647, has_patch_token=True) == 151647


@pytest.mark.parametrize(
    ("change", "key"),
    [({"architectures": ["LlavaLlamaForCausalLM"]}, "architectures"),
     ({"mm_projector_type": "linear"}, "mm_projector_type"),
     ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
     ({"add_faster_video": True}, "add_faster_video")],
)  # fmt: skip
def test_unsupported_checkpoints_are_refused_naming_the_key(tiny_checkpoint, change, key):
    config = {**json.loads((tiny_checkpoint("llava_next") / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=rf"{key}=.*allowed"):
        check_supported(config, "ckpt")


def test_tensor_names_follow_transformers_conversion():
    prefix = "model.vision_tower.vision_model."
    assert hf_parameter_name("model.layers.3.mlp.up_proj.weight", prefix) == "model.language_model.layers.3.mlp.up_proj.weight"
    assert hf_parameter_name("model.embed_tokens.weight", prefix) == "model.language_model.embed_tokens.weight"
    assert hf_parameter_name("lm_head.weight", prefix) == "lm_head.weight"
    assert hf_parameter_name("model.mm_projector.0.bias", prefix) == "model.multi_modal_projector.linear_1.bias"
    assert hf_parameter_name("model.mm_projector.2.weight", prefix) == "model.multi_modal_projector.linear_2.weight"
    assert hf_parameter_name("model.image_newline", prefix) == "model.image_newline"
    assert (hf_parameter_name("model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", prefix)
            == "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")  # fmt: skip
    assert hf_parameter_name("model.vision_tower.vision_tower.vision_model.head.probe", prefix) is None
    assert hf_parameter_name("model.layers.0.self_attn.rotary_emb.inv_freq", prefix) is None
    with pytest.raises(ValueError, match="unexpected"):
        hf_parameter_name("model.faster_token", prefix)


def test_model_class_loads_a_llava_next_checkpoint(tiny_checkpoint):
    from lmms_eval.models import get_model

    source = tiny_checkpoint("llava_next")
    model = get_model("flashvid_llava_onevision").create_from_arg_string(
        f"pretrained={source},dtype=float32,enable_flashvid=False"
    )
    assert Path(model.checkpoint_path) != source and (Path(model.checkpoint_path) / MARKER).is_file()
    reference = _model(tiny_checkpoint("llava_onevision"))
    inputs = _inputs(model.model.config.video_token_id)
    with torch.no_grad():
        assert (model.model(**inputs).logits - reference(**inputs).logits).abs().max().item() <= 1e-5


# ------------------------------------------------------------------- against the official code, when present

OFFICIAL_ROOT = os.environ.get("FLASHVID_OFFICIAL_ROOT")
TRANSFORMERS_4 = int(__import__("transformers").__version__.split(".")[0]) < 5


@pytest.mark.skipif(
    not (OFFICIAL_ROOT and TRANSFORMERS_4),
    reason="needs FLASHVID_OFFICIAL_ROOT (a checkout of Fanziyang-v/FlashVID, for its llava package) and the paper's "
    "transformers 4.57, which that code is written for",
)
@pytest.mark.parametrize(("pool_mode", "newline", "layout"), [("bilinear", "one_token", "onevision"),
                                                              ("average", "frame", "llava_video")])  # fmt: skip
def test_converted_model_matches_the_official_llava_next_model(tiny_checkpoint, pool_mode, newline, layout):
    """The official repository's LLaVA-NeXT model code on the NeXT-format tiny checkpoint against the converted model
    (with the patch's layout for LLaVA-Video): the same logits in float32."""
    import types

    from safetensors.torch import load_file

    from lmms_eval_models.patches import apply_flashvid

    sys.path.insert(0, OFFICIAL_ROOT)
    from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM

    source = tiny_checkpoint("llava_next")
    config = LlavaQwenConfig.from_pretrained(str(source))
    # LLaVA-NeXT builds SigLIP towers from hub names only; load the local tower by hand, as its load_model does
    config.mm_vision_tower, config.delay_load = "siglip-local", True
    config.mm_spatial_pool_mode, config.mm_newline_position = pool_mode, newline
    official = LlavaQwenForCausalLM(config)
    tower = official.get_vision_tower()
    tower.vision_tower_name = str(source / "vision_tower")
    tower.load_model()
    tower.config = tower.vision_tower.config

    def forward(self, images):  # its batched forward, without the assert on so400m's 729 tokens
        outputs = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return outputs.hidden_states[-1].to(images.dtype)

    tower.forward = types.MethodType(forward, tower)
    missing, unexpected = official.load_state_dict(load_file(source / "model.safetensors"), strict=False)
    assert not unexpected and all("inv_freq" in name for name in missing)
    official = official.float().eval()

    ours = _model(converted_checkpoint(str(source)))
    if layout == "llava_video":
        apply_flashvid(ours, None, video_layout="llava_video")
    frames, text = 3, [1, 20, 30, 40, 50, 2]
    pixels = torch.randn(frames, 3, 98, 98, generator=torch.Generator().manual_seed(0))
    run = frames * 16 + 1 if layout == "onevision" else frames * (9 + 1)
    with torch.no_grad():
        embeds = official.prepare_inputs_labels_for_multimodal(
            torch.tensor([[*text[:3], -200, *text[3:]]]), None, None, None, None, [pixels], modalities=["video"]
        )[4]
        expected = official(inputs_embeds=embeds).logits
        got = ours(input_ids=torch.tensor([[*text[:3], *[ours.config.video_token_id] * run, *text[3:]]]),
                   pixel_values_videos=pixels[None]).logits  # fmt: skip
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
