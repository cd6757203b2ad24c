"""The exact argument list of one run: `python -m lmms_eval ...` or `accelerate launch ... -m lmms_eval ...`.

Always a list handed to subprocess (never a shell string), so no config value is ever interpreted by a shell.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from lmms_eval_models.bundled import resolve_include_path
from lmms_eval_models.sweeps.spec import TINY_PREFIX, Launcher, Run, Scalar, render_model_args


def resolve_tiny(model_args: Mapping[str, Scalar], cache_dir: str | Path | None = None) -> dict[str, Scalar]:
    """Replace `tiny:<family>` values by the path of that tiny checkpoint, building it once if needed."""
    resolved = dict(model_args)
    for key, value in model_args.items():
        if isinstance(value, str) and value.startswith(TINY_PREFIX):
            # Imported here only: it imports transformers, which plan and validation do not need.
            from lmms_eval_models.tiny_checkpoints import tiny_checkpoint_path

            resolved[key] = str(tiny_checkpoint_path(value[len(TINY_PREFIX):], cache_dir))
    return resolved


def lmms_eval_args(run: Run, output_path: Path, model_args: Mapping[str, Scalar] | None = None) -> list[str]:
    """The lmms-eval CLI arguments of a run (after `-m lmms_eval`)."""
    args = [
        "--model", run.model,
        "--model_args", render_model_args(run.model_args if model_args is None else model_args),
        "--tasks", ",".join(run.tasks),
        "--batch_size", str(run.batch_size),
        "--seed", str(run.seed),
        "--log_samples",
        "--output_path", str(output_path),
    ]
    if run.limit is not None:
        args += ["--limit", str(run.limit)]
    for include in run.include_path:
        args += ["--include_path", str(resolve_include_path(include))]
    if run.gen_kwargs:
        args += ["--gen_kwargs", run.gen_kwargs]
    return [*args, *run.lmms_eval_args]  # the sweep file's `lmms_eval_args`, as given (checked at load)


def default_port(run_id: str) -> int:
    # A port per run (stable across reruns) so two runs sharing a node do not collide on accelerate's default.
    return 20000 + int(hashlib.sha256(run_id.encode()).hexdigest()[:8], 16) % 20000


def accelerate_executable() -> str:
    """The `accelerate` script of this interpreter's environment (falls back to PATH)."""
    sibling = Path(sys.executable).with_name("accelerate")
    return str(sibling) if sibling.exists() else (shutil.which("accelerate") or "accelerate")


def build_command(run: Run, launcher: Launcher, output_path: Path,
                  model_args: Mapping[str, Scalar] | None = None,
                  python: str | None = None, accelerate: Callable[[], str] = accelerate_executable) -> list[str]:
    """The full argument list of a run for its launcher (for SLURM: what the job runs on its node)."""
    tail = ["-m", "lmms_eval", *lmms_eval_args(run, output_path, model_args)]
    processes = launcher.num_processes
    if launcher.type == "local" or (launcher.type == "slurm" and processes <= 1):
        return [python or sys.executable, *tail]
    port = launcher.main_process_port or default_port(run.run_id)
    return [accelerate(), "launch", "--num_processes", str(processes), "--main_process_port", str(port), *tail]


def build_group_command(spec_path: Path, launcher: Launcher, group_id: str, python: str | None = None,
                        accelerate: Callable[[], str] = accelerate_executable) -> list[str]:
    """The argument list of a sweep group's process (`group_worker`), for its launcher as `build_command`."""
    tail = ["-m", "lmms_eval_models.sweeps.group_worker", str(spec_path)]
    processes = launcher.num_processes
    if launcher.type == "local" or (launcher.type == "slurm" and processes <= 1):
        return [python or sys.executable, *tail]
    port = launcher.main_process_port or default_port(group_id)
    return [accelerate(), "launch", "--num_processes", str(processes), "--main_process_port", str(port), *tail]
