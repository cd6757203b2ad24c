"""The paper's efficiency rows (Table 6: LLaVA-OneVision-7B; Table 10: LLaVA-Video-7B), one A100, 64 frames.

Source: /work/shared/paper/paper_tables.yaml (ids table6_efficiency_llava_onevision, table10_efficiency_llava_video).
prefill = compression + LLM forward and TTFT = vision encoding + prefill hold for every printed row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    table: str
    model: str
    method: str
    retention_ratio: float | None
    tflops: float
    vision_encoding_ms: float
    compression_ms: float | None
    llm_forward_ms: float
    prefill_total_ms: float
    prefill_speedup: float
    ttft_ms: float
    ttft_speedup: float


PAPER_ROWS: tuple[PaperRow, ...] = (
    PaperRow("table6", "LLaVA-OneVision-7B", "Vanilla", None, 113.4, 785.0, None, 1220.8, 1220.8, 1.0, 2005.8, 1.0),
    PaperRow("table6", "LLaVA-OneVision-7B", "FastVID", 0.25, 22.4, 785.0, 28.6, 273.2, 301.8, 4.0, 1086.8, 1.8),
    PaperRow("table6", "LLaVA-OneVision-7B", "FlashVID", 0.10, 8.6, 785.0, 60.2, 133.1, 193.3, 6.3, 978.3, 2.1),
    PaperRow("table10", "LLaVA-Video-7B", "Vanilla", None, 94.8, 685.0, None, 1016.8, 1016.8, 1.0, 1701.8, 1.0),
    PaperRow("table10", "LLaVA-Video-7B", "FlashVID", 0.10, 8.0, 685.0, 85.7, 107.6, 193.3, 5.3, 878.3, 1.9),
)
PAPER_HARDWARE = "NVIDIA A100 (paper)"


def paper_rows(table: str | None) -> list[PaperRow]:
    return [row for row in PAPER_ROWS if row.table == table]
