"""Entry point for lmms-eval's `lmms_eval.models` group: the suite's model manifests."""

from __future__ import annotations


def manifests() -> list:
    """Return the lmms-eval `ModelManifest`s of the suite's models (filled by the plugin)."""
    return []
