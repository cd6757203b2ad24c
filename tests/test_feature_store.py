"""The visual-feature store: memory and disk budgets, atomic files, and damaged files that never change a result."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from lmms_eval_models.feature_store import FeatureStore, entry_bytes, entry_key


def entry(seed: int, frames: int = 4, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(frames, 6, 8, generator=generator).to(dtype),
            "statistic": torch.rand(frames, 6, generator=generator)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_keys_are_stable_and_depend_on_every_part() -> None:
    parts = {"checkpoint": "/m", "video": ["/v.mp4", 10, 1.5], "frames": 32}
    assert entry_key(parts) == entry_key(dict(reversed(parts.items())))
    assert entry_key(parts) != entry_key({**parts, "frames": 16})


def test_memory_budget_is_honoured_least_recently_used_first() -> None:
    size = entry_bytes(entry(0))
    store = FeatureStore(memory_bytes=2 * size)
    for seed in range(3):
        store.put(f"k{seed}", entry(seed))
        assert store.memory_used <= 2 * size
    assert store.get("k0") is None  # evicted first
    assert same(store.get("k2"), entry(2)) and same(store.get("k1"), entry(1))
    store.put("k3", entry(3))  # k2 is now the least recently used
    assert store.get("k2") is None and store.get("k1") is not None
    assert (store.stats.memory_hits, store.stats.misses) == (3, 2)


def test_an_entry_over_the_memory_budget_is_used_but_not_kept() -> None:
    store = FeatureStore(memory_bytes=entry_bytes(entry(0)) - 1)
    store.put("big", entry(0))
    assert store.memory_used == 0 and store.stats.too_large == 1 and store.get("big") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_entries_round_trip_exactly_into_a_new_store(tmp_path: Path, dtype: torch.dtype) -> None:
    FeatureStore(directory=tmp_path).put("k", entry(0, dtype=dtype))
    fresh = FeatureStore(directory=tmp_path)
    assert same(fresh.get("k"), entry(0, dtype=dtype)) and fresh.stats.disk_hits == 1
    assert fresh.get("k") is not None and fresh.stats.memory_hits == 1  # now held in memory
    assert not list(tmp_path.rglob(".tmp-*"))


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":  # one bit of the last tensor byte: the header still parses
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "flipped"])
def test_damaged_files_are_discarded_with_a_warning_and_recomputed(tmp_path: Path, how: str) -> None:
    writer = FeatureStore(directory=tmp_path)
    writer.put("k", entry(0))
    damage(writer.path_of("k"), how)
    reader = FeatureStore(directory=tmp_path)
    with pytest.warns(UserWarning, match="discarding damaged entry"):
        assert reader.get("k") is None
    assert reader.stats.discarded == 1 and not reader.path_of("k").exists()
    reader.put("k", entry(0))
    assert same(FeatureStore(directory=tmp_path).get("k"), entry(0))


def test_a_file_written_for_another_key_is_not_served(tmp_path: Path) -> None:
    store = FeatureStore(directory=tmp_path)
    store.put("a" * 64, entry(0))
    target = store.path_of("b" * 64)
    target.parent.mkdir(parents=True)
    target.write_bytes(store.path_of("a" * 64).read_bytes())
    with pytest.warns(UserWarning, match="key or checksum"):
        assert FeatureStore(directory=tmp_path).get("b" * 64) is None


def test_a_folder_full_of_garbage_never_changes_a_result(tmp_path: Path) -> None:
    keys = [entry_key({"video": seed}) for seed in range(4)]
    for key in keys:
        path = FeatureStore(directory=tmp_path).path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(100 + len(key)))
    (tmp_path / "stray.txt").write_text("not an entry")
    store = FeatureStore(directory=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, key in enumerate(keys):
            assert store.get(key) is None
            store.put(key, entry(seed))
    fresh = FeatureStore(directory=tmp_path)
    assert all(same(fresh.get(key), entry(seed)) for seed, key in enumerate(keys))


def test_disk_budget_evicts_least_recently_used_files(tmp_path: Path) -> None:
    first = FeatureStore(directory=tmp_path, memory_bytes=0)
    first.put("k0", entry(0))
    file_size = first.path_of("k0").stat().st_size
    store = FeatureStore(directory=tmp_path, memory_bytes=0, disk_bytes=2 * file_size)
    os.utime(store.path_of("k0"), (1, 1))
    store.put("k1", entry(1))
    assert store.get("k0") is not None  # read: now the most recently used
    os.utime(store.path_of("k1"), (2, 2))
    store.put("k2", entry(2))
    assert store.path_of("k0").exists() and store.path_of("k2").exists() and not store.path_of("k1").exists()


@pytest.mark.parametrize(("name", "value"), [("memory_bytes", -1), ("disk_bytes", 1.5), ("memory_bytes", True)])
def test_bad_budgets_name_the_argument(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        FeatureStore(**{name: value})
