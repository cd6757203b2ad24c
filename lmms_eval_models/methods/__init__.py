"""The token-compression methods in FlashVID's harness, one module each, as a registry.

    from lmms_eval_models.methods import get_method, MethodSettings
    method = get_method("visionzip")          # name, label, needs_statistic, compresses, Options
    budget = budget_for_method("visionzip", num_tokens_per_frame=196, num_frames=32, retention_ratio=0.1)
    out = compress_with_method("visionzip", features, attention, 0.1)   # the same Compression as FlashVID's

Every method returns the same `Compression` as FlashVID's `compress` (tokens (M, D), ascending global indices
g = f·N + n), so a model patch plumbs any method identically; the patches, model classes and sweeps ask the
registry what a method needs and hold no per-method branches. Adding a method is one new module here: a `Method`
subclass with its name, label, options, budget rule, in-LLM pruning and compression, decorated with `register`.

Settings follow the paper's Appendix C.1; the defaults of each method's `Options` are those values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flashvid_core.config import FlashVIDConfig
from flashvid_core.pipeline import Compression
from lmms_eval_models.methods.base import (
    FrameBudget,
    LLMPruning,
    Method,
    MethodBudget,
    check_features,
    check_positive_int,
    check_retention_ratio,
    frame_budget,
)
from lmms_eval_models.methods.registry import all_methods, discover, get_method, method_names, register
from lmms_eval_models.methods.settings import compose_settings

discover()
METHODS: tuple[str, ...] = method_names()
MethodSettings = compose_settings(all_methods())


def llm_pruning_plan(
    method: str,
    retention_ratio: float,
    num_llm_layers: int = 28,
    settings: Any = None,
    flashvid_config: FlashVIDConfig | None = None,
) -> LLMPruning | None:
    """Where and how much a method prunes visual tokens inside the LLM; None for methods that do not."""
    return get_method(method).llm_pruning(retention_ratio, num_llm_layers, settings or MethodSettings(),
                                          flashvid_config)


def budget_for_method(
    method: str,
    num_tokens_per_frame: int,
    num_frames: int,
    retention_ratio: float,
    num_llm_layers: int = 28,
    *,
    grid_hw: tuple[int, int] | None = None,
    settings: Any = None,
    flashvid_config: FlashVIDConfig | None = None,
) -> MethodBudget:
    """The token arithmetic of `method` at retention ratio R (average share of visual tokens per LLM layer):
    its per-frame budget and its in-LLM pruning (each method's module documents its rule)."""
    spec = get_method(method)
    check_positive_int("num_tokens_per_frame", num_tokens_per_frame)
    check_positive_int("num_frames", num_frames)
    check_positive_int("num_llm_layers", num_llm_layers)
    check_retention_ratio(retention_ratio)
    settings = settings or MethodSettings()
    pruning = spec.llm_pruning(retention_ratio, num_llm_layers, settings, flashvid_config)
    frame = spec.frame_budget(num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config)
    return MethodBudget(method=method, num_frames=num_frames, num_tokens_per_frame=num_tokens_per_frame,
                        retention_ratio=float(retention_ratio), num_llm_layers=num_llm_layers,
                        tokens_per_frame=frame.tokens_per_frame, num_selected=frame.num_selected,
                        num_merged=frame.num_merged, llm_pruning=pruning, pooled_grid=frame.pooled_grid)


@torch.no_grad()
def compress_with_method(
    method: str,
    features: Tensor,
    attention: Tensor | None,
    retention_ratio: float,
    grid_hw: tuple[int, int] | None = None,
    *,
    flashvid_config: FlashVIDConfig | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Compression:
    """Compress one video's visual tokens with `method`; the same Compression as FlashVID's `compress`.

    features: (F, N, D) after the model's own pooling/merging; attention: (F, N) the per-token attention
    statistic (needed by the methods with `needs_statistic`); grid_hw: the frame's token grid (h, w), h·w = N,
    needed by uniform for non-square grids. options: `MethodSettings` fields (unknown keys raise ValueError).
    flashvid_config: FlashVID's config (default FlashVIDConfig()), run at this retention_ratio.
    generator: the random draws' generator where a method has any (default: one seeded with `seed`).
    """
    spec = get_method(method)
    settings = MethodSettings.from_options(options)
    check_retention_ratio(retention_ratio)
    check_features(features, attention, spec.needs_statistic, method)
    return spec.compress(features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator)


__all__ = [
    "METHODS",
    "FrameBudget",
    "LLMPruning",
    "Method",
    "MethodBudget",
    "MethodSettings",
    "all_methods",
    "budget_for_method",
    "compress_with_method",
    "frame_budget",
    "get_method",
    "llm_pruning_plan",
    "method_names",
    "register",
]
