"""What a grouped sweep costs: an N-point retention-ratio sweep against its 1-point sweep, measured in one run.

    python scripts/bench_sweep_reuse.py                      # the four tiny families, smoke and long tasks
    python scripts/bench_sweep_reuse.py --with-no-reuse      # also the N-point sweep with --no-reuse
    python scripts/bench_sweep_reuse.py --families qwen2_5_vl --suites smoke --points 2 --limit 1   # quick

For each family and task suite, three `flashvid-sweep run` invocations, each timed as a whole (process start,
model load, every run, publication) in a fresh output folder with its own feature store:

- 1 point: FlashVID at R = 0.25;
- N points: FlashVID at R = 0.5, 0.25, 0.15, 0.1 (the first N), grouped: one model load, one decoding and vision
  pass per video (the issue's target: at most 1.5x the 1-point sweep); the table also gives the group's first
  run's own seconds (loading, decoding, vision passes included) and the mean of the later runs' (served);
- with --with-no-reuse, the same N points as N lmms-eval processes (what a sweep cost before).

Suites: `smoke` (the five smoke tasks, 16 frames of 64x64 per video) and `long` (videomme_long_synthetic: 6
videos of 300 frames of 256x256, `configs/tasks/bench`), where the visual path dominates. A warm-up sweep per
suite first builds the tiny checkpoints and writes the synthetic videos, so no timed sweep pays for them. The
machine's load (`os.getloadavg`) is printed before and after: the ratios are only comparable on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("llava_onevision", "llava_video", "qwen2_5_vl", "qwen3_vl")
RATIOS = (0.5, 0.25, 0.15, 0.1)
SUITES = {
    "smoke": {"tasks": ["videomme_smoke", "egoschema_smoke", "longvideobench_val_v_smoke", "mvbench_smoke",
                        "mlvu_test_smoke"], "include_path": "configs/tasks/smoke", "frames": 8},
    "long": {"tasks": ["videomme_long_synthetic"], "include_path": "configs/tasks/bench", "frames": 32},
}


def family_args(family: str, frames: int) -> dict[str, object]:
    """The smoke sweep's model_args of a family (configs/sweeps/smoke.yaml), at `frames` frames."""
    if family.startswith("llava"):
        return {"pretrained": f"tiny:{family}", "max_frames_num": frames, "device": "cpu", "dtype": "float32"}
    return {"pretrained": f"tiny:{family}", "max_num_frames": frames, "device": "cpu", "dtype": "float32",
            "min_segment_num": 4, "token_selection_method": "attn_div"}


def sweep_document(family: str, suite: str, ratios: tuple[float, ...], output_root: Path, limit: int | None) -> dict:
    settings = SUITES[suite]
    document = {
        "name": f"bench_{family}_{suite}_{len(ratios)}",
        "model": f"flashvid_{family}",
        "model_args": family_args(family, settings["frames"]),
        "tasks": settings["tasks"],
        "include_path": [str(REPO / settings["include_path"])],
        "grid": {"enable_flashvid": True, "retention_ratio": list(ratios)},
        "output_root": str(output_root),
        "seed": 0,
    }
    if limit is not None:
        document["limit"] = limit
    return document


def timed_sweep(document: dict, workdir: Path, *extra: str) -> tuple[float, list[float]]:
    """Wall seconds of `flashvid-sweep run` on `document` in a fresh folder (its own output and store), and each
    run's own seconds (its run.json; in a group, the first run's include loading the model), in sweep order."""
    folder = Path(tempfile.mkdtemp(dir=workdir))
    document = {**document, "output_root": str(folder / "runs")}
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(document, sort_keys=False))
    command = [sys.executable, "-m", "lmms_eval_models.sweep", "run", str(sweep_file), "--no-report", *extra]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"sweep failed: {' '.join(command)}\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    manifests = [json.loads(path.read_text()) for path in (folder / "runs").glob("*/runs/*/run.json")]
    per_run = [manifest["seconds"] for manifest in sorted(manifests, key=lambda manifest: manifest["order"])]
    shutil.rmtree(folder, ignore_errors=True)
    return seconds, per_run


def load() -> str:
    return "load average " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
    parser.add_argument("--points", type=int, default=4, choices=range(2, len(RATIOS) + 1),
                        help="points of the grouped sweep (default 4)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--with-no-reuse", action="store_true", help="also time the N points with --no-reuse")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up sweeps")
    args = parser.parse_args(argv)
    ratios = RATIOS[: args.points]
    print(f"bench_sweep_reuse: {' '.join(sys.argv[1:]) or '(defaults)'}; {load()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        workdir = Path(scratch)
        if not args.no_warmup:
            for suite in args.suites:
                for family in args.families:
                    timed_sweep(sweep_document(family, suite, ratios[1:2], workdir, args.limit), workdir)
        for suite in args.suites:
            for family in args.families:
                one, _ = timed_sweep(sweep_document(family, suite, ratios[1:2], workdir, args.limit), workdir)
                grouped, per_run = timed_sweep(sweep_document(family, suite, ratios, workdir, args.limit), workdir)
                alone = (timed_sweep(sweep_document(family, suite, ratios, workdir, args.limit), workdir,
                                     "--no-reuse")[0] if args.with_no_reuse else None)  # fmt: skip
                rows.append((family, suite, one, grouped, per_run, alone))
                print(f"  {family} {suite}: 1 point {one:.1f} s, {len(ratios)} points {grouped:.1f} s", flush=True)
    points = len(ratios)
    header = (f"| family | tasks | 1 point (s) | {points} points, grouped (s) | ratio | grouped run 1 (s) | "
              f"runs 2..{points}, mean (s) |")
    rule = "|---|---|---|---|---|---|---|"
    if args.with_no_reuse:
        header += f" {points} points, --no-reuse (s) | ratio |"
        rule += "---|---|"
    print()
    print(header)
    print(rule)
    for family, suite, one, grouped, per_run, alone in rows:
        later = sum(per_run[1:]) / len(per_run[1:])
        line = f"| {family} | {suite} | {one:.1f} | {grouped:.1f} | {grouped / one:.2f} | {per_run[0]:.1f} | {later:.2f} |"
        if alone is not None:
            line += f" {alone:.1f} | {alone / one:.2f} |"
        print(line)
    print(f"\n{load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
