"""Baseline token-compression methods in FlashVID's harness: FastV, VisionZip, DivPrune, FastVID, uniform, random.

Every pre-LLM method returns the same `Compression` as FlashVID's `compress` (tokens (M, D), ascending global
indices g = f·N + n), so a model adapter plumbs any method identically. FastV is an in-LLM method: it keeps all
visual tokens before the LLM and prunes at layer K; `llm_pruning_plan` says where and how much, for FastV and for
FlashVID alike, and the adapter applies it with `fastv_keep_positions` / `llm_keep_positions`.

Budgets are aligned as in the paper (§4.1, App. C.3): R is the average number of visual tokens per LLM layer, as
a fraction of vanilla. A method that shortens the sequence before the LLM keeps R·N tokens per frame for every
layer; FastV keeps all N for its first K layers and a ratio r after, with R·L = K + r·(L − K). `budget_for_method`
does this arithmetic for every method; docs/baselines.md explains each choice.

Settings follow the paper's Appendix C.1; the defaults of `BaselineSettings` are those values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .clustering import dpc_knn
from .config import FlashVIDConfig
from .llm_pruning import llm_keep_positions
from .merging import index_sum
from .pipeline import Compression, compress, validate_inputs
from .segmentation import segment_lengths as dyseg_segment_lengths
from .selection import gather_tokens, select_tokens

METHODS: tuple[str, ...] = ("flashvid", "fastv", "visionzip", "divprune", "fastvid", "uniform", "random", "none")
# Methods that shorten the visual sequence before the LLM and leave the LLM untouched.
PRE_LLM_METHODS: tuple[str, ...] = ("visionzip", "divprune", "fastvid", "uniform", "random")
VISIONZIP_MERGES: tuple[str, ...] = ("official", "mean")
FASTV_RATIO_RULES: tuple[str, ...] = ("per_layer", "paper")

# Slack for float noise in N·R: 0.29 · 100 is 28.999999999999996, and the budget should still be 29.
_FLOOR_SLACK = 1e-9


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class BaselineSettings:
    """Per-method settings; defaults are the paper's Appendix C.1 values. Frozen: read, never written.

    fastv_layer: K, the LLM layer from which FastV keeps only the top-attention visual tokens (paper: 2).
    fastv_ratio_rule: "per_layer" (default, issue 8): the kept ratio r after layer K solves R·L = K + r·(L − K),
        so the per-layer average is R. "paper": r = R, i.e. the pruning ratio 1 − R that App. C.1 prints
        (75/80/85/90% for R = 25/20/15/10%); its per-layer average is above R.
    visionzip_dominant, visionzip_contextual: VisionZip's dominant:contextual split of a frame's budget, 54:10
        at its reference budget of 64 tokens, scaled to other budgets by `visionzip_split`.
    visionzip_merge: "official" (released VisionZip: a contextual token = its target + the mean of the tokens
        assigned to it) or "mean" (the target and its assigned tokens averaged together, as in the FlashVID
        authors' refactored copy of VisionZip).
    fastvid_min_segments (c = 8), fastvid_segment_threshold (τ = 0.9): DySeg, shared with FlashVID.
    fastvid_contextual_share (d = 0.4): App. C.1 calls d the "salient token ratio"; the official FastVID code
        uses it as the contextual share: contextual = floor(budget · d), salient = budget − contextual.
    fastvid_anchor_step (p = 4): every p-th frame of a segment, counted back from its last frame, is an anchor.
    fastvid_merging_factor (α = 0.6): a contextual token's own weight is max(α, 1 / (members + 1)).
    fastvid_density_neighbours: k of FastVID's DPC-kNN density (official: 4; capped at the frame's tokens).
    seed: seeds `random` and the density tie-breaker of `fastvid` (deterministic outputs for a fixed seed).
    """

    fastv_layer: int = 2
    fastv_ratio_rule: str = "per_layer"
    visionzip_dominant: int = 54
    visionzip_contextual: int = 10
    visionzip_merge: str = "official"
    fastvid_min_segments: int = 8
    fastvid_segment_threshold: float = 0.9
    fastvid_contextual_share: float = 0.4
    fastvid_anchor_step: int = 4
    fastvid_merging_factor: float = 0.6
    fastvid_density_neighbours: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("fastv_layer", "visionzip_dominant", "visionzip_contextual", "fastvid_min_segments",
                     "fastvid_anchor_step", "fastvid_density_neighbours", "seed"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} is invalid: expected an integer")
        for name in ("fastvid_segment_threshold", "fastvid_contextual_share", "fastvid_merging_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is invalid: expected a finite real number")
            object.__setattr__(self, name, float(value))
        _check_at_least("fastv_layer", self.fastv_layer, 1)
        _check_at_least("visionzip_dominant", self.visionzip_dominant, 0)
        _check_at_least("visionzip_contextual", self.visionzip_contextual, 0)
        if self.visionzip_dominant + self.visionzip_contextual == 0:
            raise ValueError("visionzip_dominant + visionzip_contextual is 0: allowed a sum >= 1")
        _check_at_least("fastvid_min_segments", self.fastvid_min_segments, 1)
        _check_at_least("fastvid_anchor_step", self.fastvid_anchor_step, 1)
        _check_at_least("fastvid_density_neighbours", self.fastvid_density_neighbours, 1)
        _check_at_least("seed", self.seed, 0)
        _check_choice("fastv_ratio_rule", self.fastv_ratio_rule, FASTV_RATIO_RULES)
        _check_choice("visionzip_merge", self.visionzip_merge, VISIONZIP_MERGES)
        _check_interval("fastvid_segment_threshold", self.fastvid_segment_threshold, -1.0, 1.0)
        _check_interval("fastvid_contextual_share", self.fastvid_contextual_share, 0.0, 1.0)
        _check_interval("fastvid_merging_factor", self.fastvid_merging_factor, 0.0, 1.0)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> BaselineSettings:
        """Build from keyword options, typed or as strings (lmms-eval model_args: "2", "0.6", "mean").

        An unknown key raises ValueError naming it and the allowed keys; a string that does not parse raises
        ValueError naming the key and the expected type.
        """
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(f"unknown baseline option(s) {unknown}: allowed keys are {', '.join(fields)}")
        parsed: dict[str, Any] = {}
        for name, value in options.items():
            kind = type(fields[name].default)
            if isinstance(value, str) and kind in (int, float):
                try:
                    value = kind(value.strip())
                except ValueError:
                    expected = "an integer" if kind is int else "a number"
                    raise ValueError(f"{name}={value!r} is invalid: expected {expected}") from None
            parsed[name] = value
        return cls(**parsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name}={value!r} is out of range: allowed integers >= {low}")


def _check_interval(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} is out of range: allowed [{low}, {high}]")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: allowed {', '.join(allowed)}")


def check_method(method: str) -> str:
    """The method name, or ValueError naming the allowed ones."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: allowed {', '.join(METHODS)}")
    return method


