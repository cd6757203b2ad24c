"""flashvid-bench: Eq. 12, the 7B shapes, inputs, the CLI's defaults and errors, and the CPU mode end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from lmms_eval_models import bench
from lmms_eval_models.benchmarking import presets
from lmms_eval_models.benchmarking.flops import LLMShape, prefill_tflops
from lmms_eval_models.benchmarking.inputs import llava_placeholder_count, qwen_patchify, synthetic_frames
from lmms_eval_models.benchmarking.report import COLUMNS

TABLE_HEADERS = [header for _, header in COLUMNS]


def test_eq12_reproduces_the_papers_vanilla_tflops() -> None:
    shape = LLMShape.from_text_config(presets.llava_7b_config().text_config)
    # Table 6: 64 frames × 196 + 1 newline; Table 10: 64 × (169 + 1).
    assert round(prefill_tflops(shape, 64 * 196 + 1), 1) == 113.4
    assert round(prefill_tflops(shape, 64 * 170), 1) == 94.8
    pruned = prefill_tflops(shape, 1600, pruned_tokens=480, pruning_layer=20)
    assert pruned < prefill_tflops(shape, 1600)
    assert math.isclose(prefill_tflops(shape, 1600, pruned_tokens=1600, pruning_layer=20), prefill_tflops(shape, 1600))


def test_7b_presets_carry_the_published_shapes() -> None:
    llava = presets.llava_7b_config()
    text, vision = llava.text_config, llava.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 18944, 152064)  # fmt: skip
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size) == (1152, 26, 16, 4304, 384, 14)  # fmt: skip
    qwen = presets.qwen2_5_vl_7b_config()
    assert (qwen.vision_config.depth, qwen.vision_config.hidden_size, qwen.vision_config.out_hidden_size) == (32, 1280, 3584)
    assert qwen.text_config.num_hidden_layers == 28
    assert llava_placeholder_count(llava, 64) == 12545


def test_small_presets_keep_the_7b_ratios() -> None:
    text = presets.llava_small_config().text_config
    assert text.num_key_value_heads / text.num_attention_heads == 4 / 28
    assert presets.llava_small_config().vision_config.image_size == 384  # same token geometry: 27×27 → 14×14


def test_unknown_preset_is_named() -> None:
    with pytest.raises(ValueError, match="unknown --model 'llava_13b'"):
        presets.get_preset("llava_13b")


def test_qwen_patchify_keeps_every_pixel_once() -> None:
    frames = synthetic_frames(3, 56, 84, seed=1)  # odd frame count: padded to 4 by repeating the last
    rows, grid = qwen_patchify(frames, patch=14, temporal=2, merge=2)
    assert grid == [2, 4, 6]
    assert rows.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    padded = torch.cat([frames, frames[-1:]])
    assert torch.equal(rows.sum(), padded.sum()) or math.isclose(float(rows.sum()), float(padded.sum()), rel_tol=1e-5)
    # the first row is the top-left patch of frames 0 and 1, channel-major
    first = rows[0].view(3, 2, 14, 14)
    assert torch.equal(first[:, 0], frames[0, :, :14, :14])
    assert torch.equal(first[:, 1], frames[1, :, :14, :14])


def test_synthetic_video_is_deterministic_with_shots() -> None:
    video = synthetic_frames(8, 32, 32, seed=3)
    assert torch.equal(video, synthetic_frames(8, 32, 32, seed=3))
    similarity = torch.nn.functional.cosine_similarity(video[:-1].flatten(1), video[1:].flatten(1))
    assert similarity.max() > 0.95 and similarity.min() < similarity.max()  # smooth within shots, cuts between


def test_no_arguments_pick_the_small_cpu_shape_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = bench.settings_from_args(bench.build_parser().parse_args([]))
    assert settings.device.type == "cpu" and settings.dtype == torch.float32
    assert settings.preset.name == "llava_onevision_small" and settings.ratios == [0.1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ratios", "0.1,1.5"], "out of range"),
        (["--device", "cpu", "--flashvid", "alpah=0.5"], "alpah"),
        (["--device", "cpu", "--flashvid", "retention_ratio=0.2"], "--ratios"),
        (["--device", "cpu", "--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_with_the_key(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as error:
        bench.settings_from_args(bench.build_parser().parse_args(argv))
    assert message in (str(error.value.code) + capsys.readouterr().err)


def _table_lines(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Source"))
    return lines[start:]


@pytest.mark.slow
def test_cpu_mode_prints_the_table_and_flashvid_speeds_up_the_llm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--device", "cpu", "--frames", "8", "--ratios", "0.1", "--warmup", "1", "--repeats", "3",
                       "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    table = _table_lines(capsys.readouterr().out)
    assert table[0].split("  ")[0] == "Source"
    for header in TABLE_HEADERS:
        assert header in table[0]
    methods = [line.split()[:2] for line in table[2:7]]
    assert methods == [["ours", "Vanilla"], ["ours", "FlashVID"], ["paper", "Vanilla"], ["paper", "FastVID"],
                       ["paper", "FlashVID"]]  # fmt: skip

    (csv_path,) = tmp_path.glob("llava_onevision_small_8f_float32_cpu_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert [key for key, _ in COLUMNS] == [key for key in rows[0] if key in dict(COLUMNS)]
    vanilla, flashvid = rows[0], rows[1]
    assert (vanilla["method"], flashvid["method"], flashvid["retention"]) == ("Vanilla", "FlashVID", "10%")
    assert int(flashvid["visual_tokens"]) < int(vanilla["visual_tokens"]) / 5  # 8 × 25 + newline vs 8 × 196 + 1
    assert float(flashvid["compression_ms"]) > 0
    # Ratio measured in this run; generous against the shared CPU's noise (tokens drop about 8x).
    assert float(vanilla["llm_forward_ms"]) / float(flashvid["llm_forward_ms"]) > 1.5
    assert csv_path.with_suffix(".md").read_text().count("| ours |") == 2
    # the table says where the vision path runs extra work for the attention statistic
    assert "statistic" in flashvid["vision_attention"] and "statistic" not in vanilla["vision_attention"]


@pytest.mark.slow
def test_qwen_small_runs_through_the_patch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--device", "cpu", "--model", "qwen2_5_vl_small", "--frames", "4", "--frame-size", "224",
                       "--warmup", "0", "--repeats", "1", "--no-write"]) == 0  # fmt: skip
    table = _table_lines(capsys.readouterr().out)
    flashvid = next(line for line in table if line.startswith("ours    FlashVID"))
    assert "10%" in flashvid and "statistic" in flashvid


def test_profile_writes_a_trace_and_a_table_per_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    profile = tmp_path / "profile"
    assert bench.main(["--device", "cpu", "--frames", "4", "--ratios", "0.1", "--warmup", "0", "--repeats", "1",
                       "--no-write", "--profile", str(profile)]) == 0  # fmt: skip
    assert sorted(p.name for p in profile.iterdir()) == ["flashvid_r0.1.json", "flashvid_r0.1.txt", "vanilla.json",
                                                         "vanilla.txt"]  # fmt: skip
    assert "Self CPU" in (profile / "vanilla.txt").read_text()
    assert '"traceEvents"' in (profile / "flashvid_r0.1.json").read_text()[:2000]


def test_bench_compress_times_and_profiles_on_the_cpu(repo_root: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "bench_compress.py"), "--device", "cpu", "--shapes", "6x16x8",
         "--runs", "1", "--loop-runs", "1", "--warmup", "0", "--profile", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=repo_root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "same output as compress: True" in result.stdout
    assert "ms/video" in result.stdout
    assert (tmp_path / "compress_6x16x8_cpu.json").is_file()


@pytest.mark.parametrize(("table", "csv_name"), [("table6", "table6_efficiency_llava_onevision.csv"),
                                                 ("table10", "table10_efficiency_llava_video.csv")])  # fmt: skip
def test_paper_rows_match_the_papers_tables(repo_root: Path, table: str, csv_name: str) -> None:
    from lmms_eval_models.benchmarking.paper import paper_rows

    printed = list(csv.DictReader((repo_root / "results" / "paper" / csv_name).open()))
    ours = paper_rows(table)
    assert [row.method for row in ours] == [row["method"] for row in printed]
    for row, reference in zip(ours, printed):
        assert row.tflops == float(reference["tflops"])
        assert row.vision_encoding_ms == float(reference["vision_encoding_ms"])
        assert row.llm_forward_ms == float(reference["llm_forward_ms"])
        assert row.prefill_total_ms == float(reference["prefill_total_ms"])
        assert row.ttft_ms == float(reference["ttft_ms"])
        assert f"{row.prefill_speedup:.1f}x" == reference["prefill_speedup"]
        assert (row.compression_ms is None) == (reference["compression_ms"] == "")
    shipped = [r for r in csv.DictReader((repo_root / "results" / "efficiency" / "paper_table6.csv").open())
               if r["table"] == table]  # fmt: skip
    assert [float(r["ttft_ms"]) for r in shipped] == [row.ttft_ms for row in ours]
