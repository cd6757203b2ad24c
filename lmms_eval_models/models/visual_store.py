"""A model class's videos served from a visual-feature store: no decoding and no vision pass on a hit.

The suite's model classes use this when a sweep group shares one loaded model between its points
(`lmms_eval_models.sweeps.group_worker`); a plain lmms-eval run never does. Per request with one video:

1. The key (`VisualStore.key`): everything the stored tensors depend on — the checkpoint (path, config hash,
   weight files or hub revision), the video file (absolute path, size, modification time), the family's frame
   sampling and pixel settings (`FlashVIDModel.visual_settings`), the dtype, the vision attention implementation,
   the device type (and CUDA device name, cuDNN and TF32 switches), the library versions that change the numbers,
   the statistic's backend switch (`Backend.fused_statistic`) and `ENTRY_VERSION`.
2. A hit gives a `VisualEntry`: the `EncodedVideo` the patch's `encode` produced (features, statistic if it was
   computed, layout, Qwen3-VL's deepstack rows) and the family's `record`: what the prompt needs besides the
   pixels (LLaVA: the sampled frames' indices and times for the time instruction; Qwen: the video processor's
   output without pixels, replayed through the real processor so that it expands the prompt itself). The model
   class builds the call from the record with a pixel stand-in, and the prefill takes the entry's
   `EncodedVideo` through `patches.prefill.supplying_video` (`ServedVideo`).
3. A miss decodes and processes the video as usual; the prefill's `encode` runs through `RecordingVideo`, which
   stores the entry. Before storing, the model class rebuilds the call from the record as a hit would and
   compares it with the real one: an entry that would not reproduce the call is not stored.

A method that reads the attention statistic and finds an entry without it recomputes (decoding included) and
replaces the entry; `VisualStore.keep_statistic` computes the statistic on every miss when some point of the group
will read it, so that this happens at most once per video.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flashvid_core.backend import current_backend
from lmms_eval_models.feature_store import FeatureStore
from lmms_eval_models.patches.prefill import EncodedVideo, VideoLayout

# Bump when what an entry holds, or what a family's encode computes, changes: older entries then miss.
ENTRY_VERSION = 1
# Distributions whose version changes decoded frames, pixels or features.
VERSIONED_PACKAGES = ("torch", "transformers", "torchvision", "decord", "av", "qwen-vl-utils", "pillow", "numpy",
                      "flashvid-suite")  # fmt: skip
RECORD_PREFIX = "record."
SIDE_PREFIX = "side_features."


# ------------------------------------------------------------------------------------------------ identities


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """A video file as a key part: its absolute path, size and modification time (ns)."""
    resolved = Path(path).resolve()
    status = resolved.stat()
    return {"path": str(resolved), "size": status.st_size, "mtime_ns": status.st_mtime_ns}


def checkpoint_identity(pretrained: str, resolved_path: str | os.PathLike | None, config: Any) -> dict[str, Any]:
    """The checkpoint as a key part: the name given and the folder loaded, a hash of the loaded config, and the
    weight files (name, size, modification time) of a local folder or the hub revision of a downloaded one."""
    folder = Path(resolved_path) if resolved_path is not None else Path(pretrained)
    weights = []
    if folder.is_dir():
        for file in sorted(folder.iterdir()):
            if file.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                status = file.stat()
                weights.append([file.name, status.st_size, status.st_mtime_ns])
    config_json = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    return {
        "pretrained": str(pretrained),
        "folder": str(folder.resolve()) if folder.is_dir() else None,
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
        "revision": getattr(config, "_commit_hash", None),
        "weights": weights,
    }


@functools.cache
def package_versions() -> dict[str, str | None]:
    """The installed versions of `VERSIONED_PACKAGES` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_identity(device: torch.device) -> dict[str, Any]:
    """What else changes the numbers: library versions, the device type (CUDA: the device's name, cuDNN and the
    TF32 switches) and the statistic backend switch."""
    parts: dict[str, Any] = {
        "versions": package_versions(),
        "device_type": device.type,
        "fused_statistic": current_backend().fused_statistic,
    }
    if device.type == "cuda":
        parts["cuda"] = {
            "device_name": torch.cuda.get_device_name(device),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        }
    return parts


