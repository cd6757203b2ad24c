"""The acceptance commands: lmms-eval's CLI with each suite model over all five smoke tasks, one process and two
(`accelerate launch --num_processes 2`, CPU). Slow: each lmms-eval CLI invocation costs 15-35 s on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SMOKE_TASKS, SMOKE_TASKS_DIR

from lmms_eval_models.tiny_checkpoints import FAMILIES

pytestmark = pytest.mark.slow

# The acceptance command's keys (pretrained, retention_ratio=0.1) plus few frames / small pixel budgets.
FAST_ARGS = {
    "llava_onevision": "max_frames_num=8",
    "llava_video": "max_frames_num=8",
    "qwen2_5_vl": "max_num_frames=8,min_pixels=3136,max_pixels=12544,dtype=float32",
    "qwen3_vl": "max_num_frames=8,min_pixels=3136,max_pixels=12544,dtype=float32",
}
SCORED_TASKS = {
    "videomme_smoke": "videomme_perception_score,none",
    "egoschema_smoke": "score,none",
    "longvideobench_val_v_smoke": "lvb_acc,none",
    "mvbench_smoke_action_antonym": "mvbench_accuracy,none",
    "mvbench_smoke_fine_grained_action": "mvbench_accuracy,none",
    "mlvu_test_smoke": "mlvu_percetion_score,none",
}


def lmms_eval_command(family: str, checkpoint: Path, output: Path, processes: int) -> list[str]:
    arguments = [
        "--model", f"flashvid_{family}",
        "--model_args", f"pretrained={checkpoint},retention_ratio=0.1,{FAST_ARGS[family]}",
        "--tasks", ",".join(SMOKE_TASKS),
        "--include_path", str(SMOKE_TASKS_DIR),
        "--batch_size", "1",
        "--output_path", str(output),
        "--log_samples",
    ]  # fmt: skip
    if processes == 1:
        return [sys.executable, "-m", "lmms_eval", *arguments]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [accelerate, "launch", "--cpu", "--num_processes", str(processes), "-m", "lmms_eval", *arguments]


@pytest.fixture(scope="module")
def cli_run(tiny_checkpoint, tmp_path_factory):
    """`cli_run(family, processes)` -> (results JSON, {task: samples}); each command runs once per module."""
    cache: dict[tuple[str, int], tuple[dict, dict]] = {}

    def run(family: str, processes: int = 1) -> tuple[dict, dict]:
        if (family, processes) not in cache:
            output = tmp_path_factory.mktemp(f"cli-{family}-{processes}")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # CPU, the same for one and two processes
            command = lmms_eval_command(family, tiny_checkpoint(family), output, processes)
            completed = subprocess.run(
                command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
            )
            assert completed.returncode == 0, completed.stderr[-4000:]
            results = json.loads(next(output.rglob("*_results.json")).read_text())
            samples = {
                task: [
                    json.loads(line)
                    for line in next(output.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()
                ]
                for task in SCORED_TASKS
            }
            cache[family, processes] = (results, samples)
        return cache[family, processes]

    return run


def _answer(sample: dict) -> str:
    """The model's answer in a saved sample (the samples file keeps `resps` only where filtering changed it)."""
    answer = sample.get("resps", sample["filtered_resps"])
    while isinstance(answer, list):
        answer = answer[0]
    return answer


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_runs_every_smoke_task(cli_run, family):
    results, samples = cli_run(family)
    for task, metric in SCORED_TASKS.items():
        value = results["results"][task][metric]
        assert isinstance(value, (int, float)) and math.isfinite(value), (task, value)
        for sample in samples[task]:
            assert _answer(sample).strip(), (task, sample["doc_id"])
            assert (
                sample["token_counts"][0]["visual_tokens_out"] < sample["token_counts"][0]["visual_tokens_in"]
            )
    assert results["throughput"]["avg_visual_tokens_out"] < results["throughput"]["avg_visual_tokens_in"]


def test_two_processes_match_one(cli_run):
    single, single_samples = cli_run("qwen3_vl", 1)
    double, double_samples = cli_run("qwen3_vl", 2)
    for task, metric in SCORED_TASKS.items():
        assert double["results"][task][metric] == single["results"][task][metric], task
        answers = {sample["doc_id"]: _answer(sample) for sample in single_samples[task]}
        assert {sample["doc_id"]: _answer(sample) for sample in double_samples[task]} == answers
    for name in ("visual_tokens_in", "visual_tokens_out", "visual_tokens_after_pruning"):
        assert double["throughput"][f"avg_{name}"] == pytest.approx(single["throughput"][f"avg_{name}"])
