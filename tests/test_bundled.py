"""The files the package ships (sweeps, task YAMLs with their data, the paper's numbers), found from any folder, and
`--only` run filters."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lmms_eval_models import bundled
from lmms_eval_models.sweep import main as sweep_main
from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.paper import default_paper_dir
from lmms_eval_models.sweeps.spec import load_sweep

REPO = Path(__file__).resolve().parent.parent
RESOURCES = REPO / "lmms_eval_models" / "resources"


def test_checkout_paths_are_the_bundled_folders() -> None:
    assert (REPO / "configs").resolve() == (RESOURCES / "configs").resolve()
    assert (REPO / "results" / "paper").resolve() == (RESOURCES / "paper").resolve()
    assert bundled.resource_root().resolve() == RESOURCES.resolve()


def test_builtin_sweeps_are_the_sweep_files() -> None:
    names = bundled.builtin_sweeps()
    assert sorted(names) == sorted(path.stem for path in (REPO / "configs" / "sweeps").glob("*.yaml"))
    assert {"smoke", "table1_llava_onevision", "table5_alpha"} <= set(names)


def test_sweep_names_resolve_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert bundled.resolve_sweep_file("smoke") == bundled.builtin_sweeps()["smoke"]
    assert bundled.resolve_sweep_file("no_such_sweep") == Path("no_such_sweep")  # reported as the user typed it
    local = tmp_path / "smoke"
    local.write_text("name: mine\n")
    assert bundled.resolve_sweep_file("smoke") == Path("smoke")  # an existing path wins over a built-in name


def test_include_path_falls_back_to_the_bundled_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = bundled.resolve_include_path("configs/tasks/smoke")
    assert found == bundled.resource_root() / "configs" / "tasks" / "smoke"
    assert (found / "videomme_smoke.yaml").is_file() and (found / "data" / "videomme.jsonl").is_file()
    (tmp_path / "configs" / "tasks" / "smoke").mkdir(parents=True)
    assert bundled.resolve_include_path("configs/tasks/smoke") == Path("configs/tasks/smoke")  # the user's own
    assert bundled.resolve_include_path("not/there") == Path("not/there")


def test_paper_numbers_found_outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_paper_dir() == bundled.paper_dir()
    assert (default_paper_dir() / "paper_tables.yaml").is_file()


def test_plan_by_name_outside_the_checkout_with_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert sweep_main(["plan", "smoke", "--only", "flashvid_qwen3_vl.*"]) == 0
    out = capsys.readouterr().out
    assert "sweep smoke: 3 run(s)" in out
    assert out.count("  model: flashvid_qwen3_vl") == 3 and "flashvid_llava" not in out
    assert f"--include_path {bundled.resource_root() / 'configs' / 'tasks' / 'smoke'}" in out
    assert sweep_main(["plan", "smoke", "--only", "*.vanilla-*", "--only", "flashvid_qwen3_vl.flashvid-r0.1-*"]) == 0
    assert "sweep smoke: 5 run(s)" in capsys.readouterr().out


def test_only_that_matches_nothing_names_the_flag(capsys: pytest.CaptureFixture) -> None:
    assert sweep_main(["plan", "smoke", "--only", "nothing-like-this*"]) == 2
    err = capsys.readouterr().err
    assert "--only: no run id matches 'nothing-like-this*'" in err and "flashvid_llava_onevision.vanilla-" in err


def test_unknown_sweep_name_is_reported_as_typed(capsys: pytest.CaptureFixture) -> None:
    assert sweep_main(["plan", "smok"]) == 2
    assert "smok does not exist" in capsys.readouterr().err


def test_wheel_carries_every_bundled_file(tmp_path: Path) -> None:
    """The wheel built from the checkout holds each file of resources/ (CI also installs it and runs a point)."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("flashvid_suite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {path.relative_to(REPO).as_posix() for path in RESOURCES.rglob("*") if path.is_file()}
    assert {"lmms_eval_models/resources/configs/sweeps/smoke.yaml",
            "lmms_eval_models/resources/configs/tasks/smoke/data/videomme.jsonl",
            "lmms_eval_models/resources/paper/paper_tables.yaml"} <= expected
    assert expected - names == set()


@pytest.mark.slow
def test_only_runs_exactly_the_matching_points(tmp_path: Path, flashvid_cache: Path, tiny_checkpoint) -> None:
    tiny_checkpoint("qwen2_5_vl")
    document = yaml.safe_load((REPO / "configs" / "sweeps" / "smoke.yaml").read_text())
    document.update(models=[entry for entry in document["models"] if entry["name"] == "qwen2_5_vl"],
                    tasks=["videomme_smoke"], limit=1, output_root=str(tmp_path / "runs"), name="smoke_only")
    document["grid"]["retention_ratio"] = [0.1]
    sweep_file = tmp_path / "smoke_only.yaml"
    sweep_file.write_text(yaml.safe_dump(document, sort_keys=False))
    sweep = load_sweep(sweep_file)
    vanilla, flashvid = (run.run_id for run in sweep.runs)
    env = {**os.environ, "FLASHVID_CACHE": str(flashvid_cache)}

    result = subprocess.run([sys.executable, "-m", "lmms_eval_models.sweep", "run", str(sweep_file),
                             "--only", "*.vanilla-*"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 run(s), 0 already finished, 1 to run" in result.stdout
    assert store.is_finished(sweep.sweep_dir(), vanilla) and not store.is_finished(sweep.sweep_dir(), flashvid)
    assert not store.attempt_dir(sweep.sweep_dir(), flashvid).exists()
    status = subprocess.run([sys.executable, "-m", "lmms_eval_models.sweep", "status", str(sweep_file)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert f"finished  {vanilla}" in status and f"pending   {flashvid}" in status
    assert "1 finished, 0 running, 0 failed, 1 pending" in status
