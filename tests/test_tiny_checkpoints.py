"""The tiny checkpoints reload offline through the Auto classes and run a video forward and a short generate."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from lmms_eval_models.tiny_checkpoints import FAMILIES, SPECIAL_TOKENS, TOKEN_ID, build_tiny_checkpoint, main


def _synthetic_video(num_frames: int = 4, size: int = 64) -> np.ndarray:
    """Deterministic moving gradient, (frames, height, width, 3) uint8."""
    ramp = np.arange(size, dtype=np.int64)
    frames = [(ramp[None, :, None] * 4 + ramp[:, None, None] * 2 + 30 * t + np.arange(3) * 50) % 256
              for t in range(num_frames)]  # fmt: skip
    return np.stack(frames).astype(np.uint8)


def _prompt_inputs(processor, family: str):
    messages = [
        {
            "role": "user",
            "content": [{"type": "video"}, {"type": "text", "text": "What happens? (A) x (B) y"}],
        }
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    options = {"videos_kwargs": {"do_sample_frames": False}} if family == "qwen3_vl" else {}
    return prompt, processor(text=[prompt], videos=[_synthetic_video()], return_tensors="pt", **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_reloads_and_generates(tiny_checkpoint, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    path = tiny_checkpoint(family)
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()

    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == list(
        range(len(SPECIAL_TOKENS))
    )
    assert model.config.text_config.num_hidden_layers == 4
    prompt, inputs = _prompt_inputs(processor, family)
    # lmms-eval's llava_hf class renders prompts with the tokenizer's template: it must match the processor's.
    messages = [
        {
            "role": "user",
            "content": [{"type": "video"}, {"type": "text", "text": "What happens? (A) x (B) y"}],
        }
    ]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompt

    video_token = TOKEN_ID["<video>"] if family.startswith("llava") else TOKEN_ID["<|video_pad|>"]
    assert int((inputs["input_ids"] == video_token).sum()) > 4
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape == (2,)
    assert tokenizer.decode(new_tokens, skip_special_tokens=True) != ""  # special tokens are never picked


def test_llava_grid_is_odd(tiny_checkpoint):
    """7×7 patches: bilinear pooling (4×4) and stride-2 average pooling (3×3) give different layouts."""
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(tiny_checkpoint("llava_video")).vision_config
    assert (vision.image_size // vision.patch_size) % 2 == 1


def test_build_is_deterministic(tmp_path):
    def digest(seed: int, name: str) -> str:
        path = build_tiny_checkpoint("qwen2_5_vl", tmp_path / name, seed=seed)
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    assert digest(0, "a") == digest(0, "b") != digest(1, "c")


def test_cache_is_reused_and_cli_prints_paths(tmp_path, capsys):
    main(["--family", "qwen3_vl", "--cache-dir", str(tmp_path)])
    first = capsys.readouterr().out.strip()
    weights = tmp_path.glob("tiny/transformers-*/qwen3_vl/model.safetensors")
    mtime = next(weights).stat().st_mtime_ns
    main(["--family", "qwen3_vl", "--cache-dir", str(tmp_path)])
    assert capsys.readouterr().out.strip() == first
    assert next(tmp_path.glob("tiny/transformers-*/qwen3_vl/model.safetensors")).stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "tiny").glob("*/.*")]  # no staging folder left behind


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'llava'"):
        build_tiny_checkpoint("llava", tmp_path)


def test_outdated_cache_is_rebuilt(tmp_path):
    from lmms_eval_models.tiny_checkpoints import BUILD_MARKER, tiny_checkpoint_path

    path = tiny_checkpoint_path("qwen3_vl", tmp_path)
    (path / BUILD_MARKER).write_text('{"builder_version": 0}')  # as left by an older builder
    (path / "stale.txt").write_text("from an older build")
    assert tiny_checkpoint_path("qwen3_vl", tmp_path) == path
    assert not (path / "stale.txt").exists() and (path / "config.json").is_file()
