"""The CPU stage's C kernel (flashvid_core/accel/cpu_kernel.py, run_products.c): it forms each entry in its fixed
order whatever the shapes, threads and strides around it; it is used only where it gives torch's own products bit
for bit; compress gives the same outputs with it and without it; and without a compiler everything falls back."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import core_cases as cc
import pytest
import torch

import flashvid_core as fc
from flashvid_core import cpu_products, eager_stage
from flashvid_core.accel import cpu_kernel

LOOP = cc.loop_reference()


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as handle:
            return " avx512f" in handle.read()
    except OSError:
        return False


KERNEL_EXPECTED = (sys.platform.startswith("linux") and os.uname().machine == "x86_64" and _cpu_has_avx512()
                   and bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")))
KERNEL = cpu_kernel.library() is not None


def _kernel_order(left: torch.Tensor, right_rows: torch.Tensor, run: int = cpu_kernel.RUN_LENGTH) -> torch.Tensor:
    """The kernel's order written out in float64 one product at a time: each run of `run` products a chain of
    fused multiply-adds from zero (a float32 product is exact in float64, and one rounding of the float64 sum to
    float32 is the fused operation's rounding unless the float64 sum itself rounded, which these small operands
    never make it do), the runs' sums added in order."""
    depth = left.shape[-1]
    total = None
    for start in range(0, depth, run):
        chain = torch.zeros(left.shape[0], left.shape[1], right_rows.shape[1], dtype=torch.float32)
        for k in range(start, min(start + run, depth)):
            step = left[:, :, k].double().unsqueeze(2) * right_rows[:, :, k].double().unsqueeze(1)
            chain = (chain.double() + step).float()
        total = chain if total is None else total + chain
    return total


def test_the_kernel_builds_where_it_can_run():
    assert KERNEL == KERNEL_EXPECTED


@pytest.mark.skipif(not KERNEL, reason="the C kernel does not run on this machine (checked above)")
@pytest.mark.parametrize("depth", [1, 5, 191, 192, 193, 400])
def test_each_entry_is_runs_of_192_fused_chains_added_in_order(depth):
    generator = torch.Generator().manual_seed(depth)
    # Operands of 8 significant bits: their products are exact in float32 and the float64 chain never rounds.
    left = torch.randint(-127, 128, (2, 7, depth), generator=generator).float() / 128
    right_rows = torch.randint(-127, 128, (2, 37, depth), generator=generator).float() / 128
    # Values spread over magnitudes, so that the order of the additions shows in the last bits.
    left = left * torch.exp2(torch.randint(-6, 7, (2, 7, depth), generator=generator)).float()
    got = cpu_kernel.products(left, right_rows)
    assert torch.equal(got, _kernel_order(left, right_rows))
    if depth > 192:  # another run length gives other bits: the test can tell
        assert not torch.equal(got, _kernel_order(left, right_rows, run=96))


@pytest.mark.skipif(not KERNEL, reason="the C kernel does not run on this machine (checked above)")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("batch", "rows", "columns"), [(1, 1, 1), (3, 13, 70), (2, 64, 33), (5, 40, 40), (1, 97, 5)])
def test_entries_do_not_depend_on_threads_strides_or_the_rows_around_them(threads, batch, rows, columns):
    generator = torch.Generator().manual_seed(rows * columns)
    left = torch.randn(batch, rows + 3, 300, generator=generator)[:, 2 : 2 + rows]  # a view: strided rows
    right_rows = torch.randn(batch, columns, 300, generator=generator)
    whole = cpu_kernel.products(left, right_rows, threads=threads)
    assert whole.shape == (batch, rows, columns)
    assert torch.equal(whole, cpu_kernel.products(left.contiguous(), right_rows, threads=1))
    assert torch.equal(whole[:, 1:4, 2:], cpu_kernel.products(left[:, 1:4], right_rows[:, 2:], threads=threads))
    assert torch.equal(whole[-1:], cpu_kernel.products(left[-1:], right_rows[-1:], threads=threads))


