"""CUDA-only fast paths give what the plain PyTorch calls give: the one-launch DPC tie-breaker draws (values and
generator state), compress with and without them (the CPU-vs-CUDA check on the golden set is in test_core_stages), and the statistic's half-to-float softmax. Skipped with a
reason where no CUDA device is present (CI); run on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import flashvid_core as fc
from flashvid_core import clustering
from flashvid_core.accel import kernels as accel_kernels
from flashvid_core.accel import rng as accel_rng
from flashvid_core.accel import stage as accel_stage

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


@needs_triton
@pytest.mark.parametrize("seed", [0, 1, 1234, 2**40 + 7])
def test_fused_draws_equal_per_call_torch_rand(seed):
    device = torch.device("cuda")
    sizes = [196, 50, 1, 255, 256, 257, 1000, 120] + [180] * 60
    assert accel_rng.draws_match_torch(sizes, device, seed)


@needs_triton
def test_fused_draws_advance_the_default_generator_like_per_call_draws():
    device = torch.device("cuda")
    sizes = [100, 37, 196]
    torch.manual_seed(5)
    reference = torch.cat([torch.rand(1, n, device=device) for n in sizes], dim=1).flatten()
    after_reference = torch.rand(4, device=device)
    torch.manual_seed(5)
    fused = clustering.draw_density_noise(sizes, device)
    assert torch.equal(fused, reference)
    assert torch.equal(torch.rand(4, device=device), after_reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compress_on_cuda_is_the_same_with_fused_draws(monkeypatch, dtype):
    _assert_same_with_and_without("fused_cuda_draws", _video(24, 196, 256, dtype),
                                  fc.FlashVIDConfig(retention_ratio=0.1), seed=11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_to_float_softmax_equals_softmax_with_dtype(dtype):
    from lmms_eval_models.patches.common import softmax_float32

    logits = (torch.randn(4, 16, 89, 729, device="cuda") * 4).to(dtype)
    assert torch.equal(softmax_float32(logits), torch.softmax(logits, dim=-1, dtype=torch.float32))


def _assert_same_with_and_without(flag: str, video, config: fc.FlashVIDConfig, seed: int) -> None:
    """compress gives identical indices and tokens with the Backend's fast path `flag` on and off."""
    features, attention = video
    torch.manual_seed(seed)
    fast = fc.compress(features, attention, config)
    torch.manual_seed(seed)
    plain = fc.compress(features, attention, config, backend=fc.Backend(**{flag: False}))
    assert torch.equal(fast.indices, plain.indices)
    assert torch.equal(fast.tokens, plain.tokens)


def _video(frames: int, tokens: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    scenes = torch.randn(4, tokens, dim, generator=generator)[torch.arange(frames) * 4 // frames]
    features = scenes + 0.3 * torch.randn(frames, tokens, dim, generator=generator)
    attention = torch.softmax(torch.randn(frames, tokens, generator=generator) * 2.0, dim=-1)
    return features.to("cuda", dtype), attention.to("cuda", dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_statistic_agrees_with_the_plain_computation(monkeypatch, dtype):
    from types import SimpleNamespace

    from lmms_eval_models.patches import llava_onevision

    torch.manual_seed(0)
    width, heads = 1152, 16
    attention = SimpleNamespace(
        num_heads=heads, head_dim=width // heads, scale=(width // heads) ** -0.5,
        q_proj=torch.nn.Linear(width, width).to("cuda", dtype), k_proj=torch.nn.Linear(width, width).to("cuda", dtype),
    )
    hidden = torch.randn(6, 729, width, device="cuda", dtype=dtype)
    with torch.no_grad():
        fused = llava_onevision.attention_received(attention, hidden, None)
        with fc.use_backend(fused_statistic=False):
            plain = llava_onevision.attention_received(attention, hidden, None)
    assert fused.shape == plain.shape == (6, 729) and fused.dtype == torch.float32
    assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-9)
    # the ranking the selection reads is the same
    assert torch.equal(fused.argsort(dim=-1, stable=True)[:, -50:], plain.argsort(dim=-1, stable=True)[:, -50:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_self_cdist_is_torch_cdist_bit_for_bit_on_cuda(dtype):
    x = (torch.randn(64, 150, 3584, device="cuda") * 3).to(dtype)
    assert torch.equal(clustering.self_cdist(x), torch.cdist(x.float(), x.float()))


@needs_triton
@pytest.mark.parametrize(("forbid_repick", "picked_value"), [(True, -1.0), (False, -1.0), (True, float("-inf"))])
def test_triton_greedy_equals_the_pytorch_loop(forbid_repick, picked_value):
    from flashvid_core import selection

    generator = torch.Generator().manual_seed(0)
    for tokens, picks in ((196, 18), (169, 40), (37, 37), (2, 1)):
        x = torch.randn(64, tokens, 32, generator=generator)
        distances = fc.cosine_distances(x) * torch.rand(64, 1, tokens, generator=generator)
        distances = (torch.round(distances * 8) / 8).cuda()  # many exact ties
        fused = accel_kernels.greedy_max_min(distances, picks, forbid_repick, picked_value)
        assert fused is not None
        assert torch.equal(fused, selection.greedy_loop(distances, picks, forbid_repick, picked_value))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_tree_walk_equals_the_frame_by_frame_walk(dtype):
    from flashvid_core import merging

    features, _ = _video(64, 196, 3584, dtype)
    lengths = [9, 0, 7, 8, 8, 1, 8, 8, 15]
    starts = torch.zeros(64, dtype=torch.bool, device="cuda")
    starts[[0, 9, 16, 24, 32, 33, 41, 49]] = True
    max_sim, parent = fc.temporal_parents(features, torch.zeros(64, 196, dtype=torch.bool, device="cuda"), starts)
    merged = merging.merge_decisions(max_sim, 0.8, lengths, 25)
    children_of = ((parent.unsqueeze(-1) == torch.arange(196, device="cuda")) & merged.unsqueeze(-1))
    children_of = children_of.transpose(1, 2).to(dtype).contiguous()
    reference = features.clone()
    merging.stepwise_walk(reference, children_of)
    walked = features.clone()
    assert accel_kernels.walk_tree_sums(walked, children_of, lengths)
    assert torch.equal(walked, reference)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["attn_div_v2", "attn_div", "div"])
def test_compress_on_cuda_is_the_same_with_and_without_the_triton_kernels(monkeypatch, dtype, method):
    _assert_same_with_and_without("triton", _video(64, 196, 512, dtype),
                                  fc.FlashVIDConfig(retention_ratio=0.1, token_selection_method=method), seed=2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["attn_div_v2", "attn", "div"])
@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_compress_is_the_same_with_and_without_the_cuda_graph_stage(monkeypatch, dtype, method, ratio):
    config = fc.FlashVIDConfig(retention_ratio=ratio, token_selection_method=method)
    for frames in (64, 5, 1):
        features, attention = _video(frames, 196, 512, dtype)
        assert accel_stage.applies(features, config)
        results = []
        for enabled, graphs in ((True, True), (True, True), (True, False), (False, True)):
            torch.manual_seed(4)
            backend = fc.Backend(cuda_stage=enabled, stage_graphs=graphs)
            results.append(fc.compress(features, attention, config, backend=backend))
        for other in results[1:]:
            assert torch.equal(other.indices, results[0].indices)
            assert torch.equal(other.tokens, results[0].tokens)
            assert torch.equal(other.segment_lengths, results[0].segment_lengths)
        assert not accel_stage.STATE.broken
