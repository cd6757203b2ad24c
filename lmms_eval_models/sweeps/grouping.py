"""Which runs of a sweep share one loaded model: groups of runs that differ only by compression settings.

Runs are grouped when they use the same suite model class with the same model_args apart from the compression
settings (`method`, `enable_flashvid`, the FlashVID keys and the baseline keys), the same batch size and the same
extra lmms-eval arguments; tasks, limit, seed and gen_kwargs may differ (they are the evaluator's, not the
model's). Such runs need the same checkpoint, frames and pixels, so one process loads the model once and serves
every video's decoding and vision pass from one visual-feature store (`group_worker`). Runs of lmms-eval's own
model classes, and runs whose extra arguments configure what a shared process cannot (`UNGROUPABLE_FLAGS`), run
one process each, as without grouping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmms_eval_models.models import MODEL_CLASSES
from lmms_eval_models.sweeps.spec import Run, render_model_args

# lmms-eval flags whose effect is per process (a config file of several runs, loggers initialised once per
# process, another launcher): a run that sets one is not grouped.
UNGROUPABLE_FLAGS = ("--config", "--wandb_args", "--swanlab_args", "--launcher_args", "--power-analysis")


# What a store counts (`VisualStore.pass_counts`): passes served (from memory or disk) and computed; entries
# refused (without the statistic a run needed), over the memory budget, damaged cache files discarded, computed
# passes not stored (their call could not be rebuilt from the record).
PASS_COUNTS = ("served", "computed", "from_memory", "from_disk", "refused", "too_large", "discarded", "not_stored")


def passes_line(passes: Mapping[str, int]) -> str:
    """"N of M visual passes served from the store (...)", with what else the store met."""
    total = passes.get("served", 0) + passes.get("computed", 0)
    line = (f"{passes.get('served', 0)} of {total} visual passes served from the store "
            f"({passes.get('from_memory', 0)} from memory, {passes.get('from_disk', 0)} from disk)")
    details = (("refused", "found without the attention statistic a run needed, recomputed"),
               ("too_large", "over the memory budget, not kept in memory"),
               ("discarded", "damaged cache file(s) discarded"),
               ("not_stored", "computed but not stored (the call could not be rebuilt)"))
    extra = [f"{passes[name]} {what}" for name, what in details if passes.get(name)]
    return line + "".join(f"; {text}" for text in extra)


@dataclass(frozen=True)
class Group:
    """Runs that share one loaded model (in sweep order); `group_id` is stable for the same runs."""

    group_id: str
    model: str
    runs: tuple[Run, ...]

    @property
    def needs_statistic(self) -> bool:
        """Whether some run's method reads the vision attention statistic (every miss then computes it)."""
        from lmms_eval_models.methods import get_method
        from lmms_eval_models.models.common import resolve_method

        return any(get_method(resolve_method(run.model_args)).needs_statistic for run in self.runs)


def compression_keys() -> frozenset[str]:
    """The model_args a shared model changes between runs (`FlashVIDModel.reconfigure`)."""
    from lmms_eval_models.models.common import ENABLE_KEY, METHOD_KEY, baseline_key_names, flashvid_key_names

    return frozenset((ENABLE_KEY, METHOD_KEY, *flashvid_key_names(), *baseline_key_names()))


def is_groupable(run: Run) -> bool:
    flags = {arg.split("=", 1)[0] for arg in run.lmms_eval_args}
    return run.model in MODEL_CLASSES and not flags & set(UNGROUPABLE_FLAGS)


def group_key(run: Run) -> str:
    """What the runs of one group share: model class, non-compression model_args, batch size, extra arguments."""
    excluded = compression_keys()
    visual = {key: value for key, value in run.model_args.items() if key not in excluded}
    shared = {"model": run.model, "model_args": render_model_args(dict(sorted(visual.items()))),
              "batch_size": run.batch_size, "lmms_eval_args": list(run.lmms_eval_args)}  # fmt: skip
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:10]


def plan_groups(runs: Sequence[Run]) -> tuple[list[Group], list[Run]]:
    """(groups of groupable runs, in the order of their first run; the runs that run alone)."""
    members: dict[str, list[Run]] = {}
    alone = []
    for run in runs:
        if is_groupable(run):
            members.setdefault(group_key(run), []).append(run)
        else:
            alone.append(run)
    groups = [Group(f"{grouped[0].model}-{key}", grouped[0].model, tuple(grouped)) for key, grouped in members.items()]
    return groups, alone
