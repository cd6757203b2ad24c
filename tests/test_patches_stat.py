"""The LLaVA patch's fast vision-side pieces against the stock computations they stand in for.

- Pooling: the patch's channels-last bilinear pooling must be bit-identical to transformers' own `apply_pooling`
  (float32 and bfloat16, the 7B shape's 27×27 grid and the tiny checkpoint's 7×7 one).
- Attention statistic: computed beside the layer in query chunks, it must equal the mean over heads and queries
  of transformers' eager attention probabilities (within float tolerance), while the layer's output, with the
  statistic armed on it, stays bit-identical to the stock layer's (sdpa and eager).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flashvid_core import FlashVIDConfig
from lmms_eval_models.patches import apply_flashvid
from lmms_eval_models.patches.llava_onevision import (
    attention_received,
    bilinear_pool_half,
    siglip_attention_received,
)
from lmms_eval_models.patches.prefill import StatisticCapture, encode_call

DTYPES = (torch.float32, torch.bfloat16)


def stock_pooling(features: torch.Tensor, side: int) -> torch.Tensor:
    """transformers' own `LlavaOnevisionModel.apply_pooling`; it reads only the vision config's grid size."""
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    vision_config = SimpleNamespace(image_size=side * 14, patch_size=14)
    model = SimpleNamespace(config=SimpleNamespace(vision_config=vision_config))
    return LlavaOnevisionModel.apply_pooling(model, features)


def siglip_attention(implementation: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipAttention

    config = SiglipVisionConfig(hidden_size=48, num_attention_heads=4, intermediate_size=96)
    config._attn_implementation = implementation
    torch.manual_seed(seed)
    return SiglipAttention(config).to(dtype).eval()


def eager_statistic(
    attention: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over heads and queries of the eager layer's own attention probabilities, (B, N) float32."""
    eager = copy.deepcopy(attention)
    eager.config = copy.deepcopy(attention.config)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        _, probabilities = eager(hidden_states, mask)
    return probabilities.float().mean(dim=(1, 2))


# -------------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("side", "dim"), [(27, 3584), (27, 1), (7, 40)])
def test_bilinear_pooling_is_bit_identical_to_stock(side: int, dim: int, dtype: torch.dtype) -> None:
    torch.manual_seed(side + dim)
    features = torch.randn(3, side * side, dim).to(dtype)
    expected = stock_pooling(features, side)
    pooled = bilinear_pool_half(features, side, side)
    assert pooled.shape == expected.shape == (3, math.ceil(side / 2) ** 2, dim)
    assert pooled.dtype == expected.dtype
    assert torch.equal(pooled, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_patched_model_pools_as_stock(tiny_checkpoint: Callable[[str], Path], dtype: torch.dtype) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    path = tiny_checkpoint("llava_onevision")
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(path)
    patched = apply_flashvid(LlavaOnevisionForConditionalGeneration.from_pretrained(path), FlashVIDConfig())
    assert type(patched.model).apply_pooling is not type(stock.model).apply_pooling  # the fast one is in use
    side = stock.config.vision_config.image_size // stock.config.vision_config.patch_size
    torch.manual_seed(1)
    features = torch.randn(4, side * side, stock.config.text_config.hidden_size).to(dtype)
    assert torch.equal(patched.model.apply_pooling(features), stock.model.apply_pooling(features))


# ------------------------------------------------------------------------------------------ statistic


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_bytes", [1, 3 * 2 * 4 * 29 * 4, 1 << 28])  # one row, 3 rows (29 = 9·3 + 2), all
def test_chunked_statistic_equals_eager(dtype: torch.dtype, max_bytes: int) -> None:
    attention = siglip_attention("sdpa", dtype)
    torch.manual_seed(2)
    hidden_states = torch.randn(2, 29, 48).to(dtype)
    with torch.no_grad():
        received = attention_received(attention, hidden_states, None, max_bytes=max_bytes)
    expected = eager_statistic(attention, hidden_states)
    assert received.shape == (2, 29) and received.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(received, expected)
    else:  # eager rounds each probability to bfloat16 before the mean; the statistic keeps float32
        torch.testing.assert_close(received, expected, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(received.sum(dim=-1), torch.ones(2))  # each query distributes one unit


@pytest.mark.parametrize("mask_rows", [29, 1])  # a full (B, 1, N, N) mask, and one broadcast over queries
def test_chunked_statistic_with_mask_equals_eager(mask_rows: int) -> None:
    attention = siglip_attention("eager", torch.float32)
    torch.manual_seed(3)
    hidden_states = torch.randn(2, 29, 48)
    mask = torch.zeros(2, 1, mask_rows, 29)
    mask[..., -5:] = torch.finfo(torch.float32).min  # the last keys are padding
    with torch.no_grad():
        received = attention_received(attention, hidden_states, mask, max_bytes=4 * 2 * 4 * 29 * 4)
    expected = eager_statistic(attention, hidden_states, mask.expand(2, 1, 29, 29))
    torch.testing.assert_close(received, expected)
    assert torch.all(received[:, -5:] == 0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_armed_layer_output_is_the_stock_layer_output(implementation: str, dtype: torch.dtype) -> None:
    stock = siglip_attention(implementation, dtype)
    armed = copy.deepcopy(stock)
    capture = StatisticCapture()
    torch.manual_seed(4)
    hidden_states = torch.randn(3, 29, 48).to(dtype)
    with torch.no_grad():
        expected = stock(hidden_states)[0]
        with capture.armed(armed, siglip_attention_received) as sink:
            actual = armed(hidden_states)[0]
        assert torch.equal(armed(hidden_states)[0], expected)  # disarmed: the hook computes nothing
    assert torch.equal(actual, expected)
    assert len(sink) == 1 and capture.captures == 1
    tolerance = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(sink[0], eager_statistic(stock, hidden_states), **tolerance)
    capture.remove()
    assert len(armed._forward_pre_hooks) == len(stock._forward_pre_hooks)


def test_patched_sdpa_features_are_the_stock_features(tiny_checkpoint: Callable[[str], Path]) -> None:
    """End to end on the tiny checkpoint: the features FlashVID compresses are exactly the stock sdpa model's."""
    from transformers import LlavaOnevisionForConditionalGeneration

    path = tiny_checkpoint("llava_onevision")
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    patched = LlavaOnevisionForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    apply_flashvid(patched, FlashVIDConfig())
    config = stock.config
    torch.manual_seed(5)
    pixels = torch.randn(1, 5, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        output = stock.model.get_video_features(
            pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        encoded = encode_call(
            patched,
            pixel_values_videos=pixels,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    features, statistic = encoded.features, encoded.statistic
    expected = output if torch.is_tensor(output) else output.pooler_output
    frames, tokens, dim = features.shape
    assert torch.equal(features.reshape(-1, dim), expected.reshape(-1, dim)[: frames * tokens])
    assert statistic.shape == (frames, tokens)
