"""Per-stage timing with forward hooks: CUDA events on GPU, perf_counter on CPU.

Nothing here touches the FlashVID patches: the stages are cut at module boundaries that exist in the stock
model (vision tower in, projector out; language model in and out), and the compression time comes from the
patch's own `flashvid_stats.compression_ms` (measured between device synchronisations).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class Clock:
    """Time marks on the host: CPU kernels run synchronously, so perf_counter at a hook is the stage boundary."""

    def mark(self) -> Any:
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return (end - start) * 1e3

    def synchronize(self) -> None:
        """Nothing queued on the CPU."""


class CudaClock(Clock):
    """Time marks as CUDA events on the current stream: asynchronous, so hooks do not stall the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


def clock_for(device: torch.device) -> Clock:
    return CudaClock(device) if device.type == "cuda" else Clock()


@dataclass
class StageModules:
    """Where a family's stages begin and end in its module tree."""

    vision_in: nn.Module  # its forward starts vision encoding
    vision_out: nn.Module  # its forward ends vision encoding (the projector / merger)
    vision_layers: list[nn.Module]  # encoder layers, for the one-layer cost
    language_model: nn.Module  # LLM backbone (decoder layers; no lm_head)


@dataclass
class _Marks:
    vision_start: Any = None
    vision_end: Any = None
    llm_start: Any = None
    llm_end: Any = None
    llm_sequence_length: int | None = None
    layer_marks: list[tuple[Any, Any]] = field(default_factory=list)
    layer_open: dict[int, Any] = field(default_factory=dict)


@dataclass
class StageTimes:
    """One timed call: milliseconds per stage (LLM forward = the first, prefill, call of the backbone)."""

    vision_ms: float
    llm_forward_ms: float
    between_ms: float  # vision end to LLM start: pooling, statistic pooling, compression, embedding splice
    total_ms: float
    vision_layer_ms: list[float]
    llm_sequence_length: int


class StageProbe:
    """Forward hooks that mark stage boundaries during one `generate` call; remove() detaches them."""

    def __init__(self, modules: StageModules, clock: Clock) -> None:
        self.clock = clock
        self.marks = _Marks()
        self._handles: list[Any] = []
        self._handles.append(modules.vision_in.register_forward_pre_hook(self._on_vision_start))
        self._handles.append(modules.vision_out.register_forward_hook(self._on_vision_end))
        self._handles.append(
            modules.language_model.register_forward_pre_hook(self._on_llm_start, with_kwargs=True)
        )
        self._handles.append(modules.language_model.register_forward_hook(self._on_llm_end))
        for index, layer in enumerate(modules.vision_layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_start(index)))
            self._handles.append(layer.register_forward_hook(self._layer_end(index)))

    def reset(self) -> None:
        self.marks = _Marks()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # The first vision call and the first LLM call of a generate() are the prefill's; later ones are decoding.
    def _on_vision_start(self, module: nn.Module, args: Any) -> None:
        if self.marks.vision_start is None:
            self.marks.vision_start = self.clock.mark()

    def _on_vision_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.marks.llm_start is None:  # the projector's last call before the LLM starts
            self.marks.vision_end = self.clock.mark()

    def _on_llm_start(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self.marks.llm_start is None:
            self.marks.llm_start = self.clock.mark()
            embeds = kwargs.get("inputs_embeds")
            ids = kwargs.get("input_ids", args[0] if args else None)
            source = embeds if embeds is not None else ids
            self.marks.llm_sequence_length = int(source.shape[1]) if source is not None else None

    def _on_llm_end(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.marks.llm_end is None:
            self.marks.llm_end = self.clock.mark()

    def _layer_start(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self.marks.llm_start is None:
                self.marks.layer_open[index] = self.clock.mark()

        return hook

    def _layer_end(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            start = self.marks.layer_open.pop(index, None)
            if start is not None:
                self.marks.layer_marks.append((start, self.clock.mark()))

        return hook

    def times(self, call_start: Any, call_end: Any) -> StageTimes:
        """Stage times of the call between `call_start` and `call_end` (synchronises first)."""
        self.clock.synchronize()
        marks = self.marks
        missing = [name for name in ("vision_start", "vision_end", "llm_start", "llm_end") if getattr(marks, name) is None]
        if missing:
            raise RuntimeError(f"stage hooks did not fire: {', '.join(missing)} (is the video reaching the model?)")
        elapsed = self.clock.elapsed_ms
        return StageTimes(
            vision_ms=elapsed(marks.vision_start, marks.vision_end),
            llm_forward_ms=elapsed(marks.llm_start, marks.llm_end),
            between_ms=elapsed(marks.vision_end, marks.llm_start),
            total_ms=elapsed(call_start, call_end),
            vision_layer_ms=[elapsed(start, end) for start, end in marks.layer_marks],
            llm_sequence_length=marks.llm_sequence_length or 0,
        )


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated device memory since the last reset (None on CPU: no per-call peak is tracked there)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
