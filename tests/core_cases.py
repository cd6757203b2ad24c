"""Golden conformance cases (tests/conformance/, produced by the official FlashVID code) and their checks.

Each `check_*` runs flashvid_core on a case's inputs and raises AssertionError with a precise message on any
difference. Comparison rules (conformance/README.md): integers exactly; floats np.allclose(atol=1e-4,
rtol=1e-4); rows sharing one global index compared as a multiset.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import segment_reference
import torch

import flashvid_core as fc

CONFORMANCE_DIR = Path(__file__).parent / "conformance"
ATOL = 1e-4
RTOL = 1e-4
# Keys of a case's config that are the reference's per-call derived values, not FlashVIDConfig fields.
DERIVED_KEYS = ("num_attn_div_tokens", "num_sttm_tokens")


@lru_cache(maxsize=1)
def manifest() -> dict[str, Any]:
    return json.loads((CONFORMANCE_DIR / "manifest.json").read_text())


def cases(function: str | None = None) -> list[dict[str, Any]]:
    return [c for c in manifest()["cases"] if function is None or c["function"] == function]


def case_ids(function: str | None = None) -> list[str]:
    return [c["case_id"] for c in cases(function)]


def arrays(case: dict[str, Any]) -> dict[str, np.ndarray]:
    with np.load(CONFORMANCE_DIR / case["file"]) as data:
        return {key: data[key] for key in data.files}


def config_of(case: dict[str, Any]) -> fc.FlashVIDConfig:
    values = {k: v for k, v in case["config"].items() if k not in DERIVED_KEYS}
    return fc.FlashVIDConfig.from_mapping(values)


def budgets_of(case: dict[str, Any]) -> tuple[int, int]:
    return case["config"]["num_attn_div_tokens"], case["config"]["num_sttm_tokens"]


def assert_equal_ints(name: str, got: Any, expected: np.ndarray) -> None:
    got_array = np.asarray(got.cpu() if isinstance(got, torch.Tensor) else got)
    if got_array.shape != expected.shape or not np.array_equal(got_array, expected):
        diff = ""
        if got_array.shape == expected.shape:
            where = np.nonzero(got_array != expected)
            diff = f"; first differences at {[int(i[0]) for i in where]}"
        raise AssertionError(
            f"{name}: got shape {got_array.shape} {got_array.ravel()[:20]} ..., expected shape {expected.shape} "
            f"{expected.ravel()[:20]} ...{diff}"
        )


def assert_close(name: str, got: torch.Tensor, expected: np.ndarray) -> None:
    got_array = got.detach().float().cpu().numpy()
    if got_array.shape != expected.shape:
        raise AssertionError(f"{name}: shape {got_array.shape}, expected {expected.shape}")
    if not np.allclose(got_array, expected, atol=ATOL, rtol=RTOL):
        error = np.abs(got_array - expected).max()
        raise AssertionError(f"{name}: max abs difference {error:.3g} exceeds atol/rtol {ATOL}")


def assert_rows_match(name: str, got_tokens: torch.Tensor, got_indices: np.ndarray, expected_tokens: np.ndarray,
                      expected_indices: np.ndarray) -> None:
    """Rows in index order; rows sharing an index compared as a multiset (the reference sorts unstably)."""
    got = got_tokens.detach().float().cpu().numpy()
    if got.shape != expected_tokens.shape:
        raise AssertionError(f"{name}: tokens shape {got.shape}, expected {expected_tokens.shape}")
    if np.allclose(got, expected_tokens, atol=ATOL, rtol=RTOL):
        return
    unique = np.unique(expected_indices)
    for index in unique:
        got_rows = got[got_indices == index]
        expected_rows = expected_tokens[expected_indices == index]
        remaining = list(range(len(expected_rows)))
        for row in got_rows:
            match = next((j for j in remaining if np.allclose(row, expected_rows[j], atol=ATOL, rtol=RTOL)), None)
            if match is None:
                error = min(np.abs(row - expected_rows[j]).max() for j in range(len(expected_rows)))
                raise AssertionError(f"{name}: token row for global index {index} differs (max abs {error:.3g})")
            remaining.remove(match)


def check_flashvid_compression(case: dict[str, Any], device: str = "cpu", dtype: torch.dtype = torch.float32,
                               inject_noise: bool = False) -> fc.Compression | None:
    data = arrays(case)
    features = torch.from_numpy(data["video_features"]).to(device=device, dtype=dtype)
    attention = torch.from_numpy(data["cls_attention"]).to(device=device, dtype=dtype)
    if case.get("expect_exception"):
        try:
            config = config_of(case)
            fc.compress(features, attention, config)
        except ValueError:
            return None
        raise AssertionError("expected ValueError (the reference raised " + case["expect_exception"] + ")")
    config = config_of(case)
    kwargs: dict[str, Any] = {}
    if inject_noise:
        kwargs["dpc_noise"] = torch.from_numpy(data["dpc_noise"]) if "dpc_noise" in data else torch.zeros(0)
    torch.manual_seed(case["torch_seed"])
    out = fc.compress(features, attention, config, **kwargs)
    assert_equal_ints("segment_lengths", out.segment_lengths, data["segment_lengths"])
    assert_equal_ints("segment_num_tokens", out.segment_num_tokens, data["segment_num_tokens"])
    assert_equal_ints("num_attn_div_tokens", out.num_selected, data["num_attn_div_tokens"])
    assert_equal_ints("num_sttm_tokens", out.num_merged, data["num_sttm_tokens"])
    assert_equal_ints("visual_token_length", out.num_tokens, data["visual_token_length"])
    assert_equal_ints("out_indices", out.indices, data["out_indices"])
    if out.tokens.dtype != features.dtype:
        raise AssertionError(f"tokens dtype {out.tokens.dtype}, expected the input dtype {features.dtype}")
    assert_rows_match("out_tokens", out.tokens, out.indices.cpu().numpy(), data["out_tokens"], data["out_indices"])
    return out


def check_segment(case: dict[str, Any], device: str = "cpu") -> None:
    data = arrays(case)
    params = case["params"]
    lengths = fc.segment_lengths(
        torch.from_numpy(data["frame_features"]).to(device),
        params["segment_threshold"],
        params["min_segment_num"],
        params["complementary_segment"],
    )
    assert_equal_ints("segment_lengths", lengths, data["segment_lengths"])


def check_token_selection(case: dict[str, Any], device: str = "cpu") -> None:
    data = arrays(case)
    params = case["params"]
    features = torch.from_numpy(data["features"]).to(device)
    attention = torch.from_numpy(data["cls_attention"]).to(device)
    keep = fc.select_tokens(features, attention, params["num_retained_tokens"], params["method"])
    assert_equal_ints("keep_indices", keep, data["keep_indices"])
    assert_close("selected_features", torch.gather(features, 1, keep.unsqueeze(-1).expand(-1, -1, features.shape[-1])),
                 data["selected_features"])


def check_dpc_knn(case: dict[str, Any], device: str = "cpu", inject_noise: bool = False) -> None:
    data = arrays(case)
    params = case["params"]
    features = torch.from_numpy(data["features"]).to(device)
    mask = torch.from_numpy(data["valid_token_mask"]).to(device) if "valid_token_mask" in data else None
    noise = torch.from_numpy(data["dpc_noise"]).to(device).reshape(features.shape[:2]) if inject_noise else None
    torch.manual_seed(case["torch_seed"])
    assignment, centres = fc.dpc_knn(features, params["num_clusters"], params["k"], valid_token_mask=mask, noise=noise)
    assert_equal_ints("cluster_center_indices", centres, data["cluster_center_indices"])
    assert_equal_ints("cluster_indices", assignment, data["cluster_indices"])
    if mask is None and features.shape[1] > 0:
        # The ragged batched form must agree with the single-call form.
        count = features.shape[1]
        k = params["k"]
        ragged_noise = torch.from_numpy(data["dpc_noise"]).to(device).reshape(1, -1)
        ragged_assignment, ragged_centres = fc.dpc_knn_ragged(
            features.float(), torch.tensor([count], device=device), torch.tensor([params["num_clusters"]], device=device),
            torch.tensor([k], device=device), ragged_noise, [count], [params["num_clusters"]], [k],
        )
        assert_equal_ints("ragged cluster_center_indices", ragged_centres, data["cluster_center_indices"])
        assert_equal_ints("ragged cluster_indices", ragged_assignment, data["cluster_indices"])


def check_spatiotemporal_compression(case: dict[str, Any], device: str = "cpu") -> None:
    data = arrays(case)
    params = case["params"]
    features = torch.from_numpy(data["video_features"]).to(device)
    before = features.clone()
    tokens, indices, counts = segment_reference.merge_segment(
        features,
        torch.from_numpy(data["token_mask"]).to(device),
        params["temporal_threshold"],
        params["num_attn_div_tokens"],
        params["num_sttm_tokens"],
    )
    assert torch.equal(features, before), "merge_segment mutated its input"
    assert_equal_ints("retained_counts", counts, data["retained_counts"])
    assert_equal_ints("retained_indices", indices, data["retained_indices"])
    assert_close("retained_tokens", tokens, data["retained_tokens"])


def check_segment_compression(case: dict[str, Any], device: str = "cpu", inject_noise: bool = False) -> None:
    """One segment end to end with the case's explicit budgets (compress_segment)."""
    data = arrays(case)
    features = torch.from_numpy(data["segment_features"]).to(device)
    attention = torch.from_numpy(data["cls_attention"]).to(device)
    if case.get("expect_exception"):
        try:
            segment_reference.compress_segment(features, attention, config_of(case), *budgets_of(case))
        except ValueError:
            return
        raise AssertionError("expected ValueError (the reference raised " + case["expect_exception"] + ")")
    kwargs: dict[str, Any] = {"dpc_noise": torch.from_numpy(data["dpc_noise"])} if inject_noise else {}
    torch.manual_seed(case["torch_seed"])
    out = segment_reference.compress_segment(features, attention, config_of(case), *budgets_of(case), **kwargs)
    global_indices = torch.from_numpy(data["segment_global_indices"]).flatten()
    got_indices = global_indices[out.indices.cpu()].numpy()
    order = np.argsort(data["global_indices"], kind="stable")
    expected_indices = data["global_indices"][order]
    assert_equal_ints("global_indices (sorted)", got_indices, expected_indices)
    assert_rows_match("tokens", out.tokens, got_indices, data["tokens"][order], expected_indices)


