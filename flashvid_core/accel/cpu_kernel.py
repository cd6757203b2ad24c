"""The CPU stage's float32 products from a small C kernel (`run_products.c`), with this machine's BLAS entries.

torch's float32 products on the CPU are MKL's. On the project host (an AMD EPYC, where MKL runs at about the AVX2
rate) each entry is formed in runs of 192 products, each run a fused multiply-add chain from zero, the runs' sums
added in order; the kernel forms every entry in that order with AVX-512 registers, about twice MKL's rate there. It is
used for a product only where it gives the entries of the reference's own product bit for bit: each shape the
reference multiplies at is checked once per process and thread count (`matches_blas`, on seeded random operands;
the order does not depend on the values). Anywhere else (another BLAS order, no AVX-512, no C compiler, not
Linux on x86-64, `Backend(native_cpu_products=False)`) the provider returns None and torch's product runs.

The kernel is compiled at first use with the system C compiler (`$CC`, else `cc`) into the user's cache
(`$XDG_CACHE_HOME/flashvid_core`, else `~/.cache/flashvid_core`, else the temporary directory), keyed by the
source, the compiler and the flags; no Python or torch headers are needed. A compiler without OpenMP builds it
without: the same entries, on one thread. Products run on torch's thread count, as row ranges
on torch's own OpenMP threads (see run_products.c).
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..backend import provide

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("run_products.c")
COMPILE_FLAGS = ("-O3", "-mavx512f", "-mfma", "-fPIC", "-shared")
# With OpenMP the rows are shared among torch's threads; a compiler without it builds a one-thread kernel.
OPENMP_FLAGS = ("-fopenmp",)
# The kernel's products per fused chain (RUN in run_products.c), and its column panels (NB: with `lower`, a row
# strip computes the panels up to its diagonal).
RUN_LENGTH = 192
PANEL_COLUMNS = 32


def _cache_dirs() -> list[Path]:
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(home) / "flashvid_core", Path(tempfile.gettempdir()) / f"flashvid_core-{os.getuid()}"]


def _compile(compiler: list[str], flags: tuple[str, ...], target: Path) -> bool:
    """Compile the kernel to `target` (written under a temporary name, then renamed: concurrent processes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as handle:
        partial = Path(handle.name)
    try:
        result = subprocess.run([*compiler, *flags, "-o", str(partial), str(SOURCE)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            logger.info("the CPU product kernel did not compile (%s): %s", compiler, result.stderr.strip()[-500:])
            return False
        os.replace(partial, target)
        return True
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run here (see the module docstring)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [found for found in (shutil.which("cc"), shutil.which("gcc"))
                                                         if found][:1]
    if not compiler:
        return None
    source = SOURCE.read_bytes()
    builds = [(*COMPILE_FLAGS, *OPENMP_FLAGS), COMPILE_FLAGS]  # the first that exists or compiles
    keys = [hashlib.sha256(source + " ".join((*compiler, *flags)).encode()).hexdigest()[:16] for flags in builds]
    for directory in _cache_dirs():
        paths = [directory / f"run_products-{key}.so" for key in keys]
        try:
            path = next((path for path in paths if path.exists()), None)
            if path is None:
                path = next((path for flags, path in zip(builds, paths) if _compile(compiler, flags, path)), None)
            if path is None:
                return None
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError) as error:  # an unwritable cache: try the next one
            logger.info("the CPU product kernel is not usable from %s: %s", directory, error)
            continue
        if not lib.run_products_supported():
            return None
        long, pointer = ctypes.c_long, ctypes.c_void_p
        lib.run_products.argtypes = [pointer, long, long, pointer, long, long, pointer, long, long,
                                     long, long, long, ctypes.c_int, long, long]
        lib.run_products.restype = ctypes.c_int
        lib.run_products_parallel.argtypes = [*lib.run_products.argtypes[:-2], ctypes.POINTER(long), ctypes.c_int]
        lib.run_products_parallel.restype = ctypes.c_int
        return lib
    return None


def _row_cuts(batch: int, rows: int, columns: int, threads: int, lower: bool) -> list[int]:
    """Split the batch's rows (row u = row u % rows of product u // rows) into `threads` ranges of equal work."""
    total_rows = batch * rows
    if not lower:
        return [total_rows * t // threads for t in range(threads + 1)]
    # With `lower` a row strip costs its panels up to the diagonal: balance the cumulative cost.
    cost = list(itertools.accumulate((min(columns, (row // PANEL_COLUMNS + 1) * PANEL_COLUMNS) for row in range(rows)),
                                     initial=0))
    cuts = [0]
    for t in range(1, threads):
        product, within = divmod(cost[-1] * batch * t / threads, cost[-1])
        cuts.append(max(cuts[-1], int(product) * rows + bisect.bisect_left(cost, within)))
    cuts.append(total_rows)
    return cuts


def products(left: Tensor, right_rows: Tensor, lower: bool = False, threads: int | None = None) -> Tensor | None:
    """left (B, M, K) @ right_rows (B, N, K)^T -> (B, M, N) float32, every entry in the kernel's order; None when
    the kernel cannot run here. Operands: float32 CPU, unit stride along K. lower: only the entries on and below
    the diagonal (and those in the same 32-column panels) are written; the rest of the result is unset."""
    lib = library()
    if lib is None:
        return None
    batch, rows, depth = left.shape
    columns = right_rows.shape[1]
    result = left.new_empty((batch, rows, columns))
    if result.numel() == 0 or depth == 0:
        return result.zero_()
    if left.stride(2) != 1:
        left = left.contiguous()
    if right_rows.stride(2) != 1:
        right_rows = right_rows.contiguous()
    threads = threads or torch.get_num_threads()
    arguments = (left.data_ptr(), left.stride(0), left.stride(1), right_rows.data_ptr(), right_rows.stride(0),
                 right_rows.stride(1), result.data_ptr(), result.stride(0), result.stride(1), rows, columns, depth,
                 int(lower))
    cuts = _row_cuts(batch, rows, columns, threads, lower) if threads > 1 and batch * rows > 1 else [0, batch * rows]
    cuts = sorted(set(cuts))
    with torch.profiler.record_function("flashvid_core::run_products"):  # profiles see no aten op here
        if len(cuts) == 2:
            failed = lib.run_products(*arguments, cuts[0], cuts[1])
        else:
            failed = lib.run_products_parallel(*arguments, (ctypes.c_long * len(cuts))(*cuts), len(cuts) - 1)
    return None if failed else result


@functools.lru_cache(maxsize=4096)
def matches_blas(rows: int, columns: int, depth: int, threads: int) -> bool:
    """Whether torch's float32 products of this shape give the kernel's entries on this machine, with `threads`
    torch threads: `mm` and `bmm` (which forms a batch matrix by matrix with the same kernel) on one pair of seeded
    random operands (own generator: the default one, which the DPC tie-breaker draws from, is not touched). Runs
    inside the first call that needs the shape, so the operands are one matrix each (they add to its peak memory)."""
    if library() is None:
        return False
    generator = torch.Generator().manual_seed(0)
    left = torch.rand(1, rows, depth, generator=generator).sub_(0.5)
    right_rows = torch.rand(1, columns, depth, generator=generator).sub_(0.5)
    ours = products(left, right_rows, threads=threads)
    if ours is None:
        return False
    return torch.equal(ours, torch.bmm(left, right_rows.transpose(1, 2))) and torch.equal(
        ours[0], torch.mm(left[0], right_rows[0].T))


@provide("cpu_run_products")
def run_products(left: Tensor, right_rows: Tensor, official_shapes: Sequence[tuple[int, int, int]],
                 lower: bool = False) -> Tensor | None:
    """The fast path of `flashvid_core.cpu_products.native_products`: left @ right_rows^T from the kernel when
    the reference's own products at every (M, N, K) of `official_shapes` give its entries here, else None."""
    if left.dtype != torch.float32 or right_rows.dtype != torch.float32 or left.device.type != "cpu":
        return None
    threads = torch.get_num_threads()
    if not all(matches_blas(*shape, threads) for shape in official_shapes):
        return None
    return products(left, right_rows, lower=lower, threads=threads)
