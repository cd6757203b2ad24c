"""The Triton kernels of `flashvid_core.accel.kernels`, run by Triton's CPU interpreter (TRITON_INTERPRET=1, in
a subprocess since it must be set before triton is imported) against the PyTorch code they replace: the kernels'
logic is checked here on every CI run; their GPU numerics in tests/test_gpu_fast_paths.py (on a GPU)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent(
    """
    import torch
    import flashvid_core as fc
    from flashvid_core import merging, selection
    from flashvid_core.accel import kernels as accel_kernels

    kernels = accel_kernels._build()
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        tokens = int(torch.randint(2, 70, (1,), generator=generator))
        picks = int(torch.randint(1, tokens + 1, (1,), generator=generator))
        x = torch.randn(3, tokens, 8, generator=generator)
        distances = fc.cosine_distances(x) * torch.rand(3, 1, tokens, generator=generator)
        distances = (torch.round(distances * 4) / 4).contiguous()  # exact ties
        for forbid, picked_value in ((True, -1.0), (False, -1.0), (True, float("-inf"))):
            expected = selection.greedy_loop(distances, picks, forbid, picked_value)
            got = accel_kernels.launch_greedy(kernels["greedy"], distances, picks, forbid, picked_value)
            assert torch.equal(got, expected), (seed, forbid, picked_value, got, expected)

    generator = torch.Generator().manual_seed(1)
    frames, tokens, dim = 12, 30, 40
    scenes = torch.randn(3, tokens, dim, generator=generator)[torch.arange(frames) * 3 // frames]
    features = (scenes + 0.3 * torch.randn(frames, tokens, dim, generator=generator)).half()
    starts = torch.zeros(frames, dtype=torch.bool)
    starts[[0, 4, 7]] = True
    max_sim, parent = fc.temporal_parents(features, torch.zeros(frames, tokens, dtype=torch.bool), starts)
    merged = merging.merge_decisions(max_sim, 0.5, [4, 0, 3, 5], 5)
    links = (parent.unsqueeze(-1) == torch.arange(tokens)) & merged.unsqueeze(-1)
    children_of = links.transpose(1, 2).half().contiguous()
    expected = features.clone()
    merging.stepwise_walk(expected, children_of)
    walked = features.clone()
    accel_kernels.launch_walk(kernels["walk"], walked, children_of, torch.tensor([0, 4, 7]), torch.tensor([4, 3, 5]))
    assert torch.equal(walked, expected)
    # the per-frame launch shape of the CUDA graph stage: frames that start no multi-frame segment do nothing
    walked = features.clone()
    lengths = torch.tensor([4, 1, 1, 1, 3, 1, 1, 5, 1, 1, 1, 1])
    accel_kernels.launch_walk(kernels["walk"], walked, children_of, torch.arange(frames), lengths)
    assert torch.equal(walked, expected)
    print("kernels agree")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_agree_with_pytorch_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernels agree" in result.stdout
