"""scripts/bench_compress.py --official-root: the side-by-side timing mode, run here against stand-in checkouts whose
`flashvid/utils.py` wraps flashvid_core (the official code is not part of this project). Behaviour only: which
rows, columns and verdicts it prints, never how fast anything is."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_diff_official import stand_in_checkout

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_compress.py"
ROW = re.compile(r"^\s*(\d+x\d+x\d+)\s+([\d.]+)\s+(\w+) \|\s+([\d.]+)\s+([\d.]+)\s+(\S+) \|\s+([\d.]+)x\s+(\S+) \|\s+"
                 r"(True|False),\s+(\S+) \| (.*)$")


def run(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--official-root", str(root), "--shapes", "6x16x8", "--pairs", "2",
         "--warmup", "0", "--loop-runs", "1", *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def rows(stdout: str) -> list[tuple[str, ...]]:
    return [match.groups() for line in stdout.splitlines() if (match := ROW.match(line))]


def test_side_by_side_prints_one_row_per_setting_with_memory_and_the_machine(tmp_path):
    result = run(stand_in_checkout(tmp_path / "same", shift=False), "--retention-ratios", "0.25", "0.5",
                 "--dtypes", "float32", "bfloat16")
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout)
    assert [(shape, ratio, dtype) for shape, ratio, dtype, *_ in table] == [
        ("6x16x8", "0.25", "float32"), ("6x16x8", "0.25", "bfloat16"),
        ("6x16x8", "0.5", "float32"), ("6x16x8", "0.5", "bfloat16"),
    ]  # fmt: skip
    for row in table:
        assert row[8] == "True"  # the same indices as the (stand-in) official code in every pair
        assert row[9] == "True"  # ... and as the loop-style oracle
        assert float(row[3]) > 0 and float(row[4]) > 0 and float(row[5]) > 0
        assert re.fullmatch(r"\d+ / \d+ \(call: \+\d+ / \+\d+\)", row[10]), row[10]
    assert result.stdout.count("load average (1, 5, 15 min)") == 2  # before and after the table
    assert "CPUs usable: " in result.stdout and "medians of 2 alternating pairs" in result.stdout


def test_differing_indices_are_reported_and_exit_1(tmp_path):
    result = run(stand_in_checkout(tmp_path / "shifted", shift=True), "--retention-ratios", "0.25", "--dtypes",
                 "float32", "--no-memory", "--no-loop")
    assert result.returncode == 1, result.stdout + result.stderr
    (row,) = rows(result.stdout)
    assert row[8] == "False" and row[5] == "-" and row[10] == "-"


def test_peak_memory_child_reports_one_call(tmp_path):
    root = stand_in_checkout(tmp_path / "same", shift=False)
    for implementation in ("ours", "official"):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "--peak-rss-child", implementation, "--shapes", "8x64x256", "--dtypes",
             "float32", "--retention-ratios", "0.25", "--official-root", str(root)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        numbers = json.loads(result.stdout.strip().splitlines()[-1])
        assert set(numbers) == {"before", "peak", "call", "retained"}
        assert numbers["peak"] >= numbers["before"] > 0 and numbers["call"] == pytest.approx(numbers["peak"] - numbers["before"])


def test_missing_checkout_is_a_clear_error(tmp_path):
    result = run(tmp_path / "nothing", "--no-memory")
    assert result.returncode != 0
    assert "no flashvid/utils.py there" in result.stderr
