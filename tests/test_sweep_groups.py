"""Which runs share a process (sweeps.grouping), the `reuse_visual` / `feature_store` keys and `--no-reuse`, and the
group process's command line: without running anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lmms_eval_models import sweep as sweep_cli
from lmms_eval_models.sweeps.command import build_group_command
from lmms_eval_models.sweeps.grouping import group_key, plan_groups
from lmms_eval_models.sweeps.spec import Launcher, SweepError, load_sweep, parse_sweep

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "sweeps" / "smoke.yaml"


def smoke_document(**changes: object) -> dict:
    document = yaml.safe_load(SMOKE.read_text())
    document.update(changes)
    return document


def test_runs_differing_only_by_compression_settings_share_a_group() -> None:
    sweep = load_sweep(SMOKE)
    groups, alone = plan_groups(sweep.runs)
    assert not alone
    assert [(group.model, len(group.runs)) for group in groups] == [
        ("flashvid_llava_onevision", 3), ("flashvid_llava_video", 3), ("flashvid_qwen2_5_vl", 3),
        ("flashvid_qwen3_vl", 3)]  # fmt: skip
    assert all(group.needs_statistic for group in groups)  # FlashVID reads the vision attention statistic
    # the group keeps the sweep's order of its runs
    assert [run.order for run in groups[0].runs] == sorted(run.order for run in groups[0].runs)


def test_visual_settings_split_groups_and_compression_settings_do_not() -> None:
    document = smoke_document(models=[smoke_document()["models"][2]], points=None, grid=[
        {"max_num_frames": [4, 8], "enable_flashvid": True, "retention_ratio": [0.25, 0.1]},
        {"max_num_frames": 8, "method": ["divprune", "random"], "retention_ratio": 0.25, "seed": [1, 2]}])
    sweep = parse_sweep(document, "groups")
    groups, _ = plan_groups(sweep.runs)
    frames = [{run.model_args["max_num_frames"] for run in group.runs} for group in groups]
    assert frames == [{4}, {8}] and [len(group.runs) for group in groups] == [2, 6]
    assert groups[1].needs_statistic  # its FlashVID runs read the statistic
    without = parse_sweep({**document, "grid": document["grid"][1]}, "groups")
    assert not plan_groups(without.runs)[0][0].needs_statistic  # DivPrune and random never do
    vanilla_like = {**sweep.runs[0].model_args, "retention_ratio": 0.5, "method": "uniform", "seed": 3}
    assert group_key(sweep.runs[0]) == group_key(type(sweep.runs[0])(**{**sweep.runs[0].__dict__,
                                                                         "model_args": vanilla_like}))


def test_lmms_eval_models_and_per_process_flags_run_alone() -> None:
    document = smoke_document(models=[smoke_document()["models"][0], {"name": "dummy", "model": "dummy",
                                                                      "model_args": {"response": "A"}}])
    groups, alone = plan_groups(parse_sweep(document, "mixed").runs)
    assert [group.model for group in groups] == ["flashvid_llava_onevision"]
    assert {run.model for run in alone} == {"dummy"}
    flagged = parse_sweep(smoke_document(lmms_eval_args=["--wandb_args", "project=x"]), "flagged")
    assert plan_groups(flagged.runs) == ([], list(flagged.runs))


@pytest.mark.parametrize(("changes", "key"), [
    ({"reuse_visual": "yes"}, "reuse_visual"),
    ({"feature_store": {"memory_gb": -1}}, "feature_store.memory_gb"),
    ({"feature_store": {"disk_gb": "lots"}}, "feature_store.disk_gb"),
    ({"feature_store": {"folder": 3}}, "feature_store.folder"),
    ({"feature_store": {"memory": 4}}, "feature_store.memory"),
    ({"feature_store": ["folder"]}, "feature_store"),
])  # fmt: skip
def test_bad_store_settings_name_the_key_and_the_allowed_range(changes: dict, key: str) -> None:
    with pytest.raises(SweepError) as raised:
        parse_sweep(smoke_document(**changes), "bad")
    assert raised.value.key == key
    if key == "feature_store.memory_gb":
        assert "must be a number of GiB in [0, 1048576], got -1" in str(raised.value)


def test_store_settings_and_their_defaults() -> None:
    default = parse_sweep(smoke_document(), "smoke")
    assert default.reuse_visual is True
    assert default.store_dir() == Path("runs") / "feature_store"
    assert default.store_dir("elsewhere") == Path("elsewhere") / "feature_store"  # follows --output-root
    assert (default.feature_store.memory_bytes, default.feature_store.disk_bytes) == (4 << 30, 200 << 30)
    custom = parse_sweep(smoke_document(reuse_visual=False, feature_store={
        "memory_gb": 0.5, "disk_gb": 10, "folder": "/scratch/features"}), "smoke")  # fmt: skip
    assert custom.reuse_visual is False and custom.store_dir() == Path("/scratch/features")
    assert custom.feature_store.memory_bytes == 1 << 29
    assert parse_sweep(smoke_document(feature_store={"folder": False}), "smoke").store_dir() is None


def test_group_commands_follow_the_launcher(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    assert build_group_command(spec, Launcher(), "g", python="py") == [
        "py", "-m", "lmms_eval_models.sweeps.group_worker", str(spec)]  # fmt: skip
    accelerated = build_group_command(spec, Launcher(type="accelerate", num_processes=8), "g", accelerate=lambda: "acc")
    assert accelerated[:4] == ["acc", "launch", "--num_processes", "8"] and accelerated[-3:-1] == [
        "-m", "lmms_eval_models.sweeps.group_worker"]  # fmt: skip
    single_gpu_job = build_group_command(spec, Launcher(type="slurm", partition="p", num_processes=1), "g")
    assert single_gpu_job[0] == sys.executable


def test_plan_shows_the_groups_and_no_reuse_turns_them_off(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert sweep_cli.main(["plan", str(SMOKE), "--output-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "visual reuse: 4 group(s) of runs sharing one model load and one visual pass per video" in out
    assert f"feature store: folder {tmp_path / 'feature_store'} (memory 4 GiB, disk 200 GiB)" in out
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump(smoke_document(reuse_visual=False)))
    assert sweep_cli.main(["plan", str(off)]) == 0
    assert "visual reuse: off (one lmms-eval process per run)" in capsys.readouterr().out
    assert sweep_cli.build_parser().parse_args(["run", "smoke", "--no-reuse"]).no_reuse is True
