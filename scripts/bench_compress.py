#!/usr/bin/env python
"""Time flashvid_core.compress against a straightforward loop-style implementation, in one run.

    python scripts/bench_compress.py                      # CPU float32 (and CUDA float16 when a GPU is present)
    python scripts/bench_compress.py --runs 10 --loop-runs 3 --shapes 32x196x3584 64x196x3584

Prints the median milliseconds per video (after warm-up) of both implementations and their ratio, and checks
that both give the same indices. The loop-style implementation (`loop_compress`, written for this project from
the specification, per frame and per token like the official code) is also used by the tests as an oracle.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

import flashvid_core as fc

# ----------------------------------------------------------------------------------------------------------------
# Loop-style implementation: the algorithm as the specification states it, frame by frame and token by token.
# ----------------------------------------------------------------------------------------------------------------


def loop_segments(features: Tensor, config: fc.FlashVIDConfig) -> list[int]:
    num_frames = features.shape[0]
    if not config.do_segment:
        return [num_frames]
    means = features.mean(dim=1)
    sims = []
    for t in range(num_frames - 1):
        a = means[t] / means[t].norm()
        b = means[t + 1] / means[t + 1].norm()
        sims.append((a * b).sum())
    sims_tensor = torch.stack(sims) if sims else means.new_zeros(0)
    cuts = [t for t in range(num_frames - 1) if bool(sims_tensor[t] < config.segment_threshold)]
    if len(cuts) + 1 < config.min_segment_num and config.complementary_segment:
        filled = sims_tensor.clone()
        for t in cuts:
            filled[t] = 1.0
        extra = torch.topk(filled, k=min(config.min_segment_num - len(cuts) - 1, filled.shape[0]), largest=False)
        cuts = sorted(cuts + extra.indices.tolist())
    bounds = [-1, *cuts, num_frames - 1]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def loop_select(frame: Tensor, attention: Tensor, k: int, method: str, segment_means: Tensor) -> list[int]:
    """One frame: (N, D) features, (N,) attention, segment_means (L, D) float32 of the frame's segment."""
    if method == "attn":
        return sorted(torch.topk(attention, k).indices.tolist())
    x = frame.float()
    normed = x / x.norm(dim=-1, keepdim=True)
    dist = 1.0 - normed @ normed.T
    if method in ("attn_div", "attn_div_v2"):
        dist = dist * (attention.float() * 1e6).unsqueeze(0)
    if method in ("attn_div_v2", "div_er"):
        relevance = (x @ segment_means.T).mean(dim=1)
        dist = dist * relevance.unsqueeze(0)
    n = dist.shape[0]
    if n == 1:
        return [0] * k
    picks = [int(torch.topk(dist, 2, dim=0, largest=False).values[1].argmax())]
    while len(picks) < k:
        min_dist = dist[picks].min(dim=0).values  # full recompute over all picked rows
        if method != "attn_div_v2":
            min_dist[picks] = float("-inf") if method == "div_er" else -1.0
        picks.append(int(min_dist.argmax()))
    return sorted(picks)


def loop_tstm(seg: Tensor, selected: Tensor, threshold: float, budget: int) -> list[tuple[list[int], Tensor]]:
    """One multi-frame segment (T, N, D); returns per frame (kept indices, kept values in the input dtype)."""
    frames, n, _ = seg.shape
    values = seg.clone()
    normed = seg / seg.norm(dim=-1, keepdim=True)
    max_sim = torch.full((frames, n), -1.0, dtype=seg.dtype)
    parent = torch.zeros(frames, n, dtype=torch.long)
    for t in range(1, frames):
        sim = normed[t] @ normed[t - 1].T
        sim[selected[t]] = -1.0
        sim[:, selected[t - 1]] = -1.0
        max_sim[t], parent[t] = sim.max(dim=1)
    merged = max_sim > threshold
    if int((~merged).sum()) < budget * frames:
        k = frames * n - budget * frames
        floor = torch.topk(max_sim.flatten(), k).values[-1] if k > 0 else torch.tensor(math.inf)
        merged = max_sim > max(floor, -1.0 + 1e-6)
    counts = torch.ones(frames, n, dtype=seg.dtype)
    for t in range(frames - 1, 0, -1):  # last frame first, token by token
        for i in range(n):
            if merged[t, i]:
                values[t - 1, parent[t, i]] += values[t, i]
                counts[t - 1, parent[t, i]] += 1
    out = []
    for t in range(frames):
        keep = [i for i in range(n) if not merged[t, i] and not selected[t, i]]
        out.append((keep, values[t, keep] / counts[t, keep].unsqueeze(-1)))
    return out


def loop_dpc(tokens: Tensor, clusters: int, k: int) -> tuple[list[int], Tensor]:
    """One frame's DPC-kNN: returns the centres (score order) and the member means, (K, D)."""
    x = tokens.float().unsqueeze(0)
    dists = torch.cdist(x, x)[0] / math.sqrt(x.shape[-1])
    density = torch.mean(-(torch.topk(dists, k, dim=-1, largest=False).values ** 2), dim=-1).exp()
    density = density + torch.rand_like(density.unsqueeze(0))[0] * 1e-6
    n = dists.shape[0]
    delta = torch.empty(n)
    max_dist = dists.max()
    for i in range(n):
        denser = density > density[i]
        delta[i] = dists[i][denser].min() if bool(denser.any()) else max_dist
    centres = torch.topk(delta * density, clusters).indices.tolist()
    assign = dists[:, centres].argmin(dim=1)
    for j, c in enumerate(centres):
        assign[c] = j
    means = torch.stack([tokens[assign == j].sum(dim=0) / int((assign == j).sum()) for j in range(clusters)])
    return centres, means


