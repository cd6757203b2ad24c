"""`flashvid-sweep`: plan, run and inspect YAML sweeps of lmms-eval runs (one invocation per run).

    flashvid-sweep plan   configs/sweeps/table1_llava_onevision.yaml   # every run and its exact command line
    flashvid-sweep run    configs/sweeps/smoke.yaml                    # run what has not finished, then report
    flashvid-sweep status configs/sweeps/smoke.yaml                    # finished / running / failed / pending
    flashvid-sweep run    smoke --only 'flashvid_qwen2_5_vl.*'         # a built-in sweep by name; some runs only
    flashvid-sweep run    configs/sweeps/smoke.yaml --no-reuse         # one lmms-eval process per run

Runs that differ only by compression settings share one process: the model is loaded once and each video is
decoded and encoded once for all of them (a visual-feature store; `reuse_visual: false` or --no-reuse turns it
off). Every run is still published on its own, under its own run id.

A sweep is a path to a YAML file or the name of a built-in one (`smoke`, `table1_llava_onevision`, ...: the
files of configs/sweeps/, shipped in the package, so they work from any folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import tqdm as tqdm_module

from lmms_eval_models.bundled import builtin_sweeps, resolve_sweep_file
from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.checks import check_sweep
from lmms_eval_models.sweeps.command import build_command
from lmms_eval_models.sweeps.runner import Outcome, run_runs
from lmms_eval_models.sweeps.spec import TINY_PREFIX, Launcher, Run, Sweep, SweepError, load_sweep

# How each suite model lays a video out for the LLM. Not a model_arg: the model class fixes it to the official
# scripts' setting (mm_spatial_pool_mode and newline placement there); printed by `plan` so a plan shows it.
VIDEO_LAYOUTS = {
    "flashvid_llava_onevision": "bilinear 2-D pooling to 14x14 tokens per frame, one newline token at the end",
    "flashvid_llava_video": "average pooling (stride 2) to 13x13 tokens per frame, one newline token per frame",
    "flashvid_qwen2_5_vl": "the model's own 2x2 patch merging, no extra pooling",
    "flashvid_qwen3_vl": "the model's own 2x2 patch merging, no extra pooling",
}


def load_checked(path: str | Path) -> Sweep:
    """Load, validate and check a sweep file (or a built-in sweep's name) against the installed lmms-eval,
    before anything starts."""
    sweep = load_sweep(resolve_sweep_file(path))
    check_sweep(sweep)
    return sweep


def select_runs(sweep: Sweep, patterns: Sequence[str]) -> Sweep:
    """The sweep restricted to the runs whose id matches one of the glob patterns (all runs without patterns)."""
    if not patterns:
        return sweep
    runs = tuple(run for run in sweep.runs if any(fnmatch.fnmatchcase(run.run_id, p) for p in patterns))
    if not runs:
        ids = ", ".join(run.run_id for run in sweep.runs[:4]) + (", ..." if len(sweep.runs) > 4 else "")
        raise SweepError("--only", f"no run id matches {' or '.join(map(repr, patterns))} (run ids: {ids})")
    return dataclasses.replace(sweep, runs=runs)


def describe_launcher(launcher: Launcher) -> str:
    if launcher.type == "local":
        return "local (one process: python -m lmms_eval)"
    if launcher.type == "accelerate":
        return f"accelerate (accelerate launch --num_processes {launcher.num_processes})"
    where = f"partition={launcher.partition}" if launcher.cluster == "slurm" else f"submitit {launcher.cluster} executor"
    return (f"slurm via submitit ({where}, gpus={launcher.gpus}, time={launcher.time_min} min, "
            f"num_processes={launcher.num_processes}"
            + (f", cpus_per_task={launcher.cpus_per_task}" if launcher.cpus_per_task else "")
            + (f", mem_gb={launcher.mem_gb}" if launcher.mem_gb else "") + ")")


def reuse_lines(sweep: Sweep, store_dir: Path | None, reuse: bool) -> list[str]:
    """How the runs share models and the visual-feature store (plan and run print it)."""
    from lmms_eval_models.sweeps.grouping import plan_groups

    if not reuse:
        return ["visual reuse: off (one lmms-eval process per run)"]
    groups, alone = plan_groups(sweep.runs)
    settings = sweep.feature_store
    where = f"folder {store_dir}" if store_dir is not None else "memory only"
    lines = [f"visual reuse: {len(groups)} group(s) of runs sharing one model load and one visual pass per video; "
             f"feature store: {where} (memory {settings.memory_gb:g} GiB, disk {settings.disk_gb:g} GiB)"]
    lines += [f"  group {index}: {group.model}, {len(group.runs)} run(s)" for index, group in enumerate(groups, 1)]
    if alone:
        lines.append(f"  {len(alone)} run(s) on their own (not a suite model, or per-process lmms-eval flags)")
    return lines


def run_command(sweep: Sweep, run: Run, sweep_dir: Path) -> list[str]:
    """The exact argument list `run` executes for this run (tiny:<family> values are resolved at launch)."""
    return build_command(run, sweep.launcher, store.attempt_dir(sweep_dir, run.run_id) / store.LMMS_EVAL_DIR)


def plan_lines(sweep: Sweep, sweep_dir: Path, store_dir: Path | None = None, reuse: bool | None = None) -> list[str]:
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} run(s); launcher {describe_launcher(sweep.launcher)}",
             f"output: {sweep_dir}/runs/<run id>  (seed{'s' if len(sweep.seeds) > 1 else ''} "
             f"{', '.join(map(str, sweep.seeds))}, limit {sweep.limit})",
             *reuse_lines(sweep, store_dir if reuse is not None else sweep.store_dir(),
                          sweep.reuse_visual if reuse is None else reuse)]
    if sweep.description:
        lines.append(f"about: {sweep.description}")
    for index, run in enumerate(sweep.runs, 1):
        state = "finished" if store.is_finished(sweep_dir, run.run_id) else "pending"
        lines += [
            "",
            f"[{index}/{len(sweep.runs)}] {run.label or run.name}  id={run.run_id}  ({state})",
            f"  model: {run.model}",
            *([f"  pooling: {VIDEO_LAYOUTS[run.model]} (fixed by the model class)"] if run.model in VIDEO_LAYOUTS else []),
            "  model_args: " + ",".join(f"{k}={v}" for k, v in _rendered(run).items()),
            f"  tasks: {','.join(run.tasks)}",
            "  $ " + shlex.join(run_command(sweep, run, sweep_dir)),
        ]
    if any(isinstance(v, str) and v.startswith(TINY_PREFIX) for run in sweep.runs for v in run.model_args.values()):
        lines += ["", f"note: {TINY_PREFIX}<family> is replaced by that tiny checkpoint's folder at launch "
                      "(built once and cached; see lmms_eval_models.tiny_checkpoints)"]
    return lines


def _rendered(run: Run) -> dict[str, str]:
    from lmms_eval_models.sweeps.spec import render_value

    return {key: render_value(value) for key, value in run.model_args.items()}


def run_state(sweep_dir: Path, run_id: str) -> str:
    if store.is_finished(sweep_dir, run_id):
        return "finished"
    if store.is_locked(sweep_dir, run_id):
        return "running"
    if store.failed_dir(sweep_dir, run_id).exists():
        return "failed"
    return "pending"


def status_lines(sweep: Sweep, sweep_dir: Path) -> list[str]:
    states = {run.run_id: run_state(sweep_dir, run.run_id) for run in sweep.runs}
    width = max(len(run.run_id) for run in sweep.runs)
    lines = [f"sweep {sweep.name} in {sweep_dir}"]
    for run in sweep.runs:
        seconds = ""
        if states[run.run_id] == "finished":
            seconds = f"{store.read_manifest(store.finished_dir(sweep_dir, run.run_id)).get('seconds', 0):.0f} s"
        lines.append(f"  {states[run.run_id]:<9} {run.run_id:<{width}}  {run.label or run.name}  {seconds}")
    counts = {state: list(states.values()).count(state) for state in ("finished", "running", "failed", "pending")}
    lines.append("  " + ", ".join(f"{count} {state}" for state, count in counts.items()))
    return lines


def summary_lines(outcomes: Sequence[Outcome], skipped: int) -> list[str]:
    lines = ["", "summary:"]
    for outcome in outcomes:
        took = f"{outcome.seconds:.0f} s" if outcome.seconds else ""
        lines.append(f"  {outcome.status:<9} {outcome.run_id}  {took}")
    statuses = [outcome.status for outcome in outcomes]
    lines.append(f"  {statuses.count('finished')} finished now, {skipped + statuses.count('skipped')} already "
                 f"finished (skipped), {statuses.count('failed')} failed, {statuses.count('busy')} running elsewhere, "
                 f"{statuses.count('duplicate')} published by another process")
    return lines


def _report_outcome(outcome: Outcome) -> None:
    # One line per run as it ends, so logs without a terminal (CI, SLURM) show progress too.
    took = f" in {outcome.seconds:.0f} s" if outcome.seconds else ""
    tqdm_module.tqdm.write(f"{outcome.status} {outcome.run_id}{took}")
    if outcome.status == "failed":
        tqdm_module.tqdm.write(f"run {outcome.run_id} FAILED: {outcome.detail}", file=sys.stderr)


def cmd_run(sweep: Sweep, sweep_dir: Path, stream: bool, report: bool, reuse: bool = True,
            store_dir: Path | None = None) -> int:
    pending = [run for run in sweep.runs if not store.is_finished(sweep_dir, run.run_id)]
    skipped = len(sweep.runs) - len(pending)
    print(f"sweep {sweep.name}: {len(sweep.runs)} run(s), {skipped} already finished, {len(pending)} to run; "
          f"launcher {describe_launcher(sweep.launcher)}; output {sweep_dir}", flush=True)
    if pending:
        print("\n".join(reuse_lines(dataclasses.replace(sweep, runs=tuple(pending)), store_dir, reuse)), flush=True)
    outcomes = run_runs(sweep, pending, sweep_dir, stream=stream, reuse=reuse, store_dir=store_dir,
                        on_outcome=_report_outcome)
    print("\n".join(summary_lines(outcomes, skipped)), flush=True)
    unfinished = [run for run in sweep.runs if not store.is_finished(sweep_dir, run.run_id)]
    if report and not unfinished:
        from lmms_eval_models.report import report_sweep

        report_sweep(sweep, sweep_dir, print_table=True)
    elif unfinished:
        print(f"{len(unfinished)} run(s) not finished: rerun the same command to resume", flush=True)
    return 1 if unfinished else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashvid-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "print every run and its exact command line"),
                       ("run", "run the runs that have not finished (resumable), then write the report"),
                       ("status", "show which runs are finished, running, failed or pending")):
        command = sub.add_parser(name, help=text, description=text)
        command.add_argument("sweep_file", metavar="SWEEP",
                             help="a sweep YAML file, or a built-in sweep's name: " + ", ".join(builtin_sweeps()))
        command.add_argument("--output-root", default=None, help="folder holding the sweep's run folders (overrides the sweep file's output_root)")
        if name in ("plan", "run"):
            command.add_argument("--only", action="append", default=[], metavar="PATTERN",
                                 help="only the runs whose id matches this glob (repeatable), e.g. "
                                      "'flashvid_llava_onevision.vanilla-*'; the others are left untouched")
        if name == "run":
            command.add_argument("--stream", action="store_true", help="show lmms-eval's output live (otherwise it goes to each run's log.txt)")
            command.add_argument("--no-report", action="store_true", help="do not write the report (tables and plot) when every run has finished")
            command.add_argument("--no-reuse", action="store_true",
                                 help="one lmms-eval process per run: no shared model, no visual-feature store "
                                      "(as the sweep file's reuse_visual: false)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tqdm_module.tqdm.monitor_interval = 0  # no monitor thread: children are forked with a pre-exec hook
    try:
        sweep = select_runs(load_checked(args.sweep_file), getattr(args, "only", []))
    except SweepError as error:
        print(f"flashvid-sweep: invalid sweep file {args.sweep_file}: {error}", file=sys.stderr)
        return 2
    sweep_dir = sweep.sweep_dir(args.output_root)
    store_dir = sweep.store_dir(args.output_root)
    if args.command == "plan":
        print("\n".join(plan_lines(sweep, sweep_dir, store_dir, sweep.reuse_visual)))
        return 0
    if args.command == "status":
        print("\n".join(status_lines(sweep, sweep_dir)))
        return 0
    try:
        return cmd_run(sweep, sweep_dir, stream=args.stream, report=not args.no_report,
                       reuse=sweep.reuse_visual and not args.no_reuse, store_dir=store_dir)
    except KeyboardInterrupt:
        # The interrupted run stays unpublished; its attempt folder is restarted by the next `run`.
        print("\ninterrupted: finished runs are kept; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
