"""Per-family outputs of every method on the tiny checkpoints, pinned so that a restructuring changes none of them.

    python tests/family_outputs.py     # (re)record tests/data/family_outputs/transformers-<major>.json

Recorded once per transformers major version (the tiny checkpoints are built per version). Each entry: the
sequence length the LLM received, each decoder layer's length, the compressed visual-token count, the forward's
logits summarised (sum, absolute sum, the last position's top-5 ids) and four greedily generated token ids.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (method, FlashVIDConfig overrides beyond R = 0.4 and no inner pruning)
    **{method: (method, {}) for method in ("flashvid", "fastv", "visionzip", "divprune", "fastvid", "uniform",
                                           "random", "none")},
    "flashvid_inner_pruning": ("flashvid", {"pruning_layer": 2, "llm_retention_ratio": 0.5}),
    "flashvid_attn_div": ("flashvid", {"token_selection_method": "attn_div", "min_segment_num": 2}),
}


def fixture_path() -> Path:
    import transformers

    return HERE / "data" / "family_outputs" / f"transformers-{transformers.__version__.split('.')[0]}.json"


def family_outputs(case: Any) -> dict[str, dict[str, Any]]:
    """Every variant's outputs for one loaded family `Case` of test_patches_methods."""
    from test_patches_methods import BASELINE_OPTIONS, config_for, forward

    outputs = {}
    for name, (method, overrides) in VARIANTS.items():
        config = config_for(case, **overrides) if method != "none" else None
        case.apply(config, method=method, baseline_options=BASELINE_OPTIONS)
        result = forward(case)
        logits = result.logits.double()
        torch.manual_seed(0)
        with torch.no_grad():
            generated = case.model.generate(**case.inputs, max_new_tokens=4, do_sample=False)
        outputs[name] = {
            "llm_length": result.llm_length,
            "layer_lengths": result.layer_lengths,
            "visual_tokens_compressed": case.model.flashvid_stats.visual_tokens_compressed,
            "logits_sum": float(logits.sum()),
            "logits_abs_sum": float(logits.abs().sum()),
            "last_top5": logits[0, -1].topk(5).indices.tolist(),
            "generated": generated[0, case.inputs["input_ids"].shape[1]:].tolist(),
        }
    return outputs


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from test_patches_methods import FAMILIES, _llava_case, _qwen_case

    from lmms_eval_models.tiny_checkpoints import tiny_checkpoint_path

    recorded = {}
    for family in FAMILIES:
        build = _llava_case if family.startswith("llava") else _qwen_case
        recorded[family] = family_outputs(build(family, tiny_checkpoint_path(family)))
    path = fixture_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
