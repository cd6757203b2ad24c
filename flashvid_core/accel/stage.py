"""On CUDA, the part of `compress` between DySeg and the per-frame cluster counts, replayed as one CUDA graph.

That part (ADTS selection, TSTM parents, merge decisions, tree sums, the passed-on tokens) is about 150 small
PyTorch calls; issued one by one, the host's launch overhead, not the GPU, sets its time. Written with fixed
shapes (the segments enter as per-frame device tensors, `..._by_frame` / `..._from_ids` functions, the two Triton
kernels), it is captured once per (shape, dtype, settings), the second time that key comes, and replayed with
one launch per video. The stage is the same code eagerly or replayed; `tests/test_gpu_fast_paths.py` checks
compress with and without it on a GPU.

Used for float16/bfloat16 features on CUDA with the Triton kernels available and the default TSTM (no opt-in tree
limits, windows or float32 sums); elsewhere compress runs its eager path. `Backend(stage_graphs=False)` runs the
same stage eagerly (for profiling); `Backend(cuda_stage=False)` turns the path off. The cache keeps `CACHE_SIZE`
graphs, each holding its buffers (about 5 copies of the features at 64x196x3584: ~0.5 GB).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backend import current_backend, provide
from ..config import FlashVIDConfig
from ..merging import children_and_counts, frame_layout, merge_decisions_by_frame, temporal_parents
from ..pipeline import VideoPlan
from ..selection import select_tokens
from . import kernels
from .graphs import GraphCache

CACHE_SIZE = 2


@dataclass(frozen=True)
class Plan:
    """Everything the stage's shapes and code path depend on besides the tensors' sizes (the graph key)."""

    num_selected: int
    num_merged: int
    method: str
    forbid_repick: bool | None
    temporal_threshold: float
    budget: int
    multi_frame: bool  # some segment has more than one frame (TSTM runs)


@dataclass
class StageOutput:
    """keep (F, K) ascending or None; selected (F, N) bool; for num_merged > 0: sums (F, N, D) input dtype and
    counts (F, N) (None: sums are the features), passed (F, N) bool, token_order (F, N), passed_counts (F,)."""

    keep: Tensor | None
    selected: Tensor
    sums: Tensor | None
    counts: Tensor | None
    passed: Tensor | None
    token_order: Tensor | None
    passed_counts: Tensor | None


class StageState:
    """The stage's graphs, the keys seen once (run eagerly), and whether it failed (then it stays off)."""

    def __init__(self) -> None:
        self.graphs = GraphCache(CACHE_SIZE)
        self.seen: OrderedDict[tuple, None] = OrderedDict()
        self.broken = False
        self.last_error: BaseException | None = None  # why the stage failed, if it did

    def disable(self, error: BaseException) -> None:
        self.broken, self.last_error = True, error
        self.graphs.clear()
        warnings.warn(f"flashvid_core: the CUDA stage is disabled, compress runs its eager path: {error!r}",
                      RuntimeWarning, stacklevel=5)


STATE = StageState()


def applies(features: Tensor, config: FlashVIDConfig) -> bool:
    """Whether compress takes this path for these features and settings."""
    return (
        current_backend().cuda_stage
        and not STATE.broken
        and features.is_cuda
        and features.dtype in (torch.float16, torch.bfloat16)
        and config.tstm_max_depth is None
        and config.tstm_max_breadth is None
        and config.tstm_spatial_window is None
        and not config.tstm_float32_sums
        and not config.tstm_true_mean
        and kernels.available()
    )


@provide("compress_stage")
def compress_stage(features: Tensor, attention: Tensor, video: VideoPlan) -> StageOutput | None:
    """`compress`'s fast path from selection to the passed-on tokens for this video's plan, or None where it
    does not apply."""
    config = video.config
    if not applies(features, config):
        return None
    plan = Plan(video.num_selected, video.num_merged, config.token_selection_method,
                True if config.adts_forbid_repick else None, config.temporal_threshold, video.budget,
                video.multi_frame)
    return run(features, attention, list(video.segment_lengths), plan)