def _check_retention_ratio(retention_ratio: float) -> None:
    if isinstance(retention_ratio, bool) or not isinstance(retention_ratio, (int, float)) or not (
        0.0 < retention_ratio <= 1.0
    ):
        raise ValueError(f"retention_ratio={retention_ratio!r} is out of range: allowed (0, 1]")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")


# ------------------------------------------------------------------------------------------------ budgets
def frame_budget(num_tokens_per_frame: int, retention_ratio: float) -> int:
    """Tokens kept per frame by a pre-LLM baseline: floor(N · R), at least 1.

    Floor, as the official FastVID code (`int(N * R)`), so a baseline never gets more than R (FlashVID's own
    ceilings only ever give it more, never less: the comparison stays conservative). At least 1 so that tiny
    grids (N = 4 at R = 0.1) still see every frame.
    """
    _check_positive_int("num_tokens_per_frame", num_tokens_per_frame)
    _check_retention_ratio(retention_ratio)
    return min(num_tokens_per_frame, max(1, math.floor(num_tokens_per_frame * retention_ratio + _FLOOR_SLACK)))


def fastv_llm_retention_ratio(
    retention_ratio: float, num_llm_layers: int = 28, fastv_layer: int = 2, rule: str = "per_layer"
) -> float:
    """The share r of visual tokens FastV keeps from layer K on.

    per_layer: R·L = K + r·(L − K), i.e. r = (R·L − K) / (L − K); it needs R > K / L (FastV already spends K
    full layers). paper: r = R (App. C.1 prints FastV's pruning ratio as 1 − R).
    """
    _check_retention_ratio(retention_ratio)
    _check_positive_int("num_llm_layers", num_llm_layers)
    _check_positive_int("fastv_layer", fastv_layer)
    _check_choice("fastv_ratio_rule", rule, FASTV_RATIO_RULES)
    if fastv_layer >= num_llm_layers:
        raise ValueError(
            f"fastv_layer={fastv_layer} is out of range: allowed 1..{num_llm_layers - 1} (the LLM has "
            f"{num_llm_layers} layers)"
        )
    if rule == "paper":
        return float(retention_ratio)
    ratio = (retention_ratio * num_llm_layers - fastv_layer) / (num_llm_layers - fastv_layer)
    if ratio <= 0.0:
        raise ValueError(
            f"retention_ratio={retention_ratio!r} is out of range for FastV with fastv_layer={fastv_layer} and "
            f"{num_llm_layers} LLM layers: all visual tokens pass the first {fastv_layer} layers, so the per-layer "
            f"average is above R unless R > {fastv_layer}/{num_llm_layers} = {fastv_layer / num_llm_layers:.4g}"
        )
    return ratio


