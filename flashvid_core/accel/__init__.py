"""The fast paths of `compress`, beside the reference stages: Triton kernels, CUDA graphs, the fixed-shape CUDA
stage. Importing this package fills the reference's fast-path slots (`flashvid_core.backend.fast_path`); which of
them may run is the current `Backend`'s choice. Nothing here changes a number: each path computes what the
reference computes, and falls back to it (returns None) where it cannot run.

    kernels.py   the kernel registry (KERNELS) and the Triton greedy Max-Min and TSTM walk kernels
    rng.py       the DPC tie-breaker draws of all frames in one Triton launch
    graphs.py    one CUDA-graph cache helper; the graph-replayed greedy loop and TSTM walk
    stage.py     the part of compress from selection to the passed-on tokens with fixed shapes, graph-replayed
    cpu_kernel.py  the CPU stage's float32 products from a C kernel (run_products.c) in this machine's BLAS order
"""

from . import cpu_kernel, graphs, kernels, rng, stage

__all__ = ["cpu_kernel", "graphs", "kernels", "rng", "stage"]
