"""What every compression method shares: the `Method` interface, budgets, and the checks and helpers of its file.

Budgets are aligned as in the paper (§4.1, App. C.3): R is the average number of visual tokens per LLM layer, as
a fraction of vanilla. A method that shortens the sequence before the LLM keeps R·N tokens per frame for every
layer; one that prunes inside the LLM (FastV) keeps all N for its first K layers and a share r after, with
R·L = K + r·(L − K). Each method states its own rule (`Method.frame_budget`, `Method.llm_pruning`);
docs/baselines.md explains each choice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from flashvid_core.pipeline import Compression, validate_inputs

# Slack for float noise in N·R: 0.29 · 100 is 28.999999999999996, and the budget should still be 29.
FLOOR_SLACK = 1e-9


# ------------------------------------------------------------------------------------------------ checks
def check_at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name}={value!r} is out of range: allowed integers >= {low}")


def check_interval(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} is out of range: allowed [{low}, {high}]")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: allowed {', '.join(allowed)}")


def check_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is invalid: expected an integer")


def as_real(name: str, value: Any) -> float:
    """A finite real option as float, or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid: expected a finite real number")
    return float(value)


def check_integer_fields(options: Any, names: tuple[str, ...], low: int) -> None:
    """Each named field of an options dataclass an integer >= low, or ValueError naming it."""
    for name in names:
        check_integer(name, getattr(options, name))
        check_at_least(name, getattr(options, name), low)


def store_real_fields(options: Any, names: tuple[str, ...]) -> None:
    """Each named field of a frozen options dataclass checked as a finite real and stored as float."""
    for name in names:
        object.__setattr__(options, name, as_real(name, getattr(options, name)))


def check_retention_ratio(retention_ratio: float) -> None:
    if isinstance(retention_ratio, bool) or not isinstance(retention_ratio, (int, float)) or not (
        0.0 < retention_ratio <= 1.0
    ):
        raise ValueError(f"retention_ratio={retention_ratio!r} is out of range: allowed (0, 1]")


def check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")


def check_grid(grid_hw: tuple[int, int] | None, num_tokens_per_frame: int) -> tuple[int, int]:
    """The frame's token grid (h, w) with h·w = N; the square grid when None."""
    if grid_hw is None:
        side = math.isqrt(num_tokens_per_frame)
        if side * side != num_tokens_per_frame:
            raise ValueError(f"grid_hw is required for uniform pooling: {num_tokens_per_frame} tokens per frame is "
                             "not a square grid")
        return side, side
    height, width = (int(side) for side in grid_hw)
    if height * width != num_tokens_per_frame:
        raise ValueError(
            f"grid_hw={tuple(grid_hw)!r} is invalid: {height}×{width} != {num_tokens_per_frame} tokens per frame"
        )
    return height, width


def check_features(features: Tensor, attention: Tensor | None, needs_attention: bool, method: str) -> None:
    if needs_attention and attention is None:
        raise ValueError(f"method={method!r} needs the attention statistic (F, N); got None")
    if attention is not None:
        validate_inputs(features, attention, check_finite=False)
    elif not isinstance(features, Tensor) or features.dim() != 3 or 0 in features.shape:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a non-empty (F, N, D) tensor, got {shape}")


# ------------------------------------------------------------------------------------------------ budgets
def frame_budget(num_tokens_per_frame: int, retention_ratio: float) -> int:
    """Tokens kept per frame by a pre-LLM baseline: floor(N · R), at least 1.

    Floor, as the official FastVID code (`int(N * R)`), so a baseline never gets more than R (FlashVID's own
    ceilings only ever give it more, never less: the comparison stays conservative). At least 1 so that tiny
    grids (N = 4 at R = 0.1) still see every frame.
    """
    check_positive_int("num_tokens_per_frame", num_tokens_per_frame)
    check_retention_ratio(retention_ratio)
    return min(num_tokens_per_frame, max(1, math.floor(num_tokens_per_frame * retention_ratio + FLOOR_SLACK)))


@dataclass(frozen=True)
class LLMPruning:
    """Visual-token pruning inside the LLM: from layer `pruning_layer` on keep `llm_retention_ratio` of them.

    scoring: what ranks the visual tokens at layer K − 1, i.e. which pruner of `patches.llm_pruning` the patches
    attach: "last_query" (the last token's attention, averaged over heads: FastV, FlashVID) or "question" (the
    largest attention any head of any token after the video pays: PruneVID).
    """

    pruning_layer: int
    llm_retention_ratio: float
    scoring: str = "last_query"


