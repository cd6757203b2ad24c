"""The official LLaVA scripts' model_args, pasted as they are after `--model flashvid_llava_onevision` (or
`flashvid_llava_video`) with the LLaVA-NeXT-format tiny checkpoint as `pretrained`, run a smoke task end to end through
lmms-eval's CLI. On this CPU machine their `attn_implementation=flash_attention_2` runs sdpa, with a warning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SMOKE_TASKS_DIR

pytestmark = pytest.mark.slow

SCRIPTS = {name: script for name, script in json.loads(
    (REPO_ROOT / "tests" / "data" / "official_llava_scripts.json").read_text()).items() if not name.startswith("_")}  # fmt: skip
OUR_MODEL = {"llava_onevision": "flashvid_llava_onevision", "llava_vid": "flashvid_llava_video"}
# frames x pooled tokens per frame of the tiny 7x7-patch tower: bilinear 4x4, average 3x3
VISUAL_TOKENS = {"llava_onevision": 32 * 16, "llava_vid": 64 * 9}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_official_model_args_run_a_smoke_task(script, tiny_checkpoint, tmp_path):
    official = SCRIPTS[script]
    model_args = official["model_args"].replace("PRETRAINED", str(tiny_checkpoint("llava_next")))
    command = [
        sys.executable, "-m", "lmms_eval",
        "--model", OUR_MODEL[official["model"]],
        "--model_args", model_args,
        "--tasks", "videomme_smoke",
        "--include_path", str(SMOKE_TASKS_DIR),
        "--batch_size", "1",
        "--output_path", str(tmp_path),
        "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "flash_attention_2 needs a CUDA device; running sdpa on cpu" in completed.stdout + completed.stderr

    results = json.loads(next(tmp_path.rglob("*_results.json")).read_text())
    assert math.isfinite(results["results"]["videomme_smoke"]["videomme_perception_score,none"])
    samples = [json.loads(line) for line in next(tmp_path.rglob("*_samples_videomme_smoke.jsonl")).read_text().splitlines()]
    assert samples
    for sample in samples:
        answer = sample.get("resps", sample["filtered_resps"])  # `resps` is kept only where filtering changed it
        assert str(answer).strip()  # a real answer, not lmms-eval's "" on a swallowed error
        figures = sample["token_counts"][0]
        assert figures["visual_tokens_in"] == VISUAL_TOKENS[official["model"]]
        if "enable_flashvid=True" in model_args:
            assert 0 < figures["visual_tokens_out"] < figures["visual_tokens_in"]
        else:
            assert figures["visual_tokens_out"] == figures["visual_tokens_in"]
