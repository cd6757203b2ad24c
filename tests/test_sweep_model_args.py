"""Every point's model_args are checked against its suite model class before anything starts (plan and run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmms_eval_models.sweeps.checks import check_model_args
from lmms_eval_models.sweeps.spec import SweepError, parse_sweep

REPO = Path(__file__).resolve().parent.parent
BASE = {"name": "s", "model": "flashvid_llava_onevision", "model_args": {"pretrained": "tiny:llava_onevision"},
        "tasks": ["videomme_smoke"]}


@pytest.mark.parametrize(("grid", "message"), [
    ({"retention_ratio": [0.1, 1.5]}, r"retention_ratio=1.5 is out of range: allowed \(0.0, 1.0\]"),
    ({"alpha": [-1]}, r"alpha=-1.0 is out of range: allowed \[0.0, 1.0\]"),
    ({"retention_ratoi": [0.1]}, r"unknown model_args key 'retention_ratoi'.*did you mean 'retention_ratio'"),
    ({"method": ["fastvv"]}, r"fastvv"),
    ({"fastv_layer": [-2]}, r"fastv_layer"),
    ({"mm_spatial_pool_mode": ["max"]}, r"mm_spatial_pool_mode"),  # the family's own settings too
])
def test_bad_model_args_fail_naming_the_point_and_the_key(grid: dict, message: str) -> None:
    sweep = parse_sweep({**BASE, "grid": grid}, "s")
    with pytest.raises(SweepError, match=message) as error:
        check_model_args(sweep.runs)
    assert error.value.key.startswith("run '") and "flashvid_llava_onevision" in error.value.key


def test_every_built_in_sweep_has_valid_model_args() -> None:
    from lmms_eval_models.sweeps.spec import load_sweep

    for path in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        check_model_args(load_sweep(path).runs)


def test_plan_refuses_an_out_of_range_point_before_printing_any_command(tmp_path: Path) -> None:
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(yaml.safe_dump({**BASE, "include_path": [str(REPO / "configs" / "tasks" / "smoke")],
                                          "grid": {"retention_ratio": [0.1, 1.5]}}))
    result = subprocess.run([sys.executable, "-m", "lmms_eval_models.sweep", "plan", str(sweep_file)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "retention_ratio=1.5 is out of range" in result.stderr
    assert "python" not in result.stdout and "lmms_eval" not in result.stdout
