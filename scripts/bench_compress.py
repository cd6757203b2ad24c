#!/usr/bin/env python
"""Time flashvid_core.compress against a straightforward loop-style implementation, and against the official code.

    python scripts/bench_compress.py                      # CPU float32 (and CUDA float16 when a GPU is present)
    python scripts/bench_compress.py --runs 10 --loop-runs 3 --shapes 32x196x3584 64x196x3584
    python scripts/bench_compress.py --official-root /path/to/FlashVID     # side by side with the official code

Prints the median milliseconds per video (after warm-up) of both implementations and their ratio, and checks
that both give the same indices. The loop-style implementation (`loop_compress`, written for this project from
the specification, per frame and per token like the official code) is also used by the tests as an oracle.

With --official-root (your checkout of github.com/Fanziyang-v/FlashVID; never part of this project) it times
`flashvid_core.compress` and the official `flashvid_compression` alternately on the same inputs in one process
(--pairs pairs per shape, retention ratio and dtype, the order swapped every pair, both after the same
`torch.manual_seed`), with the loop-style implementation as a further column, and prints per row the medians,
the median of the pairwise ratios and whether every pair gave the same indices. The peak resident memory of one
call of each implementation is measured in a fresh subprocess each (see `peak_rss_of_one_call`). The machine's
load and the CPUs this process may use are printed with the table: other processes on the machine slow both
implementations, which the alternation spreads evenly but does not remove. Exits 1 if any indices differ.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

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


# ----------------------------------------------------------------------------------------------------------------
# Side by side with the official implementation
# ----------------------------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# An implementation under test: (features (F, N, D), attention (F, N), config) -> (tokens (M, D), indices (M,)).
Implementation = Callable[[Tensor, Tensor, fc.FlashVIDConfig], tuple[Tensor, Tensor]]


def ours(features: Tensor, attention: Tensor, config: fc.FlashVIDConfig) -> tuple[Tensor, Tensor]:
    out = fc.compress(features, attention, config)
    return out.tokens, out.indices


def loop_style(features: Tensor, attention: Tensor, config: fc.FlashVIDConfig) -> tuple[Tensor, Tensor]:
    return loop_compress(features.cpu(), attention.cpu(), config)


def official_implementation(root: Path) -> Implementation:
    """The official `flashvid_compression` of a checkout, loaded as scripts/diff_official.py loads it (the package's
    `__init__`, which imports the model files, is skipped). It writes into its features (TSTM sums) and into its
    config, so each call gets a fresh official config built from ours, and callers pass features they can lose."""
    harness_path = Path(__file__).resolve().parent / "diff_official.py"
    spec = importlib.util.spec_from_file_location("diff_official", harness_path)
    harness = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(harness)
    module = harness.load_official(root)

    def official(features: Tensor, attention: Tensor, config: fc.FlashVIDConfig) -> tuple[Tensor, Tensor]:
        official_config = module.FlashVidConfig(**{name: getattr(config, name) for name in harness.CONFIG_FIELDS})
        return module.flashvid_compression(features, attention, official_config)

    return official


class PairTimes(NamedTuple):
    """Milliseconds per call of ours and the official code, pair by pair, and whether each pair's indices agree."""

    ours_ms: list[float]
    official_ms: list[float]
    same_indices: list[bool]

    @property
    def pair_ratios(self) -> list[float]:
        return [theirs / mine for mine, theirs in zip(self.ours_ms, self.official_ms)]


def timed_call(fn: Implementation, features: Tensor, attention: Tensor, config: fc.FlashVIDConfig, seed: int
               ) -> tuple[float, Tensor]:
    """One call after torch.manual_seed(seed) (the DPC tie-breaker's draws): (milliseconds, indices)."""
    cuda = features.is_cuda
    torch.manual_seed(seed)
    if cuda:
        torch.cuda.synchronize()
    begin = time.perf_counter()
    _, indices = fn(features, attention, config)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - begin) * 1000.0, indices.cpu()


