"""The small pieces the patches share, below the prefill base (`prefill.py`): the family registry by class name, the
per-call figures (`FlashVIDStats`), the method plan (FlashVID or a baseline, from the methods registry
`lmms_eval_models.methods`) and the config validated at apply time, and the numeric helpers of the statistics."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flashvid_core.backend import Backend, use_backend
from flashvid_core.config import FlashVIDConfig
from lmms_eval_models.methods import (
    LLMPruning,
    MethodSettings,
    compress_with_method,
    get_method,
    llm_pruning_plan,
)

# transformers class name -> module of this package that patches it (imported only when a model of it is patched,
# so that importing the package does not import every family's transformers module)
FAMILY_MODULES: dict[str, str] = {
    "LlavaOnevisionForConditionalGeneration": "lmms_eval_models.patches.llava_onevision",
    "Qwen2_5_VLForConditionalGeneration": "lmms_eval_models.patches.qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "lmms_eval_models.patches.qwen3_vl",
}

# Attribute set on a patched model instance (and on each module whose class it swapped); holds its `prefill.Patch`.
PATCH_ATTR = "_flashvid_patch"
# Attribute of a patched model instance holding the `FlashVIDStats` of its last video prefill (None before one).
STATS_ATTR = "flashvid_stats"


@dataclass(frozen=True)
class FlashVIDStats:
    """What happened to the video tokens on the model's last forward pass with a video.

    visual_tokens_in: F·N, the video's tokens the LLM would receive uncompressed (LLaVA's newline embeddings not
    counted); visual_tokens_compressed: M, those the method passed on; visual_tokens_after_pruning: those left from
    the in-LLM pruning layer K on (M without inner pruning); num_segments: the method's segments (DySeg for
    FlashVID); compression_ms: the wall time of the method's compression, between device synchronisations (0.0
    for a method that compresses nothing, as an unpatched run reports). Readable as `model.flashvid_stats` after
    a call (set by the prefill base, `prefill.py`); never written into the config.
    """

    visual_tokens_in: int
    visual_tokens_compressed: int
    visual_tokens_after_pruning: int
    num_segments: int
    compression_ms: float


def coerce_config(config: Any) -> FlashVIDConfig | None:
    """The `FlashVIDConfig` a family's `apply` runs with: a FlashVIDConfig as is, a mapping of its fields through
    `FlashVIDConfig.from_mapping` (which names a bad key), None as None (each family says where None is allowed);
    anything else is a TypeError."""
    if isinstance(config, Mapping):
        return FlashVIDConfig.from_mapping(config)
    if config is not None and not isinstance(config, FlashVIDConfig):
        raise TypeError(
            f"config must be a flashvid_core.FlashVIDConfig, a mapping of its fields, or None, got {type(config).__name__}"
        )
    return config


def bind_arguments(signature: inspect.Signature, module: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A method call's arguments by name, positional ones included, without the bound instance (the signature's
    first parameter) and with `**kwargs` flattened, whatever the transformers version's signature."""
    bound = signature.bind(module, *args, **kwargs)
    instance_name = next(iter(signature.parameters))
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif name != instance_name:
            arguments[name] = value
    return arguments


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding helper: (..., D) -> (..., D), the halves swapped and the new first half negated."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def softmax_float32(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits, dim=-1, dtype=torch.float32), without the float32 copy of half/bfloat16 logits on CUDA.

    softmax(dtype=float32) first casts its input to a float32 copy; on CUDA the softmax kernel reads float16
    directly and computes in float32 (`half_to_float`, float16 only), giving the same values with one pass fewer
    over the (largest) tensor of the statistic.
    """
    if logits.is_cuda and logits.dtype == torch.float16:
        return torch._softmax(logits, -1, True)
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ methods


@dataclass(frozen=True)
class MethodPlan:
    """Which token-compression method one patched instance runs, validated once when the patch is applied.

    method: a registered method's name (`lmms_eval_models.methods`); retention_ratio: R of the config (1.0 for
    "none" without one); settings: the `MethodSettings` parsed from the baseline options; llm_pruning: where and
    how much the LLM prunes visual tokens (FlashVID's K/r, FastV's K/r derived from R), None for no inner pruning;
    backend: the fast paths this instance's video prefills may take (None: whatever the caller's context says).
    """

    method: str
    retention_ratio: float
    settings: Any  # lmms_eval_models.methods.MethodSettings
    llm_pruning: LLMPruning | None
    backend: Backend | None = None

    def scope(self) -> contextlib.AbstractContextManager:
        """The context a video prefill of this instance runs in: its own Backend, if it has one."""
        return use_backend(self.backend) if self.backend is not None else contextlib.nullcontext()

    @property
    def needs_statistic(self) -> bool:
        """Whether the method reads the vision attention statistic; for the others it is never computed."""
        return get_method(self.method).needs_statistic

    @property
    def compresses(self) -> bool:
        """False for "none": its tokens pass unchanged, and it reports 0 ms of compression as unpatched runs do."""
        return get_method(self.method).compresses

    def compress(self, features: Any, statistic: Any, grid_hw: tuple[int, int], config: Any) -> Any:
        """One video's Compression: features (F, N, D), statistic (F, N) or None, grid_hw (h, w) with h·w = N."""
        return compress_with_method(
            self.method, features, statistic, self.retention_ratio, grid_hw, flashvid_config=config,
            **self.settings.to_dict(),
        )  # fmt: skip


def plan_method(
    method: Any, baseline_options: Mapping[str, Any] | None, config: Any, num_llm_layers: int,
    backend: Backend | None = None,
) -> MethodPlan:
    """Validate a family's method options before any model work; ValueError names the bad value and the allowed.

    config: the `FlashVIDConfig` whose retention_ratio sets every method's budget (None only for "none").
    """
    spec = get_method(method)
    if baseline_options is None:
        baseline_options = {}
    if not isinstance(baseline_options, Mapping):
        raise ValueError(
            f"baseline_options={baseline_options!r} is invalid: expected a mapping of MethodSettings fields"
        )
    settings = MethodSettings.from_options(baseline_options)
    if config is None and spec.compresses:
        raise ValueError(f"method={method!r} needs a FlashVIDConfig: its retention_ratio sets the token budget")
    retention_ratio = 1.0 if config is None else float(config.retention_ratio)
    pruning = llm_pruning_plan(method, retention_ratio, num_llm_layers, settings, config)
    if backend is not None and not isinstance(backend, Backend):
        raise ValueError(f"backend={backend!r} is invalid: expected a flashvid_core.Backend or None")
    return MethodPlan(method=method, retention_ratio=retention_ratio, settings=settings, llm_pruning=pruning,
                      backend=backend)
