"""The methods registry: what each method declares, the composed settings, and a method added as one new file."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmms_eval_models.methods import METHODS, MethodSettings, all_methods, get_method

REPO = Path(__file__).resolve().parent.parent


def test_registry_lists_every_method_in_order() -> None:
    assert METHODS == ("flashvid", "fastv", "visionzip", "divprune", "prunevid", "fastvid", "uniform", "random",
                       "none")
    assert [method.label for method in all_methods()] == [
        "FlashVID", "FastV", "VisionZip", "DivPrune", "PruneVID", "FastVID", "Uniform", "Random", "Vanilla"]


def test_each_method_declares_what_the_patches_ask() -> None:
    assert {m.name for m in all_methods() if m.needs_statistic} == {"flashvid", "visionzip", "fastvid"}
    assert {m.name for m in all_methods() if not m.compresses} == {"none"}
    assert {m.name for m in all_methods() if m.depth_sensitive} == {"fastv"}


def test_settings_are_the_union_of_the_methods_options() -> None:
    declared = [field.name for method in all_methods() if method.Options
                for field in dataclasses.fields(method.Options)]
    assert [field.name for field in dataclasses.fields(MethodSettings)] == list(dict.fromkeys(declared))
    settings = MethodSettings.from_options({"fastv_layer": "3", "seed": "5"})
    assert settings.options_for("fastv").fastv_layer == 3
    assert settings.options_for("random").seed == settings.options_for("fastvid").seed == 5
    assert settings.options_for("divprune") is None


def test_unknown_method_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"method='tome' is invalid: allowed flashvid, fastv, .*, random, none"):
        get_method("tome")


def test_no_per_method_branch_outside_the_registry() -> None:
    """The model classes, patches and sweeps ask the registry; they name no method in a condition."""
    names = "|".join(METHODS)
    branch = re.compile(rf"if method ==|method in \(|method (?:==|!=) \"(?:{names})\"")
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for folder in ("models", "patches", "sweeps")
                 for path in sorted((REPO / "lmms_eval_models" / folder).glob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert offenders == []


NEW_METHOD = '''
"""Keep the first k tokens of every frame (a test method)."""
from dataclasses import dataclass

from lmms_eval_models.methods.base import FrameBudget, Method, check_at_least, per_frame_compression
from lmms_eval_models.methods.registry import register


@dataclass(frozen=True)
class KeepFirstOptions:
    keep_first_count: int = 2

    def __post_init__(self):
        check_at_least("keep_first_count", self.keep_first_count, 1)


@register
class KeepFirst(Method):
    name, label, order = "keep_first", "KeepFirst", 50
    Options = KeepFirstOptions

    def frame_budget(self, num_tokens_per_frame, retention_ratio, grid_hw, settings, flashvid_config):
        count = min(settings.keep_first_count, num_tokens_per_frame)
        return FrameBudget(count, count, 0)

    def compress(self, features, attention, retention_ratio, grid_hw, settings, flashvid_config, generator):
        budget = self.frame_budget(features.shape[1], retention_ratio, grid_hw, settings, flashvid_config)
        import torch
        indices = torch.arange(budget.tokens_per_frame).expand(features.shape[0], -1)
        return per_frame_compression(features[:, : budget.tokens_per_frame], indices, features.shape[1], budget)
'''

CHECK = '''
import torch
from lmms_eval_models.methods import METHODS, budget_for_method, compress_with_method, get_method
from lmms_eval_models.models.common import split_model_args
from lmms_eval_models.patches.common import plan_method
from flashvid_core import FlashVIDConfig

assert METHODS[-2:] == ("keep_first", "none"), METHODS
out = compress_with_method("keep_first", torch.randn(3, 9, 4), None, 0.5, keep_first_count="3")
assert out.indices.tolist() == [0, 1, 2, 9, 10, 11, 18, 19, 20], out.indices
assert budget_for_method("keep_first", 9, 3, 0.5).tokens_entering_llm == 6
plan = plan_method("keep_first", {"keep_first_count": 4}, FlashVIDConfig(), 28)
assert not plan.needs_statistic and plan.compresses and plan.llm_pruning is None


class Base:
    def __init__(self, pretrained: str = "x", device: str = "cpu"):
        pass


arguments = split_model_args(Base, {"method": "keep_first", "keep_first_count": "5"}, "demo", {})
assert arguments.method == "keep_first" and arguments.baseline_options == {"keep_first_count": "5"}
try:
    split_model_args(Base, {"method": "keep_first", "keep_first_count": "0"}, "demo", {})
except ValueError as error:
    assert "keep_first_count=0 is out of range" in str(error), error
else:
    raise AssertionError("keep_first_count=0 was accepted")
print("ok", get_method("keep_first").label)
'''


def test_a_method_is_one_new_file(tmp_path: Path) -> None:
    """A copy of the package with one more module in methods/: every consumer accepts the new method and key."""
    for package in ("flashvid_core", "lmms_eval_models"):
        shutil.copytree(REPO / package, tmp_path / package, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "resources"))
    (tmp_path / "lmms_eval_models" / "methods" / "keep_first.py").write_text(textwrap.dedent(NEW_METHOD))
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok KeepFirst"
