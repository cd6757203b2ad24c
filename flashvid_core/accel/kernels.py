"""Triton kernels for two sequential stages of `compress` on CUDA, each replacing many small launches.

- `greedy_max_min`: the greedy Max-Min selection of every frame in one launch (one program per frame keeps the
  running minimum on chip) instead of 3-4 kernels per pick.
- `walk_tree_sums`: the official frame-by-frame TSTM sums of float16/bfloat16 inputs, one program per (segment,
  block of feature columns) walking its frames last to first, instead of one matrix product per frame.

Both compute what the PyTorch code computes, value for value: the same comparisons with the same tie rule (the
lowest index wins, as torch.argmax/argmin), and for the walk the same roundings (the children's sum rounded to
the input dtype, then the addition rounded). They run only on CUDA with Triton; `Backend(triton=False)`, no Triton
or a compile failure falls back to the PyTorch code. `tests/test_gpu_fast_paths.py` compares both ways on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .._transfer import int_tensors
from ..backend import current_backend, provide


class KernelRegistry:
    """Triton kernels built on first use and kept, by name; every Triton kernel of the project (this module's,
    the DPC draws, the LLaVA statistic) is built through the one registry `KERNELS`."""

    def __init__(self) -> None:
        self._kernels: dict[str, object] = {}
        self._failed: set[str] = set()

    def get(self, name: str, build: Callable[[], object]) -> object | None:
        """What `build()` returns, built once; None once building failed (no Triton) or `disable(name)` was called
        after a failed launch, so the caller takes its PyTorch path."""
        if name in self._failed:
            return None
        if name not in self._kernels:
            try:
                self._kernels[name] = build()
            except Exception:  # no triton
                self._failed.add(name)
                return None
        return self._kernels[name]

    def disable(self, name: str) -> None:
        """After a failed launch (a compile error): the caller's PyTorch path from now on."""
        self._failed.add(name)


KERNELS = KernelRegistry()


