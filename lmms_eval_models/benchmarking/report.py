"""The Table 6 layout: our rows with speedups against our vanilla, the paper's rows beside them; CSV and Markdown."""

from __future__ import annotations

import csv
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmms_eval_models.benchmarking.paper import PAPER_HARDWARE, paper_rows
from lmms_eval_models.benchmarking.runner import BenchResult

# Column key -> header, in the order of the paper's Table 6 (then what the paper does not report).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("source", "Source"),
    ("method", "Method"),
    ("retention", "R"),
    ("tflops", "TFLOPs"),
    ("vision_ms", "Vision (ms)"),
    ("compression_ms", "Compression (ms)"),
    ("llm_forward_ms", "LLM forward (ms)"),
    ("prefill_ms", "Prefill (ms)"),
    ("prefill_speedup", "Prefill speedup"),
    ("other_ms", "Other (ms)"),
    ("ttft_ms", "TTFT (ms)"),
    ("ttft_speedup", "TTFT speedup"),
    ("peak_memory_gib", "Peak mem (GiB)"),
    ("visual_tokens", "Visual tokens (LLM)"),
    ("vision_attention", "Vision attention"),
)
# Extra CSV-only columns: diagnostics behind the table.
EXTRA_CSV: tuple[str, ...] = (
    "llm_forward_speedup",
    "between_ms",
    "vision_layer_ms",
    "visual_tokens_after_pruning",
    "num_segments",
    "calls",
)


@dataclass
class Checks:
    """Ratios measured in this run that the issue's goals are stated in."""

    lines: list[str]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(value: float | None) -> str:
    return "100%" if value is None else f"{value * 100:g}%"


def our_records(result: BenchResult) -> list[dict[str, Any]]:
    """One dict per row of ours, with speedups against our vanilla row."""
    vanilla = result.rows[0]
    records = []
    for row in result.rows:
        records.append({
            "source": "ours",
            "method": row.method,
            "retention": _ratio(row.retention_ratio),
            "tflops": row.tflops,
            "vision_ms": row.vision_ms,
            "compression_ms": row.compression_ms if row.retention_ratio is not None else None,
            "llm_forward_ms": row.llm_forward_ms,
            "prefill_ms": row.prefill_ms,
            "prefill_speedup": vanilla.prefill_ms / row.prefill_ms,
            "other_ms": row.ttft_ms - row.vision_ms - row.prefill_ms,
            "ttft_ms": row.ttft_ms,
            "ttft_speedup": vanilla.ttft_ms / row.ttft_ms,
            "peak_memory_gib": row.peak_memory_gib,
            "visual_tokens": row.llm_visual_tokens,
            "vision_attention": row.vision_attention,
            "llm_forward_speedup": vanilla.llm_forward_ms / row.llm_forward_ms,
            "between_ms": row.between_ms,
            "vision_layer_ms": row.vision_layer_ms,
            "visual_tokens_after_pruning": row.visual_tokens_after_pruning,
            "num_segments": row.num_segments,
            "calls": row.calls,
        })  # fmt: skip
    return records


def paper_records(table: str | None) -> list[dict[str, Any]]:
    return [
        {
            "source": "paper",
            "method": row.method,
            "retention": _ratio(row.retention_ratio),
            "tflops": row.tflops,
            "vision_ms": row.vision_encoding_ms,
            "compression_ms": row.compression_ms,
            "llm_forward_ms": row.llm_forward_ms,
            "prefill_ms": row.prefill_total_ms,
            "prefill_speedup": row.prefill_speedup,
            "other_ms": None,
            "ttft_ms": row.ttft_ms,
            "ttft_speedup": row.ttft_speedup,
            "peak_memory_gib": None,
            "visual_tokens": None,
            "vision_attention": None,
            "llm_forward_speedup": None,
        }
        for row in paper_rows(table)
    ]


def _cell(key: str, value: Any) -> str:
    if key.endswith("speedup"):
        return "–" if value is None else f"{value:.1f}x"
    if key == "peak_memory_gib":
        return _fmt(value, 2)
    if key == "tflops":  # small CPU shapes give fractions of a TFLOP: keep three significant digits
        return "–" if value is None else (f"{value:.1f}" if value >= 10 else f"{value:.3g}")
    return _fmt(value)


def table_cells(records: list[dict[str, Any]]) -> list[list[str]]:
    return [[_cell(key, record.get(key)) for key, _ in COLUMNS] for record in records]


def text_table(records: list[dict[str, Any]]) -> str:
    """Aligned plain-text table (numbers right-aligned)."""
    headers = [header for _, header in COLUMNS]
    cells = table_cells(records)
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]
    numeric = {i for i, (key, _) in enumerate(COLUMNS) if key not in ("source", "method", "vision_attention")}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in cells)])


def markdown_table(records: list[dict[str, Any]]) -> str:
    headers = [header for _, header in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_cells(records)]
    return "\n".join(lines)