def alternating_pairs(official: Implementation, features: Tensor, attention: Tensor, config: fc.FlashVIDConfig,
                      pairs: int, warmup: int) -> PairTimes:
    """Ours and the official code on the same inputs, `warmup` untimed pairs then `pairs` timed ones; the order
    swaps every pair so that neither always runs right after the other. The official call gets a copy of the
    inputs made outside the timing (it writes into its features); ours gets the inputs themselves."""
    ours_ms: list[float] = []
    official_ms: list[float] = []
    same: list[bool] = []
    for pair in range(warmup + pairs):
        order = ("ours", "official") if pair % 2 == 0 else ("official", "ours")
        times: dict[str, float] = {}
        indices: dict[str, Tensor] = {}
        for name in order:
            if name == "ours":
                times[name], indices[name] = timed_call(ours, features, attention, config, seed=pair)
            else:
                copies = (features.clone(), attention.clone())
                times[name], indices[name] = timed_call(official, *copies, config, seed=pair)
                del copies
        if pair >= warmup:
            ours_ms.append(times["ours"])
            official_ms.append(times["official"])
            same.append(torch.equal(indices["ours"], indices["official"]))
    return PairTimes(ours_ms, official_ms, same)


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the resident high-water mark)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (peak memory needs Linux)")
    return int(match.group(1))


def measure_peak_rss(fn: Implementation, shape: str, dtype: torch.dtype, config: fc.FlashVIDConfig) -> dict:
    """In this (fresh) process: the resident memory of one call of fn on the synthetic video of `shape`.

    A call on a small video first loads and initialises the libraries (thread pools, BLAS), so that their one-off
    memory is not counted; the full-size call is the first one, so any memory an implementation keeps across
    calls (a cache, a workspace) is counted in its peak. The high-water mark is reset (/proc/self/clear_refs)
    after the inputs exist; the official code gets the inputs themselves (no copy: this process has no further use
    for them). Returns MiB: before (inputs resident), peak (high-water mark during the call), call (peak - before)
    and retained (resident after the call - before: outputs and anything kept)."""
    fn(*synthetic_video(4, 16, 32, "cpu", dtype, seed=1), config)
    frames, tokens, dim = (int(v) for v in shape.split("x"))
    features, attention = synthetic_video(frames, tokens, dim, "cpu", dtype)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kib("VmRSS")
    torch.manual_seed(0)
    result = fn(features, attention, config)
    peak = _status_kib("VmHWM")
    after = _status_kib("VmRSS")
    del result
    return {"before": before / 1024, "peak": peak / 1024, "call": (peak - before) / 1024,
            "retained": (after - before) / 1024}


def peak_rss_of_one_call(implementation: str, shape: str, dtype: str, retention_ratio: float,
                         official_root: Path | None) -> dict:
    """measure_peak_rss in a fresh subprocess of this script (one per implementation: nothing either one
    allocated or freed before can hide in the other's numbers)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--peak-rss-child", implementation, "--shapes", shape,
               "--dtypes", dtype, "--retention-ratios", str(retention_ratio)]
    if official_root is not None:
        command += ["--official-root", str(official_root)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess for {implementation} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine_line() -> str:
    """The CPUs this process may use, torch's threads and the load averages (other work slows every column)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"CPUs usable: {len(cpus)} of {os.cpu_count()} ({cpus}); torch threads: {torch.get_num_threads()}; "
            f"load average (1, 5, 15 min): {load}")


