"""Entry point for lmms-eval's `lmms_eval.models` group: the suite's model manifests."""

from __future__ import annotations

from lmms_eval_models.models import MODEL_CLASSES


def manifests() -> list:
    """The lmms-eval `ModelManifest`s of the suite's models (simple classes: the paper used lmms-eval's simple
    model classes, which take the task's `doc_to_visual` + `doc_to_text`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, simple_class_path=path) for name, path in MODEL_CLASSES.items()]