def header_lines(result: BenchResult) -> list[str]:
    settings = result.settings
    dtype = str(settings.dtype).replace("torch.", "")
    videos = f"{len(settings.videos)} video file(s)" if settings.videos else "1 synthetic video"
    layout = f", layout {result.video_layout}" if result.video_layout else ""
    return [
        f"FlashVID efficiency (paper Table 6 layout): {result.model_name}{layout}, {settings.frames} frames, "
        f"{dtype}, {result.device_name}, attention {settings.attn_implementation}",
        f"{videos}; prompt {result.sequence_length} tokens ({result.visual_tokens_vanilla} visual in the vanilla LLM "
        f"input); medians of {settings.repeats} timed call(s) per video after {settings.warmup} warm-up(s).",
        "Prefill = compression + LLM forward; Other = TTFT − vision − prefill (pooling, embedding splice, "
        "position ids, LM head, generate() bookkeeping); TTFT = measured wall time to the first token "
        f"({'generate(max_new_tokens=1)' if settings.first_token == 'generate' else 'one cached forward + argmax'}; "
        "the paper reports vision + prefill); TFLOPs by Eq. 12 from the visual tokens the LLM received.",
    ]


def checks(result: BenchResult) -> list[str]:
    """The run's own ratios: LLM forward / prefill / TTFT speedups, compression share, vision overhead."""
    vanilla = result.rows[0]
    lines = []
    if "statistic" in vanilla.vision_attention:
        lines.append(
            "Vanilla runs through the patch for its token layout and pays the statistic's vision work too, so the "
            "vision overhead below compares like with like and understates FlashVID's cost against the stock model."
        )
    for row in result.rows[1:]:
        tag = f"FlashVID R={_ratio(row.retention_ratio)}"
        lines.append(
            f"{tag}: LLM forward {vanilla.llm_forward_ms / row.llm_forward_ms:.2f}x, prefill "
            f"{vanilla.prefill_ms / row.prefill_ms:.2f}x, TTFT {vanilla.ttft_ms / row.ttft_ms:.2f}x faster than vanilla; "
            f"compression {row.compression_ms:.1f} ms = {100 * row.compression_ms / row.prefill_ms:.1f}% of prefill."
        )
        overhead = row.vision_ms - vanilla.vision_ms
        budget = vanilla.vision_layer_ms
        verdict = "within one layer's work" if overhead <= budget else "MORE than one layer's work"
        lines.append(
            f"{tag}: vision {row.vision_ms:.1f} ms vs vanilla {vanilla.vision_ms:.1f} ms (+{overhead:.1f} ms; one "
            f"(last) vision layer ≈ {budget:.1f} ms): {verdict}. Vision attention: {row.vision_attention}."
        )
    return lines


def render(result: BenchResult, table: str | None) -> tuple[str, str, list[dict[str, Any]]]:
    """(plain-text report, Markdown report, all CSV records)."""
    ours = our_records(result)
    paper = paper_records(table)
    records = ours + paper
    paper_note = (
        [f"Paper rows: {PAPER_HARDWARE}, 64 frames, fp16 + flash-attn 2, means over 100 VideoMME samples (1 warm-up + "
         "3 runs each); their TTFT is vision + prefill."]
        if paper else []
    )  # fmt: skip
    head = header_lines(result)
    check_lines = checks(result)
    text = "\n".join([*head, "", text_table(records), "", *check_lines, *paper_note, *result.notes])
    markdown = "\n".join([
        "\n\n".join(head), "", markdown_table(records), "", *(f"- {line}" for line in check_lines + paper_note + result.notes)
    ])  # fmt: skip
    return text, markdown, records


def csv_rows(result: BenchResult, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    settings = result.settings
    context = {
        "model": result.model_name,
        "video_layout": result.video_layout or "",
        "device": result.device_name,
        "dtype": str(settings.dtype).replace("torch.", ""),
        "frames": settings.frames,
        "attention": settings.attn_implementation,
    }
    keys = [key for key, _ in COLUMNS] + list(EXTRA_CSV)
    rows = []
    for record in records:
        row = {**context, **{key: record.get(key) for key in keys}}
        if record["source"] == "paper":
            row.update(device=PAPER_HARDWARE, dtype="float16", frames=64, attention="flash_attention_2")
        rows.append(row)
    return rows


def _unused_path(directory: Path, stem: str, suffix: str) -> Path:
    """A path that does not exist yet: finished results are never overwritten."""
    candidate = directory / f"{stem}{suffix}"
    counter = 2
    while candidate.exists():
        candidate = directory / f"{stem}-{counter}{suffix}"
        counter += 1
    return candidate


def write_outputs(result: BenchResult, records: list[dict[str, Any]], markdown: str, out_dir: Path) -> tuple[Path, Path]:
    """Write `<model>_<frames>f_<dtype>_<device>_<UTC time>.csv/.md` under `out_dir`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = result.settings
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = Path(result.model_name).name.replace(" ", "_")
    stem = f"{name}_{settings.frames}f_{str(settings.dtype).replace('torch.', '')}_{settings.device.type}_{stamp}"
    csv_path = _unused_path(out_dir, stem, ".csv")
    md_path = csv_path.with_suffix(".md")
    rows = csv_rows(result, records)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()})
    md_path.write_text(markdown + "\n")
    return csv_path, md_path
