"""Bad inputs and impossible configurations raise ValueError with a clear message, never a wrong result."""

from __future__ import annotations

import pytest
import segment_reference
import torch

import flashvid_core as fc


def video(frames=4, tokens=16, dim=8, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(frames, tokens, dim, generator=generator).to(dtype)
    attention = torch.rand(frames, tokens, generator=generator).to(dtype)
    return features, attention


@pytest.mark.parametrize(
    ("features_shape", "attention_shape", "message"),
    [
        ((4, 16), (4, 16), r"features must have shape \(F, N, D\)"),
        ((2, 4, 16, 8), (4, 16), r"features must have shape \(F, N, D\)"),
        ((4, 16, 8), (4, 16, 1), r"attention must have shape \(F, N\)"),
        ((4, 16, 8), (64,), r"attention must have shape \(F, N\)"),
        ((4, 16, 8), (4, 15), "does not match features"),
        ((4, 16, 8), (3, 16), "does not match features"),
        ((0, 16, 8), (0, 16), "zero frames"),
        ((4, 0, 8), (4, 0), "no tokens"),
    ],
)
def test_shape_errors(features_shape, attention_shape, message):
    with pytest.raises(ValueError, match=message):
        fc.compress(torch.randn(features_shape), torch.rand(attention_shape), fc.FlashVIDConfig())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs(bad):
    features, attention = video()
    broken = features.clone()
    broken[1, 3, 2] = bad
    with pytest.raises(ValueError, match="features contain NaN or inf"):
        fc.compress(broken, attention)
    broken_attention = attention.clone()
    broken_attention[2, 5] = bad
    with pytest.raises(ValueError, match="attention contains NaN or inf"):
        fc.compress(features, broken_attention)


def test_type_errors():
    features, attention = video()
    with pytest.raises(ValueError, match="torch tensors"):
        fc.compress(features.numpy(), attention)
    with pytest.raises(ValueError, match="floating point"):
        fc.compress(features.to(torch.int64), attention)
    with pytest.raises(ValueError, match="FlashVIDConfig"):
        fc.compress(features, attention, {"alpha": 0.5})


def test_reference_crash_configuration_is_refused():
    # e2e_056_err: temporal_threshold 1.0 with alpha 0.5 made the official code divide by zero.
    with pytest.raises(ValueError, match="divides by zero"):
        fc.compress(*video(), fc.FlashVIDConfig(temporal_threshold=1.0, alpha=0.5))


def test_budget_rounding_past_the_frame_is_refused_in_compress():
    # 0.8 * 1.25 == 1.0, but 169 * 0.8 * 1.25 = 169.00000000000003 -> a budget of 170 tokens for 169.
    config = fc.FlashVIDConfig(retention_ratio=0.8, expansion=1.25)
    assert config.token_budget(169) == 170
    features, attention = video(frames=2, tokens=169)
    with pytest.raises(ValueError, match="larger than the frame's 169 tokens"):
        fc.compress(features, attention, config)


def test_injected_noise_of_wrong_length_is_refused():
    features, attention = video()
    with pytest.raises(ValueError, match="dpc_noise has 3 values"):
        fc.compress(features, attention, fc.FlashVIDConfig(), dpc_noise=torch.rand(3))


def test_compress_segment_argument_errors():
    features, attention = video()
    config = fc.FlashVIDConfig()
    with pytest.raises(ValueError, match="exceeds the 16 tokens"):
        segment_reference.compress_segment(features, attention, config, 10, 10)
    with pytest.raises(ValueError, match="num_merged=-1"):
        segment_reference.compress_segment(features, attention, config, 1, -1)


def test_llm_keep_positions_errors():
    attention = torch.rand(20)
    with pytest.raises(ValueError, match="1-D"):
        fc.llm_keep_positions(attention.view(4, 5), 0, 5, 0.5)
    with pytest.raises(ValueError, match="exceeds the sequence length 20"):
        fc.llm_keep_positions(attention, 10, 11, 0.5)
    with pytest.raises(ValueError, match="llm_retention_ratio=0"):
        fc.llm_keep_positions(attention, 0, 5, 0)
    with pytest.raises(ValueError, match="visual_start=-1"):
        fc.llm_keep_positions(attention, -1, 5, 0.5)
    broken = attention.clone()
    broken[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fc.llm_keep_positions(broken, 0, 5, 0.5)
