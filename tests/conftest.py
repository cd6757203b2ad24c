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
# The test models are tiny: one intra-op thread is fastest, and on a shared 2-core machine several threads per
# process oversubscribe the cores (a tiny LLaVA generate went from 7 s to 0.5 s). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


SMOKE_TASKS_DIR = REPO_ROOT / "configs" / "tasks" / "smoke"
PAPER_TASKS_DIR = REPO_ROOT / "configs" / "tasks" / "paper"
SMOKE_TASKS = (
    "videomme_smoke",
    "egoschema_smoke",
    "longvideobench_val_v_smoke",
    "mvbench_smoke",
    "mlvu_test_smoke",
)


@pytest.fixture(scope="session", autouse=True)
def _session_cache_env(flashvid_cache: Path) -> Iterator[None]:
    """Synthetic smoke videos (and anything else keyed by $FLASHVID_CACHE) go to the session's cache."""
    previous = os.environ.get("FLASHVID_CACHE")
    os.environ["FLASHVID_CACHE"] = str(flashvid_cache)
    yield
    if previous is None:
        os.environ.pop("FLASHVID_CACHE", None)
    else:
        os.environ["FLASHVID_CACHE"] = previous


@pytest.fixture(scope="session")
def evaluate() -> Callable[..., dict]:
    """`evaluate(model, model_args, tasks, include_path=smoke tasks)`: lmms-eval's simple_evaluate in-process.

    Only the given task folder is indexed (not lmms-eval's built-in task tree), which keeps a call to seconds.
    """

    def run(
        model: str,
        model_args: str,
        tasks: list[str] | tuple[str, ...],
        include_path: Path | str = SMOKE_TASKS_DIR,
    ) -> dict:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        return simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), batch_size=1,
                               task_manager=manager, log_samples=True)  # fmt: skip

    return run
