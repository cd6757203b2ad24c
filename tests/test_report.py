"""flashvid-report on committed lmms-eval outputs (a real smoke run, trimmed): the paper's columns, the paper's rows
beside ours with the difference, determinism, and the parsing rules for lmms-eval 0.7.3's result files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from lmms_eval_models import report as report_cli
from lmms_eval_models.report import average, collect, comparison, match_paper_rows, report_sweep
from lmms_eval_models.sweeps.paper import leading_number, paper_frame, values_match
from lmms_eval_models.sweeps.results import benchmark_of, main_metric, read_scores, videomme_by_duration
from lmms_eval_models.sweeps.spec import load_sweep, method_of

DATA = Path(__file__).parent / "data" / "sweep_report"
PAPER_DIR = Path(__file__).resolve().parent.parent / "results" / "paper"


@pytest.fixture()
def fixture_sweep():
    sweep = load_sweep(DATA / "smoke_fixture.yaml")
    return sweep, DATA / sweep.name


def test_table_has_the_paper_columns_in_sweep_order(fixture_sweep) -> None:
    sweep, sweep_dir = fixture_sweep
    table = collect(sweep, sweep_dir)
    assert list(table.columns) == [
        "model", "run", "method", "retention_ratio", "frames", "videomme_short", "videomme_medium", "videomme_long",
        "videomme_overall", "egoschema_subset", "longvideobench", "mvbench", "mlvu", "avg_score", "rel_acc_pct",
        "run_id",
    ]
    assert list(table["run_id"]) == [run.run_id for run in sweep.runs]
    assert list(table["method"]) == ["Vanilla", "FlashVID", "FlashVID"] * 2
    assert list(table["retention_ratio"]) == [100.0, 25.0, 10.0] * 2


def test_scores_avg_and_relative_accuracy(fixture_sweep) -> None:
    sweep, sweep_dir = fixture_sweep
    table = collect(sweep, sweep_dir).set_index("run_id")
    vanilla, flashvid = sweep.runs[0].run_id, sweep.runs[1].run_id  # llava_onevision
    # The videomme smoke subset has one question per duration: the duration split is 0 or 100 each.
    row = table.loc[vanilla]
    assert row["videomme_overall"] == pytest.approx(
        (row["videomme_short"] + row["videomme_medium"] + row["videomme_long"]) / 3)
    parts = ["videomme_overall", "egoschema_subset", "longvideobench", "mvbench", "mlvu"]
    for run_id in (vanilla, flashvid):
        assert table.loc[run_id, "avg_score"] == pytest.approx(table.loc[run_id, parts].mean())
    assert table.loc[vanilla, "rel_acc_pct"] == pytest.approx(100.0)
    expected = 100 * table.loc[flashvid, "avg_score"] / table.loc[vanilla, "avg_score"]
    assert table.loc[flashvid, "rel_acc_pct"] == pytest.approx(expected)


def test_paper_rows_beside_ours_with_the_difference(fixture_sweep) -> None:
    sweep, sweep_dir = fixture_sweep
    ours = collect(sweep, sweep_dir)
    matched = match_paper_rows(sweep, ours, PAPER_DIR)
    paper = paper_frame("table1_llava_onevision", PAPER_DIR)
    flashvid_10 = paper[(paper["method"] == "FlashVID") & (paper["retention_ratio"] == "10%")].iloc[0]
    assert matched[2]["videomme_overall"] == flashvid_10["videomme_overall"]  # FlashVID R = 10 % -> its paper row
    assert matched[0]["method"] == "Vanilla"
    compared = comparison(ours, matched)
    assert list(compared["source"][:3]) == ["ours", "paper", "diff"]
    ours_row, paper_row, diff_row = (compared.iloc[6 + i] for i in range(3))  # third run: FlashVID R = 10 %
    for column in ("videomme_overall", "longvideobench", "mvbench", "avg_score"):
        assert paper_row[column] == pytest.approx(flashvid_10[column])
        assert diff_row[column] == pytest.approx(ours_row[column] - paper_row[column])
    assert math.isnan(paper_row["mlvu"])  # the paper's Table 1 has no MLVU column


def test_report_files_are_byte_identical_for_the_same_inputs(fixture_sweep, tmp_path: Path) -> None:
    sweep, sweep_dir = fixture_sweep
    first = report_sweep(sweep, sweep_dir, tmp_path / "a", PAPER_DIR)
    second = report_sweep(sweep, sweep_dir, tmp_path / "b", PAPER_DIR)
    for a, b in zip((first.table_csv, first.table_md, first.comparison_csv, first.comparison_md, first.plot),
                    (second.table_csv, second.table_md, second.comparison_csv, second.comparison_md, second.plot)):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert first.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model | run | method | R (%) |" in first.table_md.read_text()


def test_cli_writes_into_results_of_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert report_cli.main([str(DATA / "smoke_fixture.yaml"), "--output-root", str(DATA),
                            "--paper-dir", str(PAPER_DIR)]) == 0
    out = capsys.readouterr().out
    written = sorted(path.name for path in (tmp_path / "results" / "smoke_fixture").iterdir())
    assert written == ["accuracy_vs_retention.png", "smoke_fixture.csv", "smoke_fixture.md",
                       "smoke_fixture_vs_paper.csv", "smoke_fixture_vs_paper.md"]
    assert "plot: results/smoke_fixture/accuracy_vs_retention.png" in out
    table = pd.read_csv(tmp_path / "results" / "smoke_fixture" / "smoke_fixture.csv")
    assert len(table) == 6


# ------------------------------------------------------------------------------------------ parsing rules


def test_benchmark_columns_from_task_names_and_metrics() -> None:
    assert benchmark_of("videomme", {}) == "videomme_overall"
    assert benchmark_of("videomme_smoke", {}) == "videomme_overall"
    assert benchmark_of("egoschema_subset", {"score,none": 0.5, "submission,none": []}) == "egoschema_subset"
    # lmms-eval 0.7.3: the full set's `submission` is the remote scorer's percentage (NaN from egoschema_paper
    # when the scorer was unreachable); the subset logs an empty `submission` list beside its `score` fraction.
    assert benchmark_of("egoschema", {"submission,none": 62.5, "submission_stderr,none": "N/A"}) == "egoschema_total"
    assert benchmark_of("egoschema_paper", {"submission,none": float("nan")}) == "egoschema_total"
    assert benchmark_of("longvideobench_val_v", {}) == "longvideobench"
    assert benchmark_of("mvbench_action_count", {}) == "mvbench"
    assert benchmark_of("mlvu_test", {}) == "mlvu"
    assert benchmark_of("mme", {}) is None
    assert main_metric({"alias": "x", "lvb_acc,none": 0.25, "lvb_acc_stderr,none": 0.1}) == 0.25
    assert main_metric({"alias": "x", " ": " "}) is None


def test_fractions_become_percent_and_mvbench_is_the_mean_of_its_subtasks(tmp_path: Path) -> None:
    results = {
        "results": {
            "longvideobench_val_v": {"alias": "l", "lvb_acc,none": 0.5},
            "egoschema_subset": {"alias": "e", "score,none": 0.25, "submission,none": []},
            "egoschema_paper": {"alias": "t", "submission,none": float("nan"), "submission_stderr,none": "N/A"},
            "mvbench": {" ": " ", "alias": "mvbench"},
            "mvbench_a": {"alias": " - a", "mvbench_accuracy,none": 50.0},
            "mvbench_b": {"alias": " - b", "mvbench_accuracy,none": 70.0},
        },
        "group_subtasks": {"mvbench": ["mvbench_a", "mvbench_b"], "longvideobench_val_v": []},
    }
    (tmp_path / "lmms_eval").mkdir()
    (tmp_path / "lmms_eval" / "x_results.json").write_text(json.dumps(results))
    scores = read_scores(tmp_path)
    assert scores["longvideobench"] == 50.0
    assert scores["egoschema_subset"] == 25.0
    assert math.isnan(scores["egoschema_total"])  # evaluated, but the remote scorer was unreachable
    assert scores["mvbench"] == 60.0
    # Avg falls back to the subset where the total is not scored, as documented.
    assert average(scores, ["egoschema_subset", "egoschema_total", "longvideobench", "mvbench"]) == pytest.approx(45.0)


def test_egoschema_total_from_the_remote_scorer_is_already_percent(tmp_path: Path) -> None:
    results = {
        "results": {
            "egoschema_subset": {"alias": "e", "score,none": 0.6, "submission,none": []},
            "egoschema": {"alias": "t", "submission,none": 62.5, "submission_stderr,none": "N/A"},
        },
    }
    (tmp_path / "lmms_eval").mkdir()
    (tmp_path / "lmms_eval" / "x_results.json").write_text(json.dumps(results))
    scores = read_scores(tmp_path)
    assert scores["egoschema_total"] == 62.5
    assert scores["egoschema_subset"] == 60.0


def test_videomme_duration_split_counts_like_lmms_eval(tmp_path: Path) -> None:
    samples = tmp_path / "s.jsonl"
    lines = [("short", "A", "A"), ("short", "B", "A"), ("medium", "C", "C"), ("long", "", "D")]
    samples.write_text("".join(json.dumps({"doc_id": i, "videomme_perception_score": {
        "duration": d, "pred_answer": p, "answer": a}}) + "\n" for i, (d, p, a) in enumerate(lines)))
    assert videomme_by_duration(samples) == {"videomme_short": 50.0, "videomme_medium": 100.0, "videomme_long": 0.0}


def test_paper_value_matching() -> None:
    assert leading_number("33.3%") == 33.3 and leading_number("0.0/TSTM") == 0.0 and leading_number("80 (5x)") == 80
    assert values_match("33.3%", 100 / 3)
    assert values_match("25%", 25.0) and not values_match("25%", 20.0)
    assert values_match("1.0/ADTS", 1.0)
    assert values_match("1.25", 1.25) and not values_match("1.20", 1.25) and not values_match("1.25", 1.2)
    assert values_match("w/ E.R.", "w/ E.R.") and values_match("32/Inf", "32/Inf")
    assert not values_match("FlashVID", "FastVID")


SWEEPS = Path(__file__).resolve().parent.parent / "configs" / "sweeps"


@pytest.mark.parametrize("sweep_file", sorted(path.name for path in SWEEPS.glob("table*.yaml")))
def test_every_non_vanilla_run_of_a_paper_sweep_finds_its_own_paper_row(sweep_file: str) -> None:
    sweep = load_sweep(SWEEPS / sweep_file)
    ours = pd.DataFrame({"run_id": [run.run_id for run in sweep.runs]})
    matched = match_paper_rows(sweep, ours, PAPER_DIR)
    rows = []
    for run, row in zip(sweep.runs, matched):
        if method_of(run.model_args) == "Vanilla" and "method" not in sweep.paper.match:
            continue  # ablation tables print no vanilla row
        assert row is not None, f"{sweep_file}: {run.name} has no paper row"
        if "method" in row:
            assert row["method"] == method_of(run.model_args)
        rows.append(tuple(sorted(row.items(), key=str)))
    assert len(set(rows)) == len(rows), "two runs matched the same paper row"