# ------------------------------------------------------------------------------------------------ entries


@dataclass(frozen=True)
class VisualEntry:
    """One video's stored visual pass: `encoded` (on the CPU) and the family's `record` (named tensors)."""

    encoded: EncodedVideo
    record: Mapping[str, Tensor]

    def to_tensors(self) -> dict[str, Tensor]:
        tensors = {
            "features": self.encoded.features,
            "grid_hw": torch.tensor(self.encoded.layout.grid_hw, dtype=torch.int64),
            **{f"{SIDE_PREFIX}{index}": table for index, table in enumerate(self.encoded.side_features)},
            **{f"{RECORD_PREFIX}{name}": value for name, value in self.record.items()},
        }
        if self.encoded.statistic is not None:
            tensors["statistic"] = self.encoded.statistic
        return tensors

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> VisualEntry:
        """The entry back from `to_tensors`' output; ValueError (naming what) for anything else."""
        for name in ("features", "grid_hw"):
            if name not in tensors:
                raise ValueError(f"a visual entry needs {name!r}, found {sorted(tensors)}")
        sides = sorted((int(name[len(SIDE_PREFIX):]), table) for name, table in tensors.items()
                       if name.startswith(SIDE_PREFIX))  # fmt: skip
        if [index for index, _ in sides] != list(range(len(sides))):
            raise ValueError(f"a visual entry's side features must be numbered 0..n-1, found {sorted(tensors)}")
        try:
            encoded = EncodedVideo(
                features=tensors["features"],
                statistic=tensors.get("statistic"),
                layout=VideoLayout(tuple(int(side) for side in tensors["grid_hw"].tolist())),
                side_features=tuple(table for _, table in sides),
            )
        except RuntimeError as error:
            raise ValueError(f"inconsistent visual entry: {error}") from None
        record = {name[len(RECORD_PREFIX):]: value for name, value in tensors.items() if name.startswith(RECORD_PREFIX)}
        return cls(encoded, record)


def encoded_on(encoded: EncodedVideo, device: torch.device, with_statistic: bool) -> EncodedVideo:
    """`encoded` on `device`, with its statistic only when `with_statistic` (what `encode` would have returned)."""
    statistic = encoded.statistic.to(device) if with_statistic and encoded.statistic is not None else None
    return EncodedVideo(encoded.features.to(device), statistic, encoded.layout,
                        tuple(table.to(device) for table in encoded.side_features))  # fmt: skip


# ------------------------------------------------------------------------------------------------ supplies


class ServedVideo:
    """The prefill's `EncodedVideo` from a stored entry (a hit): the call carries no pixels, nothing is encoded.
    Serves one prefill (one request's generate call)."""

    def __init__(self, entry: VisualEntry, device: torch.device) -> None:
        self.entry = entry
        self.device = device
        self.served = False

    def encoded_video(self, encode: Callable[[bool], EncodedVideo], needs_statistic: bool) -> EncodedVideo:
        if self.served:
            raise RuntimeError("a stored video serves one prefill; this call made a second one")
        if needs_statistic and self.entry.encoded.statistic is None:
            raise RuntimeError("the stored video has no attention statistic but the method reads it")
        self.served = True
        return encoded_on(self.entry.encoded, self.device, needs_statistic)


class RecordingVideo:
    """The prefill's `EncodedVideo` computed from the call's pixels (a miss), stored under `key` with `record`
    when `storable`; with `keep_statistic` the statistic is computed (and stored) even for a method that does not
    read it. Serves one prefill."""

    def __init__(self, store: VisualStore, key: str, record: Mapping[str, Tensor], keep_statistic: bool,
                 storable: bool) -> None:
        self.store, self.key, self.record = store, key, dict(record)
        self.keep_statistic, self.storable = keep_statistic, storable
        self.served = False

    def encoded_video(self, encode: Callable[[bool], EncodedVideo], needs_statistic: bool) -> EncodedVideo:
        if self.served:
            raise RuntimeError("a recorded video serves one prefill; this call made a second one")
        self.served = True
        encoded = encode(needs_statistic or self.keep_statistic)
        if self.storable:
            self.store.put(self.key, VisualEntry(encoded, self.record))
        return encoded if needs_statistic else dataclasses.replace(encoded, statistic=None)


