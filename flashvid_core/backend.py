"""Which fast paths `compress` may take, and the slots through which the accel layer provides them.

The reference stages (segmentation, selection, merging, clustering, pipeline) are plain PyTorch and import nothing
from `flashvid_core.accel`. Where a stage has a faster implementation on some device, it asks `fast_path(name)`;
the accel layer fills these slots when it is imported (`flashvid_core/__init__.py` imports it) and each provider
returns None where it cannot run (no CUDA, no Triton, turned off), so the reference path runs. Every fast path
computes the reference's numbers; `tests/test_gpu_fast_paths.py` compares both ways on a GPU.

`Backend` says which fast paths are allowed. It is read from a context variable, so it can be set per call
(`compress(..., backend=Backend(triton=False))`), per model (the patches take `backend=`), or around any code:

    with use_backend(cuda_graphs=False):
        out = compress(features, attention, config)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backend:
    """triton: the Triton kernels of the greedy Max-Min selection and the TSTM walks on CUDA (the CUDA stage needs
        them).
    cuda_graphs: CUDA graphs of the greedy selection loop and the frame-by-frame TSTM walk (without Triton).
    cuda_stage: the fixed-shape CUDA stage from DySeg to the cluster counts (`accel.stage`).
    stage_graphs: capture that stage as a CUDA graph (False: run it eagerly, e.g. for profiling).
    fused_cuda_draws: the DPC tie-breaker draws of all frames from one kernel.
    fixed_order_sums_on_cpu: take CUDA's fixed-order summation branch on the CPU too (tests compare the two).
    fused_statistic: LLaVA's vision attention statistic as one Triton kernel (lmms_eval_models.patches).
    native_cpu_products: the CPU stage's float32 similarities and DPC distances from the accel layer's C kernel,
        where it gives this machine's BLAS entries bit for bit (`accel.cpu_kernel`).
    """

    triton: bool = True
    cuda_graphs: bool = True
    cuda_stage: bool = True
    stage_graphs: bool = True
    fused_cuda_draws: bool = True
    fixed_order_sums_on_cpu: bool = False
    fused_statistic: bool = True
    native_cpu_products: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not isinstance(getattr(self, field.name), bool):
                raise ValueError(f"{field.name}={getattr(self, field.name)!r} is invalid: expected True or False")


_BACKEND: ContextVar[Backend] = ContextVar("flashvid_backend", default=Backend())  # noqa: B039 (frozen)
_FAST_PATHS: dict[str, Callable[..., Any]] = {}


def current_backend() -> Backend:
    return _BACKEND.get()


@contextmanager
def use_backend(backend: Backend | None = None, **changes: bool) -> Iterator[Backend]:
    """Run the block with `backend` (default: the current one) with `changes` applied; restored after."""
    chosen = dataclasses.replace(backend or current_backend(), **changes)
    token = _BACKEND.set(chosen)
    try:
        yield chosen
    finally:
        _BACKEND.reset(token)


def provide(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of the accel layer: `fn` is the fast path `name` (it returns None where it cannot run)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _FAST_PATHS[name] = fn
        return fn

    return register


def fast_path(name: str) -> Callable[..., Any] | None:
    """The provider of fast path `name`, or None when the accel layer provides none."""
    return _FAST_PATHS.get(name)
