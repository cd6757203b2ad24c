"""Sweep files: load, validate (errors name the offending key), and expand into runs with deterministic ids.

A sweep file (YAML) describes one or more lmms-eval models, their base `model_args`, the tasks, and the runs:
explicit `points` and/or a `grid` (a cartesian product over any model_args). See docs/sweeps.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Scalar = str | int | float | bool

TOP_LEVEL_KEYS = (
    "name", "description", "model", "model_args", "models", "tasks", "include_path", "grid", "points",
    "launcher", "output_root", "seed", "seeds", "limit", "batch_size", "gen_kwargs", "lmms_eval_args", "paper",
    "reuse_visual", "feature_store",
)
FEATURE_STORE_KEYS = ("memory_gb", "disk_gb", "folder")
DEFAULT_STORE_FOLDER = "feature_store"  # under the output root: shared by the sweeps written there
MODEL_ENTRY_KEYS = ("name", "model", "model_args")
# Keys of a point or grid that set a run's lmms-eval settings instead of a model_arg. `seeds` (not `seed`):
# `seed` is a model_arg of the random and FastVID methods.
RUN_AXIS_KEYS = ("seeds", "tasks", "gen_kwargs")
POINT_RESERVED_KEYS = ("name", "label", "reference", "models", *RUN_AXIS_KEYS)
GRID_RESERVED_KEYS = ("label", "models", *RUN_AXIS_KEYS)
# lmms-eval flags the suite sets itself for every run: `lmms_eval_args` may not repeat them.
SUITE_OWNED_FLAGS = ("--model", "--model_args", "--tasks", "--output_path", "--seed", "--log_samples",
                     "--include_path", "--limit", "--batch_size", "--gen_kwargs")
LAUNCHER_TYPES = ("local", "accelerate", "slurm")
LAUNCHER_KEYS = {
    "local": ("type",),
    "accelerate": ("type", "num_processes", "main_process_port"),
    "slurm": ("type", "partition", "gpus", "time", "cpus_per_task", "mem_gb", "cluster", "num_processes",
              "main_process_port", "additional_parameters"),
}
SUBMITIT_CLUSTERS = ("slurm", "local", "debug")
PAPER_KEYS = ("table", "match", "where")
# Prefix of a model_args value that names a tiny checkpoint family, resolved (built if needed) before launch.
TINY_PREFIX = "tiny:"


class SweepError(ValueError):
    """A sweep file is invalid; the message starts with the offending key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Launcher:
    """How each run is started: in this process's machine, through `accelerate launch`, or as a SLURM job."""

    type: str = "local"
    num_processes: int = 1
    main_process_port: int | None = None
    partition: str | None = None
    gpus: int = 1
    time_min: int = 60
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    cluster: str = "slurm"
    additional_parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreSettings:
    """The visual-feature store of grouped runs (`feature_store:`): memory and disk budgets in GiB, and the folder
    (None: the default `<output_root>/feature_store`; False: memory only)."""

    memory_gb: float = 4.0
    disk_gb: float = 200.0
    folder: str | bool | None = None

    def directory(self, output_root: str | Path) -> Path | None:
        if self.folder is False:
            return None
        return Path(output_root) / DEFAULT_STORE_FOLDER if self.folder in (None, True) else Path(str(self.folder))

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * (1 << 30))

    @property
    def disk_bytes(self) -> int:
        return int(self.disk_gb * (1 << 30))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model: str
    model_args: Mapping[str, Scalar]


