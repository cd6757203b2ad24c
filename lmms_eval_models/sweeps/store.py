"""Where runs live on disk, and the all-or-nothing move that makes a run finished.

    <output_root>/<sweep>/runs/<run_id>/      finished runs only: run.json, lmms_eval/ (results, samples), log.txt
    <output_root>/<sweep>/.tmp/<run_id>/      the attempt in progress (removed and restarted if stale)
    <output_root>/<sweep>/.tmp/<run_id>.lock  held (flock) by the process running that attempt
    <output_root>/<sweep>/failed/<run_id>/    the last failed attempt, for its log

A run is finished exactly when runs/<run_id>/run.json exists: the attempt folder is renamed into runs/ in one
step after lmms-eval wrote every task's results, so a kill at any moment leaves either nothing or a whole run,
and a rename never replaces a finished run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

MANIFEST = "run.json"
LMMS_EVAL_DIR = "lmms_eval"
LOG_FILE = "log.txt"


def finished_dir(sweep_dir: Path, run_id: str) -> Path:
    return sweep_dir / "runs" / run_id


def attempt_dir(sweep_dir: Path, run_id: str) -> Path:
    return sweep_dir / ".tmp" / run_id


def failed_dir(sweep_dir: Path, run_id: str) -> Path:
    return sweep_dir / "failed" / run_id


def is_finished(sweep_dir: Path, run_id: str) -> bool:
    return (finished_dir(sweep_dir, run_id) / MANIFEST).is_file()


def read_manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / MANIFEST).read_text())


@contextlib.contextmanager
def run_lock(sweep_dir: Path, run_id: str) -> Iterator[bool]:
    """Yield True while this process holds the run's lock, False if another live process holds it.

    flock locks vanish with their process, even on SIGKILL, so a killed sweep never leaves a stale lock.
    """
    lock_path = sweep_dir / ".tmp" / f"{run_id}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_locked(sweep_dir: Path, run_id: str) -> bool:
    """Whether some live process is running this run now (probes the lock without keeping it)."""
    lock_path = sweep_dir / ".tmp" / f"{run_id}.lock"
    if not lock_path.exists():
        return False
    with run_lock(sweep_dir, run_id) as acquired:
        return not acquired


def fresh_attempt(sweep_dir: Path, run_id: str) -> Path:
    """An empty attempt folder; whatever a killed earlier attempt left there is discarded (call under the lock)."""
    path = attempt_dir(sweep_dir, run_id)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _fsync_tree(path: Path) -> None:
    # Flush file contents before the rename publishes them, so a power cut cannot publish empty files.
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def publish(attempt: Path, sweep_dir: Path, run_id: str, manifest: Mapping[str, Any]) -> bool:
    """Write the manifest and rename the attempt into runs/. False (attempt discarded) if the run already exists."""
    (attempt / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _fsync_tree(attempt)
    target = finished_dir(sweep_dir, run_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(attempt)
        return False
    try:
        os.rename(attempt, target)  # atomic on one filesystem; fails rather than replaces a non-empty folder
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(attempt)
        return False
    return True


def keep_failed(attempt: Path, sweep_dir: Path, run_id: str) -> Path:
    """Move a failed attempt aside (replacing an older failure of the same run) so its log can be read."""
    target = failed_dir(sweep_dir, run_id)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(attempt, target)
    return target


def results_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / LMMS_EVAL_DIR).rglob("*_results.json"))


def missing_tasks(results: Mapping[str, Any], tasks: Sequence[str]) -> list[str]:
    """Requested tasks (or groups) that an lmms-eval results document has no entry for."""
    present = set(results.get("results", {})) | set(results.get("groups", {})) | set(results.get("group_subtasks", {}))
    return [task for task in tasks if task not in present]


def check_complete(run_dir: Path, tasks: Sequence[str]) -> str | None:
    """None if lmms-eval left exactly one results file covering every task, else what is wrong.

    lmms-eval logs an exception and still exits 0, so the exit status alone does not prove a run finished.
    """
    found = results_files(run_dir)
    if len(found) != 1:
        return f"expected one lmms-eval results file, found {len(found)}"
    try:
        results = json.loads(found[0].read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"unreadable results file {found[0]}: {error}"
    missing = missing_tasks(results, tasks)
    return f"no results for tasks {missing}" if missing else None
