"""Many CUDA `torch.rand(1, n)` draws in one kernel launch, with the same values and generator state.

The official DPC-kNN draws its density tie-breaker with one `torch.rand_like` per frame; on CUDA each draw is a
launch (tens of microseconds of host time per frame). For n <= 270k, PyTorch's CUDA uniform kernel gives element j
the first word of Philox4x32-10 at counter (offset / 4, j) under key = seed, mapped to (0, 1] by curand's rule and
1.0 folded to 0.0, and each call advances the generator's offset by 4. `fused_uniform_draws` computes every
call's elements in one Triton kernel from the generator's seed and offset, then advances the offset as the
separate calls would. `draws_match_torch` checks it against `torch.rand` (the GPU tests call it); any failure to
import or compile Triton falls back to the per-call draws.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._transfer import int_tensors
from ..backend import current_backend, provide
from .kernels import KERNELS

# PyTorch advances the Philox offset by 4 per uniform call below this size (one grid-stride pass).
MAX_FUSED_DRAW = 256 * 1024
_OFFSET_PER_CALL = 4

def _build_kernel():  # pragma: no cover - needs triton and a CUDA device
    import triton
    import triton.language as tl

    @triton.jit
    def uniform_draws_kernel(out_ptr, starts_ptr, sizes_ptr, seed, base_counter, BLOCK: tl.constexpr):
        call = tl.program_id(0)
        start = tl.load(starts_ptr + call)
        size = tl.load(sizes_ptr + call)
        counter = (base_counter + call).to(tl.uint64)
        low = (counter & 0xFFFFFFFF).to(tl.uint32)
        high = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
        for first in range(0, size, BLOCK):
            element = first + tl.arange(0, BLOCK)
            zero = tl.zeros([BLOCK], dtype=tl.uint32)
            word, _, _, _ = tl.philox(seed, low + zero, high + zero, element.to(tl.uint32), zero, 10)
            # curand_uniform: x * 2^-32 + 2^-33 (exact: a power-of-two scale), then torch maps 1.0 to 0.0.
            value = word.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
            value = tl.where(value == 1.0, 0.0, value)
            tl.store(out_ptr + start + element, value, mask=element < size)

    return uniform_draws_kernel


def _generator_for(device: torch.device, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def fused_uniform_draws(sizes: list[int], device: torch.device, generator: torch.Generator | None = None) -> Tensor | None:
    """The concatenation of torch.rand(1, n, device=device, generator=generator) for n in sizes, drawn in one launch.

    Returns (sum(sizes),) float32 and leaves the generator where the separate calls would, or None (nothing
    consumed) when the fused kernel cannot be used: no Triton, a draw too large, a generator being captured.
    """
    if not sizes or max(sizes) > MAX_FUSED_DRAW or min(sizes) < 1 or torch.cuda.is_current_stream_capturing():
        return None
    kernel = KERNELS.get(__name__, _build_kernel)
    if kernel is None:
        return None
    gen = _generator_for(device, generator)
    seed, offset = gen.initial_seed(), gen.get_offset()
    if offset % _OFFSET_PER_CALL:
        return None
    starts = [0] * len(sizes)
    for index in range(1, len(sizes)):
        starts[index] = starts[index - 1] + sizes[index - 1]
    start_tensor, size_tensor = int_tensors(device, starts, sizes)
    out = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    try:
        with torch.cuda.device(device):
            kernel[(len(sizes),)](out, start_tensor, size_tensor, seed, offset // _OFFSET_PER_CALL,
                                  BLOCK=256)
    except Exception:  # a compile failure: fall back for the rest of the process
        KERNELS.disable(__name__)
        return None
    gen.set_offset(offset + _OFFSET_PER_CALL * len(sizes))
    return out


def draws_match_torch(sizes: list[int], device: torch.device, seed: int = 0) -> bool:
    """True when fused_uniform_draws equals per-call torch.rand for these sizes and leaves the same state."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    reference = torch.cat([torch.rand(1, n, device=device, generator=generator) for n in sizes], dim=1).flatten()
    after_reference = torch.rand(8, device=device, generator=generator)
    generator.manual_seed(seed)
    fused = fused_uniform_draws(sizes, device, generator)
    if fused is None:
        return False
    after_fused = torch.rand(8, device=device, generator=generator)
    return torch.equal(reference, fused) and torch.equal(after_reference, after_fused)


@provide("uniform_draws")
def accelerated_draws(num_points: list[int], device: torch.device, generator: torch.Generator | None) -> Tensor | None:
    """The DPC tie-breaker draws of every call in one launch on CUDA; None (nothing drawn) where it cannot."""
    if device.type != "cuda" or not current_backend().fused_cuda_draws:
        return None
    return fused_uniform_draws(num_points, device, generator)