@dataclass(frozen=True)
class PaperRef:
    """Which table of results/paper/ the report compares against, and how runs find their paper row."""

    table: str
    match: Mapping[str, str]
    where: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One lmms-eval invocation. `settings()` is what the id is derived from (nothing machine-specific)."""

    sweep: str
    run_id: str
    model_entry: str
    model: str
    model_args: Mapping[str, Scalar]
    tasks: tuple[str, ...]
    include_path: tuple[str, ...]
    limit: int | float | None
    seed: int
    batch_size: int
    gen_kwargs: str | None
    name: str
    label: str | None
    reference: bool
    order: int
    lmms_eval_args: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        return run_settings(self.model, self.model_args, self.tasks, self.include_path, self.limit, self.seed,
                            self.batch_size, self.gen_kwargs, self.lmms_eval_args)

    def cell_key(self) -> str:
        """What runs that differ only by their seed share: the report aggregates them into one cell."""
        return settings_hash({**self.settings(), "seed": None, "label": self.label, "name": self.name})


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path | None
    description: str
    models: tuple[ModelEntry, ...]
    tasks: tuple[str, ...]
    include_path: tuple[str, ...]
    launcher: Launcher
    output_root: str
    seed: int
    limit: int | float | None
    batch_size: int
    gen_kwargs: str | None
    paper: PaperRef | None
    runs: tuple[Run, ...]
    seeds: tuple[int, ...] = (0,)
    lmms_eval_args: tuple[str, ...] = ()
    reuse_visual: bool = True
    feature_store: StoreSettings = field(default_factory=StoreSettings)

    def sweep_dir(self, output_root: str | Path | None = None) -> Path:
        return Path(output_root if output_root is not None else self.output_root) / self.name

    def store_dir(self, output_root: str | Path | None = None) -> Path | None:
        """The visual-feature store's folder (None: memory only)."""
        return self.feature_store.directory(output_root if output_root is not None else self.output_root)


# ----------------------------------------------------------------------------------------------- helpers


