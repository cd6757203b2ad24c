"""FlashVID configuration: the official parameter names, validated once at construction.

The defaults reproduce the official implementation (github.com/Fanziyang-v/FlashVID). Options that change an
output relative to it are opt-in and off by default; they are listed under "Opt-in variants" below.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .values import parse_text

# The paper's names for the selection methods (Table 4): attn = ATS, div = DTS, attn_div = "w/ C.A." (ADTS v1),
# attn_div_v2 = ADTS (default), div_er = "w/ E.R." (diversity calibrated by event relevance only; not in the
# official code).
TOKEN_SELECTION_METHODS: tuple[str, ...] = ("attn_div_v2", "attn_div", "attn", "div", "div_er")


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class FlashVIDConfig:
    """All FlashVID settings. Frozen: stages read it, nothing writes to it.

    Official parameters (names and defaults as in the official code):
        retention_ratio: share R of the visual tokens kept on average per LLM layer, in (0, 1].
        alpha: share of the per-frame budget given to token selection (ADTS); the rest is merged (TSTM), [0, 1].
        temporal_threshold: TSTM merges a token into its parent when their cosine similarity is above it, [-1, 1].
        token_selection_method: one of TOKEN_SELECTION_METHODS.
        do_segment: split the video into segments (DySeg) before compression.
        segment_threshold: a transition whose frame-similarity is below it is a cut, [-1, 1].
        min_segment_num: complementary cuts are added until there are this many segments, >= 1.
        complementary_segment: whether to add those complementary cuts.
        expansion: f_e, the tokens entering the LLM are expansion * R (the surplus is pruned at pruning_layer).
        pruning_layer: K, the LLM layer at which visual tokens are pruned again, >= 1.
        llm_retention_ratio: share of the visual tokens kept from layer K on, in (0, 1].

    Opt-in variants (off by default; each changes outputs relative to the official code):
        tstm_max_depth: maximum number of levels of a TSTM tree (a root alone is depth 1; 1 = no temporal
            merging at all; None = unlimited, the official behaviour). Paper Table 11.
        tstm_max_breadth: maximum number of children a TSTM node accepts; the most similar ones are kept, the
            others become roots (None = unlimited, official). An alternative reading of paper Table 12, whose
            sweep uses tstm_spatial_window.
        tstm_spatial_window: a token's parent candidates are limited to a window x window neighbourhood of its
            position in the previous frame (odd >= 1; the frame must be a square grid; None = the whole frame,
            official). The paper's Table 12 calls its breadth constraint a spatial neighbourhood (1 = same
            position only); tstm_max_breadth is the children-count reading of the same ablation.
        tstm_float32_sums: for bf16/fp16 inputs, sum each TSTM tree once in float32 (vectorised, faster, more
            accurate) instead of the official frame-by-frame sums rounded to the input dtype at each step.
            No effect on float32 inputs.
        tstm_true_mean: a TSTM root becomes the mean of its whole tree. The official code divides the tree's
            sum by 1 + (number of direct children), so a chain z -> x -> y gives (x + y + z) / 2.
        adts_forbid_repick: make attn_div_v2 unable to pick a token twice (the official v2 can).
    """

    retention_ratio: float = 0.25
    alpha: float = 0.7
    temporal_threshold: float = 0.8
    token_selection_method: str = "attn_div_v2"
    do_segment: bool = True
    segment_threshold: float = 0.9
    min_segment_num: int = 8
    complementary_segment: bool = True
    expansion: float = 1.25
    pruning_layer: int = 20
    llm_retention_ratio: float = 0.3
    tstm_max_depth: int | None = None
    tstm_max_breadth: int | None = None
    tstm_spatial_window: int | None = None
    tstm_float32_sums: bool = False
    tstm_true_mean: bool = False
    adts_forbid_repick: bool = False

    _FLOAT_FIELDS: ClassVar[tuple[str, ...]] = (
        "retention_ratio", "alpha", "temporal_threshold", "segment_threshold", "expansion", "llm_retention_ratio",
    )
    _INT_FIELDS: ClassVar[tuple[str, ...]] = ("min_segment_num", "pruning_layer")
    _OPTIONAL_INT_FIELDS: ClassVar[tuple[str, ...]] = ("tstm_max_depth", "tstm_max_breadth", "tstm_spatial_window")
    _BOOL_FIELDS: ClassVar[tuple[str, ...]] = (
        "do_segment", "complementary_segment", "tstm_float32_sums", "tstm_true_mean", "adts_forbid_repick",
    )

    def __post_init__(self) -> None:
        for name in self._FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_real_number(value) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} is invalid: expected a finite real number")
            object.__setattr__(self, name, float(value))  # ints are accepted; store floats
        for name in self._INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} is invalid: expected an integer")
        for name in self._OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is invalid: expected None (no limit) or an integer >= 1")
        for name in self._BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: expected True or False")

        def check_range(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
            value = getattr(self, name)
            too_low = value <= low if low_open else value < low
            too_high = value >= high if high_open else value > high
            if too_low or too_high:
                interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                raise ValueError(f"{name}={value!r} is out of range: allowed {interval}")

        if self.tstm_spatial_window is not None and self.tstm_spatial_window % 2 == 0:
            raise ValueError(
                f"tstm_spatial_window={self.tstm_spatial_window!r} is invalid: expected None or an odd integer >= 1"
            )
        check_range("retention_ratio", 0.0, 1.0, low_open=True)
        check_range("alpha", 0.0, 1.0)
        check_range("temporal_threshold", -1.0, 1.0)
        check_range("segment_threshold", -1.0, 1.0)
        check_range("llm_retention_ratio", 0.0, 1.0, low_open=True)
        if self.expansion <= 0.0:
            raise ValueError(f"expansion={self.expansion!r} is out of range: allowed (0, inf)")
        if self.retention_ratio * self.expansion > 1.0:
            raise ValueError(
                f"retention_ratio={self.retention_ratio!r} with expansion={self.expansion!r} asks for a per-frame "
                f"budget of {self.retention_ratio * self.expansion:.4g} x the frame's tokens, larger than the frame: "
                "retention_ratio * expansion must be <= 1"
            )
        if self.min_segment_num < 1:
            raise ValueError(f"min_segment_num={self.min_segment_num!r} is out of range: allowed integers >= 1")
        if self.pruning_layer < 1:
            raise ValueError(f"pruning_layer={self.pruning_layer!r} is out of range: allowed integers >= 1")
        if self.token_selection_method not in TOKEN_SELECTION_METHODS:
            raise ValueError(
                f"token_selection_method={self.token_selection_method!r} is invalid: allowed "
                f"{', '.join(TOKEN_SELECTION_METHODS)}"
            )
        if self.temporal_threshold >= 1.0 and self.alpha < 1.0:
            # With alpha < 1 some frame size gives a non-zero merged budget, and then no token can ever merge
            # (cosine similarity is never > 1): the official code divides by zero there.
            raise ValueError(
                f"temporal_threshold={self.temporal_threshold!r} with alpha={self.alpha!r} is invalid: a "
                "temporal_threshold >= 1 lets no token merge, but alpha < 1 gives merged tokens a budget (the "
                "official code divides by zero). Use temporal_threshold < 1, or alpha = 1 (selection only)"
            )

    # ----------------------------------------------------------------------------------------------- builders
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> FlashVIDConfig:
        """Build from a mapping of typed values; unknown keys raise ValueError naming them."""
        unknown = sorted(set(mapping) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown FlashVID config key(s) {unknown}: allowed keys are {', '.join(cls.field_names())}"
            )
        return cls(**dict(mapping))

    @classmethod
    def from_model_args(
        cls, model_args: Mapping[str, Any] | str, *, ignore_unknown: bool = False
    ) -> FlashVIDConfig:
        """Build from string values as the official scripts pass them ("True", "0.70", "8").

        `model_args` is a mapping, or a comma-separated "key=value,key=value" string (lmms-eval's --model_args).
        Unknown keys raise ValueError unless ignore_unknown is set (then they are skipped).
        """
        if isinstance(model_args, str):
            pairs: dict[str, str] = {}
            for item in model_args.split(","):
                item = item.strip()
                if not item:
                    continue
                if "=" not in item:
                    raise ValueError(f"model_args item {item!r} is invalid: expected key=value")
                key, value = item.split("=", 1)
                pairs[key.strip()] = value.strip()
            model_args = pairs
        known = set(cls.field_names())
        unknown = sorted(set(model_args) - known)
        if unknown and not ignore_unknown:
            raise ValueError(f"unknown FlashVID config key(s) {unknown}: allowed keys are {', '.join(sorted(known))}")
        parsed = {key: cls._parse_value(key, value) for key, value in model_args.items() if key in known}
        return cls(**parsed)

    @classmethod
    def _parse_value(cls, key: str, value: Any) -> Any:
        if key in cls._BOOL_FIELDS:
            return parse_text(key, value, bool)
        if key in cls._OPTIONAL_INT_FIELDS:
            return parse_text(key, value, int, optional=True)
        if key in cls._INT_FIELDS:
            return parse_text(key, value, int)
        if key in cls._FLOAT_FIELDS:
            return parse_text(key, value, float)
        return parse_text(key, value, str)

    def replace(self, **changes: Any) -> FlashVIDConfig:
        """A copy with `changes` applied (validated again); unknown keys raise ValueError."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(
                f"unknown FlashVID config key(s) {unknown}: allowed keys are {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -------------------------------------------------------------------------------------------- budgets
    def token_budget(self, num_tokens_per_frame: int) -> int:
        """Tokens per frame entering the LLM: ceil(N * retention_ratio * expansion), left to right in float64.

        The evaluation order matters: 192 * 0.1 * 1.25 = 24.000000000000004 -> 25, while 192 * (0.1 * 1.25) -> 24.
        """
        _check_num_tokens(num_tokens_per_frame)
        return math.ceil(num_tokens_per_frame * self.retention_ratio * self.expansion)

    def budgets(self, num_tokens_per_frame: int) -> tuple[int, int, int]:
        """(token_budget, num_selected, num_merged) per frame; num_selected = ceil(budget * alpha)."""
        budget = self.token_budget(num_tokens_per_frame)
        num_selected = math.ceil(budget * self.alpha)
        return budget, num_selected, budget - num_selected


def _check_num_tokens(num_tokens_per_frame: int) -> None:
    if isinstance(num_tokens_per_frame, bool) or not isinstance(num_tokens_per_frame, int) or num_tokens_per_frame < 1:
        raise ValueError(f"num_tokens_per_frame={num_tokens_per_frame!r} is invalid: expected an integer >= 1")
