"""The paper's FLOPs model (Eq. 12): L × (2nd²(1 + g/h) + 2n²d + 3ndm) for n visual tokens.

Checked against Table 6: LLaVA-OV-7B at 64 frames has n = 64·196 + 1 = 12,545 video tokens and gives 113.4
TFLOPs; LLaVA-Video's n = 64·(169 + 1) = 10,880 gives 94.8 (Table 10). Text tokens are not counted (as in the
paper). With inner-LLM pruning the first K layers see n tokens and the other L − K see the pruned count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LLMShape:
    layers: int  # L
    hidden: int  # d
    intermediate: int  # m
    heads: int  # h
    kv_heads: int  # g

    @classmethod
    def from_text_config(cls, text_config: Any) -> LLMShape:
        heads = text_config.num_attention_heads
        return cls(
            layers=text_config.num_hidden_layers,
            hidden=text_config.hidden_size,
            intermediate=text_config.intermediate_size,
            heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads,
        )


def layer_flops(tokens: int, shape: LLMShape) -> float:
    """Eq. 12's per-layer term for `tokens` tokens."""
    n, d, m = float(tokens), float(shape.hidden), float(shape.intermediate)
    return 2 * n * d * d * (1 + shape.kv_heads / shape.heads) + 2 * n * n * d + 3 * n * d * m


def prefill_tflops(shape: LLMShape, tokens: int, pruned_tokens: int | None = None, pruning_layer: int | None = None) -> float:
    """Eq. 12 in TFLOPs; `pruned_tokens` from `pruning_layer` on when the LLM prunes inside."""
    if pruned_tokens is None or pruning_layer is None or pruned_tokens >= tokens:
        return shape.layers * layer_flops(tokens, shape) / 1e12
    kept_layers = min(pruning_layer, shape.layers)
    total = kept_layers * layer_flops(tokens, shape) + (shape.layers - kept_layers) * layer_flops(pruned_tokens, shape)
    return total / 1e12
