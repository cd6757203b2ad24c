"""Execute runs: one lmms-eval subprocess per run, published atomically; sequentially here or as SLURM jobs."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import platform
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.command import build_command, resolve_tiny
from lmms_eval_models.sweeps.spec import Launcher, Run, Sweep

LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class Outcome:
    """What happened to one run: finished (now), skipped (finished before), failed, busy (another process runs
    it), or duplicate (another process published it first)."""

    run_id: str
    status: str
    seconds: float = 0.0
    detail: str = ""


def _die_with_parent() -> None:
    # Linux: the child gets SIGKILL when the sweep process dies, even by SIGKILL, so no orphaned lmms-eval keeps
    # writing into an attempt folder that a rerun is about to restart.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(argv: Sequence[str], log_path: Path, stream: bool) -> int:
    """Run argv with stdout+stderr into log_path (and to our stdout when streaming); return its exit status."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        if not stream:
            return subprocess.run(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  preexec_fn=preexec, check=False).returncode
        process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=preexec, text=True, errors="replace")
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            sys.stdout.write(line)
        return process.wait()


def _log_tail(log_path: Path) -> str:
    if not log_path.is_file():
        return ""
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        return "".join(deque(handle, maxlen=LOG_TAIL_LINES))


def _lmms_eval_version() -> str:
    try:
        return metadata.version("lmms-eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def _manifest(run: Run, argv: Sequence[str], seconds: float) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "sweep": run.sweep,
        "name": run.name,
        "label": run.label,
        "reference": run.reference,
        "order": run.order,
        "model_entry": run.model_entry,
        "settings": run.settings(),
        "command": list(argv),
        "seconds": round(seconds, 1),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "lmms_eval_version": _lmms_eval_version(),
    }


def execute_run(run: Run, sweep_dir: Path, launcher: Launcher, *, stream: bool = False,
                tiny_cache: str | Path | None = None) -> Outcome:
    """Run one lmms-eval invocation into a fresh attempt folder and publish it only if it completed."""
    if store.is_finished(sweep_dir, run.run_id):
        return Outcome(run.run_id, "skipped")
    with store.run_lock(sweep_dir, run.run_id) as acquired:
        if not acquired:
            return Outcome(run.run_id, "busy", detail="another process is running it")
        if store.is_finished(sweep_dir, run.run_id):  # finished while we waited for the lock
            return Outcome(run.run_id, "skipped")
        attempt = store.fresh_attempt(sweep_dir, run.run_id)
        argv = build_command(run, launcher, attempt / store.LMMS_EVAL_DIR, resolve_tiny(run.model_args, tiny_cache))
        start = time.monotonic()
        returncode = _spawn(argv, attempt / store.LOG_FILE, stream)
        seconds = time.monotonic() - start
        problem = f"lmms-eval exited with status {returncode}" if returncode else None
        problem = problem or store.check_complete(attempt, run.tasks)
        if problem:
            kept = store.keep_failed(attempt, sweep_dir, run.run_id)
            tail = _log_tail(kept / store.LOG_FILE)
            return Outcome(run.run_id, "failed", seconds, f"{problem}; log: {kept / store.LOG_FILE}\n{tail}")
        published = store.publish(attempt, sweep_dir, run.run_id, _manifest(run, argv, seconds))
        return Outcome(run.run_id, "finished" if published else "duplicate", seconds)


def _run_sequentially(runs: Sequence[Run], sweep_dir: Path, launcher: Launcher, stream: bool,
                      on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
    outcomes = []
    bar = tqdm(runs, desc="runs", unit="run", disable=None, dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(run.run_id[:60])
        outcome = execute_run(run, sweep_dir, launcher, stream=stream)
        on_outcome(outcome)
        outcomes.append(outcome)
    bar.close()
    return outcomes


def _slurm_job(run: Run, sweep_dir: str, launcher: Launcher) -> dict[str, Any]:
    """Body of one submitit job (on the compute node): the same execute_run as a local sweep."""
    return asdict(execute_run(run, Path(sweep_dir), launcher))


def _run_on_slurm(runs: Sequence[Run], sweep_dir: Path, launcher: Launcher,
                  on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
    try:
        import submitit
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise SystemExit("the slurm launcher needs submitit: pip install 'flashvid-suite[slurm]'") from error
    executor = submitit.AutoExecutor(folder=sweep_dir / "slurm" / "%j", cluster=launcher.cluster)
    parameters: dict[str, Any] = {"timeout_min": launcher.time_min, "nodes": 1, "tasks_per_node": 1,
                                  "gpus_per_node": launcher.gpus, "name": f"flashvid-{runs[0].sweep}"}
    if launcher.cpus_per_task:
        parameters["cpus_per_task"] = launcher.cpus_per_task
    if launcher.mem_gb:
        parameters["mem_gb"] = launcher.mem_gb
    if launcher.cluster == "slurm":
        parameters["slurm_partition"] = launcher.partition
        if launcher.additional_parameters:
            parameters["slurm_additional_parameters"] = dict(launcher.additional_parameters)
    executor.update_parameters(**parameters)
    # Absolute, so the job finds the sweep whatever its working directory on the node.
    jobs = {executor.submit(_slurm_job, run, str(sweep_dir.resolve()), launcher): run for run in runs}
    print(f"submitted {len(jobs)} job(s): {', '.join(job.job_id for job in jobs)}", flush=True)
    outcomes = []
    with tqdm(total=len(jobs), desc="runs", unit="run", disable=None) as bar:
        for job in submitit.helpers.as_completed(list(jobs), poll_frequency=2):
            run = jobs[job]
            try:
                outcome = Outcome(**job.result())
            except Exception as error:  # a job that died (preempted, timed out) is a failed run, not a crash
                outcome = Outcome(run.run_id, "failed", detail=f"job {job.job_id}: {error}")
            on_outcome(outcome)
            outcomes.append(outcome)
            bar.update(1)
    return outcomes


def run_runs(sweep: Sweep, runs: Sequence[Run], sweep_dir: Path, *, stream: bool = False,
             on_outcome: Callable[[Outcome], None] = lambda outcome: None) -> list[Outcome]:
    """Execute the given runs with the sweep's launcher (finished ones are skipped inside execute_run)."""
    if not runs:
        return []
    if sweep.launcher.type == "slurm":
        return _run_on_slurm(runs, sweep_dir, sweep.launcher, on_outcome)
    return _run_sequentially(runs, sweep_dir, sweep.launcher, stream, on_outcome)
