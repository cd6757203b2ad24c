"""FlashVID in Qwen2.5-VL / Qwen3-VL on a CUDA GPU: flash-attn 2 (mask-free prefill, varlen decoding over the
shorter cache of layers >= K) agrees with sdpa. Skipped with a reason where no GPU or flash-attn is present."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.gpu

import transformers  # noqa: F401, E402  (a hard dependency: a broken install must fail, not skip)
from test_patches_qwen import PRUNE, video_inputs  # noqa: E402

from lmms_eval_models.patches import apply_flashvid  # noqa: E402


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package")
@pytest.mark.parametrize("family", ("qwen2_5_vl", "qwen3_vl"))
def test_flash_attention_matches_sdpa_with_pruning(tiny_checkpoint, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_checkpoint(family)
    processor = AutoProcessor.from_pretrained(path)
    inputs = video_inputs(processor, family).to("cuda")
    results = {}
    for implementation in ("sdpa", "flash_attention_2"):
        model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=implementation)
        model = model.to(device="cuda", dtype=torch.bfloat16).eval()
        apply_flashvid(model, PRUNE)
        with torch.no_grad():
            torch.manual_seed(0)
            out = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True
            )
        cache = out.past_key_values
        layers = len(model.model.language_model.layers)
        results[implementation] = (torch.stack(out.logits).float(), [cache.get_seq_length(i) for i in range(layers)])
    assert results["sdpa"][1] == results["flash_attention_2"][1]
    assert len(set(results["sdpa"][1])) == 2  # shorter from layer K on
    # bf16 kernels differ in rounding: compare the per-step logits, not exact tokens
    torch.testing.assert_close(results["flash_attention_2"][0], results["sdpa"][0], atol=3e-2, rtol=3e-2)