def loop_compress(features: Tensor, attention: Tensor, config: fc.FlashVIDConfig) -> tuple[Tensor, Tensor]:
    """Straightforward reimplementation, CPU; returns (tokens (M, D), global indices (M,))."""
    n = features.shape[1]
    budget, num_selected, num_merged = config.budgets(n)
    lengths = loop_segments(features, config)
    out_tokens: list[Tensor] = []
    out_indices: list[int] = []
    start = 0
    for length in lengths:
        seg = features[start : start + length]
        seg_attention = attention[start : start + length]
        segment_means = seg.float().mean(dim=1)
        selected = torch.zeros(length, n, dtype=torch.bool)
        if num_selected > 0:
            for t in range(length):
                keep = loop_select(seg[t], seg_attention[t], num_selected, config.token_selection_method, segment_means)
                selected[t, keep] = True
                out_tokens.append(seg[t, keep])
                out_indices.extend((start + t) * n + i for i in keep)
        if num_merged > 0 and length > 0:
            if length > 1:
                kept = loop_tstm(seg, selected, config.temporal_threshold, budget)
            else:
                kept = [(list(range(n)), seg[0])]
            ratio = num_merged * length / sum(len(keep) for keep, _ in kept)
            for t, (keep, values) in enumerate(kept):
                clusters = math.ceil(len(keep) * ratio)
                if clusters > 0 and ratio < 1.0:
                    centres, means = loop_dpc(values, clusters, min(clusters, 7))
                    out_tokens.append(means.to(features.dtype))
                    out_indices.extend((start + t) * n + keep[c] for c in centres)
                else:
                    out_tokens.append(values)
                    out_indices.extend((start + t) * n + i for i in keep)
        start += length
    indices = torch.tensor(out_indices, dtype=torch.long)
    tokens = torch.cat(out_tokens) if out_tokens else features.new_zeros(0, features.shape[-1])
    order = torch.argsort(indices, stable=True)
    return tokens[order], indices[order]


# ----------------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------------


def synthetic_video(frames: int, tokens: int, dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Video-like features: a few scenes of slowly drifting tokens, positive peaked attention."""
    generator = torch.Generator().manual_seed(seed)
    scenes = max(1, frames // 8)
    base = torch.randn(scenes, tokens, dim, generator=generator)
    scene_of = torch.arange(frames) * scenes // frames
    drift = torch.randn(frames, tokens, dim, generator=generator) * 0.3
    features = base[scene_of] + drift
    attention = torch.softmax(torch.randn(frames, tokens, generator=generator) * 2.0, dim=-1)
    return features.to(device=device, dtype=dtype), attention.to(device=device, dtype=dtype)


def median_ms(fn: Callable[[], object], runs: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1000.0)
    return statistics.median(times)


def profile_call(fn: Callable[[], object], cuda: bool, trace_path: Path) -> None:
    """Profile one (warm) call: write a Chrome trace and print the operators taking the most time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace_path))
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
    print(f"trace: {trace_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["32x196x3584", "64x196x3584"], help="FxNxD")
    parser.add_argument("--runs", type=int, default=10, help="timed runs of compress (median reported)")
    parser.add_argument("--loop-runs", type=int, default=3, help="timed runs of the loop-style implementation")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-loop", action="store_true", help="skip the loop-style implementation")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="CUDA input dtype (default float16; the CPU always runs float32)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="also profile one call per shape and device: a Chrome trace and the top operators")
    args = parser.parse_args()
    config = fc.FlashVIDConfig()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; config: {config}")
    targets = []
    if args.device in ("auto", "cpu"):
        targets.append(("cpu", torch.float32))
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        targets.append(("cuda", getattr(torch, args.dtype or "float16")))
    for shape in args.shapes:
        frames, tokens, dim = (int(v) for v in shape.split("x"))
        loop_ms = None
        if not args.no_loop:
            features, attention = synthetic_video(frames, tokens, dim, "cpu", torch.float32)
            torch.manual_seed(0)
            loop_tokens, loop_indices = loop_compress(features, attention, config)
            torch.manual_seed(0)
            fast = fc.compress(features, attention, config)
            same = torch.equal(fast.indices, loop_indices) and torch.allclose(
                fast.tokens, loop_tokens, atol=1e-4, rtol=1e-4
            )
            loop_ms = median_ms(partial(loop_compress, features, attention, config), args.loop_runs, 1, False)
            print(f"{shape}: loop-style implementation (CPU float32): {loop_ms:9.1f} ms/video "
                  f"(median of {args.loop_runs}); same output as compress: {same}")
        for device, dtype in targets:
            features, attention = synthetic_video(frames, tokens, dim, device, dtype)
            cuda = device == "cuda"
            ms = median_ms(partial(fc.compress, features, attention, config), args.runs, args.warmup, cuda)
            ratio = f", {loop_ms / ms:6.1f}x faster than the loop-style CPU run" if loop_ms else ""
            print(f"{shape}: compress on {device} {str(dtype).replace('torch.', '')}: {ms:9.2f} ms/video "
                  f"(median of {args.runs}){ratio}")
            if args.profile:
                profile_call(partial(fc.compress, features, attention, config), cuda,
                             Path(args.profile) / f"compress_{shape}_{device}.json")


if __name__ == "__main__":
    main()
