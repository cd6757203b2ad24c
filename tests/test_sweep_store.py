"""The run store: a run is published whole or not at all, never twice, and never over a finished one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmms_eval_models import sweep as sweep_cli
from lmms_eval_models.sweeps import store

REPO = Path(__file__).resolve().parent.parent


def fake_attempt(sweep_dir: Path, run_id: str, tasks: dict[str, float]) -> Path:
    attempt = store.fresh_attempt(sweep_dir, run_id)
    (attempt / store.LMMS_EVAL_DIR).mkdir()
    results = {"results": {task: {"alias": task, "acc,none": value} for task, value in tasks.items()}}
    (attempt / store.LMMS_EVAL_DIR / "2026_results.json").write_text(json.dumps(results))
    return attempt


def test_publish_is_all_or_nothing_and_never_replaces(tmp_path: Path) -> None:
    attempt = fake_attempt(tmp_path, "run-1", {"a": 1.0})
    assert not store.is_finished(tmp_path, "run-1")
    assert store.publish(attempt, tmp_path, "run-1", {"run_id": "run-1", "n": 1})
    assert store.is_finished(tmp_path, "run-1") and not attempt.exists()
    again = fake_attempt(tmp_path, "run-1", {"a": 0.0})
    assert not store.publish(again, tmp_path, "run-1", {"run_id": "run-1", "n": 2})  # a duplicate is discarded
    assert store.read_manifest(store.finished_dir(tmp_path, "run-1"))["n"] == 1
    assert not again.exists()


def test_completeness_needs_one_results_file_covering_every_task(tmp_path: Path) -> None:
    attempt = fake_attempt(tmp_path, "run-2", {"a": 1.0})
    assert store.check_complete(attempt, ["a"]) is None
    assert "['b']" in store.check_complete(attempt, ["a", "b"])
    (attempt / store.LMMS_EVAL_DIR / "2027_results.json").write_text("{}")
    assert "found 2" in store.check_complete(attempt, ["a"])
    empty = store.fresh_attempt(tmp_path, "run-3")
    assert "found 0" in store.check_complete(empty, ["a"])


def test_a_fresh_attempt_discards_what_a_killed_one_left(tmp_path: Path) -> None:
    attempt = fake_attempt(tmp_path, "run-4", {"a": 1.0})
    (attempt / "half-written.jsonl").write_text("{")
    again = store.fresh_attempt(tmp_path, "run-4")
    assert again == attempt and list(again.iterdir()) == []


def test_the_run_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from lmms_eval_models.sweeps import store\n"
        "with store.run_lock(Path(sys.argv[1]), 'run-5') as ok:\n"
        "    print(ok, flush=True); time.sleep(60)\n"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert store.is_locked(tmp_path, "run-5")
        with store.run_lock(tmp_path, "run-5") as acquired:
            assert not acquired
    finally:
        holder.kill()
        holder.wait()
    assert not store.is_locked(tmp_path, "run-5")  # SIGKILL released it


def test_status_counts_finished_runs(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the fixture's include_path is relative to the repository root
    assert sweep_cli.main(["status", "tests/data/sweep_report/smoke_fixture.yaml"]) == 0
    out = capsys.readouterr().out
    assert "6 finished, 0 running, 0 failed, 0 pending" in out
