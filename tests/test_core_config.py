"""FlashVIDConfig: official names and defaults, validation at construction, builders, budget arithmetic."""

from __future__ import annotations

import dataclasses

import pytest

from flashvid_core import FlashVIDConfig

OFFICIAL_DEFAULTS = {
    "retention_ratio": 0.25,
    "alpha": 0.7,
    "temporal_threshold": 0.8,
    "token_selection_method": "attn_div_v2",
    "do_segment": True,
    "segment_threshold": 0.9,
    "min_segment_num": 8,
    "complementary_segment": True,
    "expansion": 1.25,
    "pruning_layer": 20,
    "llm_retention_ratio": 0.3,
}


def test_defaults_are_the_official_ones():
    config = FlashVIDConfig()
    for key, value in OFFICIAL_DEFAULTS.items():
        assert getattr(config, key) == value
    assert config == FlashVIDConfig(**OFFICIAL_DEFAULTS)
    # Opt-in variants are off.
    assert config.tstm_max_depth is None and config.tstm_max_breadth is None
    assert not config.tstm_true_mean and not config.adts_forbid_repick


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FlashVIDConfig().alpha = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("retention_ratio", 0.0, "(0.0, 1.0]"),
        ("retention_ratio", 1.5, "(0.0, 1.0]"),
        ("alpha", -0.1, "[0.0, 1.0]"),
        ("alpha", 1.01, "[0.0, 1.0]"),
        ("temporal_threshold", 1.5, "[-1.0, 1.0]"),
        ("temporal_threshold", -2.0, "[-1.0, 1.0]"),
        ("segment_threshold", 1.2, "[-1.0, 1.0]"),
        ("llm_retention_ratio", 0.0, "(0.0, 1.0]"),
        ("expansion", 0.0, "(0, inf)"),
        ("min_segment_num", 0, ">= 1"),
        ("pruning_layer", 0, ">= 1"),
        ("token_selection_method", "random", "attn_div_v2, attn_div, attn, div, div_er"),
        ("tstm_max_depth", 0, ">= 1"),
        ("tstm_max_breadth", -3, ">= 1"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(key, value, allowed):
    with pytest.raises(ValueError) as error:
        FlashVIDConfig(**{key: value})
    message = str(error.value)
    assert key in message and repr(value) in message and allowed in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("alpha", "0.5"), ("alpha", True), ("alpha", float("nan")), ("retention_ratio", float("inf")),
     ("do_segment", 1), ("complementary_segment", "True"), ("min_segment_num", 4.0), ("pruning_layer", True)],
)
def test_wrong_types_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        FlashVIDConfig(**{key: value})


def test_budget_larger_than_the_frame_is_refused():
    with pytest.raises(ValueError, match="larger than the frame") as error:
        FlashVIDConfig(retention_ratio=1.0, expansion=1.25)
    assert "retention_ratio=1.0" in str(error.value) and "expansion=1.25" in str(error.value)


def test_threshold_one_needs_selection_only():
    # alpha < 1 gives merged tokens a budget for some frame sizes; the official code divides by zero there.
    with pytest.raises(ValueError, match="temporal_threshold") as error:
        FlashVIDConfig(temporal_threshold=1.0, alpha=0.5)
    assert "alpha=0.5" in str(error.value) and "divides by zero" in str(error.value)
    FlashVIDConfig(temporal_threshold=1.0, alpha=1.0)  # selection only: valid (golden cases run it)


def test_from_mapping_rejects_unknown_keys_by_name():
    with pytest.raises(ValueError, match=r"\['retention', 'zz'\]"):
        FlashVIDConfig.from_mapping({"retention": 0.1, "zz": 1, "alpha": 0.5})
    assert FlashVIDConfig.from_mapping({"alpha": 0.5}).alpha == 0.5


def test_from_model_args_parses_official_strings():
    args = {
        "retention_ratio": "0.10", "alpha": "0.70", "temporal_threshold": "0.8", "do_segment": "True",
        "segment_threshold": "0.9", "min_segment_num": "4", "complementary_segment": "False",
        "token_selection_method": "attn_div", "expansion": "1.25", "pruning_layer": "28",
        "llm_retention_ratio": "0.1",
    }
    config = FlashVIDConfig.from_model_args(args)
    assert config.retention_ratio == 0.1 and config.alpha == 0.7 and config.do_segment is True
    assert config.complementary_segment is False and config.min_segment_num == 4 and config.pruning_layer == 28
    assert config.token_selection_method == "attn_div"
    from_string = FlashVIDConfig.from_model_args(",".join(f"{k}={v}" for k, v in args.items()))
    assert from_string == config


def test_from_model_args_errors():
    with pytest.raises(ValueError, match="pretrained"):
        FlashVIDConfig.from_model_args({"pretrained": "x", "alpha": "0.5"})
    assert FlashVIDConfig.from_model_args({"pretrained": "x", "alpha": "0.5"}, ignore_unknown=True).alpha == 0.5
    with pytest.raises(ValueError, match="do_segment='maybe'"):
        FlashVIDConfig.from_model_args({"do_segment": "maybe"})
    with pytest.raises(ValueError, match=r"min_segment_num='4\.5'"):
        FlashVIDConfig.from_model_args({"min_segment_num": "4.5"})
    with pytest.raises(ValueError, match="alpha='high'"):
        FlashVIDConfig.from_model_args({"alpha": "high"})
    assert FlashVIDConfig.from_model_args({"tstm_max_depth": "None"}).tstm_max_depth is None


def test_replace_validates_and_copies():
    config = FlashVIDConfig()
    changed = config.replace(alpha=0.5)
    assert changed.alpha == 0.5 and config.alpha == 0.7
    with pytest.raises(ValueError, match="alpha"):
        config.replace(alpha=2.0)
    with pytest.raises(ValueError, match="bogus"):
        config.replace(bogus=1)


@pytest.mark.parametrize(
    ("num_tokens", "retention_ratio", "expansion", "budget"),
    [(192, 0.1, 1.25, 25), (196, 0.25, 1.25, 62), (196, 0.1, 1.25, 25), (130, 0.1, 1.0, 13), (169, 0.1, 1.25, 22),
     (1, 0.1, 1.0, 1)],
)
def test_token_budget_left_to_right_float64(num_tokens, retention_ratio, expansion, budget):
    config = FlashVIDConfig(retention_ratio=retention_ratio, expansion=expansion)
    assert config.token_budget(num_tokens) == budget


def test_budgets_split():
    assert FlashVIDConfig().budgets(196) == (62, 44, 18)
    assert FlashVIDConfig(alpha=0.0).budgets(196) == (62, 0, 62)
    assert FlashVIDConfig(alpha=1.0).budgets(196) == (62, 62, 0)
    with pytest.raises(ValueError, match="num_tokens_per_frame"):
        FlashVIDConfig().token_budget(0)
