#!/usr/bin/env python
"""GPU smoke test: FlashVID on a 7B-shaped LLaVA-OneVision with random bf16 weights.

Builds transformers' `LlavaOnevisionForConditionalGeneration` with the real LLaVA-OneVision-7B shapes
(SigLIP so400m patch14-384 with its 26 used layers, Qwen2-7B with 28 layers), random bfloat16 weights directly on
CUDA (no checkpoint, no hub), and runs a vanilla prefill and a FlashVID prefill of one `--frames`-frame video,
then a few greedy decoding steps of each. Prints the timings measured in this one run and their ratio, and the
token counts FlashVID reports. Random weights: the point is that it runs without error at full size, and how
long each prefill takes — not what it answers.

    python scripts/gpu_smoke_llava.py [--frames 32] [--layout onevision|llava_video] [--attn sdpa]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from lmms_eval_models.benchmarking.presets import QWEN2_7B_TEXT, SIGLIP_SO400M

# The published LLaVA-OneVision-7B shapes, shared with flashvid-bench's presets.
SIGLIP_SO400M_384 = SIGLIP_SO400M
QWEN2_7B = {**QWEN2_7B_TEXT, "model_type": "qwen2"}
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151646, 151647


# --shrink: the same structure at toy widths and depths, to check the script itself on a CPU
SHRUNK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4}


def llava_onevision_7b_config(attn_implementation: str, shrink: bool = False) -> Any:
    import transformers
    from transformers import LlavaOnevisionConfig

    vision, text = dict(SIGLIP_SO400M_384), dict(QWEN2_7B)
    if shrink:
        vision.update(SHRUNK)
        text.update(SHRUNK, num_key_value_heads=2, num_hidden_layers=24)
    if int(transformers.__version__.split(".")[0]) >= 5:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    else:
        text["rope_theta"] = 1_000_000.0
    pinpoints = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return config


def build_model(attn_implementation: str, seed: int, device: str, shrink: bool) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = llava_onevision_7b_config(attn_implementation, shrink)
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16 directly on the GPU
    try:
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"built: {parameters / 1e9:.2f}B parameters, bf16 on {device}, {attn_implementation}, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    return model


def video_prompt(frames: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    """One prompt in HF's OneVision layout: text, frames·196 + 1 video placeholders, text."""
    generator = torch.Generator().manual_seed(seed)
    placeholders = frames * 14 * 14 + 1
    before = torch.randint(0, 151_000, (14,), generator=generator)
    after = torch.randint(0, 151_000, (24,), generator=generator)
    input_ids = torch.cat((before, torch.full((placeholders,), VIDEO_TOKEN_ID), after))[None]
    pixels = torch.randn(1, frames, 3, 384, 384, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values_videos": pixels.to(device, torch.bfloat16),
    }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(step: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time (ms) of `repeats` synchronized calls after one warm-up; also the last result."""
    result = step()
    synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = step()
        synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return sorted(times)[len(times) // 2], result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--layout", choices=("onevision", "llava_video"), default="onevision")
    parser.add_argument(
        "--attn", default="sdpa", help="attn_implementation: sdpa, eager or flash_attention_2"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shrink", action="store_true", help="toy widths: check the script on a CPU")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke_llava.py needs a CUDA GPU (or --device cpu --shrink to check the script)")

    import transformers

    from flashvid_core import FlashVIDConfig
    from lmms_eval_models.patches import apply_flashvid, remove_flashvid

    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}")
    model = build_model(args.attn, args.seed, args.device, args.shrink)
    inputs = video_prompt(args.frames, args.seed, args.device)
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, {args.frames} frames")

    def prefill() -> Any:
        with torch.inference_mode():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    def generate() -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(
                **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )

    results = {}
    for name, config in (("vanilla", None), ("flashvid", FlashVIDConfig())):
        # vanilla OneVision is the stock model; vanilla LLaVA-Video is its layout without compression
        patched = config is not None or args.layout != "onevision"
        if patched:
            apply_flashvid(model, config, video_layout=args.layout)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(args.seed)
        prefill_ms, output = timed_ms(prefill, args.repeats)
        logits = output.logits.float()
        if not torch.isfinite(logits).all():
            raise SystemExit(f"{name}: non-finite logits")
        cache_lengths = [
            output.past_key_values.get_seq_length(i) for i in range(len(model.model.language_model.layers))
        ]
        generated = generate()[0, inputs["input_ids"].shape[1] :]
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        stats = getattr(model, "flashvid_stats", None)
        results[name] = prefill_ms
        print(f"{name:9s} forward (vision + compression + LLM prefill) {prefill_ms:9.1f} ms "
              f"(median of {args.repeats}), peak {peak_gib:.1f} GiB, "
              f"KV cache per layer: first {cache_lengths[0]}, last {cache_lengths[-1]}, "
              f"generated {generated.tolist()}")  # fmt: skip
        if stats is not None:
            print(f"          stats: {stats}")
        if patched:
            remove_flashvid(model)
    speedup = results["vanilla"] / results["flashvid"]
    print(f"prefill speed-up (vanilla / flashvid, this run): {speedup:.2f}x")
    expected_visual = (
        math.ceil(196 * 0.25 * 1.25) if args.layout == "onevision" else math.ceil(169 * 0.25 * 1.25)
    )
    print(f"(budget per frame at R=0.25, expansion 1.25: {expected_visual} tokens)")


if __name__ == "__main__":
    main()
