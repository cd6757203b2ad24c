"""Sweep files: expansion into runs, deterministic ids, and errors that name the bad key before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmms_eval_models import sweep as sweep_cli
from lmms_eval_models.sweeps.checks import check_sweep
from lmms_eval_models.sweeps.spec import SweepError, load_sweep, parse_sweep, parse_time_minutes

TASK_DIR = Path(__file__).parent / "data" / "sweep_task"


def base_document(**changes: object) -> dict:
    document = {
        "name": "unit",
        "model": "dummy",
        "model_args": {"response": "A"},
        "tasks": ["videomme_sweeptest"],
        "include_path": [str(TASK_DIR)],
        "grid": {"response": ["B", "C"]},
        "points": [{"name": "vanilla", "response": "D", "reference": True}],
        "seed": 0,
    }
    document.update(changes)
    return {key: value for key, value in document.items() if value is not None}


def write(tmp_path: Path, document: dict, name: str = "unit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_points_then_grid_in_file_order() -> None:
    sweep = parse_sweep(base_document(), "unit")
    assert [run.model_args["response"] for run in sweep.runs] == ["D", "B", "C"]
    assert [run.name for run in sweep.runs] == ["vanilla", "response=B", "response=C"]
    assert sweep.runs[0].reference and not sweep.runs[1].reference


def test_grid_is_a_cartesian_product_and_scalars_are_fixed_axes() -> None:
    document = base_document(points=None, grid=[{"response": ["A", "B"], "read_bytes": [0, 1], "fail_on_missing": False},
                                                {"response": "Z"}])
    runs = parse_sweep(document, "unit").runs
    combos = [(run.model_args["response"], run.model_args.get("read_bytes")) for run in runs]
    assert combos == [("A", 0), ("A", 1), ("B", 0), ("B", 1), ("Z", None)]
    assert all(run.model_args["fail_on_missing"] is False for run in runs[:4])


def test_run_ids_are_deterministic_and_follow_settings_only() -> None:
    first = parse_sweep(base_document(), "unit")
    again = parse_sweep(base_document(launcher={"type": "accelerate", "num_processes": 4}, output_root="elsewhere"),
                        "unit")
    assert [run.run_id for run in first.runs] == [run.run_id for run in again.runs]
    other_seed = parse_sweep(base_document(seed=1), "unit")
    assert {run.run_id for run in other_seed.runs}.isdisjoint(run.run_id for run in first.runs)
    limited = parse_sweep(base_document(limit=2), "unit")
    assert {run.run_id for run in limited.runs}.isdisjoint(run.run_id for run in first.runs)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"modle": "dummy"}, "modle"),
        ({"launcher": {"type": "accelerate", "gpus": 2}}, "launcher.gpus"),
        ({"launcher": {"type": "kubernetes"}}, "launcher.type"),
        ({"launcher": {"type": "slurm"}}, "launcher.partition"),
        ({"launcher": {"type": "slurm", "partition": "gpu", "time": "soon"}}, "launcher.time"),
        ({"grid": {"response": []}}, "grid.response"),
        ({"grid": {}}, "grid"),
        ({"grid": None, "points": None}, "grid"),
        ({"tasks": []}, "tasks"),
        ({"tasks": None}, "tasks"),
        ({"model": None}, "model"),
        ({"model_args": {"response": "A,B"}}, "model_args.response"),
        ({"model_args": {"response": None}}, "model_args.response"),
        ({"points": [{"response": "B"}]}, "grid"),  # the same settings as a grid run
        ({"limit": 0}, "limit"),
        ({"include_path": ["a", "b"]}, "include_path"),
        ({"seed": -1}, "seed"),
        ({"paper": {"table": "table1_llava_onevision", "rows": 1}}, "paper.rows"),
        ({"points": [{"response": "D", "models": ["nope"]}]}, "points[0].models"),
    ],
)
def test_invalid_structure_names_the_key(changes: dict, key: str) -> None:
    with pytest.raises(SweepError) as error:
        parse_sweep(base_document(**changes), "unit")
    assert error.value.key == key
    assert str(error.value).startswith(f"{key}:")


@pytest.mark.parametrize(
    ("changes", "key", "hint"),
    [
        ({"model": "dummmy"}, "model", "dummy"),
        ({"tasks": ["videomme_sweeptest", "videome"]}, "tasks[1]", "videomme"),
        ({"include_path": ["/no/such/folder"]}, "include_path[0]", "not a folder"),
        ({"model_args": {"pretrained": "tiny:llama"}}, "model_args.pretrained", "families"),
    ],
)
def test_unknown_model_task_or_path_names_the_key(changes: dict, key: str, hint: str) -> None:
    sweep = parse_sweep(base_document(**changes), "unit")
    with pytest.raises(SweepError) as error:
        check_sweep(sweep)
    assert error.value.key == key
    assert hint in str(error.value)


def test_cli_refuses_a_bad_file_before_starting_anything(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output_root = tmp_path / "runs"
    path = write(tmp_path, base_document(output_root=str(output_root), grid={"response": []}))
    for command in ("plan", "run", "status"):
        assert sweep_cli.main([command, str(path)]) == 2
        assert "grid.response" in capsys.readouterr().err
    path = write(tmp_path, base_document(output_root=str(output_root), tasks=["no_such_task"]))
    assert sweep_cli.main(["run", str(path)]) == 2
    assert "tasks[0]" in capsys.readouterr().err
    assert not output_root.exists()


def test_plan_prints_every_run_with_its_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, base_document(output_root=str(tmp_path / "runs"), limit=2))
    assert sweep_cli.main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    sweep = load_sweep(path)
    for run in sweep.runs:
        assert f"id={run.run_id}" in out
        assert f"--model dummy --model_args response={run.model_args['response']} --tasks videomme_sweeptest" in out
    assert out.count("--limit 2") == 3
    assert not (tmp_path / "runs").exists()


def test_time_parsing() -> None:
    assert parse_time_minutes(90) == 90
    assert parse_time_minutes("02:00:00") == 120
    assert parse_time_minutes("1-00:30:00") == 1470


def test_multi_model_sweeps_expand_each_model(tmp_path: Path) -> None:
    document = base_document(model=None, model_args=None, models=[
        {"name": "first", "model": "dummy", "model_args": {"response": "A"}},
        {"name": "second", "model": "dummy", "model_args": {"response": "A", "read_bytes": 0}},
    ], points=[{"name": "only-first", "response": "D", "models": ["first"]}])
    runs = parse_sweep(document, "unit").runs
    assert [(run.model_entry, run.name) for run in runs] == [
        ("first", "only-first"), ("first", "response=B"), ("first", "response=C"),
        ("second", "response=B"), ("second", "response=C"),
    ]
