"""One sweep group in one process: the model is loaded once and lmms-eval's evaluator runs once per run with it.

    python -m lmms_eval_models.sweeps.group_worker <group folder>/spec.json      (or under `accelerate launch`)

The sweep runner (`runner.execute_group`) holds the runs' locks, prepares a fresh attempt folder per run and
writes the spec; this process then, for each run in order:

1. sends its output to the run's `log.txt` (every rank, appending);
2. parses the run's lmms-eval arguments with lmms-eval's own parser and follows `cli_evaluate_single`
   (`evaluate_run`): the task manager, the evaluation tracker, `simple_evaluate` with the shared model object,
   then `save_results_aggregated` / `save_results_samples`, so the run's folder holds exactly the files the CLI
   writes (the model's name, not the object, in the results' `model` and `model_source` fields);
3. loads the model for the first run (as lmms-eval would: `create_from_arg_string` with the same extra
   arguments), or switches it to this run's compression settings (`FlashVIDModel.reconfigure`);
4. on rank 0, checks the results and publishes the run's folder atomically under its run id (`store.publish`),
   exactly as a run of its own is published, and writes the run's outcome for the runner.

The visual-feature store (`lmms_eval_models.models.visual_store`) serves every video's decoding and vision pass
after the first; `summary.json` says how many passes it served. A run that fails is moved to `failed/` with its
log and the group goes on with the next run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.grouping import PASS_COUNTS, passes_line
from lmms_eval_models.sweeps.spec import Run

SPEC_FILE = "spec.json"
OUTCOMES_DIR = "outcomes"
SUMMARY_FILE = "summary.json"
LOG_FORMAT = ("<green>{time:YYYY-MM-DD HH:mm:ss}</green> | <level>{level: <8}</level> | <cyan>{name}</cyan>:"
              "<cyan>{function}</cyan>:<cyan>{line}</cyan> - <level>{message}</level>")  # lmms-eval's CLI format


@dataclass(frozen=True)
class GroupRun:
    """One run of the group as the spec gives it: the run, its lmms-eval arguments (after `-m lmms_eval`), the
    command a run of its own would execute (for its manifest) and its attempt folder."""

    run: Run
    arguments: list[str]
    command: list[str]
    attempt: Path

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"run": asdict(self.run), "arguments": self.arguments, "command": self.command,
                "attempt": str(self.attempt)}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GroupRun:
        fields = dict(data["run"])
        for name in ("tasks", "include_path", "lmms_eval_args"):
            fields[name] = tuple(fields[name])
        return cls(Run(**fields), list(data["arguments"]), list(data["command"]), Path(data["attempt"]))


def write_spec(folder: Path, group_id: str, sweep_dir: Path, model: str, runs: Sequence[GroupRun],
               store_settings: Mapping[str, Any]) -> Path:
    """The spec the worker reads: the group, its runs in order and the store's settings."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OUTCOMES_DIR).mkdir(exist_ok=True)
    path = folder / SPEC_FILE
    path.write_text(json.dumps({"group_id": group_id, "sweep_dir": str(sweep_dir), "model": model,
                                "store": dict(store_settings), "runs": [run.to_json() for run in runs]},
                               indent=2))  # fmt: skip
    return path


def read_outcomes(folder: Path) -> dict[str, dict[str, Any]]:
    """The outcomes the worker has written so far, by run id."""
    outcomes = {}
    for path in sorted((folder / OUTCOMES_DIR).glob("*.json")):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            outcome = json.loads(path.read_text())
            outcomes[outcome["run_id"]] = outcome
    return outcomes


