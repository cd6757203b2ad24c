"""Execute runs, published atomically one by one; sequentially here or as SLURM jobs.

With `reuse_visual` (the default), the runs that differ only by compression settings form a group
(`grouping.plan_groups`) and each group runs in one process (`group_worker`): one model load, and one decoding
and vision pass per video for all its runs. Without it (`--no-reuse`, `reuse_visual: false`), and for runs that
cannot be grouped, each run is one lmms-eval subprocess (`execute_run`).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import platform
import shutil
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
from lmms_eval_models.sweeps.command import build_command, build_group_command, lmms_eval_args, resolve_tiny
from lmms_eval_models.sweeps.group_worker import GroupRun, read_outcomes, write_spec
from lmms_eval_models.sweeps.grouping import Group, passes_line, plan_groups
from lmms_eval_models.sweeps.spec import Launcher, Run, StoreSettings, Sweep

POLL_SECONDS = 0.5

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


def manifest_of(run: Run, argv: Sequence[str], seconds: float) -> dict[str, Any]:
    """A finished run's run.json."""
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
        published = store.publish(attempt, sweep_dir, run.run_id, manifest_of(run, argv, seconds))
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


# ------------------------------------------------------------------------------------------------ groups


@dataclass(frozen=True)
class GroupSettings:
    """What a group's process needs beside its runs: the store's budgets and folder (absolute, or None)."""

    memory_bytes: int
    disk_bytes: int
    folder: str | None

    @classmethod
    def of(cls, settings: StoreSettings, folder: Path | None) -> GroupSettings:
        return cls(settings.memory_bytes, settings.disk_bytes, None if folder is None else str(folder.resolve()))


def group_dir(sweep_dir: Path, group: Group) -> Path:
    return sweep_dir / ".tmp" / f"{group.group_id}.group"


def execute_group(group: Group, sweep_dir: Path, launcher: Launcher, settings: GroupSettings, *,
                  stream: bool = False, tiny_cache: str | Path | None = None,
                  on_outcome: Callable[[Outcome], None] = lambda outcome: None,
                  describe: str = "group") -> tuple[list[Outcome], dict[str, int]]:
    """Run a group's unfinished runs in one process (`group_worker`), each published as soon as it is done.

    Holds every run's lock meanwhile (a run another process holds is "busy" and left out), gives each a fresh
    attempt folder, and reports each run's outcome as the worker writes it. Returns the outcomes (in the order
    they came) and the visual passes the group's store served and computed.
    """
    outcomes: list[Outcome] = []

    def report(outcome: Outcome) -> None:
        outcomes.append(outcome)
        on_outcome(outcome)

    passes: dict[str, int] = {}
    with contextlib.ExitStack() as locks:
        held = []
        for run in group.runs:
            if store.is_finished(sweep_dir, run.run_id):
                report(Outcome(run.run_id, "skipped"))
                continue
            if not locks.enter_context(store.run_lock(sweep_dir, run.run_id)):
                report(Outcome(run.run_id, "busy", detail="another process is running it"))
            elif store.is_finished(sweep_dir, run.run_id):  # finished while we waited for the lock
                report(Outcome(run.run_id, "skipped"))
            else:
                held.append(run)
        if not held:
            return outcomes, passes
        folder = group_dir(sweep_dir, group)
        if folder.exists():
            shutil.rmtree(folder)
        entries = []
        for run in held:
            attempt = store.fresh_attempt(sweep_dir, run.run_id)
            model_args = resolve_tiny(run.model_args, tiny_cache)
            output = attempt / store.LMMS_EVAL_DIR
            entries.append(GroupRun(run, lmms_eval_args(run, output, model_args),
                                    build_command(run, launcher, output, model_args), attempt))  # fmt: skip
        spec = write_spec(folder, group.group_id, sweep_dir.resolve(), group.model, entries,
                          {**asdict(settings), "keep_statistic": group.needs_statistic})  # fmt: skip
        argv = build_group_command(spec, launcher, group.group_id)
        log_path = folder / store.LOG_FILE
        returncode = _run_group_process(argv, log_path, stream, folder, entries, report, describe)
        seen = {outcome.run_id for outcome in outcomes}
        for entry in entries:
            if entry.run.run_id in seen:
                continue
            detail = f"the group's process exited with status {returncode} before this run finished"
            if entry.attempt.exists():
                kept = store.keep_failed(entry.attempt, sweep_dir, entry.run.run_id)
                detail += f"; log: {kept / store.LOG_FILE}\n{_log_tail(kept / store.LOG_FILE) or _log_tail(log_path)}"
            report(Outcome(entry.run.run_id, "failed", detail=detail))
        summary = folder / "summary.json"
        if summary.is_file():
            import json

            passes = json.loads(summary.read_text()).get("passes", {})
        shutil.rmtree(folder, ignore_errors=True)
    return outcomes, passes


