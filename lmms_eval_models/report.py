"""`flashvid-report`: a sweep's lmms-eval results as the paper's tables, beside the paper's numbers, with plots.

    flashvid-report configs/sweeps/table1_llava_onevision.yaml

writes into results/<sweep>/: <sweep>.csv / .md (our runs, in the paper's columns), <sweep>_vs_paper.csv / .md
(each of our rows, the paper's row and the difference) and accuracy_vs_retention.png. Tables hold no timestamps
and keep the sweep file's run order, so the same results give byte-identical files.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lmms_eval_models.bundled import resolve_sweep_file
from lmms_eval_models.sweeps import store
from lmms_eval_models.sweeps.paper import default_paper_dir, paper_frame, values_match
from lmms_eval_models.sweeps.results import BENCHMARK_COLUMNS, read_scores
from lmms_eval_models.sweeps.spec import FRAME_KEYS, Run, Sweep, SweepError, load_sweep, method_of

PRETTY = {"videomme_short": "VideoMME S", "videomme_medium": "VideoMME M", "videomme_long": "VideoMME L",
          "videomme_overall": "VideoMME", "egoschema_subset": "EgoSchema subset", "egoschema_total": "EgoSchema",
          "longvideobench": "LongVideoBench", "mvbench": "MVBench", "mlvu": "MLVU", "avg_score": "Avg",
          "rel_acc_pct": "Rel. Acc (%)", "retention_ratio": "R (%)"}
PLOT_COLUMNS = ("videomme_overall", "egoschema_subset", "egoschema_total", "longvideobench", "mvbench", "mlvu",
                "avg_score")


# ------------------------------------------------------------------------------------------ run fields


def run_fields(run: Run) -> dict[str, Any]:
    """What a report row says about a run, and what `paper.match` can refer to (plus every model_arg)."""
    method = method_of(run.model_args)
    ratio = run.model_args.get("retention_ratio")
    retention = 100.0 if method == "Vanilla" else (100 * float(ratio) if isinstance(ratio, int | float) else math.nan)
    frames = next((run.model_args[key] for key in FRAME_KEYS if key in run.model_args), None)
    return {**run.model_args, "model": run.model_entry, "run": run.label or run.name, "label": run.label or run.name,
            "method": method, "retention_ratio": round(retention, 2), "frames": frames}


# ----------------------------------------------------------------------------------------------- tables


def _egoschema_for_avg(row: Mapping[str, Any]) -> float:
    total = row.get("egoschema_total", math.nan)
    return total if isinstance(total, float) and not math.isnan(total) else row.get("egoschema_subset", math.nan)


def average(row: Mapping[str, Any], columns: Sequence[str]) -> float:
    """The paper's Avg: overall VideoMME, EgoSchema (Total; the subset where the total was not scored),
    LongVideoBench, MVBench and MLVU, over those the sweep evaluates."""
    parts = []
    for column in ("videomme_overall", "egoschema", "longvideobench", "mvbench", "mlvu"):
        if column == "egoschema":
            if "egoschema_subset" in columns or "egoschema_total" in columns:
                parts.append(_egoschema_for_avg(row))
        elif column in columns:
            parts.append(row.get(column, math.nan))
    return sum(parts) / len(parts) if parts and not any(math.isnan(p) for p in parts) else math.nan


def _reference_ids(runs: Sequence[Run]) -> dict[str, str]:
    """Per model entry, the run that Rel. Acc divides by: the one marked `reference`, else the first vanilla."""
    chosen: dict[str, str] = {}
    for run in runs:
        if run.reference:
            chosen[run.model_entry] = run.run_id
    for run in runs:
        if run.model_entry not in chosen and method_of(run.model_args) == "Vanilla":
            chosen[run.model_entry] = run.run_id
    return chosen


def _mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); NaN when a seed lacks the value or n < 2."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate_seeds(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per cell (runs that differ only by seed): the mean of each metric, `<metric>_std` and `n`.
    The cell keeps its first run's id (the one paper matching and Rel. Acc references look up)."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(row["_cell"], []).append(row)
    out = []
    for members in cells.values():
        cell = {**members[0], "n": len(members)}
        for metric in metrics:
            mean, std = _mean_and_std([member.get(metric, math.nan) for member in members])
            cell[metric], cell[f"{metric}_std"] = mean, std
        out.append(cell)
    return out


def collect(sweep: Sweep, sweep_dir: Path) -> pd.DataFrame:
    """One row per finished run (per cell: mean, std and n over its seeds, when a cell has several), in the
    sweep file's order, with the paper's columns."""
    rows = []
    for run in sweep.runs:
        run_dir = store.finished_dir(sweep_dir, run.run_id)
        if not store.is_finished(sweep_dir, run.run_id):
            continue
        rows.append({**run_fields(run), **read_scores(run_dir), "run_id": run.run_id, "_cell": run.cell_key()})
    columns = [c for c in BENCHMARK_COLUMNS if any(c in row for row in rows)]
    for row in rows:
        row["avg_score"] = average(row, columns)
    # Single-seed sweeps keep their table exactly as before: no n, no std columns.
    seeded = len({row["_cell"] for row in rows}) < len(rows)
    if seeded:
        rows = aggregate_seeds(rows, [*columns, "avg_score"])
    cell_of = {run.run_id: run.cell_key() for run in sweep.runs}
    references = _reference_ids(sweep.runs)
    by_cell = {row["_cell"]: row for row in rows}
    for row in rows:
        # Rel. Acc of a cell: its mean Avg over the reference cell's mean Avg.
        reference = by_cell.get(cell_of.get(references.get(row["model"], ""), ""))
        ok = reference is not None and reference["avg_score"] > 0
        row["rel_acc_pct"] = 100 * row["avg_score"] / reference["avg_score"] if ok else math.nan
    keys = ["model", "run", "method", "retention_ratio"]
    if any(row["frames"] is not None for row in rows):
        keys.append("frames")
    metrics = [*columns, "avg_score", "rel_acc_pct"]
    if seeded:
        keys.append("n")
        metrics = [column for metric in metrics
                   for column in (metric, f"{metric}_std") if column in rows[0] or column == metric]
    frame = pd.DataFrame(rows, columns=[*keys, *metrics, "run_id"])
    if len(sweep.models) == 1:
        frame = frame.drop(columns=["model"])
    return frame


def match_paper_rows(sweep: Sweep, ours: pd.DataFrame, paper_dir: Path | None) -> list[dict[str, Any] | None]:
    """For each of our rows, the paper row whose `paper.match` fields equal ours (None if none does)."""
    if sweep.paper is None:
        return [None] * len(ours)
    table = paper_frame(sweep.paper.table, paper_dir)
    for column, value in sweep.paper.where.items():
        table = table[table[column].astype(str) == value]
    fields = {run.run_id: run_fields(run) for run in sweep.runs}
    matched = []
    for run_id in ours["run_id"]:
        candidates = [row for row in table.to_dict("records")
                      if all(values_match(row.get(paper_key), fields[run_id].get(run_key))
                             for paper_key, run_key in sweep.paper.match.items())]
        matched.append(candidates[0] if candidates else None)
    return matched


def comparison(ours: pd.DataFrame, paper_rows: Sequence[dict[str, Any] | None]) -> pd.DataFrame:
    """Our row, the paper's row and ours minus the paper's, for each run (paper cells empty when unmatched)."""
    metrics = [c for c in ours.columns if c in (*BENCHMARK_COLUMNS, "avg_score", "rel_acc_pct")]
    keys = [c for c in ours.columns if c not in metrics and c != "run_id" and not c.endswith("_std")]
    rows = []
    for record, paper in zip(ours.to_dict("records"), paper_rows):
        head = {key: record[key] for key in keys}
        paper_values = {m: _number(paper.get(m)) if paper else math.nan for m in metrics}
        rows.append({**head, "source": "ours", **{m: record[m] for m in metrics}})
        rows.append({**head, "source": "paper", **paper_values})
        rows.append({**head, "source": "diff", **{m: record[m] - paper_values[m] for m in metrics}})
    return pd.DataFrame(rows, columns=[*keys, "source", *metrics])


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


# ----------------------------------------------------------------------------------------------- output


def _cell(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:+.1f}" if signed else f"{value:.1f}"
    return str(value)


def _mean_std_cell(mean: Any, std: Any) -> str:
    # A cell over several seeds reads "mean ± std"; with one seed (std NaN) just the value, as before.
    if isinstance(std, float) and not math.isnan(std) and isinstance(mean, float) and not math.isnan(mean):
        return f"{mean:.1f} ± {std:.1f}"
    return _cell(mean)


def to_markdown(frame: pd.DataFrame) -> str:
    shown = [column for column in frame.columns if not column.endswith("_std")]
    headers = [PRETTY.get(column, column) for column in shown]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for record in frame.to_dict("records"):
        signed = record.get("source") == "diff"
        cells = [_mean_std_cell(record[c], record[f"{c}_std"]) if f"{c}_std" in record
                 else _cell(record[c], signed and c not in ("retention_ratio", "frames", "n")) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    frame.to_csv(path, index=False, float_format="%.2f", lineterminator="\n")


def plot_accuracy(ours: pd.DataFrame, paper_rows: Sequence[dict[str, Any] | None], path: Path, title: str) -> None:
    """Accuracy against retention ratio, one panel per benchmark: one line per (model,) method, vanilla dashed
    (in its model's colour), the paper's points hollow and dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in PLOT_COLUMNS if c in ours.columns]
    ncols = min(4, len(columns))
    nrows = -(-len(columns) // ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows + 0.8), squeeze=False)
    several_models = "model" in ours.columns
    group_keys = ["model", "method"] if several_models else ["method"]
    records = ours.assign(_paper=list(paper_rows)).to_dict("records")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(record[k] for k in group_keys), []).append(record)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour_keys = list(dict.fromkeys(key[0] if several_models else key for key in groups))
    for axis, column in zip(axes.flat, columns):
        for key, members in groups.items():
            name = " / ".join(str(k) for k in key)
            colour_key = key[0] if several_models else key
            colour = palette[colour_keys.index(colour_key) % len(palette)]
            std_column = f"{column}_std"
            if key[-1] == "Vanilla":
                line_colour = colour if several_models else "grey"
                axis.axhline(members[0][column], linestyle="--", linewidth=1, color=line_colour, label=name)
                spread = members[0].get(std_column, math.nan)
                if isinstance(spread, float) and not math.isnan(spread):  # ± std over the seeds, as a band
                    axis.axhspan(members[0][column] - spread, members[0][column] + spread, color=line_colour,
                                 alpha=0.15, linewidth=0)
                continue
            members = sorted(members, key=lambda r: r["retention_ratio"])
            xs, ys = [r["retention_ratio"] for r in members], [r[column] for r in members]
            spreads = [r.get(std_column, math.nan) for r in members]
            if all(math.isnan(spread) for spread in spreads):  # one seed per point: a plain line, as before
                axis.plot(xs, ys, marker="o", color=colour, label=name)
            else:  # error bars of ± std over the seeds
                axis.errorbar(xs, ys, yerr=[0.0 if math.isnan(e) else e for e in spreads], marker="o",
                              color=colour, label=name, capsize=3)
            paper = [(r["retention_ratio"], _number(r["_paper"].get(column))) for r in members if r["_paper"]]
            if paper:
                axis.plot(*zip(*paper), marker="o", linestyle=":", markerfacecolor="none", color=colour,
                          label=f"{name} (paper)")
        axis.set_title(PRETTY.get(column, column))
        axis.set_xlabel("retention ratio R (%)")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
        # A flat panel (e.g. a random-weight smoke model scoring 0 everywhere) would get a 1e-17 offset axis.
        axis.ticklabel_format(axis="y", useOffset=False, style="plain")
        low, high = axis.get_ylim()
        if high - low < 1.0:
            middle = (low + high) / 2
            axis.set_ylim(max(0.0, middle - 5.0), middle + 5.0)
    for axis in list(axes.flat)[len(columns):]:
        axis.set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize="small")
    figure.suptitle(title)
    legend_rows = -(-len(labels) // 4)
    figure.tight_layout(rect=(0, min(0.4, 0.05 + 0.045 * legend_rows * 3 / nrows), 1, 1))
    figure.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: identical bytes per input
    plt.close(figure)


@dataclass(frozen=True)
class ReportPaths:
    table_csv: Path
    table_md: Path
    comparison_csv: Path | None
    comparison_md: Path | None
    plot: Path | None


def report_sweep(sweep: Sweep, sweep_dir: Path, out_dir: Path | None = None, paper_dir: Path | None = None,
                 print_table: bool = False) -> ReportPaths:
    """Write the sweep's tables (and plot) into out_dir (default results/<sweep>/); return their paths."""
    out_dir = out_dir or Path("results") / sweep.name
    out_dir.mkdir(parents=True, exist_ok=True)
    paper_dir = paper_dir or default_paper_dir()
    ours = collect(sweep, sweep_dir)
    if ours.empty:
        raise SystemExit(f"flashvid-report: no finished run of sweep {sweep.name} in {sweep_dir}")
    paper_rows = match_paper_rows(sweep, ours, paper_dir)
    table_csv, table_md = out_dir / f"{sweep.name}.csv", out_dir / f"{sweep.name}.md"
    write_csv(ours, table_csv)
    markdown = to_markdown(ours.drop(columns=["run_id"]))
    table_md.write_text(f"# {sweep.name}\n\n{markdown}")
    comparison_csv = comparison_md = None
    if sweep.paper is not None:
        compared = comparison(ours, paper_rows)
        comparison_csv, comparison_md = out_dir / f"{sweep.name}_vs_paper.csv", out_dir / f"{sweep.name}_vs_paper.md"
        write_csv(compared, comparison_csv)
        comparison_md.write_text(f"# {sweep.name} against the paper ({sweep.paper.table})\n\n{to_markdown(compared)}")
    plot = out_dir / "accuracy_vs_retention.png"
    plot_accuracy(ours, paper_rows, plot, sweep.name)
    if print_table:
        print(f"\n{markdown}")
        if comparison_md is not None:
            print(f"against the paper: {comparison_md}")
        print(f"tables: {table_csv} {table_md}\nplot: {plot}", flush=True)
    return ReportPaths(table_csv, table_md, comparison_csv, comparison_md, plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashvid-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", metavar="SWEEP", help="a sweep YAML file, or a built-in sweep's name")
    parser.add_argument("--output-root", default=None, help="where the sweep's runs are (default: its output_root)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: results/<sweep>)")
    parser.add_argument("--paper-dir", type=Path, default=None, help="folder of paper_tables.yaml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = load_sweep(resolve_sweep_file(args.sweep_file))
    except SweepError as error:
        print(f"flashvid-report: invalid sweep file {args.sweep_file}: {error}", file=sys.stderr)
        return 2
    report_sweep(sweep, sweep.sweep_dir(args.output_root), args.out, args.paper_dir, print_table=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
