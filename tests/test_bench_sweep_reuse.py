"""scripts/bench_sweep_reuse.py runs and prints its table (a quick configuration; the figures are the script's to
report, not this test's to judge)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_benchmark_prints_its_ratio_table(tmp_path: Path, flashvid_cache: Path, tiny_checkpoint) -> None:
    tiny_checkpoint("qwen2_5_vl")
    command = [sys.executable, str(REPO / "scripts" / "bench_sweep_reuse.py"), "--families", "qwen2_5_vl",
               "--suites", "long", "--points", "2", "--limit", "1", "--no-warmup"]  # fmt: skip
    env = {**os.environ, "FLASHVID_CACHE": str(flashvid_cache), "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert ("| family | tasks | 1 point (s) | 2 points, grouped (s) | ratio | grouped run 1 (s) | runs 2..2, mean (s) |"
            in lines)
    row = next(line for line in lines if line.startswith("| qwen2_5_vl | long |"))
    one, grouped, ratio, first, later = (float(value) for value in re.findall(r"\d+\.\d+", row))
    assert one > 0 and grouped > 0 and ratio == pytest.approx(grouped / one, abs=0.02) and first > 0 and later >= 0
    assert sum("load average" in line for line in lines) == 2