def _build() -> dict[str, object]:  # pragma: no cover - needs triton and a CUDA device
    import triton
    import triton.language as tl

    @triton.jit
    def greedy_kernel(dist_ptr, out_ptr, num_tokens, num_picks, picked_value,
                      FORBID_REPICK: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        frame = tl.program_id(0)
        base = dist_ptr + frame.to(tl.int64) * num_tokens * num_tokens
        cols = tl.arange(0, BLOCK)
        valid = cols < num_tokens
        inf = float("inf")
        # First pick: the column whose second-smallest entry (as a multiset) is largest.
        smallest = tl.full([BLOCK], inf, tl.float32)
        second = tl.full([BLOCK], inf, tl.float32)
        for first_row in range(0, num_tokens, ROWS):
            rows = first_row + tl.arange(0, ROWS)
            tile = tl.load(base + rows[:, None] * num_tokens + cols[None, :],
                           mask=(rows[:, None] < num_tokens) & valid[None, :], other=inf)
            tile_min = tl.min(tile, axis=0)
            min_row = tl.argmin(tile, axis=0, tie_break_left=True)
            tile_second = tl.min(tl.where(tl.arange(0, ROWS)[:, None] == min_row[None, :], inf, tile), axis=0)
            take_old = smallest <= tile_min
            second = tl.where(take_old, tl.minimum(second, tile_min), tl.minimum(tile_second, smallest))
            smallest = tl.where(take_old, smallest, tile_min)
        second = tl.where(valid, second, -inf)
        pick = tl.argmax(second, axis=0, tie_break_left=True)
        tl.store(out_ptr + frame.to(tl.int64) * num_picks, pick.to(tl.int64))
        running = tl.load(base + pick * num_tokens + cols, mask=valid, other=-inf)
        picked = cols == pick
        for step in range(1, num_picks):
            if FORBID_REPICK:
                scores = tl.where(picked, picked_value, running)
            else:
                scores = running
            scores = tl.where(valid, scores, -inf)
            pick = tl.argmax(scores, axis=0, tie_break_left=True)
            tl.store(out_ptr + frame.to(tl.int64) * num_picks + step, pick.to(tl.int64))
            row = tl.load(base + pick * num_tokens + cols, mask=valid, other=-inf)
            running = tl.minimum(running, row)
            picked = picked | (cols == pick)

    @triton.jit
    def walk_kernel(values_ptr, children_ptr, starts_ptr, lengths_ptr, num_tokens, dim,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    NUM_P_BLOCKS: tl.constexpr, NUM_C_BLOCKS: tl.constexpr):
        segment = tl.program_id(0)
        column_block = tl.program_id(1)
        start = tl.load(starts_ptr + segment)
        length = tl.load(lengths_ptr + segment)
        columns = column_block * BLOCK_D + tl.arange(0, BLOCK_D)
        column_ok = columns < dim
        frame_size = num_tokens.to(tl.int64) * dim
        for back in range(0, length - 1):
            frame = start + length - 1 - back  # adds into frame - 1
            child_values = values_ptr + frame.to(tl.int64) * frame_size
            parent_values = values_ptr + (frame - 1).to(tl.int64) * frame_size
            links = children_ptr + frame.to(tl.int64) * num_tokens * num_tokens  # [parent, child]
            for p_block in tl.static_range(NUM_P_BLOCKS):
                parents = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
                parent_ok = parents < num_tokens
                acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
                for c_block in tl.static_range(NUM_C_BLOCKS):
                    children = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
                    child_ok = children < num_tokens
                    link = tl.load(links + parents[:, None] * num_tokens + children[None, :],
                                   mask=parent_ok[:, None] & child_ok[None, :], other=0.0)
                    value = tl.load(child_values + children[:, None] * dim + columns[None, :],
                                    mask=child_ok[:, None] & column_ok[None, :], other=0.0)
                    acc += tl.dot(link, value, out_dtype=tl.float32)
                mask = parent_ok[:, None] & column_ok[None, :]
                target = parent_values + parents[:, None] * dim + columns[None, :]
                old = tl.load(target, mask=mask, other=0.0)
                summed = acc.to(old.dtype)  # the product, rounded to the input dtype
                tl.store(target, (old.to(tl.float32) + summed.to(tl.float32)).to(old.dtype), mask=mask)
            tl.debug_barrier()  # frame - 1 is read as the children of the next step

    return {"greedy": greedy_kernel, "walk": walk_kernel}


def _kernel(name: str):
    if not current_backend().triton:
        return None
    kernels = KERNELS.get(__name__, _build)
    return None if kernels is None else kernels[name]


def greedy_max_min(distances: Tensor, num_picks: int, forbid_repick: bool, picked_value: float) -> Tensor | None:
    """`selection.greedy_loop` in one launch: distances (B, N, N) float32 CUDA -> picks (B, num_picks) int64, or None."""
    if not distances.is_cuda or distances.dtype != torch.float32 or distances.shape[1] > 4096 or num_picks < 1:
        return None
    kernel = _kernel("greedy")
    if kernel is None:
        return None
    try:
        return launch_greedy(kernel, distances, num_picks, forbid_repick, picked_value)
    except Exception:
        KERNELS.disable(__name__)
        return None


@provide("walk_tree_sums")
def walk_tree_sums(values: Tensor, children_of: Tensor, segment_lengths: list[int]) -> bool:
    """`merging.stepwise_walk` in place, all segments and feature columns in parallel. values (F, N, D) and
    children_of (F, N, N) float16/bfloat16 CUDA, contiguous. Returns False (values untouched) if it cannot run."""
    walked = [(start, length) for start, length in _segment_starts(segment_lengths) if length > 1]
    if not walked:  # nothing to add; True where the kernel path is taken at all
        return _walk_possible(values) and _kernel("walk") is not None
    starts, lengths = int_tensors(values.device, *(list(column) for column in zip(*walked)))
    return _walk(values, children_of, starts, lengths)


def walk_tree_sums_by_frame(values: Tensor, children_of: Tensor, segment_start: Tensor, segment_length: Tensor) -> bool:
    """`walk_tree_sums` with the segments given per frame as device tensors (F,) int64: one program per frame and
    column block, the programs of frames that start no multi-frame segment doing nothing. Fixed launch shape and no
    host data (what a CUDA graph can capture). Returns False (values untouched) if it cannot run."""
    frames = torch.arange(values.shape[0], device=values.device)
    lengths = torch.where(segment_start == frames, segment_length, torch.ones_like(segment_length))
    return _walk(values, children_of, frames, lengths)


def available() -> bool:
    """True when the kernels can run (enabled, Triton present, no failed launch)."""
    return _kernel("greedy") is not None


def launch_greedy(kernel, distances: Tensor, num_picks: int, forbid_repick: bool, picked_value: float) -> Tensor:
    """Launch the greedy kernel on distances (B, N, N) float32 -> picks (B, num_picks) int64 (raises on failure).
    Also runs under Triton's CPU interpreter (the CI test)."""
    batch, num_tokens, _ = distances.shape
    distances = distances.contiguous()
    picks = torch.empty(batch, num_picks, dtype=torch.long, device=distances.device)
    block = max(16, 1 << (num_tokens - 1).bit_length())
    rows = max(1, min(16, 8192 // block))
    with _on(distances.device):
        kernel[(batch,)](distances, picks, num_tokens, num_picks, float(picked_value),
                         FORBID_REPICK=bool(forbid_repick), BLOCK=block, ROWS=rows)
    return picks


def launch_walk(kernel, values: Tensor, children_of: Tensor, starts: Tensor, lengths: Tensor) -> None:
    """Launch the walk kernel in place: one program per (start, length) pair (S,) int64 and block of 64 feature
    columns (raises on failure). Also runs under Triton's CPU interpreter (the CI test)."""
    _, num_tokens, dim = values.shape
    blocks = -(-num_tokens // WALK_BLOCK)
    with _on(values.device):
        kernel[(starts.numel(), -(-dim // WALK_BLOCK))](
            values, children_of.contiguous(), starts, lengths, num_tokens, dim,
            BLOCK_P=WALK_BLOCK, BLOCK_C=WALK_BLOCK, BLOCK_D=WALK_BLOCK, NUM_P_BLOCKS=blocks, NUM_C_BLOCKS=blocks,
        )


WALK_BLOCK = 64


def _walk_possible(values: Tensor) -> bool:
    return values.is_cuda and values.dtype in (torch.float16, torch.bfloat16) and values.is_contiguous()


def _walk(values: Tensor, children_of: Tensor, starts: Tensor, lengths: Tensor) -> bool:
    if not _walk_possible(values):
        return False
    kernel = _kernel("walk")
    if kernel is None:
        return False
    try:
        launch_walk(kernel, values, children_of, starts, lengths)
    except Exception:
        KERNELS.disable(__name__)
        return False
    return True


def _on(device: torch.device):
    """The device's CUDA context for a launch (nothing for CPU tensors, as under the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _segment_starts(segment_lengths: list[int]) -> list[tuple[int, int]]:
    starts, offset = [], 0
    for length in segment_lengths:
        starts.append((offset, length))
        offset += length
    return starts