@dataclass(frozen=True)
class FrameBudget:
    """One frame's share of a method's budget: tokens entering the LLM, split into selected and merged ones;
    pooled_grid (h', w') for methods that pool the grid."""

    tokens_per_frame: int
    num_selected: int
    num_merged: int
    pooled_grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class MethodBudget:
    """A method's token budget for one video (nominal: what the arithmetic promises).

    tokens_per_frame: tokens per frame entering the LLM (N for none and fastv; the pooled grid's size for
    uniform; an upper bound for fastvid, whose anchor division can round down: `fastvid_token_count` is exact).
    num_selected / num_merged: per-frame split (dominant/contextual for visionzip, salient/contextual for fastvid
    and flashvid's selected/merged; kept tokens count as selected for the other methods).
    llm_pruning: None, or the in-LLM pruning (fastv, flashvid); tokens_after_pruning = ceil(entering · r), as
    `llm_keep_positions` keeps.
    """

    method: str
    num_frames: int
    num_tokens_per_frame: int
    retention_ratio: float
    num_llm_layers: int
    tokens_per_frame: int
    num_selected: int
    num_merged: int
    llm_pruning: LLMPruning | None = None
    pooled_grid: tuple[int, int] | None = None

    @property
    def tokens_entering_llm(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def tokens_after_pruning(self) -> int:
        if self.llm_pruning is None or self.llm_pruning.pruning_layer >= self.num_llm_layers:
            return self.tokens_entering_llm
        return math.ceil(self.tokens_entering_llm * self.llm_pruning.llm_retention_ratio)

    @property
    def average_tokens_per_layer(self) -> float:
        """Visual tokens per LLM layer, averaged over the layers (the quantity R is a share of)."""
        if self.llm_pruning is None or self.llm_pruning.pruning_layer >= self.num_llm_layers:
            return float(self.tokens_entering_llm)
        layer = self.llm_pruning.pruning_layer
        return (self.tokens_entering_llm * layer + self.tokens_after_pruning * (self.num_llm_layers - layer)) / (
            self.num_llm_layers
        )

    @property
    def effective_retention_ratio(self) -> float:
        """average_tokens_per_layer as a share of the vanilla visual tokens (≈ R, by construction)."""
        return self.average_tokens_per_layer / (self.num_frames * self.num_tokens_per_frame)

    def to_dict(self) -> dict[str, Any]:
        """The fields and the derived counts, for manifests and reports."""
        return {
            **dataclasses.asdict(self),
            "tokens_entering_llm": self.tokens_entering_llm,
            "tokens_after_pruning": self.tokens_after_pruning,
            "average_tokens_per_layer": self.average_tokens_per_layer,
            "effective_retention_ratio": self.effective_retention_ratio,
        }


# ------------------------------------------------------------------------------------------------ outputs
def global_indices(frame_indices: Tensor, num_tokens_per_frame: int) -> Tensor:
    """(F, K) within-frame indices -> (F, K) global indices f·N + n."""
    frames = torch.arange(frame_indices.shape[0], device=frame_indices.device).unsqueeze(-1)
    return frames * num_tokens_per_frame + frame_indices


def sorted_by_index(tokens: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten (…, D) tokens and (…) global indices, ordered by index ascending."""
    tokens = tokens.reshape(-1, tokens.shape[-1])
    indices = indices.reshape(-1)
    order = torch.argsort(indices)
    return tokens[order], indices[order]


def make_compression(
    tokens: Tensor, indices: Tensor, segment_lengths: Tensor, num_tokens_per_frame: int, token_budget: int,
    num_selected: int, num_merged: int,
) -> Compression:
    """A Compression; segment_num_tokens counts the output tokens whose frame lies in each segment."""
    lengths = segment_lengths.to(device=indices.device, dtype=torch.long)
    segment_of_frame = torch.repeat_interleave(torch.arange(lengths.numel(), device=indices.device), lengths)
    segment_num_tokens = torch.bincount(segment_of_frame[indices // num_tokens_per_frame], minlength=lengths.numel())
    return Compression(
        tokens=tokens,
        indices=indices,
        segment_lengths=lengths,
        segment_num_tokens=segment_num_tokens,
        token_budget=token_budget,
        num_selected=num_selected,
        num_merged=num_merged,
    )


def per_frame_compression(tokens: Tensor, frame_indices: Tensor, num_tokens_per_frame: int,
                          budget: FrameBudget) -> Compression:
    """The Compression of a method that keeps (F, K, D) tokens at (F, K) within-frame indices, ascending in each
    frame, with the whole video as one segment."""
    num_frames = tokens.shape[0]
    indices = global_indices(frame_indices, num_tokens_per_frame)
    one_segment = torch.tensor([num_frames], dtype=torch.long, device=tokens.device)
    return make_compression(tokens.reshape(-1, tokens.shape[-1]), indices.reshape(-1), one_segment,
                            num_tokens_per_frame, budget.tokens_per_frame, budget.num_selected, budget.num_merged)


# ------------------------------------------------------------------------------------------------ the interface
class Method:
    """One compression method. A subclass in its own module of this package, decorated with `register`, declares:

    name: the `method=` value; label: the paper's name; order: its place in listings;
    needs_statistic: whether it reads the vision attention statistic (the patches compute it only then);
    compresses: False only for vanilla, whose tokens pass unchanged;
    depth_sensitive: whether its in-LLM pruning is only valid for some LLM depths (checked before loading);
    Options: a frozen dataclass of its own model_args keys with the paper's defaults, validating in
        `__post_init__` (keys shared by two methods must agree on the default);
    frame_budget / llm_pruning / compress: its budget rule, in-LLM pruning and compression.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    order: ClassVar[int]
    needs_statistic: ClassVar[bool] = False
    compresses: ClassVar[bool] = True
    depth_sensitive: ClassVar[bool] = False
    Options: ClassVar[type | None] = None

    def frame_budget(self, num_tokens_per_frame: int, retention_ratio: float, grid_hw: tuple[int, int] | None,
                     settings: Any, flashvid_config: Any) -> FrameBudget:
        """Default: floor(N·R) (>= 1) tokens per frame, all selected (`frame_budget`)."""
        budget = frame_budget(num_tokens_per_frame, retention_ratio)
        return FrameBudget(budget, budget, 0)

    def llm_pruning(self, retention_ratio: float, num_llm_layers: int, settings: Any,
                    flashvid_config: Any) -> LLMPruning | None:
        """Default: no pruning inside the LLM."""
        return None

    def compress(self, features: Tensor, attention: Tensor | None, retention_ratio: float,
                 grid_hw: tuple[int, int] | None, settings: Any, flashvid_config: Any,
                 generator: torch.Generator | None) -> Compression:
        """One video's Compression: features (F, N, D), attention (F, N) or None (when not needs_statistic)."""
        raise NotImplementedError(f"method {self.name!r} defines no compression")

    def __repr__(self) -> str:
        return f"<method {self.name}: {self.label}>"
