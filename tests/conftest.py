"""Session-wide test setup: offline hub access and tiny random-weight checkpoints built once per session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Nothing may reach a hub: set before any test imports transformers or lmms-eval, and inherited by subprocesses.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def flashvid_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$FLASHVID_CACHE when set (reused across sessions, e.g. in CI), else a folder private to this session."""
    configured = os.environ.get("FLASHVID_CACHE")
    return Path(configured) if configured else tmp_path_factory.mktemp("flashvid-cache")


@pytest.fixture(scope="session")
def tiny_checkpoint(flashvid_cache: Path) -> Iterator[Callable[[str], Path]]:
    """Factory `tiny_checkpoint(family) -> Path`: the family's tiny checkpoint, built on first request."""
    from lmms_eval_models.tiny_checkpoints import tiny_checkpoint_path

    def get(family: str) -> Path:
        return tiny_checkpoint_path(family, flashvid_cache)

    yield get
