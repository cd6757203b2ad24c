"""Sweeps that share the visual path, end to end: `flashvid-sweep run` (a group per family: one model load, one
decoding and vision pass per video) against `--no-reuse` (one lmms-eval process per run) on every family, with
vanilla, FlashVID and every baseline; and a cache folder of damaged files, through the SLURM launcher.

One sweep of each kind per module (the fixture), shared by the assertions: 10 runs on one smoke task, 2 documents.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.spec import load_sweep
from lmms_eval_models.tiny_checkpoints import FAMILIES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FAST = {"device": "cpu", "dtype": "float32"}
QWEN = {"max_num_frames": 8, "min_segment_num": 4, "token_selection_method": "attn_div", **FAST}
# sdpa (the default) on two families, eager on the other two; FastV (pruning inside the LLM) and VisionZip (reads
# the statistic) beside FlashVID and vanilla. Every method on one shared model: tests/test_visual_store.py.
EXACT_SWEEP = {
    "name": "reuse_exact",
    "models": [
        {"name": "llava_onevision", "model": "flashvid_llava_onevision",
         "model_args": {"pretrained": "tiny:llava_onevision", "max_frames_num": 8, **FAST}},
        {"name": "llava_video", "model": "flashvid_llava_video",
         "model_args": {"pretrained": "tiny:llava_video", "max_frames_num": 8, "attn_implementation": "eager", **FAST}},
        {"name": "qwen2_5_vl", "model": "flashvid_qwen2_5_vl", "model_args": {"pretrained": "tiny:qwen2_5_vl", **QWEN}},
        {"name": "qwen3_vl", "model": "flashvid_qwen3_vl",
         "model_args": {"pretrained": "tiny:qwen3_vl", "attn_implementation": "eager", **QWEN}},
    ],
    "tasks": ["videomme_smoke"],
    "include_path": [str(REPO / "configs" / "tasks" / "smoke")],
    "points": [
        {"name": "vanilla", "enable_flashvid": False},
        {"name": "flashvid", "retention_ratio": 0.25},
        {"name": "fastv", "method": "fastv", "retention_ratio": 0.4, "fastv_layer": 1, "models": ["llava_onevision"]},
        {"name": "visionzip", "method": "visionzip", "retention_ratio": 0.25, "models": ["llava_video"]},
    ],
    "limit": 2,
    "seed": 0,
}
# What differs between two runs of the same settings: wall times, dates, the output folder, function addresses.
TIMING_KEYS = ("prefill_ms", "compression_ms", "date", "start_time", "end_time", "total_evaluation_time_seconds",
               "total_elapsed_time", "avg_speed", "avg_prefill_ms", "avg_compression_ms")
PATH_KEYS = ("output_path", "hf_hub_log_args")
ADDRESS = re.compile(r" at 0x[0-9a-f]+>")


def sweep_command(sweep_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmms_eval_models.sweep", "run", str(sweep_file), "--no-report", *extra]


def comparable(value: Any) -> Any:
    """An lmms-eval output without what differs between two runs of the same settings."""
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items() if key not in TIMING_KEYS + PATH_KEYS}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return ADDRESS.sub(">", value) if isinstance(value, str) else value


def run_outputs(run_dir: Path) -> dict[str, Any]:
    """Every file lmms-eval wrote for a run (results and sample logs), by name without its date prefix."""
    outputs = {}
    for path in sorted((run_dir / store.LMMS_EVAL_DIR).rglob("*.json*")):
        name = path.name.split("_", 2)[-1]
        text = path.read_text()
        outputs[name] = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
    return outputs


def answers(outputs: dict[str, Any]) -> list[Any]:
    return [sample["filtered_resps"] for name, samples in outputs.items() if name.startswith("samples_")
            for sample in samples]  # fmt: skip


@pytest.fixture(scope="module")
def exact_sweeps(tmp_path_factory: pytest.TempPathFactory, flashvid_cache: Path, tiny_checkpoint) -> dict[str, Any]:
    """The same 10-run sweep with reuse (4 groups) and with --no-reuse (10 processes)."""
    for family in FAMILIES:
        tiny_checkpoint(family)  # built once per session, outside the sweeps
    root = tmp_path_factory.mktemp("reuse")
    sweep_file = root / "reuse_exact.yaml"
    sweep_file.write_text(yaml.safe_dump({**EXACT_SWEEP, "output_root": str(root / "runs")}, sort_keys=False))
    env = {**os.environ, "FLASHVID_CACHE": str(flashvid_cache)}
    completed = {}
    for name, extra in (("reuse", ()), ("no_reuse", ("--no-reuse", "--output-root", str(root / "no_reuse")))):
        completed[name] = subprocess.run(sweep_command(sweep_file, *extra), cwd=root, env=env, capture_output=True,
                                         text=True)  # fmt: skip
        assert completed[name].returncode == 0, completed[name].stdout[-3000:] + completed[name].stderr[-3000:]
    sweep = load_sweep(sweep_file)
    return {"root": root, "sweep_file": sweep_file, "sweep": sweep, "env": env, "completed": completed,
            "reuse_dir": sweep.sweep_dir(), "no_reuse_dir": sweep.sweep_dir(root / "no_reuse"),
            "store_dir": root / "runs" / "feature_store"}  # fmt: skip


def test_reuse_gives_the_no_reuse_answers_and_metrics_for_every_family(exact_sweeps: dict[str, Any]) -> None:
    sweep = exact_sweeps["sweep"]
    assert len(sweep.runs) == 10
    stdout = exact_sweeps["completed"]["reuse"].stdout
    assert "visual reuse: 4 group(s)" in stdout
    assert "visual reuse: off" in exact_sweeps["completed"]["no_reuse"].stdout
    for run in sweep.runs:
        grouped = store.finished_dir(exact_sweeps["reuse_dir"], run.run_id)
        alone = store.finished_dir(exact_sweeps["no_reuse_dir"], run.run_id)
        expected, got = run_outputs(alone), run_outputs(grouped)
        assert sorted(got) == sorted(expected) and len(expected) == 2, run.run_id  # results + videomme samples
        assert answers(got) == answers(expected) and answers(got), run.run_id
        assert comparable(got) == comparable(expected), run.run_id  # every sample log and metric
        manifest, alone_manifest = store.read_manifest(grouped), store.read_manifest(alone)
        assert "group" not in alone_manifest and manifest["group"]["size"] == len(
            [other for other in sweep.runs if other.model == run.model])
        # the manifest's command is the command a run of its own executes (output folder aside)
        assert [arg for arg in manifest["command"] if "/.tmp/" not in arg] == \
            [arg for arg in alone_manifest["command"] if "/.tmp/" not in arg]
        passes = manifest["group"]["visual_passes"]
        # the group's first run decodes and encodes both videos; every later run is served from memory
        expected_passes = (0, 2) if manifest["group"]["position"] == 1 else (2, 0)
        assert (passes["served"], passes["computed"]) == expected_passes, (run.run_id, passes)
    lines = [line for line in stdout.splitlines() if "visual passes served from the store" in line]
    assert len(lines) == 4 and all(re.search(r": \d+ of \d+ visual passes", line) for line in lines)
    assert not [path for path in (exact_sweeps["reuse_dir"] / ".tmp").iterdir() if path.is_dir()]


def damage(folder: Path) -> int:
    """Truncate half the cache files, garble the others, and add junk files; returns how many entries."""
    files = sorted(folder.rglob("*.safetensors"))
    for index, path in enumerate(files):
        data = path.read_bytes()
        if index % 2:
            path.write_bytes(data[: len(data) // 2])
        else:
            path.write_bytes(data[:100] + bytes(255 - byte for byte in data[100:300]) + data[300:])
    (folder / "ab").mkdir(exist_ok=True)
    (folder / "ab" / ("ab" + "0" * 62 + ".safetensors")).write_bytes(os.urandom(1000))
    (folder / "junk.txt").write_text("not an entry")
    return len(files)


def test_a_damaged_cache_never_changes_a_result_on_slurm(exact_sweeps: dict[str, Any], tmp_path: Path) -> None:
    """The reuse sweep's cache, every file truncated or garbled, serves the Qwen2.5-VL group again through the
    SLURM launcher (submitit's local executor, one job per group): each damaged file is discarded with a warning
    and recomputed, and every answer and metric is the --no-reuse one."""
    pytest.importorskip("submitit")
    cache = tmp_path / "cache"
    shutil.copytree(exact_sweeps["store_dir"], cache)
    assert damage(cache) == 8  # 2 videos per family
    document = {**EXACT_SWEEP, "output_root": str(tmp_path / "runs"), "feature_store": {"folder": str(cache)},
                "launcher": {"type": "slurm", "cluster": "local", "gpus": 0, "time": 20}}  # fmt: skip
    sweep_file = tmp_path / "reuse_exact.yaml"
    sweep_file.write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run(sweep_command(sweep_file, "--only", "flashvid_qwen2_5_vl.*"), cwd=tmp_path,
                            env=exact_sweeps["env"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted 1 job(s)" in result.stdout
    assert re.search(r"2 of 4 visual passes served .*; 2 damaged cache file\(s\) discarded", result.stdout)
    sweep = load_sweep(sweep_file)
    runs = [run for run in sweep.runs if run.model == "flashvid_qwen2_5_vl"]
    for run in runs:
        got = run_outputs(store.finished_dir(sweep.sweep_dir(), run.run_id))
        assert comparable(got) == comparable(run_outputs(store.finished_dir(exact_sweeps["no_reuse_dir"], run.run_id)))
    first = store.finished_dir(sweep.sweep_dir(), runs[0].run_id) / store.LOG_FILE
    assert "discarded a damaged cache file" in first.read_text()
    rewritten = [path for path in cache.rglob("*.safetensors") if path.stat().st_size > 1000]
    assert len(rewritten) >= 2  # the recomputed entries replaced the damaged ones


def test_an_accelerate_group_shards_its_videos_and_gives_the_no_reuse_outputs(exact_sweeps: dict[str, Any],
                                                                              tmp_path: Path) -> None:
    """The LLaVA-OneVision group under the accelerate launcher (2 CPU ranks, each its shard of the documents, one
    shared model per rank): every answer and metric is the single-process --no-reuse one, and the group's line
    counts the passes of both ranks."""
    document = {**EXACT_SWEEP, "output_root": str(tmp_path / "runs"), "feature_store": {"folder": False},
                "launcher": {"type": "accelerate", "num_processes": 2}}  # fmt: skip
    sweep_file = tmp_path / "reuse_exact.yaml"
    sweep_file.write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run(sweep_command(sweep_file, "--only", "flashvid_llava_onevision.*"), cwd=tmp_path,
                            env=exact_sweeps["env"], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "visual reuse: 1 group(s)" in result.stdout
    sweep = load_sweep(sweep_file)
    runs = [run for run in sweep.runs if run.model == "flashvid_llava_onevision"]
    assert len(runs) == 3  # vanilla, FlashVID, FastV
    for run in runs:
        grouped = store.finished_dir(sweep.sweep_dir(), run.run_id)
        assert "accelerate" in store.read_manifest(grouped)["command"][0]
        got = run_outputs(grouped)
        expected = run_outputs(store.finished_dir(exact_sweeps["no_reuse_dir"], run.run_id))
        assert answers(got) == answers(expected) and len(answers(got)) == 2, run.run_id
        assert comparable(got) == comparable(expected), run.run_id
    # 2 documents on 2 ranks: the first run computes one video per rank, the two later runs are served
    assert "4 of 6 visual passes served from the store" in result.stdout, result.stdout[-2000:]
