"""Checks against the installed lmms-eval that need no model and no task indexing: model ids and task names.

lmms-eval's own TaskManager takes tens of seconds to index its ~2,000 task YAMLs; reading the `task:`, `group:`
and `tag:` lines directly takes well under a second and lets a bad sweep fail before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import io
import re
import sys
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

from lmms_eval_models.bundled import resolve_include_path, resource_root
from lmms_eval_models.models import MODEL_CLASSES
from lmms_eval_models.sweeps.spec import TINY_PREFIX, Run, Sweep, SweepError, render_model_args

_NAME_LINE = re.compile(r"^(task|group|tag)\s*:\s*(.*?)\s*$")
_LIST_ITEM = re.compile(r"^\s+-\s+(['\"]?)([^'\"#\s]+)\1\s*(#.*)?$")


def _names_in_yaml(text: str) -> set[str]:
    """Top-level task/group/tag names of one task YAML (scalar, inline list or block list)."""
    names: set[str] = set()
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = _NAME_LINE.match(line)
        if not match:
            continue
        value = match.group(2).split(" #")[0].strip()
        if value.startswith("["):
            names.update(part.strip().strip("'\"") for part in value.strip("[]").split(","))
        elif value:
            names.add(value.strip("'\""))
        else:
            for item in lines[index + 1:]:
                listed = _LIST_ITEM.match(item)
                if not listed:
                    break
                names.add(listed.group(2))
    return {name for name in names if name and not name.startswith("{")}


def _task_files(root: Path) -> Iterable[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and (path.suffix in (".yaml", ".yml") or path.name.endswith("_yaml")):
            yield path


@cache
def _names_under(root: str) -> frozenset[str]:
    names: set[str] = set()
    for path in _task_files(Path(root)):
        try:
            names |= _names_in_yaml(path.read_text(errors="replace"))
        except OSError:
            continue
    return frozenset(names)


def builtin_task_root() -> Path:
    import lmms_eval

    return Path(lmms_eval.__file__).resolve().parent / "tasks"


def known_task_names(include_paths: Iterable[str | Path] = ()) -> frozenset[str]:
    names = set(_names_under(str(builtin_task_root())))
    for include in include_paths:
        names |= _names_under(str(resolve_include_path(include).resolve()))
    return frozenset(names)


def known_model_ids() -> frozenset[str]:
    """lmms-eval's model ids and aliases, including entry-point plugins (imports no model code)."""
    import lmms_eval.models

    return frozenset(lmms_eval.models.list_available_models(include_aliases=True))


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_sweep(sweep: Sweep) -> None:
    """Model ids, task names, include paths and tiny-checkpoint families: raise SweepError naming the key."""
    for index, include in enumerate(sweep.include_path):
        if not resolve_include_path(include).is_dir():
            raise SweepError(f"include_path[{index}]",
                             f"{include} is not a folder (relative paths resolve against {Path.cwd()}, "
                             f"then against the suite's bundled {resource_root()})")
    models = known_model_ids()
    several = len(sweep.models) > 1
    for index, entry in enumerate(sweep.models):
        key = f"models[{index}].model" if several else "model"
        if entry.model not in models:
            raise SweepError(key, f"unknown lmms-eval model id {entry.model!r}{_did_you_mean(entry.model, models)}")
        for arg, value in entry.model_args.items():
            if isinstance(value, str) and value.startswith(TINY_PREFIX):
                _check_tiny_family(value, f"{key}_args.{arg}" if not several else f"models[{index}].model_args.{arg}")
    for run in sweep.runs:
        for arg, value in run.model_args.items():
            if isinstance(value, str) and value.startswith(TINY_PREFIX):
                _check_tiny_family(value, f"points/grid.{arg}")
    tasks = known_task_names(sweep.include_path)
    for task in dict.fromkeys(task for run in sweep.runs for task in run.tasks):
        if task not in tasks:
            index = sweep.tasks.index(task) if task in sweep.tasks else None
            key = f"tasks[{index}]" if index is not None else "grid.tasks"
            raise SweepError(key, f"unknown task {task!r}{_did_you_mean(task, tasks)}")
    check_lmms_eval_args(sweep.lmms_eval_args)
    check_model_args(sweep.runs)


def check_model_args(runs: Sequence[Run]) -> None:
    """Each run's model_args against its suite model class, as lmms-eval will hand them over (rendered to the
    `--model_args` string and parsed back by lmms-eval's own parser): unknown keys with the closest valid name,
    FlashVID and baseline values and ranges. Nothing is loaded; runs of lmms-eval's own models are not checked."""
    from lmms_eval.utils import simple_parse_args_string

    checked: set[tuple[str, str]] = set()
    for run in runs:
        rendered = render_model_args(run.model_args)
        if run.model not in MODEL_CLASSES or (run.model, rendered) in checked:
            continue
        checked.add((run.model, rendered))
        try:
            model_class(run.model).check_model_args(simple_parse_args_string(rendered))
        except ValueError as error:
            raise SweepError(f"run {run.name!r} ({run.model}) model_args", str(error)) from None


@cache
def model_class(model: str) -> type:
    """The suite's lmms-eval class of `model` (imports its module: transformers and lmms-eval's base class)."""
    module, name = MODEL_CLASSES[model].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@cache
def lmms_eval_parser() -> argparse.ArgumentParser:
    """lmms-eval 0.7.3's own CLI parser. `parse_eval_args` builds it and parses sys.argv, so it is called with
    an argument-less argv (every lmms-eval flag has a default)."""
    from lmms_eval.__main__ import parse_eval_args

    saved = sys.argv
    sys.argv = ["lmms_eval"]
    try:
        parser, _ = parse_eval_args()
    finally:
        sys.argv = saved
    return parser


def check_lmms_eval_args(args: Sequence[str]) -> None:
    """Each flag of `lmms_eval_args` must be one of lmms-eval's own, spelled out (argparse would take an
    abbreviation, which could hide a flag the suite sets), and the list must parse as lmms-eval parses it."""
    if not args:
        return
    parser = lmms_eval_parser()
    known = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    for index, arg in enumerate(args):
        flag = arg.split("=", 1)[0]
        if arg.startswith("-") and not _is_number(arg) and flag not in known:
            raise SweepError(f"lmms_eval_args[{index}]",
                             f"unknown lmms-eval flag {flag!r}{_did_you_mean(flag, known)}")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(list(args))
    except SystemExit:
        message = errors.getvalue().strip().splitlines()
        raise SweepError("lmms_eval_args", f"lmms-eval rejects {list(args)}: "
                                           f"{message[-1] if message else 'invalid arguments'}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


TINY_FAMILIES = ("llava_onevision", "llava_video", "qwen2_5_vl", "qwen3_vl")


def _check_tiny_family(value: str, key: str) -> None:
    family = value[len(TINY_PREFIX):]
    if family not in TINY_FAMILIES:
        raise SweepError(key, f"unknown tiny checkpoint family {family!r}; families are {', '.join(TINY_FAMILIES)}")
