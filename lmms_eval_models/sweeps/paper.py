"""The paper's tables (results/paper/paper_tables.yaml, transcribed as printed) in the report's column names."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from lmms_eval_models.bundled import paper_dir as bundled_paper_dir

PAPER_FILE = "paper_tables.yaml"
# Ablation tables print overall VideoMME and the EgoSchema "Total" column under short names.
COLUMN_ALIASES = {"videomme": "videomme_overall", "egoschema": "egoschema_total"}
_LEADING_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")


def default_paper_dir() -> Path:
    """results/paper of the current directory, else the copy the package ships."""
    here = Path.cwd() / "results" / "paper"
    if (here / PAPER_FILE).is_file():
        return here
    return bundled_paper_dir()


@cache
def _load(path: str) -> dict[str, Any]:
    document = yaml.safe_load(Path(path).read_text())
    return {table["id"]: table for table in document["tables"]}


def paper_tables(paper_dir: Path | None = None) -> dict[str, Any]:
    path = (paper_dir or default_paper_dir()) / PAPER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the paper's tables are missing: {path}")
    return _load(str(path.resolve()))


def leading_number(value: Any) -> float | None:
    """25 from '25%', 80 from '80 (5x)', 0.0 from '0.0/TSTM', 1.25 from '1.25'; None if not numeric."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    match = _LEADING_NUMBER.match(str(value))
    return float(match.group(1)) if match else None


def paper_frame(table_id: str, paper_dir: Path | None = None) -> pd.DataFrame:
    """One paper table as printed, with the report's column names (numbers as floats, keys as strings)."""
    tables = paper_tables(paper_dir)
    if table_id not in tables:
        raise KeyError(f"paper table {table_id!r} not in {PAPER_FILE}; tables are {sorted(tables)}")
    rows = [{COLUMN_ALIASES.get(key, key): value for key, value in row.items()} for row in tables[table_id]["rows"]]
    return pd.DataFrame(rows)


def _printed_precision(value: Any) -> float:
    """Half a unit of the last printed digit: 0.05 for '33.3%', 0.005 for '1.25', 0.5 for '25%'."""
    match = _LEADING_NUMBER.match(str(value))
    decimals = len(match.group(1).split(".")[1]) if match and "." in match.group(1) else 0
    return 0.5 * 10.0 ** -decimals + 1e-9


def values_match(paper_value: Any, run_value: Any) -> bool:
    """Numbers are equal to the paper's printed precision ('33.3%' matches R = 1/3, '1.25' does not match 1.2);
    text compares case-insensitively."""
    if run_value is None or paper_value is None:
        return False
    paper_number, run_number = leading_number(paper_value), leading_number(run_value)
    if paper_number is not None and run_number is not None and not isinstance(run_value, str):
        return abs(paper_number - run_number) <= _printed_precision(paper_value)
    return str(paper_value).strip().lower() == str(run_value).strip().lower()


def write_paper_csvs(out_dir: Path, paper_dir: Path | None = None) -> list[Path]:
    """Every paper table as a CSV (results/paper/<table id>.csv), for reading without YAML."""
    written = []
    for table_id in sorted(paper_tables(paper_dir)):
        path = out_dir / f"{table_id}.csv"
        paper_frame(table_id, paper_dir).to_csv(path, index=False, lineterminator="\n")
        written.append(path)
    return written
