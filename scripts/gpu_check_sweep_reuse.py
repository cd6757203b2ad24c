#!/usr/bin/env python
"""GPU checks of the shared visual path (issue 15): exactness of a shared model served from the feature store on
CUDA, and what points 2..N of a sweep cost against point 1 at 7B size. Nothing here runs in CI (no GPU there).

    python scripts/gpu_check_sweep_reuse.py exactness [--dtype bfloat16] [--attn sdpa]
    python scripts/gpu_check_sweep_reuse.py per-point [--preset llava_onevision_7b] [--frames 64] [--points 4]

exactness: for each tiny family (built offline) on CUDA, every registered method run by one shared model
(reconfigured per method, its videos served from a `VisualStore`) against a fresh model per method, on two smoke
tasks (2 documents each); every sample's answer and figures must be equal. Exits 1 on any difference.

per-point: a 7B-shaped LLaVA-OneVision (random bfloat16 weights built on the GPU, `flashvid-bench`'s preset) and one
`--frames`-frame video; point 1 (FlashVID R = 0.5) runs the vision tower and stores the encoded video, points
2..N (R = 0.25, 0.15, 0.1) take it from the store; each point is a prefill plus 8 greedy tokens, timed between
device synchronisations, beside the same points without the store. Prints each point's time and the ratio of
points 2..N to point 1. `--preset llava_onevision_small --device cpu` checks the script on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

RATIOS = (0.5, 0.25, 0.15, 0.1)


def exactness(args: argparse.Namespace) -> int:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from lmms_eval_models.bundled import resource_root
    from lmms_eval_models.feature_store import FeatureStore
    from lmms_eval_models.methods import METHODS
    from lmms_eval_models.models.visual_store import VisualStore
    from lmms_eval_models.sweeps.checks import model_class
    from lmms_eval_models.sweeps.grouping import passes_line
    from lmms_eval_models.tiny_checkpoints import FAMILIES, tiny_checkpoint_path

    manager = TaskManager(include_path=str(resource_root() / "configs" / "tasks" / "smoke"), include_defaults=False)

    def evaluate(lm: Any) -> list:
        results = simple_evaluate(model=lm, tasks=["videomme_smoke", "mvbench_smoke"], batch_size=1, limit=2,
                                  task_manager=manager, log_samples=True)  # fmt: skip
        return [(task, sample["doc_id"], sample["filtered_resps"],
                 {key: value for key, value in sample["token_counts"][0].items() if not key.endswith("_ms")})
                for task, samples in sorted(results["samples"].items()) for sample in samples]  # fmt: skip

    failures = 0
    for family in FAMILIES:
        frames = {"max_frames_num": 8} if family.startswith("llava") else {"max_num_frames": 8}
        base = {"pretrained": str(tiny_checkpoint_path(family)), "device": args.device, "dtype": args.dtype,
                "attn_implementation": args.attn, "batch_size": 1, **frames}  # fmt: skip
        points = {method: ({"enable_flashvid": False} if method == "none" else
                           {"method": method, "retention_ratio": 0.4, "fastv_layer": 1}) for method in METHODS}
        cls = model_class(f"flashvid_{family}")
        expected = {method: evaluate(cls(**base, **options)) for method, options in points.items()}
        shared = cls(**base, **points["none"])
        shared.keep_between_runs()
        shared.attach_visual_store(VisualStore(FeatureStore(), keep_statistic=True))
        for method, options in points.items():
            shared.reconfigure(**base, **options)
            same = evaluate(shared) == expected[method]
            failures += not same
            print(f"{family:16s} {method:10s} {'equal' if same else 'DIFFERENT'}", flush=True)
        print(f"{family}: {passes_line(shared.visual_store.pass_counts())}", flush=True)
    print("all equal" if not failures else f"{failures} difference(s)")
    return 1 if failures else 0


def per_point(args: argparse.Namespace) -> int:
    from transformers import LlavaOnevisionForConditionalGeneration

    from flashvid_core import FlashVIDConfig
    from lmms_eval_models.benchmarking.inputs import build_inputs, synthetic_frames, to_device
    from lmms_eval_models.benchmarking.presets import get_preset
    from lmms_eval_models.feature_store import FeatureStore
    from lmms_eval_models.models.visual_store import RecordingVideo, ServedVideo, VisualStore
    from lmms_eval_models.patches import apply_flashvid
    from lmms_eval_models.patches.common import synchronize
    from lmms_eval_models.patches.prefill import supplying_video

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    preset = get_preset(args.preset)
    config = preset.build_config()
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    video = synthetic_frames(args.frames, 384, 384)
    inputs = to_device(build_inputs(preset.family, config, video, 64, 384, 0), device, dtype).model_kwargs
    layout = {"video_layout": "llava_video"} if preset.llava_video_layout else {}
    store = VisualStore(FeatureStore(memory_bytes=8 << 30), keep_statistic=True)

    def point(ratio: float, supply: Any) -> float:
        apply_flashvid(model, FlashVIDConfig(retention_ratio=ratio), **layout)
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad(), supplying_video(supply):
            model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
        synchronize(device)
        return time.perf_counter() - started

    ratios = RATIOS[: args.points]
    point(ratios[0], None)  # warm-up: kernels, allocator
    without = [point(ratio, None) for ratio in ratios]
    with_store = [point(ratios[0], RecordingVideo(store, "video", {}, keep_statistic=True, storable=True))]
    entry = store.lookup("video", needs_statistic=True)
    with_store += [point(ratio, ServedVideo(entry, device)) for ratio in ratios[1:]]
    print(f"{args.preset}, {args.frames} frames, {args.dtype}, {args.attn} on {device}")
    print("| point | R | without store (s) | with store (s) |\n|---|---|---|---|")
    for index, (ratio, alone, shared) in enumerate(zip(ratios, without, with_store), 1):
        print(f"| {index} | {ratio} | {alone:.3f} | {shared:.3f} |")
    later = sum(with_store[1:]) / len(with_store[1:])
    print(f"points 2..{len(ratios)} with the store cost {later / with_store[0]:.2f}x point 1 "
          f"(without the store: {sum(without[1:]) / len(without[1:]) / without[0]:.2f}x)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="check", required=True)
    check = sub.add_parser("exactness", help="shared model + store against fresh models, every method, CUDA")
    check.add_argument("--device", default="cuda")
    check.add_argument("--dtype", default="bfloat16")
    check.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    cost = sub.add_parser("per-point", help="points 2..N against point 1 at 7B size")
    cost.add_argument("--preset", default="llava_onevision_7b")
    cost.add_argument("--frames", type=int, default=64)
    cost.add_argument("--points", type=int, default=4, choices=range(2, len(RATIOS) + 1))
    cost.add_argument("--device", default="cuda")
    cost.add_argument("--dtype", default="bfloat16")
    cost.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    args = parser.parse_args(argv)
    return exactness(args) if args.check == "exactness" else per_point(args)


if __name__ == "__main__":
    sys.exit(main())
