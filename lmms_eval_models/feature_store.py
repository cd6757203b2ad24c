"""A store of per-video visual features, so that sweep points sharing a checkpoint and visual settings pay the
video decoding and the vision tower once.

An entry is a few named tensors (e.g. the projected features and the attention statistic) under a key made of
everything they depend on (`entry_key`). Entries live in memory up to a byte budget (least recently used first
out) and, when a folder is given, on disk as safetensors files, written atomically and evicted least recently used
first to a disk budget. Every disk entry carries a checksum of its tensors and its full key: a file that is
truncated, garbled or written for another key is discarded with a warning and counts as a miss, so a damaged
cache can cost time but never change a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

Entry = dict[str, Tensor]
FORMAT = "flashvid-feature-store/1"  # bump when an entry's meaning changes: older files then miss


def entry_key(parts: Mapping[str, Any]) -> str:
    """A stable hex digest of the key's parts (JSON with sorted keys; values must be JSON-serialisable)."""
    payload = json.dumps({"format": FORMAT, **parts}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_bytes(entry: Mapping[str, Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in entry.values())


def _checksum(entry: Mapping[str, Tensor]) -> str:
    """blake2b over the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(entry):
        tensor = entry[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class StoreStats:
    """What the store served: hits from memory and from disk, misses (computed), and entries not kept."""

    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    too_large: int = 0  # entries larger than the memory budget: computed and used, never held in memory
    discarded: int = 0  # damaged disk files removed
    refused: int = 0  # entries found that could not serve their caller (counted as misses too)

    @property
    def hits(self) -> int:
        return self.memory_hits + self.disk_hits


class FeatureStore:
    """Named-tensor entries by key, in memory (LRU, `memory_bytes`) and optionally on disk (LRU, `disk_bytes`).

    Tensors are kept on the CPU; `get` returns them on the CPU (the caller moves them to its device). An entry
    larger than `memory_bytes` is not held in memory (it may still go to disk when it fits `disk_bytes`).
    """

    def __init__(self, memory_bytes: int = 2 << 30, directory: str | os.PathLike | None = None,
                 disk_bytes: int = 50 << 30) -> None:
        for name, value in (("memory_bytes", memory_bytes), ("disk_bytes", disk_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected an integer number of bytes >= 0")
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self.directory = None if directory is None else Path(directory)
        self.stats = StoreStats()
        self._memory: OrderedDict[str, Entry] = OrderedDict()
        self._memory_used = 0

    # ---------------------------------------------------------------------------------------------- lookups

    def get(self, key: str, accept: Callable[[Entry], bool] | None = None) -> Entry | None:
        """The entry under `key` (memory first, then disk), or None (counted as a miss).

        accept: whether the entry found can serve this caller (e.g. it lacks a tensor the caller needs); an entry
        it refuses counts as a miss (`refused`) and is left where it is, for the caller to replace.
        """
        entry = self._memory.get(key)
        source = "memory"
        if entry is None:
            entry, source = self._read(key), "disk"
        if entry is not None and accept is not None and not accept(entry):
            self.stats.refused += 1
            entry = None
        if entry is None:
            self.stats.misses += 1
            return None
        if source == "memory":
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
        else:
            self.stats.disk_hits += 1
            self._remember(key, entry)
        return entry

    def put(self, key: str, entry: Mapping[str, Tensor]) -> None:
        """Keep `entry` (copied to the CPU, contiguous) in memory and, with a folder, on disk."""
        stored = {name: tensor.detach().to("cpu").contiguous() for name, tensor in entry.items()}
        self._remember(key, stored)
        if self.directory is not None:
            try:
                self._write(key, stored)
            except OSError as error:  # a full or read-only disk costs reuse, never the caller's result
                warnings.warn(f"feature store: cannot write {self.path_of(key)} ({error}); kept in memory only",
                              stacklevel=2)  # fmt: skip

    # ----------------------------------------------------------------------------------------------- memory

    def _remember(self, key: str, entry: Entry) -> None:
        size = entry_bytes(entry)
        if size > self.memory_bytes:
            self.stats.too_large += 1
            return
        if key in self._memory:
            self._memory_used -= entry_bytes(self._memory.pop(key))
        self._memory[key] = entry
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, evicted = self._memory.popitem(last=False)
            self._memory_used -= entry_bytes(evicted)

    @property
    def memory_used(self) -> int:
        return self._memory_used

    # ------------------------------------------------------------------------------------------------- disk

    def path_of(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> Entry | None:
        if self.directory is None:
            return None
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            warnings.warn(f"feature store: cannot read {path} ({error}); recomputing", stacklevel=3)
            return None
        try:
            entry = load_safetensors(data)
            metadata = _metadata(data)
            if metadata.get("key") != key or metadata.get("checksum") != _checksum(entry):
                raise ValueError("its key or checksum does not match its contents")
        except (SafetensorError, ValueError, KeyError, RuntimeError) as error:
            warnings.warn(f"feature store: discarding damaged entry {path} ({error}); recomputing", stacklevel=3)
            self.stats.discarded += 1
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # the disk's least-recently-used order follows reads too
        return entry

    def _write(self, key: str, entry: Entry) -> None:
        size = entry_bytes(entry)
        if size > self.disk_bytes:
            return
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save_safetensors(entry, metadata={"key": key, "checksum": _checksum(entry), "format": FORMAT})
        # Written beside its final name and renamed: a reader sees the whole file or none (concurrent writers of
        # one key write the same bytes).
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self._evict_disk(keep=path)

    def _evict_disk(self, keep: Path) -> None:
        """Remove the least recently used files until the folder fits `disk_bytes` (never the one just written)."""
        assert self.directory is not None
        files = []
        for path in self.directory.glob("*/*.safetensors"):
            try:
                status = path.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            files.append((status.st_mtime, status.st_size, path))
        used = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if used <= self.disk_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                used -= size


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer (its 8-byte little-endian header length, then JSON)."""
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    return dict(header.get("__metadata__") or {})
