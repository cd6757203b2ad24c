"""What every family's patch shares: the per-call statistics and instance-scoped class swapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Attribute set on a patched model instance; holds the family's patch state.
PATCH_ATTR = "_flashvid_patch"


@dataclass(frozen=True)
class FlashVIDStats:
    """What happened to the video tokens on the model's last forward pass with a video.

    Readable as `model.flashvid_stats` after a call; never written into the config.
    """

    visual_tokens_in: int
    visual_tokens_compressed: int
    visual_tokens_after_pruning: int
    num_segments: int
    compression_ms: float


def is_patched(model: Any) -> bool:
    """Whether FlashVID is currently applied to this model instance."""
    return getattr(model, PATCH_ATTR, None) is not None


def swap_class(module: Any, subclass_factory: Any) -> None:
    """Give one module instance a dynamically made subclass of its class (ToMe style), remembering the original.

    `subclass_factory(original_class) -> subclass`. Other instances of the same class are untouched.
    """
    original = module.__class__
    if getattr(module, "_flashvid_original_class", None) is not None:
        return
    module.__class__ = subclass_factory(original)
    module._flashvid_original_class = original


def restore_class(module: Any) -> None:
    """Undo `swap_class` on one module instance."""
    original = getattr(module, "_flashvid_original_class", None)
    if original is not None:
        module.__class__ = original
        del module._flashvid_original_class