def _check_keys(mapping: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise SweepError(f"{where}{key}", f"unknown key; allowed keys are {', '.join(allowed)}")


def _require_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SweepError(key, f"must be a mapping, got {type(value).__name__}")
    return value


def _require_int(value: Any, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepError(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _check_scalar(value: Any, key: str) -> Scalar:
    # lmms-eval parses model_args as "k=v,k=v": a value cannot hold a comma or '=', and None has no spelling
    # (it would arrive as the string "None"): leave such a key out instead.
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        if "," in value or "=" in value or not value.strip():
            raise SweepError(key, f"value {value!r} must be non-empty and contain neither ',' nor '='")
        return value
    raise SweepError(key, f"must be a string, number or boolean, got {value!r} (leave the key out for a default)")


def _check_model_args(mapping: Any, key: str) -> dict[str, Scalar]:
    mapping = _require_mapping(mapping, key)
    out: dict[str, Scalar] = {}
    for arg, value in mapping.items():
        if not isinstance(arg, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", arg):
            raise SweepError(f"{key}.{arg}", "model_args keys must be identifiers")
        out[arg] = _check_scalar(value, f"{key}.{arg}")
    return out


def render_value(value: Scalar) -> str:
    """A model_args value as lmms-eval's "k=v" parser reads it back (bools as True/False, floats by repr)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def render_model_args(model_args: Mapping[str, Scalar]) -> str:
    return ",".join(f"{key}={render_value(value)}" for key, value in model_args.items())


def run_settings(model: str, model_args: Mapping[str, Scalar], tasks: Sequence[str], include_path: Sequence[str],
                 limit: int | float | None, seed: int, batch_size: int, gen_kwargs: str | None,
                 extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """What a run id hashes. `lmms_eval_args` only when given, so the ids of older sweep files do not change."""
    settings = {
        "model": model,
        "model_args": {key: model_args[key] for key in sorted(model_args)},
        "tasks": list(tasks),
        "include_path": list(include_path),
        "limit": limit,
        "seed": seed,
        "batch_size": batch_size,
        "gen_kwargs": gen_kwargs,
    }
    if extra_args:
        settings["lmms_eval_args"] = list(extra_args)
    return settings


def settings_hash(settings: Mapping[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:100] or "run"


METHOD_NAMES = {"flashvid": "FlashVID", "fastv": "FastV", "visionzip": "VisionZip", "divprune": "DivPrune",
                "fastvid": "FastVID", "uniform": "Uniform", "random": "Random", "none": "Vanilla",
                "prunevid": "PruneVID"}
FRAME_KEYS = ("max_frames_num", "max_num_frames", "num_frames")


def method_of(model_args: Mapping[str, Scalar]) -> str:
    """The paper's method name of a run: `method` (baselines) or enable_flashvid (FlashVID vs vanilla)."""
    if "method" in model_args:
        return METHOD_NAMES.get(str(model_args["method"]).lower(), str(model_args["method"]))
    enabled = model_args.get("enable_flashvid", True)
    if enabled is False or str(enabled).lower() == "false":
        return "Vanilla"
    return "FlashVID" if "enable_flashvid" in model_args or "retention_ratio" in model_args else "—"


def make_run_id(model: str, model_args: Mapping[str, Scalar], settings: Mapping[str, Any]) -> str:
    """`<model>.<method>[-r<R>][-f<frames>]-<hash>`: readable, and unique by the hash of all settings."""
    method = method_of(model_args)
    parts = [method.lower() if method != "—" else "run"]
    if method != "Vanilla" and "retention_ratio" in model_args:
        parts.append(f"r{render_value(model_args['retention_ratio'])}")
    frames = next((model_args[key] for key in FRAME_KEYS if key in model_args), None)
    if frames is not None:
        parts.append(f"f{render_value(frames)}")
    return f"{_slug(model + '.' + '-'.join(parts))}-{settings_hash(settings)}"


# ------------------------------------------------------------------------------------------------ parsing


def _parse_launcher(raw: Any) -> Launcher:
    if raw is None:
        return Launcher()
    if isinstance(raw, str):
        raw = {"type": raw}
    raw = _require_mapping(raw, "launcher")
    kind = raw.get("type", "local")
    if kind not in LAUNCHER_TYPES:
        raise SweepError("launcher.type", f"must be one of {', '.join(LAUNCHER_TYPES)}, got {kind!r}")
    _check_keys(raw, LAUNCHER_KEYS[kind], "launcher.")
    gpus = _require_int(raw.get("gpus", 1), "launcher.gpus", 0)
    default_processes = max(1, gpus) if kind == "slurm" else 1
    num_processes = _require_int(raw.get("num_processes", default_processes), "launcher.num_processes", 1)
    port = raw.get("main_process_port")
    if port is not None:
        port = _require_int(port, "launcher.main_process_port", 1)
    cluster = raw.get("cluster", "slurm")
    if cluster not in SUBMITIT_CLUSTERS:
        raise SweepError("launcher.cluster", f"must be one of {', '.join(SUBMITIT_CLUSTERS)}, got {cluster!r}")
    partition = raw.get("partition")
    if kind == "slurm" and cluster == "slurm" and not partition:
        raise SweepError("launcher.partition", "is required for a SLURM launcher")
    extra = _require_mapping(raw.get("additional_parameters", {}), "launcher.additional_parameters")
    return Launcher(
        type=kind, num_processes=num_processes, main_process_port=port, partition=partition, gpus=gpus,
        time_min=parse_time_minutes(raw.get("time", 60)),
        cpus_per_task=None if raw.get("cpus_per_task") is None else _require_int(raw["cpus_per_task"],
                                                                               "launcher.cpus_per_task", 1),
        mem_gb=None if raw.get("mem_gb") is None else _require_int(raw["mem_gb"], "launcher.mem_gb", 1),
        cluster=cluster, additional_parameters=dict(extra),
    )


def parse_time_minutes(value: Any) -> int:
    """SLURM-style time: minutes as an integer, or "HH:MM:SS" / "D-HH:MM:SS"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})", str(value))
    if not match:
        raise SweepError("launcher.time", f"must be minutes (integer > 0) or HH:MM:SS, got {value!r}")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))


def _parse_models(raw: Mapping[str, Any]) -> tuple[ModelEntry, ...]:
    if "models" in raw:
        if "model" in raw or "model_args" in raw:
            raise SweepError("models", "give either `models` (a list) or `model` with `model_args`, not both")
        entries = raw["models"]
        if not isinstance(entries, list) or not entries:
            raise SweepError("models", "must be a non-empty list of {name, model, model_args}")
        models = []
        for index, entry in enumerate(entries):
            key = f"models[{index}]"
            entry = _require_mapping(entry, key)
            _check_keys(entry, MODEL_ENTRY_KEYS, f"{key}.")
            model = entry.get("model")
            if not isinstance(model, str) or not model:
                raise SweepError(f"{key}.model", "is required (an lmms-eval model id)")
            name = str(entry.get("name", model))
            models.append(ModelEntry(name, model, _check_model_args(entry.get("model_args", {}),
                                                                      f"{key}.model_args")))
        names = [entry.name for entry in models]
        if len(set(names)) != len(names):
            raise SweepError("models", f"entry names must be unique, got {names}")
        return tuple(models)
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise SweepError("model", "is required (an lmms-eval model id), or give a `models` list")
    return (ModelEntry(model, model, _check_model_args(raw.get("model_args", {}), "model_args")),)


def _string_list(value: Any, key: str, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise SweepError(key, "must be a list of non-empty strings")
    if not value and not allow_empty:
        raise SweepError(key, "must not be empty")
    if len(set(value)) != len(value):
        raise SweepError(key, f"has duplicates: {value}")
    return tuple(value)


def _models_filter(value: Any, key: str, models: Sequence[ModelEntry]) -> tuple[str, ...]:
    names = [entry.name for entry in models]
    if value is None:
        return tuple(names)
    chosen = _string_list(value, key)
    for name in chosen:
        if name not in names:
            raise SweepError(key, f"unknown model entry {name!r}; entries are {names}")
    return chosen


@dataclass(frozen=True)
class _PointSpec:
    name: str | None
    label: str | None
    reference: bool
    models: tuple[str, ...]
    overrides: Mapping[str, Scalar]
    is_grid: bool = False
    # Run settings a point or grid sets instead of the sweep-wide ones (None: the sweep's).
    seeds: tuple[int, ...] | None = None
    tasks: tuple[str, ...] | None = None
    gen_kwargs: str | None = None


def _parse_seeds(value: Any, key: str) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SweepError(key, "must be a non-empty list of integers >= 0")
    seeds = tuple(_require_int(seed, key, 0) for seed in values)
    if len(set(seeds)) != len(seeds):
        raise SweepError(key, f"has duplicate seeds: {list(seeds)}")
    return seeds


def _parse_gen_kwargs(value: Any, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SweepError(key, "must be a string such as 'max_new_tokens=16,temperature=0'")
    return value


def _axis_values(value: Any, key: str) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SweepError(key, "empty list of values: give at least one")
    return values


def _task_axis(value: Any, key: str) -> list[tuple[str, ...]]:
    """A grid's `tasks`: a list of task lists (or comma-separated strings), each one run's --tasks."""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        value = [value]  # one task list: a fixed axis
    choices = [_string_list(item, f"{key}[{index}]") for index, item in enumerate(_axis_values(value, key))]
    if len(set(choices)) != len(choices):
        raise SweepError(key, f"has duplicate task lists: {value}")
    return choices


def _parse_points(raw: Any, models: Sequence[ModelEntry]) -> list[_PointSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise SweepError("points", "must be a non-empty list of mappings (model_args overrides)")
    points = []
    for index, point in enumerate(raw):
        key = f"points[{index}]"
        point = _require_mapping(point, key)
        overrides = {k: v for k, v in point.items() if k not in POINT_RESERVED_KEYS}
        reference = point.get("reference", False)
        if not isinstance(reference, bool):
            raise SweepError(f"{key}.reference", "must be true or false")
        points.append(_PointSpec(
            name=None if point.get("name") is None else str(point["name"]),
            label=None if point.get("label") is None else str(point["label"]),
            reference=reference,
            models=_models_filter(point.get("models"), f"{key}.models", models),
            overrides=_check_model_args(overrides, key),
            seeds=None if "seeds" not in point else _parse_seeds(point["seeds"], f"{key}.seeds"),
            tasks=None if "tasks" not in point else _string_list(point["tasks"], f"{key}.tasks"),
            gen_kwargs=_parse_gen_kwargs(point.get("gen_kwargs"), f"{key}.gen_kwargs"),
        ))
    return points


def _parse_grid(raw: Any, models: Sequence[ModelEntry]) -> list[_PointSpec]:
    """A grid is a mapping (or a list of mappings) from model_args to value lists; scalars are fixed axes."""
    if raw is None:
        return []
    grids = raw if isinstance(raw, list) else [raw]
    if not grids:
        raise SweepError("grid", "must not be empty")
    points = []
    for index, grid in enumerate(grids):
        prefix = "grid" if not isinstance(raw, list) else f"grid[{index}]"
        grid = _require_mapping(grid, prefix)
        axes = {k: v for k, v in grid.items() if k not in GRID_RESERVED_KEYS}
        if not axes and not any(key in grid for key in RUN_AXIS_KEYS):
            raise SweepError(prefix, "must name at least one model_args key (or seeds, tasks, gen_kwargs) "
                                     "with a list of values")
        value_lists = []
        for arg, values in axes.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise SweepError(f"{prefix}.{arg}", "empty list of values: give at least one")
            checked = [_check_scalar(value, f"{prefix}.{arg}") for value in values]
            if len(set(map(repr, checked))) != len(checked):
                raise SweepError(f"{prefix}.{arg}", f"has duplicate values: {values}")
            value_lists.append(checked)
        _check_model_args({arg: lst[0] for arg, lst in zip(axes, value_lists)}, prefix)
        chosen_models = _models_filter(grid.get("models"), f"{prefix}.models", models)
        label = None if grid.get("label") is None else str(grid["label"])
        varying = [arg for arg, values in zip(axes, value_lists) if len(values) > 1]
        seeds = None if "seeds" not in grid else _parse_seeds(grid["seeds"], f"{prefix}.seeds")
        task_lists: list[tuple[str, ...] | None] = (
            [None] if "tasks" not in grid else _task_axis(grid["tasks"], f"{prefix}.tasks"))
        gen_kwargs_values = [None] if "gen_kwargs" not in grid else [
            _parse_gen_kwargs(value, f"{prefix}.gen_kwargs")
            for value in _axis_values(grid["gen_kwargs"], f"{prefix}.gen_kwargs")]
        for combo, tasks, gen_kwargs in itertools.product(itertools.product(*value_lists), task_lists,
                                                          gen_kwargs_values):
            overrides = dict(zip(axes, combo))
            # Named by the axes that vary, e.g. "FlashVID retention_ratio=0.1" (the method is added in _expand);
            # seeds are not named: runs that differ only by seed are one report cell.
            parts = [f"{arg}={render_value(overrides[arg])}" for arg in varying]
            if len(task_lists) > 1:
                parts.append(f"tasks={'+'.join(tasks or ())}")
            if len(gen_kwargs_values) > 1:
                parts.append(f"gen_kwargs={gen_kwargs}")
            points.append(_PointSpec(",".join(parts), label, False, chosen_models, overrides, is_grid=True,
                                     seeds=seeds, tasks=tasks, gen_kwargs=gen_kwargs))
    return points


def _parse_paper(raw: Any) -> PaperRef | None:
    if raw is None:
        return None
    raw = _require_mapping(raw, "paper")
    _check_keys(raw, PAPER_KEYS, "paper.")
    table = raw.get("table")
    if not isinstance(table, str) or not table:
        raise SweepError("paper.table", "is required (a table id of results/paper/paper_tables.yaml)")
    match = _require_mapping(raw.get("match", {"method": "method", "retention_ratio": "retention_ratio"}),
                             "paper.match")
    where = _require_mapping(raw.get("where", {}), "paper.where")
    return PaperRef(table, {str(k): str(v) for k, v in match.items()}, {str(k): str(v) for k, v in where.items()})


def _parse_store(raw: Any) -> StoreSettings:
    """`feature_store: {memory_gb, disk_gb, folder}`; every key optional."""
    if raw is None:
        return StoreSettings()
    raw = _require_mapping(raw, "feature_store")
    _check_keys(raw, FEATURE_STORE_KEYS, "feature_store.")
    budgets = {}
    for key in ("memory_gb", "disk_gb"):
        value = raw.get(key, getattr(StoreSettings, key))
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1 << 20:
            raise SweepError(f"feature_store.{key}", f"must be a number of GiB in [0, {1 << 20}], got {value!r}")
        budgets[key] = float(value)
    folder = raw.get("folder")
    if folder is not None and folder is not False and (not isinstance(folder, str) or not folder.strip()):
        raise SweepError("feature_store.folder", f"must be a folder path, or false (memory only), got {folder!r}")
    return StoreSettings(folder=folder, **budgets)


def _parse_reuse(value: Any) -> bool:
    if not isinstance(value, bool):
        raise SweepError("reuse_visual", f"must be true or false, got {value!r}")
    return value


def _parse_limit(value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise SweepError("limit", f"must be a positive integer (documents per task) or a fraction, got {value!r}")
    if isinstance(value, float) and value >= 1:
        raise SweepError("limit", f"a float limit is a fraction and must be < 1, got {value!r}")
    return value


def parse_sweep(raw: Any, name: str, path: Path | None = None) -> Sweep:
    """Validate a loaded sweep document and expand it into runs. Raises SweepError naming the bad key."""
    raw = _require_mapping(raw, "<sweep file>")
    _check_keys(raw, TOP_LEVEL_KEYS, "")
    name = str(raw.get("name", name))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SweepError("name", f"must be a simple folder name, got {name!r}")
    models = _parse_models(raw)
    if "tasks" not in raw:
        raise SweepError("tasks", "is required")
    tasks = _string_list(raw["tasks"], "tasks")
    include_path = _string_list(raw.get("include_path", []), "include_path", allow_empty=True)
    if len(include_path) > 1:
        # lmms-eval 0.7.3's CLI keeps only the last --include_path; it searches that folder recursively.
        raise SweepError("include_path", "lmms-eval takes one --include_path folder (searched recursively): "
                                         "give one folder holding all the task YAMLs")
    seeds = _sweep_seeds(raw)
    batch_size = _require_int(raw.get("batch_size", 1), "batch_size", 1)
    gen_kwargs = _parse_gen_kwargs(raw.get("gen_kwargs"), "gen_kwargs")
    extra_args = parse_lmms_eval_args(raw.get("lmms_eval_args"))
    output_root = raw.get("output_root", "runs")
    if not isinstance(output_root, str) or not output_root:
        raise SweepError("output_root", "must be a folder path")

    if "grid" not in raw and "points" not in raw:
        raise SweepError("grid", "give a `grid` and/or `points`: a sweep needs at least one run")
    specs = _parse_points(raw.get("points"), models) + _parse_grid(raw.get("grid"), models)
    sweep_settings = dict(tasks=tasks, include_path=include_path, limit=_parse_limit(raw.get("limit")),
                          batch_size=batch_size, gen_kwargs=gen_kwargs, lmms_eval_args=extra_args)
    runs = _expand(name, models, specs, seeds=seeds, **sweep_settings)
    return Sweep(
        name=name, path=path, description=str(raw.get("description", "")), models=models,
        launcher=_parse_launcher(raw.get("launcher")), output_root=output_root, paper=_parse_paper(raw.get("paper")),
        runs=runs, seed=seeds[0], seeds=seeds, reuse_visual=_parse_reuse(raw.get("reuse_visual", True)),
        feature_store=_parse_store(raw.get("feature_store")), **sweep_settings,
    )


def _sweep_seeds(raw: Mapping[str, Any]) -> tuple[int, ...]:
    """`seed: N` (one run per point) or `seeds: [..]` (one run per point and seed), not both."""
    if "seed" in raw and "seeds" in raw:
        raise SweepError("seeds", "give either `seed` (one seed) or `seeds` (a list), not both")
    if "seeds" in raw:
        return _parse_seeds(raw["seeds"], "seeds")
    return (_require_int(raw.get("seed", 0), "seed", 0),)


def parse_lmms_eval_args(value: Any) -> tuple[str, ...]:
    """`lmms_eval_args`: extra lmms-eval CLI arguments as a list of strings (never a shell string), none of them
    a flag the suite sets itself. Whether lmms-eval knows the flags is checked by `checks.check_sweep`."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str | int | float) and not isinstance(item, bool)
                                              for item in value):
        raise SweepError("lmms_eval_args", 'must be a list of strings, e.g. ["--verbosity", "DEBUG"] '
                                           "(an argument list, not a shell string)")
    args = tuple(str(item) for item in value)
    if args and not args[0].startswith("-"):
        raise SweepError("lmms_eval_args[0]", f"must be a flag (starting with --), got {args[0]!r}")
    for index, arg in enumerate(args):
        flag = arg.split("=", 1)[0]
        if flag in SUITE_OWNED_FLAGS:
            raise SweepError(f"lmms_eval_args[{index}]",
                             f"{flag} is set by the sweep itself (flags it sets: {', '.join(SUITE_OWNED_FLAGS)}); "
                             "use the sweep file's own key instead")
    return args


def _expand(sweep: str, models: Sequence[ModelEntry], specs: Sequence[_PointSpec], *, tasks: tuple[str, ...],
            include_path: tuple[str, ...], limit: int | float | None, seeds: tuple[int, ...], batch_size: int,
            gen_kwargs: str | None, lmms_eval_args: tuple[str, ...]) -> tuple[Run, ...]:
    """Models x points x seeds, in file order; the same settings twice is an error (it would be one run)."""
    runs: list[Run] = []
    seen: dict[str, str] = {}
    for entry in models:
        for spec in specs:
            if entry.name not in spec.models:
                continue
            model_args = {**entry.model_args, **spec.overrides}
            run_tasks = spec.tasks or tasks
            run_gen_kwargs = spec.gen_kwargs if spec.gen_kwargs is not None else gen_kwargs
            display = _display_name(spec, model_args)
            for seed in spec.seeds or seeds:
                settings = run_settings(entry.model, model_args, run_tasks, include_path, limit, seed, batch_size,
                                        run_gen_kwargs, lmms_eval_args)
                run_id = make_run_id(entry.model, model_args, settings)
                if run_id in seen:
                    raise SweepError("grid" if spec.is_grid else "points",
                                     f"runs {seen[run_id]!r} and {display!r} of model {entry.name!r} have "
                                     "identical settings")
                seen[run_id] = display
                runs.append(Run(sweep=sweep, run_id=run_id, model_entry=entry.name, model=entry.model,
                                model_args=model_args, tasks=run_tasks, include_path=include_path, limit=limit,
                                seed=seed, batch_size=batch_size, gen_kwargs=run_gen_kwargs, name=display,
                                label=spec.label, reference=spec.reference, order=len(runs),
                                lmms_eval_args=lmms_eval_args))
    if not runs:
        raise SweepError("points", "no run selected: check the `models` filters")
    return tuple(runs)


def _display_name(spec: _PointSpec, model_args: Mapping[str, Scalar]) -> str:
    """A point's name as given; else its method with the grid axes that vary, or with R and frames."""
    if spec.name is not None and not spec.is_grid:
        return spec.name
    method = method_of(model_args)
    parts = [method] if method != "—" else []
    if spec.is_grid:
        parts.append(spec.name or "")
    else:
        if "retention_ratio" in spec.overrides:
            parts.append(f"R={render_value(spec.overrides['retention_ratio'])}")
        parts += [f"frames={render_value(spec.overrides[key])}" for key in FRAME_KEYS if key in spec.overrides]
    display = " ".join(part for part in parts if part)
    return display or ",".join(f"{k}={render_value(v)}" for k, v in spec.overrides.items()) or "base"


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file (structure only; see `checks.check_sweep` for model ids and tasks)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError("<sweep file>", f"{path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError("<sweep file>", f"{path} is not valid YAML: {error}") from error
    return parse_sweep(raw, path.stem, path)