def visionzip_split(budget: int, dominant_share: int = 54, contextual_share: int = 10) -> tuple[int, int]:
    """(num_dominant, num_contextual) for a frame budget, keeping VisionZip's dominant:contextual ratio.

    num_contextual = round-half-up(budget · c / (d + c)), num_dominant = budget − num_contextual, so 64 gives
    54:10, 128 gives 108:20, 192 gives 162:30 (VisionZip's own settings), 49 gives 41:8.
    """
    _check_at_least("budget", budget, 0)
    num_contextual = math.floor(budget * contextual_share / (dominant_share + contextual_share) + 0.5)
    return budget - num_contextual, num_contextual


def uniform_pool_grid(grid_hw: tuple[int, int], budget: int) -> tuple[int, int]:
    """The pooled grid (h', w') for uniform pooling: h'·w' <= budget, as large as possible near the frame's shape.

    h' starts at round(h · sqrt(budget / (h·w))); with w' = min(w, budget // h'), the candidates h' − 1, h',
    h' + 1 are compared by h'·w' (larger first), then by how far h'/w' is from h/w, then smaller h'. 14×14 at
    budget 49 gives 7×7; at 39, 6×6 (36 tokens); at 29, 4×7 (28).
    """
    height, width = grid_hw
    _check_positive_int("grid height", height)
    _check_positive_int("grid width", width)
    _check_positive_int("budget", budget)
    budget = min(budget, height * width)
    start = min(height, max(1, round(height * math.sqrt(budget / (height * width)))))
    candidates = []
    for pooled_height in (start - 1, start, start + 1):
        if not 1 <= pooled_height <= height:
            continue
        pooled_width = min(width, budget // pooled_height)
        if pooled_width < 1:
            continue
        distortion = abs(math.log((pooled_height / pooled_width) / (height / width)))
        candidates.append((-pooled_height * pooled_width, distortion, pooled_height, pooled_width))
    _, _, pooled_height, pooled_width = min(candidates)
    return pooled_height, pooled_width


def _square_grid(num_tokens_per_frame: int) -> tuple[int, int]:
    side = math.isqrt(num_tokens_per_frame)
    if side * side != num_tokens_per_frame:
        raise ValueError(
            f"grid_hw is required for uniform pooling: {num_tokens_per_frame} tokens per frame is not a square grid"
        )
    return side, side


def _check_grid(grid_hw: tuple[int, int] | None, num_tokens_per_frame: int) -> tuple[int, int]:
    if grid_hw is None:
        return _square_grid(num_tokens_per_frame)
    height, width = (int(side) for side in grid_hw)
    if height * width != num_tokens_per_frame:
        raise ValueError(
            f"grid_hw={tuple(grid_hw)!r} is invalid: {height}×{width} != {num_tokens_per_frame} tokens per frame"
        )
    return height, width


@dataclass(frozen=True)
class LLMPruning:
    """Visual-token pruning inside the LLM: from layer `pruning_layer` on keep `llm_retention_ratio` of them."""

    pruning_layer: int
    llm_retention_ratio: float


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


def llm_pruning_plan(
    method: str,
    retention_ratio: float,
    num_llm_layers: int = 28,
    settings: BaselineSettings | None = None,
    flashvid_config: FlashVIDConfig | None = None,
) -> LLMPruning | None:
    """Where and how much a method prunes visual tokens inside the LLM; None for methods that do not.

    fastv: (K, r) from `fastv_llm_retention_ratio`; flashvid: (config.pruning_layer, config.llm_retention_ratio),
    None when the pruning layer is beyond the LLM (the LLM then runs unpruned, as the official code does).
    """
    check_method(method)
    settings = settings or BaselineSettings()
    if method == "fastv":
        ratio = fastv_llm_retention_ratio(retention_ratio, num_llm_layers, settings.fastv_layer, settings.fastv_ratio_rule)
        return LLMPruning(settings.fastv_layer, ratio)
    if method == "flashvid":
        config = flashvid_config or FlashVIDConfig()
        if config.pruning_layer >= num_llm_layers:
            return None
        return LLMPruning(config.pruning_layer, config.llm_retention_ratio)
    return None


def budget_for_method(
    method: str,
    num_tokens_per_frame: int,
    num_frames: int,
    retention_ratio: float,
    num_llm_layers: int = 28,
    *,
    grid_hw: tuple[int, int] | None = None,
    settings: BaselineSettings | None = None,
    flashvid_config: FlashVIDConfig | None = None,
) -> MethodBudget:
    """The token arithmetic of `method` at retention ratio R (average share of visual tokens per LLM layer).

    - none: all N per frame, no pruning (R is ignored).
    - fastv: all N per frame enter the LLM; from layer K keep r = (R·L − K) / (L − K) (see
      `fastv_llm_retention_ratio`).
    - visionzip, divprune, random: b = floor(N·R) (>= 1) per frame, for every layer (`frame_budget`);
      visionzip splits b by `visionzip_split`.
    - uniform: the largest pooled grid with h'·w' <= b near the frame's aspect (`uniform_pool_grid`).
    - fastvid: b per frame at most: salient b − floor(b·d), contextual floor(b·d) per frame on average, given to
      anchor frames (exact count: `fastvid_token_count`).
    - flashvid: ceil(N·R·f_e) per frame enter (FlashVIDConfig.token_budget); from layer K keep
      llm_retention_ratio (R·L = M·K + r·M·(L − K), paper Eq. 13–15). Nominal: FlashVID's ceilings can add a few.
    """
    check_method(method)
    _check_positive_int("num_tokens_per_frame", num_tokens_per_frame)
    _check_positive_int("num_frames", num_frames)
    _check_positive_int("num_llm_layers", num_llm_layers)
    _check_retention_ratio(retention_ratio)
    settings = settings or BaselineSettings()
    common = {
        "method": method,
        "num_frames": num_frames,
        "num_tokens_per_frame": num_tokens_per_frame,
        "retention_ratio": float(retention_ratio),
        "num_llm_layers": num_llm_layers,
    }
    pruning = llm_pruning_plan(method, retention_ratio, num_llm_layers, settings, flashvid_config)
    if method in ("none", "fastv"):
        return MethodBudget(**common, tokens_per_frame=num_tokens_per_frame, num_selected=num_tokens_per_frame,
                            num_merged=0, llm_pruning=pruning)  # fmt: skip
    if method == "flashvid":
        config = (flashvid_config or FlashVIDConfig()).replace(retention_ratio=retention_ratio)
        budget, num_selected, num_merged = config.budgets(num_tokens_per_frame)
        return MethodBudget(**common, tokens_per_frame=budget, num_selected=num_selected, num_merged=num_merged,
                            llm_pruning=pruning)  # fmt: skip
    budget = frame_budget(num_tokens_per_frame, retention_ratio)
    if method == "visionzip":
        num_dominant, num_contextual = visionzip_split(
            budget, settings.visionzip_dominant, settings.visionzip_contextual
        )
        return MethodBudget(**common, tokens_per_frame=budget, num_selected=num_dominant, num_merged=num_contextual)
    if method == "fastvid":
        num_contextual = fastvid_contextual_per_frame(budget, settings.fastvid_contextual_share)
        return MethodBudget(**common, tokens_per_frame=budget, num_selected=budget - num_contextual,
                            num_merged=num_contextual)  # fmt: skip
    if method == "uniform":
        pooled = uniform_pool_grid(_check_grid(grid_hw, num_tokens_per_frame), budget)
        size = pooled[0] * pooled[1]
        return MethodBudget(**common, tokens_per_frame=size, num_selected=size, num_merged=0, pooled_grid=pooled)
    return MethodBudget(**common, tokens_per_frame=budget, num_selected=budget, num_merged=0)  # divprune, random


# ------------------------------------------------------------------------------------------------ helpers
def _global_indices(frame_indices: Tensor, num_tokens_per_frame: int) -> Tensor:
    """(F, K) within-frame indices -> (F, K) global indices f·N + n."""
    frames = torch.arange(frame_indices.shape[0], device=frame_indices.device).unsqueeze(-1)
    return frames * num_tokens_per_frame + frame_indices


def _sorted_by_index(tokens: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten (…, D) tokens and (…) global indices, ordered by index ascending."""
    tokens = tokens.reshape(-1, tokens.shape[-1])
    indices = indices.reshape(-1)
    order = torch.argsort(indices)
    return tokens[order], indices[order]


def _check_features(features: Tensor, attention: Tensor | None, needs_attention: bool, method: str) -> None:
    if needs_attention and attention is None:
        raise ValueError(f"method={method!r} needs the attention statistic (F, N); got None")
    if attention is not None:
        validate_inputs(features, attention, check_finite=False)
    elif not isinstance(features, Tensor) or features.dim() != 3 or 0 in features.shape:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a non-empty (F, N, D) tensor, got {shape}")


def _make_compression(
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


def _one_segment(features: Tensor) -> Tensor:
    return torch.tensor([features.shape[0]], dtype=torch.long, device=features.device)


# ------------------------------------------------------------------------------------------------ FastV
def fastv_keep_positions(
    last_query_attention: Tensor, visual_start: int, visual_length: int, llm_retention_ratio: float
) -> Tensor:
    """FastV's in-LLM pruning: the sequence positions kept from layer K on.

    last_query_attention: (L,) the last query token's attention over all keys at layer K − 1, averaged over heads.
    Keeps every text position and the ceil(visual_length · r) visual positions of largest attention, in order
    (the same rule as FlashVID's inner pruning, so it reuses `llm_keep_positions`). Returns (L',) int64 ascending.
    """
    return llm_keep_positions(last_query_attention, visual_start, visual_length, llm_retention_ratio)


# ------------------------------------------------------------------------------------------------ VisionZip
@torch.no_grad()
def visionzip_select(
    features: Tensor, attention: Tensor, num_dominant: int, num_contextual: int, merge: str = "official"
) -> tuple[Tensor, Tensor]:
    """VisionZip per frame, after the model's pooling: dominant tokens by attention, contextual tokens by merging.

    features: (F, N, D); attention: (F, N). Dominant: the num_dominant tokens of largest attention (no [CLS]
    after pooling, so none is forced in). Contextual: of the N − d remaining tokens (in index order), targets are
    every step-th one, step = max(1, (N − d) // c), the first c of them; every other remaining token joins the
    target of largest cosine similarity (ties: the first target). merge="official": target + mean of its members
    (the released VisionZip; a target with no member stays itself); "mean": (target + members) / (1 + count).
    A contextual token keeps its target's index. Similarities and sums run in the features' dtype, as VisionZip.
    Returns tokens (F, d + c, D) and within-frame indices (F, d + c), ascending within each frame.
    """
    _check_choice("visionzip_merge", merge, VISIONZIP_MERGES)
    num_frames, num_tokens, _ = features.shape
    if num_dominant < 0 or num_contextual < 0 or num_dominant + num_contextual > num_tokens:
        raise ValueError(
            f"num_dominant={num_dominant}, num_contextual={num_contextual} are out of range: both >= 0 with a sum "
            f"<= {num_tokens} (tokens per frame)"
        )
    dominant = torch.topk(attention, k=num_dominant, dim=-1).indices  # (F, d)
    is_dominant = torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=features.device)
    is_dominant.scatter_(1, dominant, True)
    # A stable sort on the flag lists the remaining tokens first, in index order (VisionZip's masked_select).
    remaining = torch.argsort(is_dominant.to(torch.int8), dim=-1, stable=True)[:, : num_tokens - num_dominant]
    dominant_tokens = gather_tokens(features, dominant)
    if num_contextual == 0:
        tokens, indices = dominant_tokens, dominant
    else:
        num_remaining = remaining.shape[1]
        step = max(1, num_remaining // num_contextual)
        is_target = torch.zeros(num_remaining, dtype=torch.bool, device=features.device)
        is_target[torch.arange(0, num_remaining, step, device=features.device)[:num_contextual]] = True
        targets = remaining[:, is_target]  # (F, c)
        members = remaining[:, ~is_target]  # (F, R − c)
        target_tokens = gather_tokens(features, targets)
        member_tokens = gather_tokens(features, members)
        similarity = torch.bmm(F.normalize(member_tokens, dim=-1), F.normalize(target_tokens, dim=-1).transpose(1, 2))
        assignment = F.one_hot(similarity.argmax(dim=-1), num_contextual).to(features.dtype)  # (F, R − c, c)
        counts = assignment.sum(dim=1).unsqueeze(-1)  # (F, c, 1)
        member_sums = torch.bmm(assignment.transpose(1, 2), member_tokens)
        if merge == "official":
            contextual_tokens = target_tokens + member_sums / counts.clamp(min=1)
        else:
            contextual_tokens = (target_tokens + member_sums) / (counts + 1)
        tokens = torch.cat([dominant_tokens, contextual_tokens], dim=1)
        indices = torch.cat([dominant, targets], dim=1)
    order = torch.argsort(indices, dim=-1)
    return gather_tokens(tokens, order), torch.gather(indices, 1, order)


# ------------------------------------------------------------------------------------------------ DivPrune
def divprune_select(features: Tensor, num_keep: int) -> Tensor:
    """DivPrune per frame: pure Max-Min diversity on 1 − cosine (FlashVID's `div` selector, no re-picks).

    features: (F, N, D). Returns within-frame indices (F, num_keep) int64, ascending within each frame.
    """
    return select_tokens(features, None, num_keep, "div")


# ------------------------------------------------------------------------------------------------ uniform
@torch.no_grad()
def uniform_pool(features: Tensor, grid_hw: tuple[int, int], pooled_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Uniform spatial pooling of each frame's token grid to pooled_hw (adaptive average pooling).

    features: (F, h·w, D) in raster order. Output window (i, j) covers rows floor(i·h/h')..ceil((i+1)·h/h') − 1
    (columns likewise) and is the mean of its tokens, in the features' dtype; its index is the window's centre
    token (rows and columns (start + end − 1) // 2), strictly increasing in raster order.
    Returns tokens (F, h'·w', D) and within-frame indices (h'·w',) int64.
    """
    num_frames, num_tokens, dim = features.shape
    height, width = _check_grid(grid_hw, num_tokens)
    pooled_height, pooled_width = pooled_hw
    if not (1 <= pooled_height <= height and 1 <= pooled_width <= width):
        raise ValueError(f"pooled_hw={tuple(pooled_hw)!r} is out of range: allowed 1..{height} × 1..{width}")
    grid = features.reshape(num_frames, height, width, dim).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(grid, (pooled_height, pooled_width))
    tokens = pooled.permute(0, 2, 3, 1).reshape(num_frames, pooled_height * pooled_width, dim)
    rows = _window_centres(height, pooled_height, features.device)
    columns = _window_centres(width, pooled_width, features.device)
    indices = (rows.unsqueeze(-1) * width + columns.unsqueeze(0)).reshape(-1)
    return tokens, indices


def _window_centres(size: int, pooled_size: int, device: torch.device) -> Tensor:
    """Centre position of each adaptive-pooling window along one axis: (pooled_size,) int64."""
    positions = torch.arange(pooled_size, device=device)
    starts = (positions * size) // pooled_size
    ends = ((positions + 1) * size + pooled_size - 1) // pooled_size
    return (starts + ends - 1) // 2


# ------------------------------------------------------------------------------------------------ random
def random_select(num_frames: int, num_tokens_per_frame: int, num_keep: int, seed: int) -> Tensor:
    """Random keep: num_keep distinct tokens per frame, uniformly, from a torch.Generator seeded with `seed`.

    Drawn on the CPU so the same seed gives the same tokens on every device. Returns within-frame indices
    (F, num_keep) int64 on the CPU, ascending within each frame.
    """
    if not 0 <= num_keep <= num_tokens_per_frame:
        raise ValueError(f"num_keep={num_keep} is out of range: allowed 0..{num_tokens_per_frame} (tokens per frame)")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(num_frames, num_tokens_per_frame, generator=generator)
    return torch.topk(scores, k=num_keep, dim=-1).indices.sort(dim=-1).values


# ------------------------------------------------------------------------------------------------ FastVID
def fastvid_contextual_per_frame(budget: int, contextual_share: float = 0.4) -> int:
    """FastVID's contextual tokens per frame: floor(budget · d) (the official `int(retain * d)`)."""
    return math.floor(budget * contextual_share + _FLOOR_SLACK)


def fastvid_anchor_counts(segment_lengths: Tensor, num_contextual: int, anchor_step: int) -> Tensor:
    """Contextual tokens each frame contributes as an anchor; 0 for frames that are no anchor.

    segment_lengths: (S,) positive. In a segment of ℓ frames the anchors are the frames whose distance to the
    segment's last frame is a multiple of p (the last frame always is); each gets floor(c·ℓ / ceil(ℓ / p)).
    Returns (F,) int64.
    """
    lengths = segment_lengths.to(torch.long)
    num_frames = int(lengths.sum())
    device = lengths.device
    ends = torch.cumsum(lengths, dim=0)
    frame_lengths = torch.repeat_interleave(lengths, lengths, output_size=num_frames)
    frame_ends = torch.repeat_interleave(ends, lengths, output_size=num_frames)
    distance_to_last = frame_ends - 1 - torch.arange(num_frames, device=device)
    is_anchor = distance_to_last % anchor_step == 0
    num_anchors = (frame_lengths + anchor_step - 1) // anchor_step
    per_anchor = (num_contextual * frame_lengths) // num_anchors
    return torch.where(is_anchor, per_anchor, torch.zeros_like(per_anchor))


def fastvid_token_count(
    segment_lengths: Tensor, num_tokens_per_frame: int, retention_ratio: float, settings: BaselineSettings | None = None
) -> int:
    """The exact number of tokens `fastvid_compress` returns for these segments (positive lengths)."""
    settings = settings or BaselineSettings()
    budget = frame_budget(num_tokens_per_frame, retention_ratio)
    num_contextual = fastvid_contextual_per_frame(budget, settings.fastvid_contextual_share)
    num_salient = budget - num_contextual
    anchors = fastvid_anchor_counts(segment_lengths, num_contextual, settings.fastvid_anchor_step)
    anchors = anchors.clamp(max=num_tokens_per_frame - num_salient)
    return int(segment_lengths.sum()) * num_salient + int(anchors.sum())


@torch.no_grad()
def fastvid_compress(
    features: Tensor,
    attention: Tensor,
    retention_ratio: float,
    settings: BaselineSettings | None = None,
    frame_descriptors: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Compression:
    """FastVID (DySeg + STPrune: salient top-k + density-based token merging with anchor frames).

    features: (F, N, D); attention: (F, N); frame_descriptors: (F, D') for DySeg (default: the mean of each
    frame's tokens, as FlashVID; FastVID's own LLaVA code uses the vision tower's pooled frame embedding).
    Per frame: budget b = floor(N·R), contextual c = floor(b·d), salient s = b − c (top attention).
    1. DySeg (FlashVID's `segment_lengths` with c_min = 8, τ = 0.9; empty segments dropped: FastVID unique-s its
       cuts). Equal to FastVID's own rule (the c − 1 lowest transitions ∪ those below τ) up to ties.
    2. Anchors (`fastvid_anchor_counts`): anchor frame a takes k_a = floor(c·ℓ / ceil(ℓ/p)) contextual tokens
       (capped at its N − s non-salient tokens): the k_a of largest DPC-kNN score δ·ρ among its non-salient tokens
       (FlashVID's `dpc_knn` centres, k = 4 neighbours, seeded tie-breaker).
    3. Merging: every non-salient token of the anchor's pool joins the anchor's most cosine-similar target (ties:
       the first by score); the pool is the whole segment's non-salient tokens, or only the anchor frame's own
       when k_a == c (the official code's test; always true for one-frame segments). A target with m members
       (itself included) becomes w·target + (1 − w)·mean(members), w = max(α, 1 / (m + 1)). A token of a
       segment with several anchors joins one target of each anchor frame, as in the official code.
    Similarities in the features' dtype, member sums in float32. A contextual token keeps its target's index.
    Returns a Compression (token_budget b, num_selected s, num_merged c per frame).
    """
    _check_features(features, attention, True, "fastvid")
    settings = settings or BaselineSettings()
    num_frames, num_tokens, dim = features.shape
    device = features.device
    budget = frame_budget(num_tokens, retention_ratio)
    num_contextual = fastvid_contextual_per_frame(budget, settings.fastvid_contextual_share)
    num_salient = budget - num_contextual
    num_candidates = num_tokens - num_salient  # non-salient tokens per frame

    descriptors = features.mean(dim=1) if frame_descriptors is None else frame_descriptors
    lengths = dyseg_segment_lengths(descriptors, settings.fastvid_segment_threshold, settings.fastvid_min_segments)
    lengths = lengths[lengths > 0]

    salient = torch.topk(attention, k=num_salient, dim=-1).indices  # (F, s)
    salient_tokens = gather_tokens(features, salient)
    salient_indices = _global_indices(salient, num_tokens)

    anchor_counts = fastvid_anchor_counts(lengths.to(device), num_contextual, settings.fastvid_anchor_step)
    own_frame_pool = anchor_counts == num_contextual  # the official single-frame test, before the cap
    anchor_counts = anchor_counts.clamp(max=num_candidates)
    anchor_frames = torch.nonzero(anchor_counts > 0).flatten()  # (A,)
    if anchor_frames.numel() == 0:
        tokens, indices = _sorted_by_index(salient_tokens, salient_indices)
        return _make_compression(tokens, indices, lengths, num_tokens, budget, num_salient, num_contextual)

    # Non-salient tokens of every frame, in index order.
    is_salient = torch.zeros(num_frames, num_tokens, dtype=torch.bool, device=device)
    is_salient.scatter_(1, salient, True)
    candidates = torch.argsort(is_salient.to(torch.int8), dim=-1, stable=True)[:, :num_candidates]  # (F, n')
    candidate_tokens = gather_tokens(features, candidates)  # (F, n', D)

    # Targets: each anchor frame's k_a candidates of largest density score (dpc_knn centres, descending score).
    counts = anchor_counts[anchor_frames]  # (A,)
    max_count = int(counts.max())
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    neighbours = min(settings.fastvid_density_neighbours, num_candidates)
    _, centres = dpc_knn(candidate_tokens[anchor_frames], max_count, k=neighbours, generator=generator)
    slot_used = torch.arange(max_count, device=device).unsqueeze(0) < counts.unsqueeze(-1)  # (A, k_max)
    target_anchor = torch.arange(anchor_frames.numel(), device=device).unsqueeze(-1).expand(-1, max_count)[slot_used]
    target_frame = anchor_frames[target_anchor]  # (T,)
    target_slot = centres[slot_used]  # (T,) position among the frame's candidates
    target_tokens = candidate_tokens[target_frame, target_slot]  # (T, D)
    target_indices = target_frame * num_tokens + candidates[target_frame, target_slot]

    # Pool membership: candidate token t of frame f may join anchor frame a iff same segment, and a's pool is the
    # segment (not only its own frame) or f == a.
    segment_of_frame = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths.to(device))
    pool_tokens = candidate_tokens.reshape(-1, dim)  # (P, D), P = F·n'
    pool_frame = torch.arange(num_frames, device=device).repeat_interleave(num_candidates)
    same_segment = segment_of_frame[pool_frame].unsqueeze(-1) == segment_of_frame[target_frame].unsqueeze(0)
    same_frame = pool_frame.unsqueeze(-1) == target_frame.unsqueeze(0)
    allowed = same_segment & (same_frame | ~own_frame_pool[target_frame].unsqueeze(0))  # (P, T)

    similarity = F.normalize(pool_tokens, dim=-1) @ F.normalize(target_tokens, dim=-1).T  # (P, T), features' dtype
    similarity = similarity.float().masked_fill(~allowed, float("-inf"))
    num_anchors, num_targets = anchor_frames.numel(), target_frame.numel()
    scatter_index = target_anchor.unsqueeze(0).expand(pool_tokens.shape[0], -1)
    best = torch.full((pool_tokens.shape[0], num_anchors), float("-inf"), device=device)
    best = best.scatter_reduce(1, scatter_index, similarity, reduce="amax")
    # The first target (in score order) reaching its anchor's best similarity wins, as argmax does.
    is_best = allowed & (similarity == best.gather(1, scatter_index))
    target_ids = torch.arange(num_targets, device=device).expand_as(is_best)
    chosen = torch.full((pool_tokens.shape[0], num_anchors), num_targets, dtype=torch.long, device=device)
    chosen = chosen.scatter_reduce(1, scatter_index, torch.where(is_best, target_ids, num_targets), reduce="amin")
    member, anchor = torch.nonzero(chosen < num_targets, as_tuple=True)
    joined = chosen[member, anchor]  # (pairs,) target each member joins

    member_counts = torch.zeros(num_targets, dtype=torch.float32, device=device)
    member_counts.index_add_(0, joined, torch.ones_like(joined, dtype=torch.float32))
    # index_add_ on CPU; a fixed-order sum on CUDA, whose index_add_ rounding varies run to run.
    member_sums = index_sum(pool_tokens[member].float(), joined, num_targets)
    member_means = member_sums / member_counts.clamp(min=1).unsqueeze(-1)
    own_weight = (1.0 / (member_counts + 1)).clamp(min=settings.fastvid_merging_factor).unsqueeze(-1)
    contextual_tokens = (own_weight * target_tokens.float() + (1 - own_weight) * member_means).to(features.dtype)

    tokens, indices = _sorted_by_index(
        torch.cat([salient_tokens.reshape(-1, dim), contextual_tokens]),
        torch.cat([salient_indices.reshape(-1), target_indices]),
    )
    return _make_compression(tokens, indices, lengths, num_tokens, budget, num_salient, num_contextual)


# ------------------------------------------------------------------------------------------------ dispatcher
@torch.no_grad()
def compress_with_method(
    method: str,
    features: Tensor,
    attention: Tensor | None,
    retention_ratio: float,
    grid_hw: tuple[int, int] | None = None,
    *,
    flashvid_config: FlashVIDConfig | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> Compression:
    """Compress one video's visual tokens with `method`; the same Compression as FlashVID's `compress`.

    features: (F, N, D) after the model's own pooling/merging; attention: (F, N) the per-token attention
    statistic (needed by flashvid, visionzip, fastvid); grid_hw: the frame's token grid (h, w), h·w = N, needed
    by uniform for non-square grids. options: `BaselineSettings` fields (unknown keys raise ValueError).
    flashvid: `compress` with flashvid_config (default FlashVIDConfig()) at this retention_ratio.
    none and fastv: every token, in order (FastV prunes inside the LLM: ask `llm_pruning_plan`).
    generator: the fastvid density tie-breaker's generator (default: one seeded with `seed`).
    """
    check_method(method)
    settings = BaselineSettings.from_options(options)
    _check_retention_ratio(retention_ratio)
    _check_features(features, attention, method in ("flashvid", "visionzip", "fastvid"), method)
    num_frames, num_tokens, dim = features.shape
    if method == "flashvid":
        config = (flashvid_config or FlashVIDConfig()).replace(retention_ratio=retention_ratio)
        return compress(features, attention, config, generator=generator)
    if method in ("none", "fastv"):
        indices = torch.arange(num_frames * num_tokens, device=features.device)
        return _make_compression(
            features.reshape(-1, dim), indices, _one_segment(features), num_tokens, num_tokens, num_tokens, 0
        )
    if method == "fastvid":
        return fastvid_compress(features, attention, retention_ratio, settings, generator=generator)
    budget = budget_for_method(method, num_tokens, num_frames, retention_ratio, grid_hw=grid_hw, settings=settings)
    if method == "visionzip":
        tokens, frame_indices = visionzip_select(
            features, attention, budget.num_selected, budget.num_merged, settings.visionzip_merge
        )
    elif method == "uniform":
        tokens, pooled_indices = uniform_pool(features, _check_grid(grid_hw, num_tokens), budget.pooled_grid)
        frame_indices = pooled_indices.unsqueeze(0).expand(num_frames, -1)
    else:
        if method == "divprune":
            frame_indices = divprune_select(features, budget.tokens_per_frame)
        else:  # random
            frame_indices = random_select(num_frames, num_tokens, budget.tokens_per_frame, settings.seed)
            frame_indices = frame_indices.to(features.device)
        tokens = gather_tokens(features, frame_indices)
    indices = _global_indices(frame_indices, num_tokens)
    return _make_compression(
        tokens.reshape(-1, dim),
        indices.reshape(-1),
        _one_segment(features),
        num_tokens,
        budget.tokens_per_frame,
        budget.num_selected,
        budget.num_merged,
    )