# ------------------------------------------------------------------------------------------------ the store


class VisualStore:
    """A `FeatureStore` of `VisualEntry`s as one loaded model class uses it, with what it served.

    keep_statistic: compute the attention statistic on every miss (a point of the group will read it).
    """

    def __init__(self, store: FeatureStore, keep_statistic: bool = False) -> None:
        self.store = store
        self.keep_statistic = keep_statistic
        self.not_reproducible = 0  # misses whose call a record could not rebuild (not stored)

    def pass_counts(self) -> dict[str, int]:
        """The visual passes served and computed so far, and what else the store met (the counts of
        `sweeps.grouping.PASS_COUNTS`)."""
        stats = self.store.stats
        return {"served": stats.hits, "computed": stats.misses, "from_memory": stats.memory_hits,
                "from_disk": stats.disk_hits, "refused": stats.refused, "too_large": stats.too_large,
                "discarded": stats.discarded, "not_stored": self.not_reproducible}  # fmt: skip

    @staticmethod
    def key(model_identity: Mapping[str, Any], video_path: str | os.PathLike) -> str:
        from lmms_eval_models.feature_store import entry_key

        return entry_key({"entry_version": ENTRY_VERSION, "model": dict(model_identity),
                          "video": file_identity(video_path)})  # fmt: skip

    def lookup(self, key: str, needs_statistic: bool, video_path: str = "") -> VisualEntry | None:
        """The entry under `key` if it can serve a method that does (not) read the statistic; else None (a miss:
        absent, damaged, unreadable as an entry, or without the statistic the method needs)."""
        from loguru import logger  # as lmms-eval logs (some of its model modules silence Python warnings)

        found: list[VisualEntry] = []
        discarded = self.store.stats.discarded

        def usable(tensors: Mapping[str, Tensor]) -> bool:
            try:
                entry = VisualEntry.from_tensors(tensors)
            except ValueError:
                return False
            found.append(entry)
            return entry.encoded.statistic is not None or not needs_statistic

        entry = found[-1] if self.store.get(key, accept=usable) is not None else None
        if self.store.stats.discarded > discarded:
            logger.warning(f"feature store: discarded a damaged cache file of {video_path or key}; recomputing it")
        return entry

    def put(self, key: str, entry: VisualEntry) -> None:
        self.store.put(key, entry.to_tensors())



# ------------------------------------------------------------------------------------------------ records


def json_tensor(value: Any) -> Tensor:
    """A JSON-able value as a uint8 tensor (for a record); `from_json_tensor` reads it back."""
    return torch.frombuffer(bytearray(json.dumps(value, sort_keys=True).encode()), dtype=torch.uint8).clone()


def from_json_tensor(tensor: Tensor) -> Any:
    return json.loads(bytes(tensor.numpy().tobytes()).decode())


