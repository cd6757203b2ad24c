"""The Backend settings object (which fast paths may run) and the layering: reference stages import no accel code."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import core_cases as cc
import pytest
import torch
from test_patches_methods import case  # noqa: F401  (the tiny-checkpoint `case` fixture)

import flashvid_core as fc
from flashvid_core.backend import current_backend, fast_path

CORE = Path(fc.__file__).resolve().parent
REFERENCE_MODULES = ("config", "segmentation", "selection", "merging", "clustering", "pipeline", "llm_pruning",
                     "backend", "_transfer")


def test_reference_modules_import_nothing_from_accel() -> None:
    for name in REFERENCE_MODULES:
        tree = ast.parse((CORE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert "accel" not in (node.module or ""), (name, node.module)
                assert not (node.level and node.module is None and any(a.name == "accel" for a in node.names)), name
            elif isinstance(node, ast.Import):
                assert all("accel" not in alias.name for alias in node.names), name


def test_no_module_level_flag_left_in_the_core() -> None:
    """Fast paths are chosen by the Backend, not by module globals set to True/False."""
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
                assert not isinstance(node.value.value, bool), f"{path.relative_to(CORE)}:{node.lineno}"


def test_the_accel_layer_fills_every_slot() -> None:
    for name in ("greedy_max_min", "walk_tree_sums", "stepwise_walk", "uniform_draws", "compress_stage"):
        assert fast_path(name) is not None, name


def test_use_backend_is_scoped_and_restored() -> None:
    assert current_backend() == fc.Backend()
    with fc.use_backend(triton=False) as outer:
        assert current_backend() is outer and not outer.triton
        with fc.use_backend(cuda_graphs=False):
            assert current_backend() == fc.Backend(triton=False, cuda_graphs=False)
        assert current_backend() is outer
    assert current_backend() == fc.Backend()


def test_a_thread_sees_the_default_backend() -> None:
    seen = []
    with fc.use_backend(triton=False):
        thread = threading.Thread(target=lambda: seen.append(current_backend()))
        thread.start()
        thread.join()
    assert seen == [fc.Backend()]


def test_backend_per_call_gives_the_same_numbers_and_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    features, attention = cc.loop_reference().synthetic_video(8, 36, 16, "cpu", torch.float32, seed=3)
    config = fc.FlashVIDConfig(min_segment_num=2, retention_ratio=0.3)
    seen = []
    original = fc.merging.fixed_order_index_sum
    monkeypatch.setattr(fc.merging, "fixed_order_index_sum", lambda *a: seen.append(1) or original(*a))
    torch.manual_seed(0)
    plain = fc.compress(features, attention, config)
    assert not seen
    torch.manual_seed(0)
    forced = fc.compress(features, attention, config, backend=fc.Backend(fixed_order_sums_on_cpu=True))
    assert seen  # the per-call backend took the fixed-order branch
    assert current_backend() == fc.Backend()
    assert torch.equal(plain.indices, forced.indices) and torch.allclose(plain.tokens, forced.tokens, atol=1e-5)


def test_backend_rejects_non_boolean_switches() -> None:
    with pytest.raises(ValueError, match="triton='no' is invalid: expected True or False"):
        fc.Backend(triton="no")


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_backend_per_model_scopes_its_video_prefills(case, family: str) -> None:  # noqa: F811
    """A patched instance's Backend holds inside its video prefill, not outside it; the outputs are the same."""
    from test_patches_methods import config_for, forward

    current = case(family)
    config = config_for(current, min_segment_num=1, segment_threshold=-1.0)  # one segment: TSTM sums run
    calls: list[fc.Backend] = []
    original = fc.merging.fixed_order_index_sum

    def spy(*args):
        calls.append(current_backend())
        return original(*args)

    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(fc.merging, "fixed_order_index_sum", spy)
        current.apply(config)
        plain = forward(current)
        assert calls == []  # the CPU default sums with index_add_
        current.apply(config, backend=fc.Backend(fixed_order_sums_on_cpu=True))
        scoped = forward(current)
    assert calls and all(backend.fixed_order_sums_on_cpu for backend in calls)
    assert current_backend() == fc.Backend()
    assert torch.allclose(plain.logits, scoped.logits, atol=1e-5)


def test_patch_rejects_a_backend_that_is_not_one(case) -> None:  # noqa: F811
    from test_patches_methods import config_for

    current = case("llava_onevision")
    with pytest.raises(ValueError, match=r"backend=.* is invalid: expected a flashvid_core\.Backend"):
        current.apply(config_for(current), backend={"triton": False})
