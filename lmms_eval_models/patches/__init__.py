"""Apply FlashVID to one model instance: `apply_flashvid(model, config)` and `remove_flashvid(model)`.

Each supported model family has its own module (its `Family`: encode, splice, statistic source, registration) on
the shared prefill base `prefill.py`; this file only dispatches on the model's class name, so that importing the
package does not import every family's transformers module.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any

from lmms_eval_models.patches.common import FAMILY_MODULES, FlashVIDStats
from lmms_eval_models.patches.prefill import is_patched

__all__ = ["FAMILY_MODULES", "FlashVIDStats", "apply_flashvid", "is_patched", "remove_flashvid"]


def _family_module(model: Any) -> ModuleType:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILY_MODULES:
            return importlib.import_module(FAMILY_MODULES[cls.__name__])
    supported = ", ".join(sorted(FAMILY_MODULES))
    raise TypeError(f"FlashVID does not support {type(model).__name__}; supported model classes: {supported}")


def apply_flashvid(model: Any, config: Any, **family_options: Any) -> Any:
    """Patch `model` (this instance only) to compress its video tokens with FlashVID `config`.

    `config` is a `flashvid_core.FlashVIDConfig` or a mapping of its fields (built with `FlashVIDConfig.from_mapping`,
    which names an unknown key) in every family; None only where the method needs no config ("none").

    `family_options` are passed to the family's `apply`: every family takes `method` (a method of the registry
    `lmms_eval_models.methods`, run at `config.retention_ratio`; default "flashvid" with a config, "none" without),
    `baseline_options` (a mapping of `MethodSettings` fields) and `backend` (a `flashvid_core.Backend` for this
    instance's prefills), LLaVA also `video_layout`, Qwen3-VL `drop_vision_delimiters`. An unknown method, option
    or family option raises before the model is touched. Returns the model.
    """
    module = _family_module(model)
    _check_family_options(module, family_options)
    return module.apply(model, config, **family_options)


def _check_family_options(module: Any, family_options: dict[str, Any]) -> None:
    """A ValueError naming an unknown family option and the family's allowed ones (not a bare TypeError)."""
    allowed = [name for name in inspect.signature(module.apply).parameters if name not in ("model", "config")]
    unknown = sorted(set(family_options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown family option(s) {unknown} for {module.SUPPORTED_CLASS}: allowed {', '.join(allowed)}"
        )


def remove_flashvid(model: Any) -> Any:
    """Undo `apply_flashvid` on this instance; the model then behaves exactly like the stock one."""
    return _family_module(model).remove(model)
