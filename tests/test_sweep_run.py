"""End-to-end sweeps: SIGKILL midway then rerun (nothing lost, nothing duplicated, nothing recomputed), one process
per run (--no-reuse) and grouped (one process per group, runs published one by one), byte-identical reports for the
same seed either way, and SLURM submission through submitit's local executor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.spec import load_sweep

REPO = Path(__file__).resolve().parent.parent
TASK_DIR = Path(__file__).parent / "data" / "sweep_task"


def small_smoke_sweep(tmp_path: Path, output_root: Path) -> Path:
    """configs/sweeps/smoke.yaml cut down to one tiny model, one document per task: vanilla on two smoke tasks, then
    R = 0.1 on all five with up to 256 new tokens (the random tiny model rarely stops early): a longer second
    run, so that a kill lands inside it."""
    document = yaml.safe_load((REPO / "configs" / "sweeps" / "smoke.yaml").read_text())
    document["models"] = [entry for entry in document["models"] if entry["name"] == "qwen2_5_vl"]
    document["points"][0]["tasks"] = ["videomme_smoke", "mvbench_smoke"]
    document["include_path"] = [str(REPO / "configs" / "tasks" / "smoke")]
    document["grid"]["retention_ratio"] = [0.1]
    document["grid"]["gen_kwargs"] = "max_new_tokens=256"
    document["limit"] = 1
    document["output_root"] = str(output_root)
    document["name"] = "smoke_small"
    path = tmp_path / "smoke_small.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def sweep_command(sweep_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmms_eval_models.sweep", "run", str(sweep_file), *extra]


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (reads /proc; Linux only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def finished_snapshot(sweep_dir: Path, run_id: str) -> tuple[bytes, list[tuple[str, int]]]:
    run_dir = store.finished_dir(sweep_dir, run_id)
    files = sorted((str(path.relative_to(run_dir)), path.stat().st_mtime_ns) for path in run_dir.rglob("*"))
    return (run_dir / store.MANIFEST).read_bytes(), files


def kill_then_rerun_per_run(sweep_file: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """One lmms-eval process per run (--no-reuse): killed once the first run is published and the second has
    started, then rerun to the end. Returns the rerun."""
    sweep = load_sweep(sweep_file)
    sweep_dir = sweep.sweep_dir()
    first, second = (run.run_id for run in sweep.runs)
    killed = subprocess.Popen(sweep_command(sweep_file, "--no-report", "--no-reuse"), cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: store.is_finished(sweep_dir, first) and store.attempt_dir(sweep_dir, second).is_dir(), 600,
             "the first run to finish and the second to start")
    time.sleep(3)  # let the second lmms-eval get going
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    attempt = str(store.attempt_dir(sweep_dir, second))
    wait_for(lambda: not processes_mentioning(attempt), 30, "the killed run's lmms-eval to exit with its parent")
    assert not store.is_finished(sweep_dir, second)
    before = finished_snapshot(sweep_dir, first)

    rerun = subprocess.run(sweep_command(sweep_file, "--no-reuse"), cwd=cwd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 already finished, 1 to run" in rerun.stdout and "visual reuse: off" in rerun.stdout
    assert finished_snapshot(sweep_dir, first) == before  # not recomputed, not touched
    return rerun


def kill_then_rerun_grouped(sweep_file: Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The runs as one group (one process): killed while the model loads (nothing published yet), then again
    once the first run is published and the second has started; each time the published runs stay untouched and
    no lock is left; then rerun to the end. Returns the rerun."""
    from lmms_eval_models.sweeps.grouping import plan_groups
    from lmms_eval_models.sweeps.runner import group_dir

    sweep = load_sweep(sweep_file)
    sweep_dir = sweep.sweep_dir()
    groups, alone = plan_groups(sweep.runs)
    assert len(groups) == 1 and not alone
    first, second = (run.run_id for run in groups[0].runs)
    spec = group_dir(sweep_dir, groups[0]) / "spec.json"
    moments = [
        (spec.is_file, "the group's process to start", []),
        # the group's process writes a run's log as it begins the run
        (lambda: store.is_finished(sweep_dir, first) and (store.attempt_dir(sweep_dir, second) / store.LOG_FILE).is_file(),
         "the first run to be published and the second to begin", [first]),
    ]
    for condition, what, published in moments:
        killed = subprocess.Popen(sweep_command(sweep_file, "--no-report"), cwd=cwd, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(condition, 600, what)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        wait_for(lambda: not processes_mentioning(str(spec)), 30, "the group's process to exit with its parent")
        assert [run_id for run_id in (first, second) if store.is_finished(sweep_dir, run_id)] == published
        assert not store.is_locked(sweep_dir, first) and not store.is_locked(sweep_dir, second)
    before = finished_snapshot(sweep_dir, first)

    rerun = subprocess.run(sweep_command(sweep_file), cwd=cwd, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 already finished, 1 to run" in rerun.stdout and "visual reuse: 1 group(s)" in rerun.stdout
    assert finished_snapshot(sweep_dir, first) == before
    return rerun


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to check the killed processes")
def test_sigkill_midway_then_rerun_loses_and_duplicates_nothing(tmp_path: Path, flashvid_cache: Path,
                                                                tiny_checkpoint) -> None:
    """The same sweep killed and rerun with one process per run, and as one group killed at two moments: nothing
    lost, nothing published twice, nothing left behind; byte-identical report tables either way."""
    tiny_checkpoint("qwen2_5_vl")  # built once per session, outside the sweep
    env = {**os.environ, "FLASHVID_CACHE": str(flashvid_cache)}
    reruns = {}
    for mode, kill_then_rerun in (("per_run", kill_then_rerun_per_run), ("grouped", kill_then_rerun_grouped)):
        cwd = tmp_path / mode
        cwd.mkdir()
        sweep_file = small_smoke_sweep(cwd, cwd / "runs")
        reruns[mode] = kill_then_rerun(sweep_file, cwd, env)
        sweep = load_sweep(sweep_file)
        sweep_dir = sweep.sweep_dir()
        run_ids = [run.run_id for run in sweep.runs]
        assert sorted(path.name for path in (sweep_dir / "runs").iterdir()) == sorted(run_ids)
        for run in sweep.runs:
            assert len(store.results_files(store.finished_dir(sweep_dir, run.run_id))) == 1
            assert store.check_complete(store.finished_dir(sweep_dir, run.run_id), run.tasks) is None
        assert not (sweep_dir / "failed").exists()
        assert not [path for path in (sweep_dir / ".tmp").iterdir() if path.is_dir()]  # no attempt or group left
        assert "plot: results/smoke_small/accuracy_vs_retention.png" in reruns[mode].stdout
    # the killed group's first run left its three videos' features in the disk store (under the output root): the
    # rerun's run takes them from there and computes the other three; and the same seed gives the same report,
    # whichever way the runs ran
    assert "3 of 6 visual passes served from the store (0 from memory, 3 from disk)" in reruns["grouped"].stdout
    for name in ("smoke_small.csv", "smoke_small.md"):
        assert (tmp_path / "grouped" / "results" / "smoke_small" / name).read_bytes() == \
            (tmp_path / "per_run" / "results" / "smoke_small" / name).read_bytes()


@pytest.mark.slow
def test_slurm_launcher_through_submitit_local_executor(tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    sweep_file = tmp_path / "slurm_local.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "slurm_local",
        "model": "dummy",
        "model_args": {"response": "A"},
        "tasks": ["videomme_sweeptest"],
        "include_path": [str(TASK_DIR)],
        "points": [{"name": "answer-A"}],
        "launcher": {"type": "slurm", "cluster": "local", "gpus": 0, "time": 10},
        "output_root": str(tmp_path / "runs"),
    }))
    result = subprocess.run(sweep_command(sweep_file), cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted 1 job(s)" in result.stdout
    sweep = load_sweep(sweep_file)
    run_dir = store.finished_dir(sweep.sweep_dir(), sweep.runs[0].run_id)
    assert store.read_manifest(run_dir)["settings"]["model"] == "dummy"
    table = (tmp_path / "results" / "slurm_local" / "slurm_local.csv").read_text().splitlines()
    assert table[0].startswith("run,method,retention_ratio,videomme_short,videomme_medium,videomme_long,videomme_overall")
    assert table[1].split(",")[3:7] == ["100.00", "0.00", "50.00", "50.00"]  # the dummy answers "A" to every question
    # Rerunning submits nothing: the run is finished.
    again = subprocess.run(sweep_command(sweep_file, "--no-report"), cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "1 already finished, 0 to run" in again.stdout


@pytest.mark.slow
def test_a_run_whose_lmms_eval_fails_but_exits_0_is_not_published(tmp_path: Path) -> None:
    """lmms-eval logs a task error and exits 0: the sweep notices the missing results, keeps the attempt aside
    for its log, publishes nothing and exits 1; a rerun tries again."""
    sweep_file = tmp_path / "broken.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "broken",
        "model": "dummy",
        "tasks": ["videomme_sweepbroken"],
        "include_path": [str(Path(__file__).parent / "data" / "sweep_task_broken")],
        "points": [{"name": "answer-A", "response": "A"}],
        "output_root": str(tmp_path / "runs"),
    }))
    result = subprocess.run(sweep_command(sweep_file), cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert "1 failed" in result.stdout and "rerun the same command to resume" in result.stdout
    assert "expected one lmms-eval results file, found 0" in result.stderr
    sweep = load_sweep(sweep_file)
    run_id = sweep.runs[0].run_id
    assert not store.is_finished(sweep.sweep_dir(), run_id)
    assert "videomme_process_results_that_does_not_exist" in (
        store.failed_dir(sweep.sweep_dir(), run_id) / store.LOG_FILE).read_text()