@pytest.mark.skipif(not KERNEL, reason="the C kernel does not run on this machine (checked above)")
@pytest.mark.parametrize(("batch", "tokens", "threads"), [(1, 1, 2), (1, 37, 2), (3, 70, 2), (4, 196, 3), (2, 65, 1)])
def test_the_lower_triangle_mirrored_is_the_whole_product(batch, tokens, threads):
    frames = torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(tokens))
    whole = cpu_kernel.products(frames, frames, threads=threads)
    lower = cpu_kernel.products(frames, frames, lower=True, threads=threads)
    on_and_below = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    assert torch.equal(lower[:, on_and_below], whole[:, on_and_below])
    assert torch.equal(cpu_products.mirrored_lower(lower), whole)
    assert torch.equal(whole, whole.transpose(1, 2))  # each entry's chain is symmetric in its two rows


@pytest.mark.parametrize("lower", [False, True])
@pytest.mark.parametrize(("batch", "rows", "threads"), [(1, 1, 2), (1, 196, 2), (8, 196, 2), (7, 178, 2), (3, 50, 5),
                                                        (2, 3, 8)])
def test_the_rows_are_cut_into_ranges_of_equal_work(lower, batch, rows, threads):
    cuts = cpu_kernel._row_cuts(batch, rows, rows, threads, lower)
    assert cuts[0] == 0 and cuts[-1] == batch * rows and cuts == sorted(cuts) and len(cuts) == threads + 1
    cost = [min(rows, (row // cpu_kernel.PANEL_COLUMNS + 1) * cpu_kernel.PANEL_COLUMNS) if lower else rows
            for row in range(rows)] * batch
    shares = [sum(cost[start:stop]) for start, stop in itertools.pairwise(cuts)]
    assert max(shares) - min(shares) <= 2 * max(cost)


@pytest.mark.skipif(not KERNEL, reason="the C kernel does not run on this machine (checked above)")
def test_empty_products_are_zeros():
    assert cpu_kernel.products(torch.zeros(2, 0, 5), torch.zeros(2, 3, 5)).shape == (2, 0, 3)
    assert torch.equal(cpu_kernel.products(torch.ones(2, 4, 0), torch.ones(2, 3, 0)), torch.zeros(2, 4, 3))


@pytest.mark.parametrize(("rows", "columns", "depth"), [(196, 196, 3584), (178, 178, 3586), (36, 36, 16), (40, 8, 64)])
def test_the_fast_path_gives_torchs_entries_or_nothing(rows, columns, depth):
    generator = torch.Generator().manual_seed(depth)
    left = torch.randn(2, rows, depth, generator=generator)
    right_rows = torch.randn(2, columns, depth, generator=generator)
    got = cpu_kernel.run_products(left, right_rows, [(rows, columns, depth)])
    exact = cpu_kernel.matches_blas(rows, columns, depth, torch.get_num_threads())
    assert (got is not None) == exact
    if got is not None:
        assert torch.equal(got, torch.bmm(left, right_rows.transpose(1, 2)))
    assert cpu_kernel.run_products(left.double(), right_rows.double(), [(rows, columns, depth)]) is None
    with fc.use_backend(native_cpu_products=False):
        assert cpu_products.native_products(left, right_rows, [(rows, columns, depth)]) is None


def test_the_check_leaves_the_default_generator_alone():
    cpu_kernel.matches_blas.cache_clear()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert isinstance(cpu_kernel.matches_blas(30, 31, 200, 1), bool)
    assert torch.equal(torch.get_rng_state(), state)


CONFIGS = [{}, {"retention_ratio": 0.1}, {"token_selection_method": "div"}, {"alpha": 0.0},
           {"tstm_spatial_window": 3, "retention_ratio": 0.4}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", CONFIGS)
def test_compress_gives_the_same_outputs_with_and_without_the_kernel(dtype, overrides):
    features, attention = LOOP.synthetic_video(12, 64, 48, "cpu", dtype, seed=7)
    config = fc.FlashVIDConfig(**{"min_segment_num": 3, **overrides})
    outputs = []
    for native in (True, False):
        torch.manual_seed(0)
        outputs.append(fc.compress(features, attention, config, backend=fc.Backend(native_cpu_products=native)))
    with_kernel, without = outputs
    assert torch.equal(with_kernel.indices, without.indices)
    assert torch.equal(with_kernel.tokens, without.tokens)
    assert torch.equal(with_kernel.segment_num_tokens, without.segment_num_tokens)


@pytest.mark.skipif(not KERNEL, reason="the C kernel does not run on this machine (checked above)")
def test_the_stage_takes_the_kernels_products_where_they_are_exact(monkeypatch):
    calls = []

    def counted(left, right_rows, lower=False, threads=None):
        calls.append(lower)
        return original(left, right_rows, lower, threads)

    original = cpu_kernel.products
    monkeypatch.setattr(cpu_kernel, "products", counted)
    cpu_kernel.matches_blas.cache_clear()  # the checks themselves call the kernel first
    cpu_kernel.matches_blas(64, 64, 48, torch.get_num_threads())
    calls.clear()
    test_compress_gives_the_same_outputs_with_and_without_the_kernel(torch.float32, {})
    if cpu_kernel.matches_blas(64, 64, 48, torch.get_num_threads()):
        assert True in calls and False in calls  # the selection's gram and the TSTM products
    else:
        assert calls == []


def test_without_a_compiler_nothing_changes(tmp_path):
    # A fresh process: the kernel is looked up once per process.
    code = (
        "import torch, flashvid_core as fc\n"
        "from flashvid_core.accel import cpu_kernel\n"
        "assert cpu_kernel.library() is None\n"
        "assert cpu_kernel.run_products(torch.ones(1, 2, 3), torch.ones(1, 2, 3), [(2, 2, 3)]) is None\n"
        "x = torch.randn(6, 40, 32, generator=torch.Generator().manual_seed(0))\n"
        "out = fc.compress(x, torch.rand(6, 40), fc.FlashVIDConfig())\n"
        "print(out.indices.numel())\n"
    )
    environment = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
                   "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 0


@pytest.mark.skipif(not KERNEL, reason="the C kernel does not run on this machine (checked above)")
def test_the_kernel_is_compiled_once_into_the_cache(tmp_path):
    code = "from flashvid_core.accel import cpu_kernel\nprint(cpu_kernel.library() is not None)\n"
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                                timeout=300)
        assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr
    built = sorted(path.name for path in (tmp_path / "flashvid_core").iterdir())
    assert len(built) == 1 and built[0].startswith("run_products-") and built[0].endswith(".so")


@pytest.mark.skipif(not KERNEL, reason="the C kernel does not run on this machine (checked above)")
def test_a_compiler_without_openmp_builds_a_one_thread_kernel_with_the_same_entries(tmp_path):
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\nfor arg in "$@"; do [ "$arg" = -fopenmp ] && exit 1; done\nexec '
                        f'{shutil.which("cc") or shutil.which("gcc")} "$@"\n')
    compiler.chmod(0o755)
    code = (
        "import torch\n"
        "from flashvid_core.accel import cpu_kernel\n"
        "assert cpu_kernel.library() is not None\n"
        "left, right = torch.randn(3, 40, 500), torch.randn(3, 50, 500)\n"
        "assert torch.equal(cpu_kernel.products(left, right, threads=2), cpu_kernel.products(left, right, threads=1))\n"
        "print(cpu_kernel.matches_blas(40, 50, 500, torch.get_num_threads()))\n"
    )
    environment = {**os.environ, "CC": str(compiler), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr
    # The same check, the same answer as the OpenMP build's in this process (same entries, same torch threads).
    assert result.stdout.strip() == str(cpu_kernel.matches_blas(40, 50, 500, torch.get_num_threads()))
    assert len(list((tmp_path / "cache" / "flashvid_core").glob("run_products-*.so"))) == 1  # the plain build


def test_native_gram_is_none_or_the_whole_product():
    frames = torch.randn(3, 50, 32, generator=torch.Generator().manual_seed(2))
    frames = frames / frames.norm(dim=-1, keepdim=True)
    gram = cpu_products.native_gram(frames)
    exact = KERNEL and cpu_kernel.matches_blas(50, 50, 32, torch.get_num_threads())
    assert (gram is not None) == exact
    if gram is not None:
        assert torch.equal(gram, torch.bmm(frames, frames.transpose(1, 2)))
    assert eager_stage.native_gram is cpu_products.native_gram