def _run_group_process(argv: Sequence[str], log_path: Path, stream: bool, folder: Path, entries: Sequence[Any],
                       report: Callable[[Outcome], None], describe: str) -> int:
    """Start the group's worker and follow it: each run's outcome as the worker writes it (with `stream`, each
    run's log as it grows); the worker's exit status."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    reported: set[str] = set()
    offsets: dict[Path, int] = {}
    bar = tqdm(total=len(entries), desc=describe, unit="run", disable=None, dynamic_ncols=True, leave=True)
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   preexec_fn=preexec)  # fmt: skip
        while True:
            finished = process.poll() is not None
            if stream:
                for path in (log_path, *(entry.attempt / store.LOG_FILE for entry in entries)):
                    _echo_new_lines(path, offsets)
            written = read_outcomes(folder)
            for entry in entries:  # in the group's order
                run_id = entry.run.run_id
                if run_id in written and run_id not in reported:
                    reported.add(run_id)
                    report(Outcome(**written[run_id]))
                    bar.update(1)
            if finished:
                break
            time.sleep(POLL_SECONDS)
    bar.close()
    return process.returncode


def _echo_new_lines(path: Path, offsets: dict[Path, int]) -> None:
    """Print what was appended to `path` since the last call (for --stream)."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as handle:
            handle.seek(offsets.get(path, 0))
            data = handle.read()
        offsets[path] = offsets.get(path, 0) + len(data)
        if data:
            sys.stdout.write(data.decode(errors="replace"))
            sys.stdout.flush()


def _run_groups(groups: Sequence[Group], sweep_dir: Path, launcher: Launcher, settings: GroupSettings, stream: bool,
                on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
    outcomes = []
    for index, group in enumerate(groups, 1):
        describe = f"group {index}/{len(groups)} {group.model} ({len(group.runs)} run{'s' * (len(group.runs) > 1)})"
        done, passes = execute_group(group, sweep_dir, launcher, settings, stream=stream, on_outcome=on_outcome,
                                     describe=describe)  # fmt: skip
        outcomes += done
        if passes:
            tqdm.write(f"{describe}: {passes_line(passes)}")
    return outcomes


def _slurm_job(run: Run, sweep_dir: str, launcher: Launcher) -> dict[str, Any]:
    """Body of one submitit job (on the compute node): the same execute_run as a local sweep."""
    return asdict(execute_run(run, Path(sweep_dir), launcher))


def _slurm_group_job(group: Group, sweep_dir: str, launcher: Launcher, settings: GroupSettings) -> dict[str, Any]:
    """Body of one submitit job for a whole group (on the compute node): the same execute_group as a local sweep."""
    outcomes, passes = execute_group(group, Path(sweep_dir), launcher, settings)
    return {"outcomes": [asdict(outcome) for outcome in outcomes], "passes": passes}


def _run_on_slurm(runs: Sequence[Run], groups: Sequence[Group], sweep_dir: Path, launcher: Launcher,
                  settings: GroupSettings | None, on_outcome: Callable[[Outcome], None]) -> list[Outcome]:
    try:
        import submitit
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise SystemExit("the slurm launcher needs submitit: pip install 'flashvid-suite[slurm]'") from error
    executor = submitit.AutoExecutor(folder=sweep_dir / "slurm" / "%j", cluster=launcher.cluster)
    parameters: dict[str, Any] = {"timeout_min": launcher.time_min, "nodes": 1, "tasks_per_node": 1,
                                  "gpus_per_node": launcher.gpus, "name": f"flashvid-{(runs or groups[0].runs)[0].sweep}"}
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
    where = str(sweep_dir.resolve())
    jobs: dict[Any, Run | Group] = {executor.submit(_slurm_job, run, where, launcher): run for run in runs}
    jobs.update({executor.submit(_slurm_group_job, group, where, launcher, settings): group for group in groups})
    print(f"submitted {len(jobs)} job(s): {', '.join(job.job_id for job in jobs)}", flush=True)
    outcomes = []
    total = len(runs) + sum(len(group.runs) for group in groups)
    with tqdm(total=total, desc="runs", unit="run", disable=None) as bar:
        for job in submitit.helpers.as_completed(list(jobs), poll_frequency=2):
            unit = jobs[job]
            members = unit.runs if isinstance(unit, Group) else (unit,)
            try:
                result = job.result()
                done = ([Outcome(**outcome) for outcome in result["outcomes"]] if isinstance(unit, Group)
                        else [Outcome(**result)])  # fmt: skip
                if isinstance(unit, Group) and result["passes"]:
                    tqdm.write(f"group {unit.group_id} ({len(unit.runs)} runs, job {job.job_id}): "
                               f"{passes_line(result['passes'])}")  # fmt: skip
            except Exception as error:  # a job that died (preempted, timed out) fails its runs, not the sweep
                done = [Outcome(run.run_id, "failed", detail=f"job {job.job_id}: {error}") for run in members]
            for outcome in done:
                on_outcome(outcome)
                outcomes.append(outcome)
                bar.update(1)
    return outcomes


def run_runs(sweep: Sweep, runs: Sequence[Run], sweep_dir: Path, *, stream: bool = False, reuse: bool | None = None,
             store_dir: Path | None = None,
             on_outcome: Callable[[Outcome], None] = lambda outcome: None) -> list[Outcome]:
    """Execute the given runs with the sweep's launcher (finished ones are skipped inside execute_run /
    execute_group). reuse: group the runs that can share a model (default: the sweep's `reuse_visual`);
    store_dir: the feature store's folder (default: the sweep's)."""
    if not runs:
        return []
    reuse = sweep.reuse_visual if reuse is None else reuse
    groups, alone = plan_groups(runs) if reuse else ([], list(runs))
    settings = GroupSettings.of(sweep.feature_store, store_dir if store_dir is not None else sweep.store_dir())
    if sweep.launcher.type == "slurm":
        return _run_on_slurm(alone, groups, sweep_dir, sweep.launcher, settings, on_outcome)
    outcomes = _run_groups(groups, sweep_dir, sweep.launcher, settings, stream, on_outcome)
    return outcomes + (_run_sequentially(alone, sweep_dir, sweep.launcher, stream, on_outcome) if alone else [])
