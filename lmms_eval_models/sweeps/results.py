"""Read one finished run's lmms-eval outputs into the paper's benchmark columns (all in percent).

lmms-eval 0.7.3 reports VideoMME only overall (the short/medium/long split is only logged), MVBench as 20
sub-tasks without an overall score, and LongVideoBench / EgoSchema-subset as fractions: the per-duration split
is recomputed from the logged samples, MVBench is the mean over its sub-tasks (as MVBench reports it), and
fractions are scaled to percent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmms_eval_models.sweeps import store

BENCHMARK_COLUMNS = (
    "videomme_short", "videomme_medium", "videomme_long", "videomme_overall",
    "egoschema_subset", "egoschema_total", "longvideobench", "mvbench", "mlvu",
)
# Benchmarks whose lmms-eval score is a fraction in [0, 1] (EgoSchema's remote scorer already answers in percent).
FRACTION_SCORES = ("longvideobench", "egoschema_subset")
VIDEOMME_DURATIONS = ("short", "medium", "long")


def benchmark_of(task: str, metrics: Mapping[str, Any]) -> str | None:
    """Which paper column a task feeds, from its name (built-in, smoke and paper-protocol variants alike)."""
    if task.startswith("videomme"):
        return "videomme_overall"
    if task.startswith("egoschema"):
        # The full set ("Total") is scored by EgoSchema's remote server through lmms-eval's `submission` metric
        # (a percentage, or NaN from egoschema_paper when the server was unreachable); the 500-question subset
        # (and the smoke task) offline through `score`, a fraction.
        # lmms-eval also logs an empty `submission` list for the subset, so the full set is the task whose
        # `submission` is a number.
        full_set = any(key.split(",")[0] == "submission" and _is_number(value) for key, value in metrics.items())
        return "egoschema_total" if full_set else "egoschema_subset"
    for prefix, column in (("longvideobench", "longvideobench"), ("mvbench", "mvbench"), ("mlvu", "mlvu")):
        if task.startswith(prefix):
            return column
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def main_metric(metrics: Mapping[str, Any]) -> float | None:
    """The task's score: the first numeric "<metric>,<filter>" entry that is not a standard error."""
    for key, value in metrics.items():
        if "," not in key or "_stderr" in key or key.startswith("alias"):
            continue
        if _is_number(value) and math.isfinite(value):
            return float(value)
    return None


def _samples_file(run_dir: Path, task: str) -> Path | None:
    found = sorted((run_dir / store.LMMS_EVAL_DIR).rglob(f"*_samples_{task}.jsonl"))
    return found[0] if found else None


def videomme_by_duration(samples_path: Path) -> dict[str, float]:
    """Accuracy (%) per VideoMME duration from the logged samples, counted as lmms-eval's aggregation does."""
    correct = dict.fromkeys(VIDEOMME_DURATIONS, 0)
    answered = dict.fromkeys(VIDEOMME_DURATIONS, 0)
    with open(samples_path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            score = next((value for key, value in record.items()
                          if isinstance(value, dict) and "duration" in value and "pred_answer" in value), None)
            if score is None or score["duration"] not in answered:
                continue
            answered[score["duration"]] += 1
            correct[score["duration"]] += score["pred_answer"] == score["answer"]
    return {f"videomme_{d}": 100 * correct[d] / answered[d] for d in VIDEOMME_DURATIONS if answered[d]}


def _leaf_tasks(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    groups = set(results.get("groups", {})) | {name for name, subtasks in results.get("group_subtasks", {}).items()
                                               if subtasks}
    return {task: metrics for task, metrics in results.get("results", {}).items() if task not in groups}


def read_scores(run_dir: Path) -> dict[str, float]:
    """Paper columns (percent) of one finished run; a benchmark the run did not cover is absent."""
    found = store.results_files(run_dir)
    if len(found) != 1:
        raise ValueError(f"{run_dir}: expected one lmms-eval results file, found {len(found)}")
    results = json.loads(found[0].read_text())
    per_column: dict[str, list[float]] = {}
    scores: dict[str, float] = {}
    for task, metrics in sorted(_leaf_tasks(results).items()):
        column = benchmark_of(task, metrics)
        value = main_metric(metrics)
        if column == "egoschema_total" and value is None:
            per_column.setdefault(column, []).append(math.nan)  # evaluated, but not scorable offline
            continue
        if column is None or value is None:
            continue
        per_column.setdefault(column, []).append(100 * value if column in FRACTION_SCORES else value)
        if column == "videomme_overall" and (samples := _samples_file(run_dir, task)):
            scores.update(videomme_by_duration(samples))
    for column, values in per_column.items():
        scores[column] = sum(values) / len(values)  # MVBench: the mean over its sub-tasks
    return scores
