#!/usr/bin/env python
"""Differential test of flashvid_core.compress against YOUR checkout of the official FlashVID code.

    git clone https://github.com/Fanziyang-v/FlashVID /path/to/FlashVID
    python scripts/diff_official.py --official-root /path/to/FlashVID --cases 2000 --dtype float32

The official code is not part of this project; this script imports `flashvid.utils` (and its
`configuration_flashvid`) from --official-root, without the package's `__init__` (which imports the model files).
It generates adversarial videos (random, near-static, duplicated tokens, duplicated frames, values on a coarse grid,
bf16-grid values, video-like scenes) with random configurations, runs both implementations after the same
`torch.manual_seed`, and compares: global indices exactly, tokens within --tolerance (rows sharing one global index
as a multiset: the official code orders them with an unstable sort). It prints a count per outcome and the
mismatching cases, and exits 1 if any case differs.

Outcomes besides agreement: configurations this project refuses on purpose (a per-frame budget larger than the
frame), and inputs on which the official code raises (one-token frames with a diversity method, a TSTM lower
bound that leaves nothing to merge).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import random
import sys
import types
from pathlib import Path

import torch
from torch import Tensor

import flashvid_core as fc

CONFIG_FIELDS = ("retention_ratio", "alpha", "token_selection_method", "temporal_threshold", "do_segment",
                 "segment_threshold", "min_segment_num", "complementary_segment", "expansion")
INPUT_KINDS = ("random", "near_static", "duplicate_tokens", "duplicate_frames", "coarse_grid", "bf16_grid", "video")
ATTENTION_KINDS = ("random", "random", "coarse_grid", "constant")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_official(root: Path) -> types.ModuleType:
    """`flashvid.utils` from an official checkout, loaded without `flashvid/__init__.py`."""
    package_dir = root / "flashvid"
    if not (package_dir / "utils.py").is_file():
        raise SystemExit(f"--official-root {root}: no flashvid/utils.py there (clone the official repository)")
    package = types.ModuleType("flashvid")
    package.__path__ = [str(package_dir)]
    sys.modules["flashvid"] = package
    spec = importlib.util.spec_from_file_location("flashvid.utils", package_dir / "utils.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["flashvid.utils"] = module
    spec.loader.exec_module(module)
    return module


def random_case(
    rng: random.Random, index: int, seed: int, dtype: torch.dtype, max_shape: tuple[int, int, int] = (20, 50, 24)
) -> tuple[Tensor, Tensor, dict, str]:
    """One adversarial (features (F, N, D), attention (F, N), config keywords, description); F, N, D drawn
    uniformly up to max_shape."""
    frames, tokens, dim = (rng.randint(1, limit) for limit in max_shape)
    kind = rng.choice(INPUT_KINDS)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    base = torch.randn(1, tokens, dim, generator=generator)
    noise_scale = 1e-3 if kind == "near_static" else rng.choice([0.1, 0.3, 1.0])
    features = base + noise_scale * torch.randn(frames, tokens, dim, generator=generator)
    if kind == "duplicate_tokens" and tokens > 2:
        for _ in range(rng.randint(1, tokens // 2 + 1)):
            features[:, rng.randrange(tokens)] = features[:, rng.randrange(tokens)]
    if kind == "duplicate_frames" and frames > 1:
        for _ in range(rng.randint(1, frames)):
            frame = rng.randrange(1, frames)
            features[frame] = features[frame - 1]
    if kind == "coarse_grid":
        features = (features * 2).round() / 2
    if kind == "bf16_grid":
        features = features.bfloat16().float()
    if kind == "video":
        # A few scenes of slowly drifting tokens.
        scene_of_frame = torch.randint(0, 3, (1,), generator=generator).item() + torch.arange(frames) * 3 // frames
        scenes = torch.randn(6, tokens, dim, generator=generator)
        drift = 0.02 * torch.randn(frames, tokens, dim, generator=generator).cumsum(0)
        features = scenes[scene_of_frame] + drift
    attention_kind = rng.choice(ATTENTION_KINDS)
    attention = torch.rand(frames, tokens, generator=generator)
    if attention_kind == "coarse_grid":
        attention = (attention * 4).round() / 4 + 0.01
    if attention_kind == "constant":
        attention = torch.full((frames, tokens), 0.5)
    config = dict(
        retention_ratio=rng.choice([0.1, 0.25, 0.5, 1.0, round(rng.uniform(0.05, 1.0), 3)]),
        alpha=rng.choice([0.0, 0.3, 0.7, 1.0, round(rng.random(), 3)]),
        token_selection_method=rng.choice(["attn_div_v2", "attn_div", "attn", "div"]),
        temporal_threshold=rng.choice([0.5, 0.8, 0.9, round(rng.uniform(-0.5, 0.99), 3)]),
        segment_threshold=rng.choice([0.5, 0.9, 0.99, 1.0]),
        min_segment_num=rng.randint(1, 10),
        complementary_segment=rng.random() < 0.8,
        do_segment=rng.random() < 0.85,
        expansion=rng.choice([1.0, 1.0, 1.25, 1.5]),
    )
    description = f"case {index}: {kind} features {tuple(features.shape)}, {attention_kind} attention, {config}"
    return features.to(dtype), attention.to(dtype), config, description


def same_output(ours: fc.Compression, tokens: Tensor, indices: Tensor, tolerance: float) -> str | None:
    """None if equal; else 'indices' or 'tokens'."""
    if not torch.equal(ours.indices.cpu(), indices.cpu()):
        return "indices"
    mine, theirs = ours.tokens.float().cpu(), tokens.float().cpu()
    rows_of: dict[int, list[int]] = collections.defaultdict(list)
    for row, index in enumerate(indices.tolist()):
        rows_of[index].append(row)
    for rows in rows_of.values():
        unmatched = list(rows)
        for row in rows:
            match = next((r for r in unmatched if torch.allclose(mine[row], theirs[r], atol=tolerance, rtol=tolerance)),
                         None)
            if match is None:
                return "tokens"
            unmatched.remove(match)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-root", type=Path, required=True, help="a checkout of the official FlashVID repo")
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="token atol = rtol (default 1e-4 for float32, 2e-2 for bfloat16/float16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-shape", default="20x50x24", help="largest frames x tokens x dim drawn (default 20x50x24)")
    args = parser.parse_args()
    official = load_official(args.official_root)
    official_config_class = official.FlashVidConfig
    dtype = DTYPES[args.dtype]
    tolerance = args.tolerance if args.tolerance is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    try:
        max_shape = tuple(int(part) for part in args.max_shape.lower().split("x"))
        if len(max_shape) != 3 or min(max_shape) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(
            f"--max-shape {args.max_shape!r}: expected FxNxD with positive integers, e.g. 20x50x24"
        ) from None
    rng = random.Random(args.seed)
    outcomes: collections.Counter[str] = collections.Counter()
    mismatches: list[str] = []
    for index in range(args.cases):
        features, attention, keywords, description = random_case(rng, index, args.seed, dtype, max_shape)
        features, attention = features.to(args.device), attention.to(args.device)
        if bool((features.float().norm(dim=-1) == 0).any()):
            outcomes["skipped (a zero token: cosine undefined)"] += 1
            continue
        try:
            config = fc.FlashVIDConfig(**keywords)
            torch.manual_seed(index)
            ours = fc.compress(features, attention, config)
        except ValueError as error:
            outcomes[f"refused here: {str(error).split(' asks for')[0].split('=')[0]}"] += 1
            continue
        try:
            official_config = official_config_class(**{name: getattr(config, name) for name in CONFIG_FIELDS})
            torch.manual_seed(index)
            tokens, indices = official.flashvid_compression(features.clone(), attention.clone(), official_config)
        except Exception as error:  # the official code's own failures are an outcome here
            outcomes[f"official code raises {type(error).__name__}"] += 1
            continue
        difference = same_output(ours, tokens, indices, tolerance)
        if difference is None:
            outcomes["identical"] += 1
        else:
            outcomes[f"different {difference}"] += 1
            mismatches.append(f"{difference}: {description}")
    for outcome, count in outcomes.most_common():
        print(f"{count:6d}  {outcome}")
    for line in mismatches:
        print("MISMATCH", line)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
