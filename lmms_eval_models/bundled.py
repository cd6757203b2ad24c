"""The files the suite ships inside its package: sweep files, task YAMLs with their tiny data, the paper's numbers.

They live in `lmms_eval_models/resources/` so that a wheel carries them; in a checkout, `configs/` and
`results/paper/` are links to the same folders, so paths written relative to the repository root keep working.

    resources/configs/sweeps/<name>.yaml     the sweep files (`flashvid-sweep run smoke` names one by its stem)
    resources/configs/tasks/{smoke,paper}/   the suite's lmms-eval tasks (smoke tasks with their data/)
    resources/paper/                         the paper's tables (paper_tables.yaml and one CSV each)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SWEEP_SUFFIXES = (".yaml", ".yml")


def resource_root() -> Path:
    """The installed `resources/` folder (a wheel always installs unpacked, so this is a real folder)."""
    return Path(str(resources.files("lmms_eval_models") / "resources"))


def paper_dir() -> Path:
    return resource_root() / "paper"


def builtin_sweeps() -> dict[str, Path]:
    """Built-in sweep name (the file's stem) -> its file."""
    folder = resource_root() / "configs" / "sweeps"
    return {path.stem: path for path in sorted(folder.iterdir()) if path.suffix in SWEEP_SUFFIXES}


def resolve_sweep_file(name_or_path: str | Path) -> Path:
    """A sweep file path as given when it exists; else the built-in sweep of that name (`smoke`); else the path
    as given, so the caller reports the missing file under the name the user typed."""
    path = Path(name_or_path)
    if path.exists():
        return path
    return builtin_sweeps().get(str(name_or_path), path)


def resolve_include_path(include: str | Path) -> Path:
    """A relative task folder resolves against the current directory; where no such folder is there, against the
    bundled resources, laid out as the repository is (`configs/tasks/smoke`). Absolute paths stay as they are."""
    path = Path(include)
    if path.is_absolute() or path.is_dir():
        return path
    bundled = resource_root() / path
    return bundled if bundled.is_dir() else path
