"""CUDA graphs: one LRU cache helper for every captured computation, and the two graph-replayed reference loops.

Without Triton, the greedy Max-Min loop (3-4 small kernels per pick) and the frame-by-frame TSTM walk (one matrix
product per frame) are captured once per shape and replayed: the same kernels as eager mode, so the same numbers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from ..backend import current_backend, provide
from ..merging import stepwise_walk
from ..selection import greedy_loop
from .kernels import greedy_max_min


def capture(inputs: tuple[Tensor, ...], run: Callable[..., Any]) -> tuple[torch.cuda.CUDAGraph, tuple[Tensor, ...], Any]:
    """(graph, static inputs, output) of `run(*static inputs)`, after one warm-up run on a side stream (which
    compiles kernels and fills the allocator's caches outside the capture). The warm-up may write into the static
    inputs: every replay copies its inputs in first."""
    static_inputs = tuple(value.clone() for value in inputs)
    device = inputs[0].device
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run(*static_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = run(*static_inputs)
    return graph, static_inputs, output


class GraphCache:
    """Captured graphs by key, least recently used evicted beyond `size` (each holds its static buffers)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, tuple] = OrderedDict()

    def replay(self, key: Hashable, inputs: tuple[Tensor, ...], run: Callable[..., Any]) -> Any:
        """`run(*inputs)` by replaying its graph (captured on first use of `key`); returns the static output,
        overwritten by the next replay of the same key."""
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = capture(inputs, run)
            while len(self._entries) >= self.size:
                self._entries.popitem(last=False)
        self._entries[key] = entry
        graph, static_inputs, output = entry
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        graph.replay()
        return output

    def clear(self) -> None:
        self._entries.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


_GREEDY_GRAPHS = GraphCache(16)
_WALK_GRAPHS = GraphCache(8)


@provide("greedy_max_min")
def accelerated_greedy(distances: Tensor, num_tokens: int, forbid_repick: bool, picked_value: float) -> Tensor | None:
    """The greedy Max-Min picks on CUDA: one Triton launch, else a graph replay of `greedy_loop`; None elsewhere."""
    backend = current_backend()
    if not distances.is_cuda:
        return None
    if backend.triton:
        picks = greedy_max_min(distances, num_tokens, forbid_repick, picked_value)
        if picks is not None:
            return picks
    if not backend.cuda_graphs or num_tokens <= 2:
        return None
    key = (distances.device, distances.dtype, tuple(distances.shape), num_tokens, forbid_repick, picked_value)
    return _GREEDY_GRAPHS.replay(
        key, (distances,), lambda static: greedy_loop(static, num_tokens, forbid_repick, picked_value)
    ).clone()


def _walked(values: Tensor, children_of: Tensor) -> Tensor:
    stepwise_walk(values, children_of)
    return values


@provide("stepwise_walk")
def graph_stepwise_walk(values: Tensor, children_of: Tensor) -> Tensor | None:
    """`stepwise_walk` by a CUDA graph replay: the walked values (a new tensor), or None off CUDA or graphs off."""
    if not values.is_cuda or not current_backend().cuda_graphs:
        return None
    key = (values.device, tuple(values.shape), values.dtype)
    return _WALK_GRAPHS.replay(key, (values, children_of), _walked).clone()