def side_by_side(args: argparse.Namespace) -> int:
    """The --official-root mode: one table row per shape, retention ratio and dtype. Returns the exit status."""
    official = official_implementation(args.official_root)
    device = "cuda" if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}; device {device}; official code: {args.official_root}")
    print(machine_line())
    header = (f"{'shape':>12} {'R':>5} {'dtype':>8} | {'ours ms':>8} {'official ms':>11} {'oracle ms':>9} | "
              f"{'official/ours':>13} {'oracle/ours':>11} | same indices: official, oracle | "
              "peak MiB ours / official")
    print(header)
    print("-" * len(header))
    all_same = True
    for shape in args.shapes:
        frames, tokens, dim = (int(v) for v in shape.split("x"))
        for ratio in args.retention_ratios:
            config = fc.FlashVIDConfig(retention_ratio=ratio)
            for dtype_name in args.dtypes:
                features, attention = synthetic_video(frames, tokens, dim, device, DTYPES[dtype_name])
                times = alternating_pairs(official, features, attention, config, args.pairs, args.warmup)
                same = all(times.same_indices)
                oracle = oracle_ratio = oracle_same = "-"
                if not args.no_loop:
                    oracle_runs = [timed_call(loop_style, features, attention, config, seed=0)
                                   for _ in range(args.loop_runs)]
                    oracle_ms = statistics.median(ms for ms, _ in oracle_runs)
                    oracle_same = str(torch.equal(oracle_runs[0][1], timed_call(ours, features, attention, config, 0)[1]))
                    oracle = f"{oracle_ms:9.1f}"
                    oracle_ratio = f"{oracle_ms / statistics.median(times.ours_ms):10.2f}x"
                memory = "-"
                if not args.no_memory and device == "cpu":
                    mine = peak_rss_of_one_call("ours", shape, dtype_name, ratio, None)
                    theirs = peak_rss_of_one_call("official", shape, dtype_name, ratio, args.official_root)
                    memory = (f"{mine['peak']:.0f} / {theirs['peak']:.0f} (call: +{mine['call']:.0f} / "
                              f"+{theirs['call']:.0f})")
                all_same = all_same and same
                print(f"{shape:>12} {ratio:>5} {dtype_name:>8} | {statistics.median(times.ours_ms):8.1f} "
                      f"{statistics.median(times.official_ms):11.1f} {oracle:>9} | "
                      f"{statistics.median(times.pair_ratios):12.2f}x {oracle_ratio:>11} | {same!s:>22}, {oracle_same:>6} | "
                      f"{memory}",
                      flush=True)
                if args.profile:
                    for name, fn in (("ours", ours), ("official", official)):
                        call = partial(_fresh_inputs_call, fn, features, attention, config)
                        profile_call(call, device == "cuda",
                                     Path(args.profile) / f"{name}_{shape}_r{ratio}_{dtype_name}.json")
    oracle_note = "" if args.no_loop else f"; oracle = the loop-style implementation (median of {args.loop_runs})"
    memory_note = "" if args.no_memory else "; peak = resident high-water mark of one call in a fresh process (call: above the inputs)"
    print(f"medians of {args.pairs} alternating pairs after {args.warmup} untimed; official/ours = median of the "
          f"pairwise ratios{oracle_note}{memory_note}")
    print(machine_line())
    return 0 if all_same else 1


def _fresh_inputs_call(fn: Implementation, features: Tensor, attention: Tensor, config: fc.FlashVIDConfig) -> None:
    fn(features.clone(), attention.clone(), config)


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
    side = parser.add_argument_group("side by side with the official code (--official-root)")
    side.add_argument("--official-root", type=Path, default=None,
                      help="a checkout of github.com/Fanziyang-v/FlashVID: time it against compress, alternately")
    side.add_argument("--pairs", type=int, default=7, help="timed alternating pairs per row (medians reported)")
    side.add_argument("--retention-ratios", type=float, nargs="+", default=[0.1, 0.25], help="one row each")
    side.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"],
                      help="input dtypes, one row each")
    side.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads for the timed calls (default: torch's own, one per usable CPU)")
    side.add_argument("--no-memory", action="store_true",
                      help="skip the peak resident memory (two fresh subprocesses per row)")
    side.add_argument("--peak-rss-child", choices=["ours", "official"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_child is not None:
        fn = ours if args.peak_rss_child == "ours" else official_implementation(args.official_root)
        config = fc.FlashVIDConfig(retention_ratio=args.retention_ratios[0])
        print(json.dumps(measure_peak_rss(fn, args.shapes[0], DTYPES[args.dtypes[0]], config)))
        return
    if args.official_root is not None:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        sys.exit(side_by_side(args))
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