def check_fastv_prune(case: dict[str, Any], device: str = "cpu") -> None:
    data = arrays(case)
    params = case["params"]
    attention = fc.last_query_attention_from_probabilities(torch.from_numpy(data["attentions"]).to(device))[0]
    keep = fc.llm_keep_positions(
        attention, params["visual_token_start_index"], params["visual_token_length"], params["llm_retention_ratio"]
    )
    assert_equal_ints("keep_indices", keep, data["keep_indices"])
    visual_after = int(((keep >= params["visual_token_start_index"]) &
                        (keep < params["visual_token_start_index"] + params["visual_token_length"])).sum())
    assert_equal_ints("visual_token_length_after", visual_after, data["visual_token_length_after"])
    hidden = torch.from_numpy(data["hidden_states"]).to(device)
    assert_close("hidden_states_out", hidden[:, keep], data["hidden_states_out"])
    assert_equal_ints("position_ids_out", keep.unsqueeze(0), data["position_ids_out"])


CHECKS = {
    "flashvid_compression": check_flashvid_compression,
    "segment": check_segment,
    "token_selection": check_token_selection,
    "dpc_knn": check_dpc_knn,
    "spatiotemporal_compression": check_spatiotemporal_compression,
    "segment_compression": check_segment_compression,
    "fastv_prune": check_fastv_prune,
}


def run_case(case: dict[str, Any], **kwargs: Any) -> Any:
    return CHECKS[case["function"]](case, **kwargs)


def loop_reference():
    """The loop-style implementation kept in scripts/bench_compress.py (an independent oracle for tests)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_compress.py"
    spec = importlib.util.spec_from_file_location("bench_compress", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module