def _write_json_atomically(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so child libraries' output too) to the end
    of `path` while open."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (target, *saved):
            os.close(descriptor)


# ------------------------------------------------------------------------------------------------ one run


def parse_run_arguments(arguments: Sequence[str]) -> Any:
    """lmms-eval's own parse of a run's arguments (as `python -m lmms_eval <arguments>` would parse them)."""
    from lmms_eval_models.sweeps.checks import lmms_eval_parser

    return lmms_eval_parser().parse_args(list(arguments))


def model_extra_arguments(args: Any) -> dict[str, Any]:
    """What lmms-eval's `simple_evaluate` adds to the model_args when it creates the model itself."""
    extra = {"batch_size": args.batch_size, "max_batch_size": args.max_batch_size, "device": args.device}
    return {key: value for key, value in extra.items() if value is not None}


_TASK_INDEXES: dict[tuple, Any] = {}


def task_manager_for(verbosity: str, include_path: Any, model: str) -> Any:
    """A `TaskManager` as the CLI makes one per run, its task index (seconds to build: every task YAML of lmms-eval
    is read) built once per process: a copy of the first with fresh per-load state (its group map)."""
    import collections
    import copy

    from lmms_eval.tasks import TaskManager

    key = (verbosity, json.dumps(include_path), model)
    if key not in _TASK_INDEXES:
        _TASK_INDEXES[key] = TaskManager(verbosity, include_path=include_path, model_name=model)
    manager = copy.copy(_TASK_INDEXES[key])
    manager.task_group_map = collections.defaultdict(list)
    return manager


def evaluate_run(args: Any, lm: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """lmms-eval 0.7.3's `cli_evaluate_single` with the shared model object `lm` instead of a model name: the same
    checks, task manager, tracker and `simple_evaluate` call, the same files written. Returns (results, samples);
    (None, None) on ranks other than 0."""
    import torch
    from lmms_eval import evaluator, utils
    from lmms_eval.evaluator import request_caching_arg_to_dict
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import simple_parse_args_string
    from loguru import logger as eval_logger

    task_manager = task_manager_for(args.verbosity, args.include_path, args.model)
    if args.output_path:
        args.hf_hub_log_args += f",output_path={args.output_path}"
    if os.environ.get("HF_TOKEN", None):
        args.hf_hub_log_args += f",token={os.environ.get('HF_TOKEN')}"
    evaluation_tracker = EvaluationTracker(**simple_parse_args_string(args.hf_hub_log_args))
    if args.predict_only:
        args.log_samples = True
    if (args.log_samples or args.predict_only) and not args.output_path:
        raise ValueError("Specify --output_path if providing --log_samples or --predict_only")
    if args.fewshot_as_multiturn and args.apply_chat_template is False:
        raise ValueError("If fewshot_as_multiturn is set, apply_chat_template must be set to True.")
    if (args.num_fewshot is None or args.num_fewshot == 0) and args.fewshot_as_multiturn:
        raise ValueError("If fewshot_as_multiturn is set, num_fewshot must be greater than 0.")
    if args.limit is not None and args.limit != -1:
        eval_logger.warning(" --limit SHOULD ONLY BE USED FOR TESTING.REAL METRICS SHOULD NOT BE COMPUTED USING LIMIT.")
    if args.limit is not None and args.limit < 0 and args.limit != -1:
        raise ValueError("--limit must be -1 or non-negative")
    if args.offset < 0:
        raise ValueError("--offset must be >= 0")
    if os.environ.get("LMMS_EVAL_PLUGINS", None):
        import importlib.util

        args.include_path = [args.include_path] if args.include_path else []
        for plugin in os.environ["LMMS_EVAL_PLUGINS"].split(","):
            args.include_path.append(importlib.util.find_spec(f"{plugin}.tasks").submodule_search_locations[0])
    task_list = args.tasks.split(",")
    task_names = task_manager.match_tasks(task_list)
    for task in [task for task in task_list if task not in task_names]:
        if os.path.isfile(task):
            task_names.append(utils.load_yaml_config(task))
    missing = [task for task in task_list if task not in task_names and "*" not in task]
    if missing:
        raise ValueError(f"Tasks not found: {', '.join(missing)}")
    eval_logger.info(f"Selected Tasks: {task_names}")
    datetime_str = utils.get_datetime_str(timezone=args.timezone)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    results = evaluator.simple_evaluate(
        model=lm, model_args=args.model_args, tasks=task_names, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, max_batch_size=args.max_batch_size, device=args.device, use_cache=args.use_cache,
        limit=args.limit, offset=args.offset, check_integrity=args.check_integrity, write_out=args.write_out,
        log_samples=args.log_samples, evaluation_tracker=evaluation_tracker,
        system_instruction=args.system_instruction, apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn, gen_kwargs=args.gen_kwargs, task_manager=task_manager,
        verbosity=args.verbosity, predict_only=args.predict_only, random_seed=args.seed[0],
        numpy_random_seed=args.seed[1], torch_random_seed=args.seed[2], fewshot_random_seed=args.seed[3],
        cli_args=args, datetime_str=datetime_str,
        distributed_executor_backend="torchrun" if distributed else "accelerate", force_simple=args.force_simple,
        launcher_args=args.launcher_args, repeats=args.repeats, baseline=args.baseline, max_tokens=args.max_tokens,
        process_docs_parallel=getattr(args, "process_docs_parallel", 4),
        **request_caching_arg_to_dict(cache_requests=args.cache_requests),
    )  # fmt: skip
    if results is None:
        return None, None
    # Given a model name, simple_evaluate records the name; given the object, its checkpoint path and the
    # object itself: record what the CLI records.
    results["config"]["model"] = args.model
    evaluation_tracker.general_config_tracker.model_source = args.model
    samples = results.pop("samples") if args.log_samples else None
    evaluation_tracker.save_results_aggregated(results=results, samples=samples if args.log_samples else None,
                                               datetime_str=datetime_str)  # fmt: skip
    if args.log_samples:
        for task_name in results["configs"]:
            evaluation_tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    if evaluation_tracker.push_results_to_hub or evaluation_tracker.push_samples_to_hub:
        evaluation_tracker.recreate_metadata_card()
    print(f"{args.model} ({args.model_args}), gen_kwargs: ({args.gen_kwargs}), limit: {args.limit}, offset: "
          f"{args.offset}, num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}")  # fmt: skip
    print(utils.make_table(results))
    if "groups" in results:
        print(utils.make_table(results, "groups"))
    return results, samples


# ------------------------------------------------------------------------------------------------ the group


class SharedModel:
    """The group's one model: loaded for the first run, reconfigured for each later one, its videos served from
    the group's visual store."""

    def __init__(self, model: str, store_settings: Mapping[str, Any]) -> None:
        self.model_name = model
        self.store_settings = dict(store_settings)
        self.lm: Any = None
        self.visual_store: Any = None

    def for_run(self, args: Any) -> Any:
        from lmms_eval.utils import simple_parse_args_string

        from lmms_eval_models.sweeps.checks import model_class

        extra = model_extra_arguments(args)
        if self.lm is None:
            self.lm = model_class(self.model_name).create_from_arg_string(args.model_args, extra)
            self.lm.keep_between_runs()
            self.lm.attach_visual_store(self._visual_store())
        else:
            self.lm.reconfigure(**simple_parse_args_string(args.model_args), **extra)
        return self.lm

    def _visual_store(self) -> Any:
        from lmms_eval_models.feature_store import FeatureStore
        from lmms_eval_models.models.visual_store import VisualStore

        settings = self.store_settings
        features = FeatureStore(memory_bytes=settings["memory_bytes"], directory=settings["folder"],
                                disk_bytes=settings["disk_bytes"])  # fmt: skip
        self.visual_store = VisualStore(features, keep_statistic=settings["keep_statistic"])
        return self.visual_store

    def passes(self) -> dict[str, int]:
        """The visual passes served from the store and computed so far, summed over the processes (collective:
        every rank calls it)."""
        import torch

        counts = self.visual_store.pass_counts() if self.visual_store is not None else dict.fromkeys(PASS_COUNTS, 0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, counts)
            counts = {name: sum(rank[name] for rank in gathered) for name in counts}
        return counts


def run_one(entry: GroupRun, shared: SharedModel, sweep_dir: Path, group: Mapping[str, Any],
            is_main_process: bool, wait_for_everyone: Any) -> dict[str, Any]:
    """Evaluate one run of the group with the shared model and (rank 0) publish it; its outcome."""
    from lmms_eval_models.sweeps.runner import manifest_of

    run = entry.run
    started = time.monotonic()
    before = shared.passes()
    log_path = entry.attempt / store.LOG_FILE
    error = None
    with output_to(log_path):
        if is_main_process:
            print("$ " + " ".join(entry.command))
            print(f"# sweep group {group['group_id']}: run {group['position']} of {group['size']}, one shared "
                  "model, visual passes served from the group's feature store", flush=True)  # fmt: skip
        try:
            from loguru import logger as eval_logger

            args = parse_run_arguments(entry.arguments)
            eval_logger.remove()
            eval_logger.add(sys.stdout, colorize=True, level=args.verbosity, format=LOG_FORMAT)
            os.environ["VERBOSITY"] = args.verbosity
            evaluate_run(args, shared.for_run(args))
        except Exception as exception:  # the CLI logs a run's error and goes on with the next config
            traceback.print_exc()
            error = f"{type(exception).__name__}: {exception}"
        wait_for_everyone()
        after = shared.passes()
        passes = {name: after[name] - before.get(name, 0) for name in after}
        if is_main_process:

            print(f"# this run's visual passes: {passes_line(passes)}", flush=True)
    seconds = time.monotonic() - started
    if not is_main_process:
        return {}
    problem = error or store.check_complete(entry.attempt, run.tasks)
    if problem:
        kept = store.keep_failed(entry.attempt, sweep_dir, run.run_id)
        return {"run_id": run.run_id, "status": "failed", "seconds": seconds,
                "detail": f"{problem}; log: {kept / store.LOG_FILE}"}  # fmt: skip
    manifest = manifest_of(run, entry.command, seconds)
    manifest["group"] = {**group, "visual_passes": passes}
    published = store.publish(entry.attempt, sweep_dir, run.run_id, manifest)
    return {"run_id": run.run_id, "status": "finished" if published else "duplicate", "seconds": seconds,
            "detail": ""}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m lmms_eval_models.sweeps.group_worker <group folder>/spec.json", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    folder = spec_path.parent
    sweep_dir = Path(spec["sweep_dir"])
    runs = [GroupRun.from_json(data) for data in spec["runs"]]

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # As lmms-eval's CLI, one accelerator for the process (outside an existing torch.distributed context).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        is_main_process, wait_for_everyone = torch.distributed.get_rank() == 0, torch.distributed.barrier
    else:
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60000))])
        is_main_process, wait_for_everyone = accelerator.is_main_process, accelerator.wait_for_everyone

    shared = SharedModel(spec["model"], spec["store"])
    for position, entry in enumerate(runs, 1):
        group = {"group_id": spec["group_id"], "position": position, "size": len(runs)}
        outcome = run_one(entry, shared, sweep_dir, group, is_main_process, wait_for_everyone)
        passes = shared.passes()
        if is_main_process:
            _write_json_atomically(folder / OUTCOMES_DIR / f"{entry.run.run_id}.json", outcome)
            _write_json_atomically(folder / SUMMARY_FILE, {"passes": passes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