def run(features: Tensor, attention: Tensor, segment_lengths: list[int], plan: Plan) -> StageOutput | None:
    """The stage for one video: replayed from the graph cache (captured the second time its key comes), or run
    eagerly; None if it failed (no Triton compiler, a capture error): the caller then runs its eager path, and
    this path stays off for the process, with one warning saying why."""
    if STATE.broken:
        return None
    try:
        return _run(features, attention, segment_lengths, plan)
    except Exception as error:
        STATE.disable(error)
        return None


def _run(features: Tensor, attention: Tensor, segment_lengths: list[int], plan: Plan) -> StageOutput:
    segment_ids, segment_start, segment_length = _frame_segments(segment_lengths, features.device)
    inputs = (features, attention, segment_ids, segment_start, segment_length)
    if not current_backend().stage_graphs:
        return stage(*inputs, plan)
    key = (features.device, features.dtype, attention.dtype, tuple(features.shape), plan)
    if key not in STATE.seen and key not in STATE.graphs:
        # A shape seen once runs eagerly (same code, same results): capturing costs a few eager runs, so only
        # shapes that come back are captured (videos of varying length would otherwise thrash the cache).
        STATE.seen[key] = None
        while len(STATE.seen) > 64:
            STATE.seen.popitem(last=False)
        return stage(*inputs, plan)
    return STATE.graphs.replay(key, inputs, lambda *static: stage(*static, plan))


def stepwise_tree_sums_by_frame(
    features: Tensor, merged: Tensor, parent: Tensor, segment_start: Tensor, segment_length: Tensor
) -> tuple[Tensor, Tensor]:
    """`merging.stepwise_tree_sums` with the segments given per frame as device tensors (F,) int64 (first frame
    of the frame's segment, its length): one Triton kernel, fixed shapes, no host data. CUDA float16/bfloat16
    only; raises RuntimeError where the kernel cannot run (the caller then uses stepwise_tree_sums)."""
    children_of, counts = children_and_counts(features, merged, parent)
    values = features.clone()
    if not kernels.walk_tree_sums_by_frame(values, children_of, segment_start, segment_length):
        raise RuntimeError("the Triton TSTM walk cannot run here")
    return values, counts


def stage(features: Tensor, attention: Tensor, segment_ids: Tensor, segment_start: Tensor,
          segment_length: Tensor, plan: Plan) -> StageOutput:
    """The stage with fixed shapes: features (F, N, D), attention (F, N), per-frame segment tensors (F,) int64."""
    num_frames, num_tokens, _ = features.shape
    device = features.device
    frame_arange = torch.arange(num_frames, device=device)
    selected = torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=device)
    keep = None
    if plan.num_selected > 0:
        keep = select_tokens(features.float(), attention, plan.num_selected, plan.method,
                             forbid_repick=plan.forbid_repick, segment_ids=segment_ids)
        selected.scatter_(1, keep, True)  # (indexed assignment of True would copy a CPU scalar: not capturable)
    if plan.num_merged == 0:
        return StageOutput(keep, selected, None, None, None, None, None)
    if plan.multi_frame:
        max_sim, parent = temporal_parents(features, selected, segment_start == frame_arange)
        merged = merge_decisions_by_frame(max_sim, plan.temporal_threshold, segment_ids, segment_start,
                                          segment_length, plan.budget)
        sums, counts = stepwise_tree_sums_by_frame(features, merged, parent, segment_start, segment_length)
        passed = (segment_length == 1).unsqueeze(-1) | (~merged & ~selected)
    else:
        passed = torch.ones(num_frames, num_tokens, dtype=torch.bool, device=device)
        sums, counts = features, None
    token_order = torch.argsort((~passed).to(torch.int8), dim=-1, stable=True)
    return StageOutput(keep, selected, sums, counts, passed, token_order, passed.sum(dim=-1))


def _frame_segments(segment_lengths: list[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per frame: segment index, first frame of its segment, its length (F,) int64 (one transfer)."""
    segment_ids, _, segment_length, lengths = frame_layout(segment_lengths, device)
    return segment_ids, (torch.cumsum(lengths, 0) - lengths)[segment_ids], segment_length
