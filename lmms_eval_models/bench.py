"""`flashvid-bench`: the paper's Table 6 (efficiency) measured on your hardware and settings.

Builds a model of the real 7B shape from the published config values (random weights: cost does not depend on
weight values, and nothing is downloaded) or loads a checkpoint, feeds it videos (one synthetic video by default,
or files), and times vanilla and FlashVID at the given ratios in the same process: vision encoding,
compression, LLM forward, prefill, TTFT, peak memory, and TFLOPs by the paper's Eq. 12. Prints the table with
speedups and the paper's rows, and writes CSV + Markdown under results/efficiency/.

    flashvid-bench                                   # GPU: LLaVA-OV-7B shape, 64 frames, R=10%, bf16;
                                                     # no GPU: the small CPU shape, 16 frames
    flashvid-bench --device cuda --model llava_onevision_7b --frames 64 --ratios 0.1 --dtype bfloat16
    flashvid-bench --checkpoint /models/llava-onevision-qwen2-7b-ov-hf --video-dir videomme/data --limit 5
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmms_eval_models.benchmarking.presets import PRESETS, get_preset

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def _ratios(text: str) -> list[float]:
    values = []
    for part in text.replace(",", " ").split():
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--ratios: {part!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"--ratios: {value} is out of range; allowed (0, 1]")
        values.append(value)
    return values


def _override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--flashvid takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashvid-bench",
        description="Paper Table 6 (efficiency) for your hardware: vanilla vs FlashVID in one run.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=sorted(PRESETS), default=None,
                       help="shape preset with random weights (default: llava_onevision_7b on GPU, "
                            "llava_onevision_small on CPU)")
    model.add_argument("--checkpoint", default=None, help="load this checkpoint instead of a preset")
    model.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda when available")
    model.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    model.add_argument("--threads", type=int, default=None,
                       help="CPU threads (default on CPU: 1, which keeps timings stable on a shared machine)")
    model.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa (default), eager, flash_attention_2")
    model.add_argument("--video-layout", choices=("onevision", "llava_video"), default=None,
                       help="LLaVA token layout (default: the preset's; onevision for a checkpoint)")
    video = parser.add_argument_group("videos")
    video.add_argument("--frames", type=int, default=None, help="frames per video (default: the preset's, 64 / 16)")
    video.add_argument("--video", action="append", default=[], help="a video file (repeatable)")
    video.add_argument("--video-dir", default=None, help="take videos from this folder (e.g. a task's video folder)")
    video.add_argument("--limit", type=int, default=5, help="videos taken from --video-dir, sorted by name (default: 5)")
    video.add_argument("--frame-size", type=int, default=448, help="Qwen2.5-VL frame side in pixels, a multiple of 28 (default: 448)")
    video.add_argument("--prompt-tokens", type=int, default=128, help="text tokens around the video (default: 128)")
    run = parser.add_argument_group("run")
    run.add_argument("--ratios", type=_ratios, default=[0.1], help="FlashVID retention ratios, e.g. '0.25,0.1' (default: 0.1)")
    run.add_argument("--flashvid", type=_override, action="append", default=[], metavar="KEY=VALUE",
                     help="FlashVID config override (official key names), repeatable")
    run.add_argument("--first-token", choices=("generate", "forward"), default="generate",
                     help="TTFT call: generate(max_new_tokens=1) (default), or one cached forward + argmax")
    run.add_argument("--warmup", type=int, default=1, help="untimed calls per variant (default: 1)")
    run.add_argument("--repeats", type=int, default=3, help="timed calls per video and variant (default: 3)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out-dir", default="results/efficiency", help="where CSV and Markdown go (default: results/efficiency)")
    run.add_argument("--no-write", action="store_true", help="print only")
    run.add_argument("--profile", metavar="DIR", default=None,
                     help="after the timed calls, profile one call per row: DIR/<row>.json (Chrome trace) and .txt")
    return parser


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("flashvid-bench: --device cuda but no CUDA device is available (use --device cpu)")
    return torch.device(choice)


def _videos(args: argparse.Namespace) -> list[str]:
    videos = list(args.video)
    if args.video_dir:
        folder = Path(args.video_dir)
        if not folder.is_dir():
            raise SystemExit(f"flashvid-bench: --video-dir {folder} is not a folder")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if not found:
            raise SystemExit(f"flashvid-bench: no video files ({', '.join(VIDEO_SUFFIXES)}) under {folder}")
        videos += [str(p) for p in found[: args.limit]]
    for path in videos:
        if not Path(path).is_file():
            raise SystemExit(f"flashvid-bench: video file {path} does not exist")
    return videos


def settings_from_args(args: argparse.Namespace) -> Any:
    """Resolve defaults (GPU → 7B shape, bf16; CPU → small shape, fp32) into BenchSettings."""
    from flashvid_core import FlashVIDConfig
    from lmms_eval_models.benchmarking.runner import BenchSettings

    device = _device(args.device)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"flashvid-bench: --threads must be >= 1, got {args.threads}")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    preset = None
    if args.checkpoint is None:
        preset = get_preset(args.model or ("llava_onevision_7b" if device.type == "cuda" else "llava_onevision_small"))
    frames = args.frames or (preset.default_frames if preset else 32)
    for name, value, low in (("--frames", frames, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                             ("--prompt-tokens", args.prompt_tokens, 1), ("--limit", args.limit, 1)):  # fmt: skip
        if value < low:
            raise SystemExit(f"flashvid-bench: {name} must be >= {low}, got {value}")
    overrides = dict(args.flashvid)
    if "retention_ratio" in overrides:
        raise SystemExit("flashvid-bench: set retention ratios with --ratios, not --flashvid retention_ratio=…")
    try:
        parsed = FlashVIDConfig.from_model_args(overrides) if overrides else None
    except ValueError as error:
        raise SystemExit(f"flashvid-bench: --flashvid: {error}") from None
    typed = {key: getattr(parsed, key) for key in overrides} if parsed else {}
    return BenchSettings(
        device=device,
        dtype=dtype,
        frames=frames,
        ratios=args.ratios,
        preset=preset,
        checkpoint=args.checkpoint,
        video_layout=args.video_layout,
        warmup=args.warmup,
        repeats=args.repeats,
        prompt_tokens=args.prompt_tokens,
        frame_size=args.frame_size,
        videos=_videos(args),
        seed=args.seed,
        attn_implementation=args.attn,
        first_token=args.first_token,
        threads=args.threads,
        flashvid_overrides=typed,
        profile_dir=args.profile,
    )


def _progress(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="timed and warm-up calls", unit="call", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    from lmms_eval_models.benchmarking.report import render, write_outputs
    from lmms_eval_models.benchmarking.runner import run_benchmark

    started = time.perf_counter()
    result = run_benchmark(settings, progress_factory=_progress)
    table_id = settings.preset.paper_table if settings.preset else ("table10" if result.video_layout == "llava_video" else
                                                                    "table6" if result.family == "llava_onevision" else None)  # fmt: skip
    text, markdown, records = render(result, table_id)
    print(text)
    if not args.no_write:
        csv_path, md_path = write_outputs(result, records, markdown, Path(args.out_dir))
        print(f"\nwrote {csv_path} and {md_path}")
    print(f"total {time.perf_counter() - started:.1f} s (model build, inputs, warm-up and timed calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
