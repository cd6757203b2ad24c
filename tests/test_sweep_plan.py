"""`flashvid-sweep plan` on each paper sweep prints the official scripts' model, model_args and launch settings.

The expected values are the official FlashVID scripts' (see /work/shared notes: LLaVA-OV 32 frames, attn_div_v2;
LLaVA-Video 64 frames; Qwen 32 frames, attn_div, min_segment_num 4; Qwen3-VL pruning_layer 28 and
llm_retention_ratio 0.1; fixed-budget Qwen runs with min/max pixels 50176/200704; `accelerate launch
--num_processes 8`; batch size 1 with logged samples). Nothing is launched.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from lmms_eval_models import sweep as sweep_cli
from lmms_eval_models.sweeps.spec import load_sweep

SWEEPS = Path(__file__).resolve().parent.parent / "configs" / "sweeps"

OV = {"pretrained": "llava-hf/llava-onevision-qwen2-7b-ov-hf", "max_frames_num": "32",
      "attn_implementation": "flash_attention_2"}
VIDEO = {"pretrained": "llava-hf/LLaVA-Video-7B-Qwen2-hf", "max_frames_num": "64",
         "attn_implementation": "flash_attention_2"}
QWEN = {"pretrained": "Qwen/Qwen2.5-VL-7B-Instruct", "max_num_frames": "32", "attn_implementation": "flash_attention_2"}
QWEN_BUDGET = {"pretrained": "Qwen/Qwen2.5-VL-7B-Instruct", "min_pixels": "50176", "max_pixels": "200704",
               "attn_implementation": "flash_attention_2"}
QWEN3 = {"pretrained": "Qwen/Qwen3-VL-8B-Instruct", "max_num_frames": "32", "attn_implementation": "flash_attention_2"}
FLASHVID_LLAVA = {"enable_flashvid": "True", "token_selection_method": "attn_div_v2", "alpha": "0.7",
                  "temporal_threshold": "0.8", "do_segment": "True", "segment_threshold": "0.9", "min_segment_num": "8",
                  "complementary_segment": "True", "expansion": "1.25", "pruning_layer": "20",
                  "llm_retention_ratio": "0.3"}
FLASHVID_QWEN = {**FLASHVID_LLAVA, "token_selection_method": "attn_div", "min_segment_num": "4"}
VANILLA = {"enable_flashvid": "False"}
# Baselines at the paper's App. C.1 settings: FastV K = 2 with r = R (its printed pruning ratio 1 - R); VisionZip
# 54:10; FastVID c = 8, tau = 0.9, d = 0.4, p = 4, alpha = 0.6.
FASTV_PAPER = {"method": "fastv", "fastv_layer": "2", "fastv_ratio_rule": "paper"}
VISIONZIP = {"method": "visionzip", "visionzip_dominant": "54", "visionzip_contextual": "10"}
FASTVID_PAPER = {"method": "fastvid", "fastvid_min_segments": "8", "fastvid_segment_threshold": "0.9",
                 "fastvid_contextual_share": "0.4", "fastvid_anchor_step": "4", "fastvid_merging_factor": "0.6"}
# PruneVID: tau = 0.8, gamma = 0.25, alpha = 0.4, K = 10 (its cluster ratio follows from R).
PRUNEVID_PAPER = {"method": "prunevid", "prunevid_threshold": "0.8", "prunevid_segment_ratio": "0.25",
                  "prunevid_selection_ratio": "0.4", "prunevid_layer": "10"}
TASKS = "videomme_paper,egoschema_paper,egoschema_subset,longvideobench_val_v_paper,mvbench"
TASKS_MLVU = "videomme_paper,egoschema_paper,egoschema_subset,longvideobench_val_v_paper,mlvu_test_paper"

# sweep file -> (lmms-eval model, tasks, number of runs, {run name: exact model_args})
EXPECTED = {
    "table1_llava_onevision": ("flashvid_llava_onevision", TASKS, 21, {
        "vanilla": {**OV, **VANILLA},
        "FlashVID retention_ratio=0.1": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1"},
        "FlashVID retention_ratio=0.25": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.25"},
        "FastV retention_ratio=0.25": {**OV, **FASTV_PAPER, "retention_ratio": "0.25"},
        "FastV retention_ratio=0.15": {**OV, **FASTV_PAPER, "retention_ratio": "0.15"},
        "VisionZip retention_ratio=0.2": {**OV, **VISIONZIP, "retention_ratio": "0.2"},
        "VisionZip retention_ratio=0.1": {**OV, **VISIONZIP, "retention_ratio": "0.1"},
        "PruneVID retention_ratio=0.25": {**OV, **PRUNEVID_PAPER, "retention_ratio": "0.25"},
        "PruneVID retention_ratio=0.1": {**OV, **PRUNEVID_PAPER, "retention_ratio": "0.1"},
        "FastVID retention_ratio=0.25": {**OV, **FASTVID_PAPER, "retention_ratio": "0.25"},
        "FastVID retention_ratio=0.1": {**OV, **FASTVID_PAPER, "retention_ratio": "0.1"},
    }),
    # every method at the same ratios; FastV with the per-layer rule (the suite's default)
    "baselines": ("flashvid_llava_onevision", TASKS, 33, {
        "vanilla": {**OV, **VANILLA},
        "FlashVID retention_ratio=0.2": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.2"},
        "FastV retention_ratio=0.1": {**OV, "method": "fastv", "fastv_layer": "2", "retention_ratio": "0.1"},
        "VisionZip retention_ratio=0.25": {**OV, **VISIONZIP, "retention_ratio": "0.25"},
        "DivPrune retention_ratio=0.15": {**OV, "method": "divprune", "retention_ratio": "0.15"},
        "PruneVID retention_ratio=0.2": {**OV, **PRUNEVID_PAPER, "retention_ratio": "0.2"},
        "FastVID retention_ratio=0.1": {**OV, **FASTVID_PAPER, "retention_ratio": "0.1"},
        "Uniform retention_ratio=0.25": {**OV, "method": "uniform", "retention_ratio": "0.25"},
        "Random retention_ratio=0.1": {**OV, "method": "random", "seed": "0", "retention_ratio": "0.1"},
    }),
    "table1_llava_video": ("flashvid_llava_video", TASKS, 9, {
        "vanilla": {**VIDEO, **VANILLA},
        "FlashVID retention_ratio=0.2": {**VIDEO, **FLASHVID_LLAVA, "retention_ratio": "0.2"},
        "FlashVID retention_ratio=0.1": {**VIDEO, **FLASHVID_LLAVA, "retention_ratio": "0.1"},
        "FastV retention_ratio=0.2": {**VIDEO, **FASTV_PAPER, "retention_ratio": "0.2"},
        "FastV retention_ratio=0.1": {**VIDEO, **FASTV_PAPER, "retention_ratio": "0.1"},
        "VisionZip retention_ratio=0.2": {**VIDEO, **VISIONZIP, "retention_ratio": "0.2"},
        "FastVID retention_ratio=0.1": {**VIDEO, **FASTVID_PAPER, "retention_ratio": "0.1"},
    }),
    "table9_llava_video": ("flashvid_llava_video", TASKS, 9, {
        "vanilla": {**VIDEO, **VANILLA},
        "FlashVID retention_ratio=0.25": {**VIDEO, **FLASHVID_LLAVA, "retention_ratio": "0.25"},
        "FlashVID retention_ratio=0.15": {**VIDEO, **FLASHVID_LLAVA, "retention_ratio": "0.15"},
    }),
    "table2_qwen2_5_vl": ("flashvid_qwen2_5_vl", TASKS, 9, {
        "vanilla": {**QWEN, **VANILLA, "max_pixels": "200704"},
        "FlashVID retention_ratio=0.1": {**QWEN, **FLASHVID_QWEN, "max_pixels": "1605632", "retention_ratio": "0.1"},
    }),
    "table7_qwen2_5_vl": ("flashvid_qwen2_5_vl", TASKS, 9, {
        "vanilla": {**QWEN, **VANILLA, "max_pixels": "200704"},
        "FlashVID retention_ratio=0.15": {**QWEN, **FLASHVID_QWEN, "max_pixels": "1605632", "retention_ratio": "0.15"},
    }),
    "table3_qwen2_5_vl_frames": ("flashvid_qwen2_5_vl", TASKS_MLVU, 7, {
        "vanilla": {**QWEN_BUDGET, **VANILLA, "max_num_frames": "16"},
        "FlashVID R=0.2 frames=80": {**QWEN_BUDGET, **FLASHVID_QWEN, "max_num_frames": "80", "retention_ratio": "0.2"},
        "FastVID R=0.1 frames=160": {**QWEN_BUDGET, "method": "fastvid", "fastvid_min_segments": "8",
                                     "fastvid_segment_threshold": "0.9", "fastvid_anchor_step": "4",
                                     "fastvid_merging_factor": "0.6", "max_num_frames": "160", "retention_ratio": "0.1"},
    }),
    "table8_qwen2_5_vl_frames": ("flashvid_qwen2_5_vl", TASKS_MLVU, 7, {
        "vanilla": {**QWEN_BUDGET, **VANILLA, "max_num_frames": "16"},
        "FlashVID R=0.3333 frames=48": {**QWEN_BUDGET, **FLASHVID_QWEN, "max_num_frames": "48",
                                        "retention_ratio": "0.3333"},
    }),
    "table4_selection": ("flashvid_llava_onevision", TASKS, 6, {
        "Vanilla": {**OV, **VANILLA},
        "w/ E.R.": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "token_selection_method": "div_er"},
        "ATS": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "token_selection_method": "attn"},
    }),
    "table5_alpha": ("flashvid_llava_onevision", TASKS, 8, {
        "FlashVID alpha=0.0": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "alpha": "0.0"},
        "FlashVID alpha=1.0": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "alpha": "1.0"},
    }),
    "table11_tree_depth": ("flashvid_llava_onevision", TASKS, 6, {
        "1/Min": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "tstm_max_depth": "1"},
        "32/Inf": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1"},
    }),
    "table12_tree_breadth": ("flashvid_llava_onevision", TASKS, 5, {
        "1/Min": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "tstm_spatial_window": "1"},
        "9": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "tstm_spatial_window": "9"},
        "14/Inf": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1"},
    }),
    "table13_threshold_llava_onevision": ("flashvid_llava_onevision", TASKS, 4, {
        "FlashVID temporal_threshold=0.7": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1",
                                            "temporal_threshold": "0.7"},
    }),
    "table13_threshold_llava_video": ("flashvid_llava_video", TASKS, 4, {
        "FlashVID temporal_threshold=0.9": {**VIDEO, **FLASHVID_LLAVA, "retention_ratio": "0.1",
                                            "temporal_threshold": "0.9"},
    }),
    "table14_expansion": ("flashvid_llava_onevision", TASKS, 7, {
        "1.00": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "expansion": "1.0", "llm_retention_ratio": "1.0"},
        "1.25": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1"},
        "1.35": {**OV, **FLASHVID_LLAVA, "retention_ratio": "0.1", "expansion": "1.35",
                 "llm_retention_ratio": "0.0926"},
    }),
    "qwen3_vl": ("flashvid_qwen3_vl", f"{TASKS},mlvu_test_paper", 5, {
        "vanilla": {**QWEN3, **VANILLA},
        "FlashVID retention_ratio=0.1": {**QWEN3, **FLASHVID_QWEN, "pruning_layer": "28", "llm_retention_ratio": "0.1",
                                         "retention_ratio": "0.1"},
    }),
}


def parse_model_args(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(","))


def planned_commands(sweep_name: str, capsys: pytest.CaptureFixture) -> dict[str, list[str]]:
    """Run name (or label) -> the command printed by `plan`."""
    assert sweep_cli.main(["plan", str(SWEEPS / f"{sweep_name}.yaml")]) == 0
    out = capsys.readouterr().out
    commands: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("["):
            current = line.split("] ", 1)[1].split("  id=")[0]
        elif line.startswith("  $ ") and current is not None:
            commands.setdefault(current, shlex.split(line[4:]))
    return commands


def test_every_paper_sweep_file_is_covered() -> None:
    files = {path.stem for path in SWEEPS.glob("*.yaml")} - {"smoke", "baselines_smoke"}  # CPU sweeps
    assert files == set(EXPECTED)


@pytest.mark.parametrize("sweep_name", sorted(EXPECTED))
def test_plan_prints_the_official_settings(sweep_name: str, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SWEEPS.parent.parent)  # include paths are relative to the repository root
    model, tasks, count, runs = EXPECTED[sweep_name]
    commands = planned_commands(sweep_name, capsys)
    assert len(commands) == count
    sweep = load_sweep(SWEEPS / f"{sweep_name}.yaml")
    assert any(run.model_args.get("enable_flashvid") is False for run in sweep.runs), "every sweep has its vanilla run"
    for name, expected_args in runs.items():
        command = commands[name]
        # accelerate launch --num_processes 8 --main_process_port P -m lmms_eval ...
        assert Path(command[0]).name == "accelerate" and command[1:4] == ["launch", "--num_processes", "8"]
        assert command[4] == "--main_process_port" and command[6:8] == ["-m", "lmms_eval"]
        assert command.count("--log_samples") == 1
        flags = [part for part in command[8:] if part != "--log_samples"]
        options = dict(zip(flags[::2], flags[1::2]))
        assert options["--model"] == model
        assert options["--tasks"] == tasks
        assert options["--batch_size"] == "1"
        assert options["--seed"] == "0"
        assert parse_model_args(options["--model_args"]) == expected_args
        assert options["--output_path"].startswith(f"runs/{sweep_name}/.tmp/")
        assert options["--include_path"] == "configs/tasks/paper"


@pytest.mark.parametrize(("sweep_name", "pooling"), [
    ("table1_llava_onevision", "bilinear 2-D pooling to 14x14 tokens per frame, one newline token at the end"),
    ("table1_llava_video", "average pooling (stride 2) to 13x13 tokens per frame, one newline token per frame"),
    ("table2_qwen2_5_vl", "the model's own 2x2 patch merging, no extra pooling"),
])
def test_plan_shows_the_pooling(sweep_name: str, pooling: str, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SWEEPS.parent.parent)
    assert sweep_cli.main(["plan", str(SWEEPS / f"{sweep_name}.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count(f"  pooling: {pooling} (fixed by the model class)") == len(load_sweep(SWEEPS / f"{sweep_name}.yaml").runs)


def test_paper_sweeps_point_at_existing_paper_tables() -> None:
    from lmms_eval_models.sweeps.paper import paper_tables

    tables = paper_tables(SWEEPS.parent.parent / "results" / "paper")
    for sweep_name in EXPECTED:
        sweep = load_sweep(SWEEPS / f"{sweep_name}.yaml")
        if sweep.paper is not None:
            assert sweep.paper.table in tables, sweep_name


def test_slurm_plan_shows_the_job_settings(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SWEEPS.parent.parent)
    text = (SWEEPS / "table1_llava_video.yaml").read_text().replace(
        "launcher: {type: accelerate, num_processes: 8}", "launcher: {type: slurm, partition: gpu, gpus: 8, time: '12:00:00'}")
    path = tmp_path / "table1_llava_video.yaml"
    path.write_text(text)
    assert sweep_cli.main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "slurm via submitit (partition=gpu, gpus=8, time=720 min, num_processes=8)" in out
    assert "launch --num_processes 8" in out


@pytest.mark.parametrize("sweep_file", sorted(path.name for path in SWEEPS.glob("*.yaml")))
def test_every_run_passes_its_model_class_validation(sweep_file: str) -> None:
    """Each run's --model_args, as lmms-eval parses them, are accepted by the suite's model class (nothing loads);
    FastV runs also fit the paper's 28-layer LLMs (Qwen2-7B / Qwen2.5-7B)."""
    from lmms_eval.models import get_model
    from lmms_eval.utils import simple_parse_args_string

    from lmms_eval_models.methods import MethodSettings, llm_pruning_plan
    from lmms_eval_models.models.common import split_model_args
    from lmms_eval_models.sweeps.spec import render_model_args

    for run in load_sweep(SWEEPS / sweep_file).runs:
        model_class = get_model(run.model)
        parsed = simple_parse_args_string(render_model_args(run.model_args))
        arguments = split_model_args(model_class.base_class, parsed, model_class.model_name,
                                     model_class.suite_defaults)  # fmt: skip
        if arguments.method == "fastv" and sweep_file.startswith("table"):
            settings = MethodSettings.from_options(arguments.baseline_options)
            llm_pruning_plan("fastv", arguments.flashvid_config.retention_ratio, 28, settings)
