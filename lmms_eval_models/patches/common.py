"""What every family's patch shares: the per-call statistics, instance-scoped class swapping, and the method
plan (FlashVID or a baseline, from the methods registry `lmms_eval_models.methods`) validated at apply time."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flashvid_core.backend import Backend, use_backend
from lmms_eval_models.methods import (
    LLMPruning,
    MethodSettings,
    compress_with_method,
    get_method,
    llm_pruning_plan,
)

# Attribute set on a patched model instance; holds the family's patch state.
PATCH_ATTR = "_flashvid_patch"
# Attribute of a patched model instance holding the `FlashVIDStats` of its last video prefill (None before one).
STATS_ATTR = "flashvid_stats"


@dataclass(frozen=True)
class FlashVIDStats:
    """What happened to the video tokens on the model's last forward pass with a video.

    Readable as `model.flashvid_stats` after a call; never written into the config.
    """

    visual_tokens_in: int
    visual_tokens_compressed: int
    visual_tokens_after_pruning: int
    num_segments: int
    compression_ms: float


def is_patched(model: Any) -> bool:
    """Whether FlashVID is currently applied to this model instance."""
    return getattr(model, PATCH_ATTR, None) is not None


def swap_class(module: Any, subclass_factory: Any) -> None:
    """Give one module instance a dynamically made subclass of its class (ToMe style), remembering the original.

    `subclass_factory(original_class) -> subclass`. Other instances of the same class are untouched.
    """
    original = module.__class__
    if getattr(module, "_flashvid_original_class", None) is not None:
        return
    module.__class__ = subclass_factory(original)
    module._flashvid_original_class = original


def restore_class(module: Any) -> None:
    """Undo `swap_class` on one module instance."""
    original = getattr(module, "_flashvid_original_class", None)
    if original is not None:
        module.__class__ = original
        del module._flashvid_original_class


def check_supported_class(model: Any, supported_class: str) -> None:
    """TypeError unless `model` is (a subclass of) the class named `supported_class`, listing every supported one."""
    if not any(cls.__name__ == supported_class for cls in type(model).__mro__):
        from lmms_eval_models.patches import FAMILY_MODULES

        raise TypeError(
            f"this patch supports {supported_class}, got {type(model).__name__}; supported model classes: "
            f"{', '.join(sorted(FAMILY_MODULES))}"
        )


def coerce_config(config: Any) -> Any:
    """The `FlashVIDConfig` a family's `apply` runs with: a FlashVIDConfig as is, a mapping of its fields through
    `FlashVIDConfig.from_mapping` (which names a bad key), None as None (each family says where None is allowed);
    anything else is a TypeError."""
    from flashvid_core import FlashVIDConfig

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


def attach_planned_pruning(layers: Any, plan: MethodPlan) -> Any:
    """The `LLMPruner` the plan asks for on these decoder layers, or None."""
    if plan.llm_pruning is None:
        return None
    from lmms_eval_models.patches.llm_pruning import attach_llm_pruning

    pruning = plan.llm_pruning
    return attach_llm_pruning(layers, pruning.pruning_layer, pruning.llm_retention_ratio, pruning.scoring)
