"""Seeds (mean ± std per report cell), lmms_eval_args passed through and checked against lmms-eval's own parser,
and tasks / gen_kwargs / seeds as grid axes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lmms_eval_models.report import collect, report_sweep, to_markdown
from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.checks import check_lmms_eval_args
from lmms_eval_models.sweeps.command import lmms_eval_args
from lmms_eval_models.sweeps.results import read_scores
from lmms_eval_models.sweeps.spec import SweepError, load_sweep, parse_sweep

REPO = Path(__file__).resolve().parent.parent
REPORT_DATA = Path(__file__).parent / "data" / "sweep_report"
BASE = {"name": "s", "model": "flashvid_llava_onevision", "model_args": {"pretrained": "tiny:llava_onevision"},
        "tasks": ["videomme_smoke"], "points": [{"name": "vanilla", "enable_flashvid": False}]}


def test_seeds_give_one_run_each_and_single_seed_ids_do_not_change() -> None:
    single = parse_sweep({**BASE, "seed": 0}, "s")
    seeded = parse_sweep({**BASE, "seeds": [0, 1, 2]}, "s")
    assert [run.seed for run in seeded.runs] == [0, 1, 2]
    assert len({run.run_id for run in seeded.runs}) == 3
    assert seeded.runs[0].run_id == single.runs[0].run_id  # seed 0 of `seeds` is the `seed: 0` run
    assert "lmms_eval_args" not in single.runs[0].settings()
    assert len({run.cell_key() for run in seeded.runs}) == 1
    command = lmms_eval_args(seeded.runs[2], Path("out"))
    assert command[command.index("--seed") + 1] == "2"


def test_committed_fixture_run_ids_are_unchanged() -> None:
    sweep = load_sweep(REPORT_DATA / "smoke_fixture.yaml")
    assert {run.run_id for run in sweep.runs} == {path.name for path in (REPORT_DATA / sweep.name / "runs").iterdir()}


def test_seed_and_seeds_together_is_an_error() -> None:
    with pytest.raises(SweepError, match=r"`seed`.*`seeds`") as error:
        parse_sweep({**BASE, "seed": 0, "seeds": [0, 1]}, "s")
    assert error.value.key == "seeds"


def test_grid_axes_over_seeds_tasks_and_gen_kwargs() -> None:
    sweep = parse_sweep({**BASE, "points": None, "grid": {
        "enable_flashvid": True, "retention_ratio": 0.1, "seeds": [0, 1],
        "tasks": [["videomme_smoke"], ["mvbench_smoke", "mlvu_test_smoke"]],
        "gen_kwargs": ["max_new_tokens=16", "max_new_tokens=32"]}}, "s")
    assert len(sweep.runs) == 2 * 2 * 2
    assert {run.tasks for run in sweep.runs} == {("videomme_smoke",), ("mvbench_smoke", "mlvu_test_smoke")}
    assert {run.gen_kwargs for run in sweep.runs} == {"max_new_tokens=16", "max_new_tokens=32"}
    assert len({run.cell_key() for run in sweep.runs}) == 4  # seeds share a cell, the other axes do not
    assert all("seed" not in run.name and "tasks=" in run.name for run in sweep.runs)


def test_lmms_eval_args_are_appended_and_hashed() -> None:
    extra = ["--verbosity", "DEBUG", "--wandb_args", "project=flashvid"]
    sweep = parse_sweep({**BASE, "lmms_eval_args": extra}, "s")
    assert lmms_eval_args(sweep.runs[0], Path("out"))[-4:] == extra
    assert sweep.runs[0].settings()["lmms_eval_args"] == extra
    assert sweep.runs[0].run_id != parse_sweep(BASE, "s").runs[0].run_id


@pytest.mark.parametrize("bad", [["--seed", "3"], ["--limit=2"], ["--tasks", "x"]])
def test_lmms_eval_args_may_not_set_what_the_suite_sets(bad: list[str]) -> None:
    with pytest.raises(SweepError, match=bad[0].split("=")[0]) as error:
        parse_sweep({**BASE, "lmms_eval_args": bad}, "s")
    assert error.value.key == "lmms_eval_args[0]"


def test_lmms_eval_args_must_be_a_list_not_a_shell_string() -> None:
    with pytest.raises(SweepError, match="list of strings"):
        parse_sweep({**BASE, "lmms_eval_args": "--verbosity DEBUG"}, "s")


def test_unknown_lmms_eval_flag_fails_at_plan_time_naming_it(tmp_path: Path) -> None:
    check_lmms_eval_args(["--verbosity", "DEBUG", "--wandb_args", "project=flashvid"])  # lmms-eval's own flags
    with pytest.raises(SweepError, match=r"--verbositi.*did you mean --verbosity") as error:
        check_lmms_eval_args(["--verbosity", "DEBUG", "--verbositi", "INFO"])
    assert error.value.key == "lmms_eval_args[2]"
    document = {**BASE, "include_path": ["configs/tasks/smoke"], "lmms_eval_args": ["--no_such_flag"]}
    sweep_file = tmp_path / "bad.yaml"
    sweep_file.write_text(yaml.safe_dump(document))
    result = subprocess.run([sys.executable, "-m", "lmms_eval_models.sweep", "plan", str(sweep_file)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "lmms_eval_args[0]: unknown lmms-eval flag '--no_such_flag'" in result.stderr


def _two_seed_fixture(tmp_path: Path):
    """The report fixture's sweep with seeds [0, 1]; seed 1's runs are copies of other committed runs, so the
    two seeds of a cell score differently."""
    document = yaml.safe_load((REPORT_DATA / "smoke_fixture.yaml").read_text())
    document.pop("seed")
    document.update(seeds=[0, 1], output_root=str(tmp_path), models=document["models"][:1])
    sweep = parse_sweep(document, "smoke_fixture")
    source = load_sweep(REPORT_DATA / "smoke_fixture.yaml")
    sources = [run.run_id for run in source.runs if run.model_entry == "llava_onevision"]
    by_seed = {seed: [run for run in sweep.runs if run.seed == seed] for seed in (0, 1)}
    copied = {}
    for seed, shift in ((0, 0), (1, 1)):
        for index, run in enumerate(by_seed[seed]):
            origin = sources[(index + shift) % len(sources)]
            shutil.copytree(REPORT_DATA / "smoke_fixture" / "runs" / origin, store.finished_dir(sweep.sweep_dir(),
                                                                                                run.run_id))
            copied[run.run_id] = origin
    return sweep, by_seed


def test_report_cells_carry_mean_std_and_n_over_seeds(tmp_path: Path) -> None:
    sweep, by_seed = _two_seed_fixture(tmp_path)
    table = collect(sweep, sweep.sweep_dir())
    assert len(table) == 3 and list(table["n"]) == [2, 2, 2]
    for row, first, second in zip(table.to_dict("records"), by_seed[0], by_seed[1]):
        scores = [read_scores(store.finished_dir(sweep.sweep_dir(), run.run_id))["mvbench"] for run in (first, second)]
        assert row["mvbench"] == pytest.approx(sum(scores) / 2)
        assert row["mvbench_std"] == pytest.approx(pd.Series(scores).std(ddof=1))
    markdown = to_markdown(table.drop(columns=["run_id"]))
    assert "| n |" in markdown or " n |" in markdown
    assert f"{table['mvbench'][1]:.1f} ± {table['mvbench_std'][1]:.1f}" in markdown
    paths = report_sweep(sweep, sweep.sweep_dir(), out_dir=Path(os.environ.get("SEEDS_PLOT_DIR", tmp_path / "report")))
    written = pd.read_csv(paths.table_csv)
    assert {"n", "mvbench_std", "avg_score_std"} <= set(written.columns)
    assert paths.plot is not None and paths.plot.stat().st_size > 0


@pytest.mark.slow
def test_two_seed_smoke_sweep_reports_mean_and_std(tmp_path: Path, flashvid_cache: Path, tiny_checkpoint) -> None:
    tiny_checkpoint("qwen2_5_vl")
    document = yaml.safe_load((REPO / "configs" / "sweeps" / "smoke.yaml").read_text())
    document.pop("seed", None)
    document.update(models=[entry for entry in document["models"] if entry["name"] == "qwen2_5_vl"],
                    tasks=["videomme_smoke"], limit=1, output_root=str(tmp_path / "runs"), name="smoke_seeds",
                    seeds=[0, 1], points=None, lmms_eval_args=["--verbosity", "WARNING"])
    document["grid"]["retention_ratio"] = [0.1]
    sweep_file = tmp_path / "smoke_seeds.yaml"
    sweep_file.write_text(yaml.safe_dump({k: v for k, v in document.items() if v is not None}, sort_keys=False))
    env = {**os.environ, "FLASHVID_CACHE": str(flashvid_cache)}
    result = subprocess.run([sys.executable, "-m", "lmms_eval_models.sweep", "run", str(sweep_file)],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    sweep = load_sweep(sweep_file)
    assert [run.seed for run in sweep.runs] == [0, 1]
    scores = [read_scores(store.finished_dir(sweep.sweep_dir(), run.run_id))["videomme_overall"] for run in sweep.runs]
    written = pd.read_csv(tmp_path / "results" / "smoke_seeds" / "smoke_seeds.csv")
    assert list(written["n"]) == [2]
    assert written["videomme_overall"][0] == pytest.approx(sum(scores) / 2, abs=0.01)
    assert written["videomme_overall_std"][0] == pytest.approx(pd.Series(scores).std(ddof=1), abs=0.01)
    assert (tmp_path / "results" / "smoke_seeds" / "accuracy_vs_retention.png").stat().st_size > 0
