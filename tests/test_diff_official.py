"""scripts/diff_official.py: the differential harness against an official checkout, run here against stand-in
checkouts whose `flashvid/utils.py` wraps flashvid_core (the official code is not part of this project)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "diff_official.py"

STAND_IN = '''
import torch
import flashvid_core as fc
from .configuration_flashvid import FlashVidConfig


def flashvid_compression(video_features, cls_attention, flashvid_config):
    if video_features.shape[1] == 1:
        raise IndexError("stand-in for a crash of the official code")
    config = fc.FlashVIDConfig(**{k: getattr(flashvid_config, k) for k in (
        "retention_ratio", "alpha", "token_selection_method", "temporal_threshold", "do_segment",
        "segment_threshold", "min_segment_num", "complementary_segment", "expansion")})
    out = fc.compress(video_features, cls_attention, config)
    indices = out.indices.clone()
    if SHIFT and indices.numel() > 1:
        indices[-1] += 1
    return out.tokens, indices
'''

CONFIG = '''
from dataclasses import dataclass


@dataclass
class FlashVidConfig:
    retention_ratio: float = 0.25
    alpha: float = 0.7
    token_selection_method: str = "attn_div"
    temporal_threshold: float = 0.8
    do_segment: bool = True
    segment_threshold: float = 0.9
    min_segment_num: int = 8
    complementary_segment: bool = True
    expansion: float = 1.25
'''


def stand_in_checkout(root: Path, shift: bool) -> Path:
    package = root / "flashvid"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the harness must not import the package __init__')\n")
    (package / "configuration_flashvid.py").write_text(CONFIG)
    (package / "utils.py").write_text(f"SHIFT = {shift}\n" + STAND_IN)
    return root


def run(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--official-root", str(root), "--cases", "40", "--seed", "3", *extra],
        capture_output=True, text=True, timeout=300,
    )


def test_agreeing_checkout_reports_identical_cases_and_exits_0(tmp_path):
    result = run(stand_in_checkout(tmp_path / "same", shift=False))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical" in result.stdout
    assert "official code raises IndexError" in result.stdout  # the stand-in's crash on one-token frames
    assert "MISMATCH" not in result.stdout


def test_differing_checkout_is_reported_and_exits_1(tmp_path):
    result = run(stand_in_checkout(tmp_path / "shifted", shift=True), "--dtype", "bfloat16")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "different indices" in result.stdout
    assert "MISMATCH indices: case" in result.stdout


def test_missing_checkout_is_a_clear_error(tmp_path):
    result = run(tmp_path / "nothing")
    assert result.returncode != 0
    assert "no flashvid/utils.py there" in result.stderr


def test_max_shape_bounds_the_cases_and_bad_values_are_refused(tmp_path):
    root = stand_in_checkout(tmp_path / "same", shift=False)
    result = run(root, "--max-shape", "2x3x2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical" in result.stdout
    bad = run(root, "--max-shape", "2x3")
    assert bad.returncode != 0 and "expected FxNxD" in bad.stderr
