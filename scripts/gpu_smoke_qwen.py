"""GPU smoke test: FlashVID prefill on a 7B-shaped Qwen2.5-VL with random weights (bf16, CUDA).

Builds Qwen2.5-VL-7B-Instruct's architecture from a config dict (no download: random init directly on the GPU),
feeds a synthetic video of the paper's size (32 frames -> 16 temporal groups of 16 x 16 merged tokens) and times:
the stock prefill, the FlashVID prefill (compression + pruning at layer K), and a few greedy decoding steps.
Prints ratios measured in this run. Usage:

    python scripts/gpu_smoke_qwen.py [--attn sdpa|eager|flash_attention_2] [--frames 32] [--side 448]
"""

from __future__ import annotations

import argparse
import time

import torch

from lmms_eval_models.benchmarking.presets import QWEN2_5_7B_TEXT, QWEN2_5_VL_7B_VISION

# Qwen2.5-VL-7B-Instruct's published architecture (config.json), shared with flashvid-bench's presets; weights
# replaced by random init.
TEXT = QWEN2_5_7B_TEXT
VISION = {**QWEN2_5_VL_7B_VISION, "in_chans": 3}
TOKENS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
          "vision_end_token_id": 151653, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}  # fmt: skip
MROPE_SECTION = [16, 24, 24]
ROPE_THETA = 1_000_000.0


def build_config(attn_implementation: str):
    import transformers
    from packaging.version import Version
    from transformers import Qwen2_5_VLConfig

    rope = {"rope_type": "default", "mrope_section": MROPE_SECTION}
    if Version(transformers.__version__) >= Version("5.0.0"):
        text = {**TEXT, "rope_parameters": {**rope, "rope_theta": ROPE_THETA}}
    else:
        text = {**TEXT, "rope_scaling": {**rope, "type": "mrope"}, "rope_theta": ROPE_THETA}
    config = Qwen2_5_VLConfig(text_config={**text, **TOKENS}, vision_config=VISION, **TOKENS)
    config._attn_implementation = attn_implementation
    return config


def build_model(attn_implementation: str):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_config(attn_implementation)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):  # random init straight on the GPU, in bf16 (about 16 GB)
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # keep activations finite with random weights
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02)
    return model.to(torch.bfloat16).eval()


def build_inputs(frames: int, side: int, device: str = "cuda") -> dict:
    patch, merge, temporal = VISION["patch_size"], VISION["spatial_merge_size"], VISION["temporal_patch_size"]
    grid = torch.tensor([[frames // temporal, side // patch, side // patch]], device=device)
    patches = int(grid.prod())
    video_tokens = patches // merge**2
    generator = torch.Generator(device=device).manual_seed(0)
    pixel_values_videos = torch.randn(
        patches, 3 * temporal * patch * patch, generator=generator, device=device, dtype=torch.bfloat16
    )
    prefix = torch.randint(1000, 100000, (12,), generator=generator, device=device)
    suffix = torch.randint(1000, 100000, (40,), generator=generator, device=device)
    video = torch.full((video_tokens,), TOKENS["video_token_id"], device=device)
    start = torch.tensor([TOKENS["vision_start_token_id"]], device=device)
    end = torch.tensor([TOKENS["vision_end_token_id"]], device=device)
    input_ids = torch.cat([prefix, start, video, end, suffix]).unsqueeze(0)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values_videos": pixel_values_videos,
        "video_grid_thw": grid,
        "second_per_grid_ts": torch.tensor([1.0], device=device),
    }
    try:  # 5.x: the processor also returns modality ids (0 text, 1 image, 2 video)
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) >= Version("5.0.0"):
            inputs["mm_token_type_ids"] = 2 * (input_ids == TOKENS["video_token_id"]).long()
    except ImportError:
        pass
    return inputs


class StageTimer:
    """CUDA-synchronised wall time of one module's forward calls (forward pre/post hooks)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total_ms = 0.0
        self.calls = 0
        self._started = 0.0
        self._handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, *args) -> None:
        torch.cuda.synchronize()
        self._started = time.perf_counter()

    def _stop(self, *args) -> None:
        torch.cuda.synchronize()
        self.total_ms += (time.perf_counter() - self._started) * 1000.0
        self.calls += 1

    def reset(self) -> None:
        self.total_ms, self.calls = 0.0, 0

    def mean_ms(self) -> float:
        return self.total_ms / max(self.calls, 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def timed(function, timers: tuple[StageTimer, ...] = (), repeats: int = 3) -> tuple[float, object]:
    result = function()  # warm-up, not counted
    torch.cuda.synchronize()
    for timer in timers:
        timer.reset()
    started = time.perf_counter()
    for _ in range(repeats):
        result = function()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000.0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash_attention_2"))
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--side", type=int, default=448, help="frame side in pixels (multiple of 28)")
    parser.add_argument("--decode-steps", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this smoke test needs one")

    import transformers

    from flashvid_core import FlashVIDConfig
    from lmms_eval_models.patches import apply_flashvid, remove_flashvid

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    started = time.perf_counter()
    model = build_model(args.attn)
    print(f"built 7B-shaped Qwen2.5-VL ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, "
          f"{args.attn}) in {time.perf_counter() - started:.1f} s")  # fmt: skip
    inputs = build_inputs(args.frames, args.side)
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens, video grid {inputs['video_grid_thw'].tolist()}")

    vision, language = StageTimer(model.model.visual), StageTimer(model.model.language_model)
    with torch.no_grad():
        stock_ms, stock = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), (vision, language))
        print(f"stock forward: {stock_ms:.1f} ms (vision {vision.mean_ms():.1f} ms, LLM {language.mean_ms():.1f} ms), "
              f"finite logits: {bool(torch.isfinite(stock.logits).all())}")  # fmt: skip
        stock_llm_ms = language.mean_ms()

        config = FlashVIDConfig(token_selection_method="attn_div", min_segment_num=4)  # the official Qwen script
        apply_flashvid(model, config)
        flash_ms, flash = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), (vision, language))
        stats = model.flashvid_stats
        cache = flash.past_key_values
        lengths = sorted({cache.get_seq_length(i) for i in range(TEXT["num_hidden_layers"])})
        print(f"FlashVID forward: {flash_ms:.1f} ms (vision {vision.mean_ms():.1f} ms incl. the statistic, "
              f"compression {stats.compression_ms:.1f} ms, LLM {language.mean_ms():.1f} ms), {stats}")
        prefill_ms = stats.compression_ms + language.mean_ms()
        print(f"prefill (compression + LLM) {prefill_ms:.1f} ms vs stock LLM {stock_llm_ms:.1f} ms: "
              f"{stock_llm_ms / prefill_ms:.2f}x; whole forward {stock_ms / flash_ms:.2f}x")  # fmt: skip
        print(f"KV cache lengths per layer (below / from K={config.pruning_layer}): {lengths}")
        assert bool(torch.isfinite(flash.logits).all()), "non-finite logits"

        generated = model.generate(**inputs, max_new_tokens=args.decode_steps, do_sample=False)
        print(f"greedy decoding after a FlashVID prefill: {generated[0, inputs['input_ids'].shape[1]:].tolist()}")
        remove_flashvid(model)
    vision.remove()
    language.remove()
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
