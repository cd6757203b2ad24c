"""The baseline sweeps: every method is planned (in configs/sweeps/ as a whole, in baselines.yaml at the paper's
ratios, in the smoke variant on every tiny family), Table 1 plans PruneVID and the report matches its paper rows,
and the smoke variant runs end to end on CPU (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lmms_eval_models import sweep as sweep_cli
from lmms_eval_models.methods import MethodSettings, all_methods, get_method
from lmms_eval_models.report import match_paper_rows, run_fields
from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.spec import load_sweep, method_of

REPO = Path(__file__).resolve().parent.parent
SWEEPS = REPO / "configs" / "sweeps"
PAPER_DIR = REPO / "results" / "paper"
# every compressing method of the registry: FlashVID, FastV, VisionZip, DivPrune, PruneVID, FastVID, Uniform, Random
METHOD_LABELS = {method.label for method in all_methods() if method.compresses}
FAMILIES = ("llava_onevision", "llava_video", "qwen2_5_vl", "qwen3_vl")
RATIOS = (25.0, 20.0, 15.0, 10.0)


def planned_methods(path: Path, capsys: pytest.CaptureFixture) -> list[tuple[str, str]]:
    """(model line, method) of every run `flashvid-sweep plan` prints for the file."""
    assert sweep_cli.main(["plan", str(path)]) == 0
    planned = []
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  model_args: "):
            args = dict(item.split("=", 1) for item in line.removeprefix("  model_args: ").split(","))
            planned.append((args["pretrained"], method_of(args)))
    return planned


def test_registry_labels_are_the_methods_asked_for():
    assert {"FlashVID", "FastV", "VisionZip", "DivPrune", "PruneVID", "FastVID", "Uniform", "Random"} == METHOD_LABELS


def test_plan_over_every_sweep_file_lists_every_method(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    seen: set[str] = set()
    for path in sorted(SWEEPS.glob("*.yaml")):
        seen |= {method for _, method in planned_methods(path, capsys)}
    assert seen >= METHOD_LABELS


def test_baselines_plans_every_method_at_the_same_ratios(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    planned = planned_methods(SWEEPS / "baselines.yaml", capsys)
    assert {model for model, _ in planned} == {"llava-hf/llava-onevision-qwen2-7b-ov-hf"}
    sweep = load_sweep(SWEEPS / "baselines.yaml")
    ratios: dict[str, list[float]] = {}
    for run in sweep.runs:
        fields = run_fields(run)
        ratios.setdefault(fields["method"], []).append(fields["retention_ratio"])
    assert ratios.pop("Vanilla") == [100.0]
    assert set(ratios) == METHOD_LABELS
    assert all(sorted(values, reverse=True) == list(RATIOS) for values in ratios.values())
    # the paper's settings where App. C.1 gives them; FastV aligned per layer (the suite's default rule)
    args = {method_of(run.model_args): run.model_args for run in sweep.runs}
    assert {key: args["PruneVID"][key] for key in args["PruneVID"] if key.startswith("prunevid_")} == {
        "prunevid_threshold": 0.8, "prunevid_segment_ratio": 0.25, "prunevid_selection_ratio": 0.4,
        "prunevid_layer": 10}
    assert "fastv_ratio_rule" not in args["FastV"] and args["FastV"]["fastv_layer"] == 2


def test_smoke_variant_runs_every_method_on_every_tiny_family(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    planned = planned_methods(SWEEPS / "baselines_smoke.yaml", capsys)
    assert sorted(planned) == sorted((f"tiny:{family}", method) for family in FAMILIES for method in METHOD_LABELS)
    sweep = load_sweep(SWEEPS / "baselines_smoke.yaml")
    assert tuple(sweep.tasks) == ("videomme_smoke",) and sweep.limit == 1
    assert {run.model_args["retention_ratio"] for run in sweep.runs} == {0.3}
    for run in sweep.runs:  # the tiny LLMs have 4 layers: every in-LLM pruner acts inside them
        method = run.model_args.get("method", "flashvid")
        if method == "flashvid":
            assert run.model_args["pruning_layer"] == 2
            continue
        options = {key: value for key, value in run.model_args.items() if key in ("fastv_layer", "prunevid_layer")}
        plan = get_method(method).llm_pruning(0.3, 4, MethodSettings(**options), None)
        assert (plan is not None) == (method in ("fastv", "prunevid"))


def test_script_runs_the_full_baselines_sweep():
    script = REPO / "scripts" / "baselines.sh"
    assert os.access(script, os.X_OK)
    assert "flashvid-sweep run configs/sweeps/baselines.yaml \"$@\"" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_table1_plans_prunevid_and_the_report_matches_its_rows():
    sweep = load_sweep(SWEEPS / "table1_llava_onevision.yaml")
    prunevid = [run for run in sweep.runs if method_of(run.model_args) == "PruneVID"]
    assert [run_fields(run)["retention_ratio"] for run in prunevid] == list(RATIOS)
    ours = pd.DataFrame({"run_id": [run.run_id for run in sweep.runs]})
    matched = dict(zip((run.run_id for run in sweep.runs), match_paper_rows(sweep, ours, PAPER_DIR)))
    rows = [matched[run.run_id] for run in prunevid]
    assert [(row["method"], row["retention_ratio"]) for row in rows] == [
        ("PruneVID", "25%"), ("PruneVID", "20%"), ("PruneVID", "15%"), ("PruneVID", "10%")]
    assert [row["avg_score"] for row in rows] == [56.7, 57.0, 55.7, 54.9]  # the paper's Table 1 PruneVID rows


@pytest.mark.slow  # 32 lmms-eval runs of about 10 s each on the tiny checkpoints
def test_smoke_baselines_sweep_runs_end_to_end(tmp_path: Path, flashvid_cache: Path, tiny_checkpoint) -> None:
    for family in FAMILIES:
        tiny_checkpoint(family)  # built once per session, outside the sweep
    sweep_file = SWEEPS / "baselines_smoke.yaml"
    result = subprocess.run([sys.executable, "-m", "lmms_eval_models.sweep", "run", str(sweep_file),
                             "--output-root", str(tmp_path / "runs")], cwd=tmp_path,
                            env={**os.environ, "FLASHVID_CACHE": str(flashvid_cache)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    sweep = load_sweep(sweep_file)
    sweep_dir = sweep.sweep_dir(tmp_path / "runs")
    for run in sweep.runs:
        run_dir = store.finished_dir(sweep_dir, run.run_id)
        assert store.is_finished(sweep_dir, run.run_id), run.run_id
        assert len(store.results_files(run_dir)) == 1 and store.check_complete(run_dir, sweep.tasks) is None
        (samples,) = sorted((run_dir / store.LMMS_EVAL_DIR).rglob("*videomme_smoke*.jsonl"))
        (sample,) = [json.loads(line) for line in samples.read_text().splitlines()]
        figures = sample["token_counts"][0]
        assert figures["visual_tokens_out"] < figures["visual_tokens_in"] or run.model_args.get("method") == "fastv"
        # FastV, FlashVID and PruneVID prune inside the tiny LLM
        if run.model_args.get("method", "flashvid") in ("fastv", "flashvid", "prunevid"):
            assert figures["visual_tokens_after_pruning"] < figures["visual_tokens_out"], run.run_id
    table = pd.read_csv(tmp_path / "results" / "baselines_smoke" / "baselines_smoke.csv")
    assert sorted(zip(table["model"], table["method"])) == sorted(
        (family, method) for family in FAMILIES for method in METHOD_LABELS)
    assert "plot: results/baselines_smoke/accuracy_vs_retention.png" in result.stdout