def to_jsonable(value: Any) -> Any:
    """A processor value as tagged JSON that `from_jsonable` restores to the same type and contents: None, bool,
    int, float (exact: JSON writes the shortest repr), str, lists, tuples, dicts with string keys, numpy arrays,
    torch tensors and dataclasses of `transformers.video_utils` (the video metadata). TypeError otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"__tensor__": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                "data": value.flatten().tolist()}  # fmt: skip
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.dtype.str, "shape": list(value.shape), "data": value.flatten().tolist()}
    if isinstance(value, np.generic):
        return {"__npscalar__": value.dtype.str, "data": value.item()}
    if isinstance(value, (list, tuple)):
        items = [to_jsonable(item) for item in value]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, dict) and all(isinstance(name, str) for name in value):
        return {"__dict__": {name: to_jsonable(item) for name, item in value.items()}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        if not cls.__module__.startswith("transformers.video_utils"):
            raise TypeError(f"cannot record a {cls.__module__}.{cls.__name__}")
        fields = {field.name: to_jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
        return {"__dataclass__": f"{cls.__module__}.{cls.__qualname__}", "fields": fields}
    raise TypeError(f"cannot record a {type(value).__name__}")


def from_jsonable(value: Any) -> Any:
    if isinstance(value, list):
        return [from_jsonable(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        dtype = getattr(torch, value["__tensor__"])
        return torch.tensor(value["data"], dtype=dtype).reshape(value["shape"])
    if "__ndarray__" in value:
        return np.array(value["data"], dtype=np.dtype(value["__ndarray__"])).reshape(value["shape"])
    if "__npscalar__" in value:
        return np.dtype(value["__npscalar__"]).type(value["data"])
    if "__tuple__" in value:
        return tuple(from_jsonable(item) for item in value["__tuple__"])
    if "__dict__" in value:
        return {name: from_jsonable(item) for name, item in value["__dict__"].items()}
    if "__dataclass__" in value:
        import importlib

        module, name = value["__dataclass__"].rsplit(".", 1)
        if not module.startswith("transformers.video_utils"):
            raise ValueError(f"a record names an unexpected class {value['__dataclass__']!r}")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{field: from_jsonable(item) for field, item in value["fields"].items()})
    raise ValueError(f"unreadable record value {sorted(value)}")


def same_call(expected: Mapping[str, Any], rebuilt: Mapping[str, Any], ignore: tuple[str, ...]) -> bool:
    """Whether a call rebuilt from a record equals the real one (tensors bit for bit), `ignore`d keys aside."""
    names = set(expected) - set(ignore)
    if names != set(rebuilt) - set(ignore):
        return False
    for name in names:
        left, right = expected[name], rebuilt[name]
        if isinstance(left, Tensor) or isinstance(right, Tensor):
            if not (isinstance(left, Tensor) and isinstance(right, Tensor) and left.dtype == right.dtype
                    and left.shape == right.shape and torch.equal(left.cpu(), right.cpu())):  # fmt: skip
                return False
        elif to_jsonable(left) != to_jsonable(right):
            return False
    return True


# ------------------------------------------------------------------------------------------------ processor replay


class RecordingVideoProcessor:
    """Stands in for a processor's video processor for one call: runs it and records its output without the pixels
    (snapshotted at once, before the processor reads or amends it), so `ReplayVideoProcessor` can give the same
    output later without the video. Every other attribute is the real video processor's."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.recorded: Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self._real(*args, **kwargs)
        layout = []
        for name, value in output.items():
            if name == PIXELS:
                layout.append([name, {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}])
            else:
                layout.append([name, to_jsonable(value)])
        self.recorded = json_tensor(layout)
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class ReplayVideoProcessor:
    """Stands in for a processor's video processor: returns the recorded output (fresh objects each call), with an
    empty pixel tensor (0, C) in place of the pixels, whatever video it is given."""

    def __init__(self, real: Any, recorded: Tensor) -> None:
        self._real = real
        self._layout = from_json_tensor(recorded)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        data = {}
        for name, value in self._layout:
            if name == PIXELS:
                data[name] = torch.empty((0, *value["shape"][1:]), dtype=getattr(torch, value["dtype"]))
            else:
                data[name] = from_jsonable(value)
        return BatchFeature(data=data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


PIXELS = "pixel_values_videos"
# What a replayed processor is given as the video: one 4-D (frames, channels, height, width) tensor, as
# qwen-vl-utils hands the processor a video; only counted, never read.
VIDEO_STAND_IN = torch.zeros(1, 3, 2, 2)


def processor_with(processor: Any, video_processor: Any) -> Any:
    """A shallow copy of `processor` whose video processor is `video_processor` (the model's own is untouched)."""
    import copy

    replaced = copy.copy(processor)
    replaced.video_processor = video_processor
    return replaced


def settings_digest(value: Any) -> str:
    """A stable digest of a configuration object (`to_dict()` where it has one), for a key part."""
    data = value.to_dict() if hasattr(value, "to_dict") else value
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
