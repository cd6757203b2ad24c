"""What the four FlashVID lmms-eval model classes share: arguments, loading, patching, per-sample figures.

Each family module subclasses lmms-eval's own class for that family and mixes `FlashVIDModel` in front of it:

    class FlashVIDQwen2_5_VL(FlashVIDModel, Qwen2_5_VL): ...

The mixin replaces only loading (the base classes pick CUDA devices whenever several processes run, force
`device_map="auto"` and swallow some errors) and wraps generation; prompting, video loading and decoding stay the
base class's. Everything is validated before any weight is read: an unknown key, a bad FlashVID or baseline value,
or a `method` that contradicts `enable_flashvid` raises a ValueError naming it. Loading leaves the global random
generators as it found them, so a run's random draws depend on its seed only, not on what the loader drew.

A sweep group shares one loaded model between its runs (`lmms_eval_models.sweeps.group_worker`): `reconfigure`
switches the compression settings (and refuses any other change), `attach_visual_store` serves each video's
decoding and vision pass from a visual-feature store (`visual_store`), vanilla included (through the patch's "none"
method).

Which compression runs: `method` (any method of the registry `lmms_eval_models.methods`, default `flashvid`) at the
FlashVID config's `retention_ratio`, tuned by the baseline keys (`MethodSettings` fields). `enable_flashvid=False` is the
official scripts' vanilla switch and means `method=none`; see `resolve_method` for how the two combine.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import inspect
import os
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import CacheHook, lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from tqdm import tqdm

from flashvid_core import FlashVIDConfig
from flashvid_core.values import parse_text
from lmms_eval_models.methods import MethodSettings, get_method, llm_pruning_plan
from lmms_eval_models.models.visual_store import (
    RecordingVideo,
    ServedVideo,
    VisualStore,
    checkpoint_identity,
    environment_identity,
    same_call,
)
from lmms_eval_models.patches import apply_flashvid, is_patched, remove_flashvid
from lmms_eval_models.patches.common import synchronize
from lmms_eval_models.patches.prefill import VideoSupply

ENABLE_KEY = "enable_flashvid"
METHOD_KEY = "method"

# The official scripts' FlashVID keys; the suite's opt-in variants come from FlashVIDConfig itself.
OFFICIAL_FLASHVID_KEYS = (
    "retention_ratio",
    "alpha",
    "temporal_threshold",
    "do_segment",
    "segment_threshold",
    "min_segment_num",
    "complementary_segment",
    "token_selection_method",
    "expansion",
    "pruning_layer",
    "llm_retention_ratio",
)

# Keys every suite class accepts beside the base class's own (`dtype` is not a key of the Qwen base classes).
SUITE_KEYS = ("dtype", "device", "device_map")

# Per-sample figures, in the order they appear in sample logs; their means go to the results' "throughput".
FIGURE_NAMES = (
    "visual_tokens_in",
    "visual_tokens_out",
    "visual_tokens_after_pruning",
    "num_segments",
    "compression_ms",
    "prefill_ms",
)


# --------------------------------------------------------------------------------------------------- arguments


def flashvid_key_names() -> tuple[str, ...]:
    return tuple(FlashVIDConfig.field_names())


def baseline_key_names() -> tuple[str, ...]:
    """The baseline methods' keys: the fields of `MethodSettings` (every registered method's options)."""
    return tuple(field.name for field in dataclasses.fields(MethodSettings))


def parse_bool(key: str, value: Any) -> bool:
    """True/False, or an int or string that `parse_text` reads as one; ValueError naming the key otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, str)):
        try:
            return parse_text(key, str(value), bool)
        except ValueError:
            pass
    raise ValueError(f"{key}={value!r} is invalid: expected True or False")


def unknown_key_error(key: str, allowed: Sequence[str], model_name: str) -> ValueError:
    hint = difflib.get_close_matches(key, allowed, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    return ValueError(
        f"unknown model_args key {key!r} for {model_name}{suggestion}; allowed keys: {', '.join(sorted(set(allowed)))}"
    )


@dataclass(frozen=True)
class ModelArguments:
    """`--model_args` split into the base class's settings and the compression settings.

    method: the compression method ("none" for vanilla); enable_flashvid: whether any method compresses (method is
    not "none"); flashvid_config: the FlashVIDConfig whose retention_ratio sets every method's budget (None for
    "none"); flashvid_args / baseline_options: the FlashVID and baseline keys as given (validated).
    """

    base: dict[str, Any]
    enable_flashvid: bool
    flashvid_config: Any  # flashvid_core.FlashVIDConfig, or None when no method compresses
    flashvid_args: dict[str, Any] = field(default_factory=dict)
    method: str = "flashvid"
    baseline_options: dict[str, Any] = field(default_factory=dict)


def resolve_method(model_args: Mapping[str, Any]) -> str:
    """The method a run uses: `method` if given (default "flashvid"); `enable_flashvid=False` means "none".

    `enable_flashvid` is the official scripts' vanilla switch and stays one: False alone is `method=none`, and
    True alone the default FlashVID. Given together they must agree, so a run never does something other than one
    of its keys says: `enable_flashvid=False` with a compressing method, or `enable_flashvid=True` with
    `method=none`, is refused. `enable_flashvid=True` with a baseline method is fine (compression is on).
    """
    enable = parse_bool(ENABLE_KEY, model_args.get(ENABLE_KEY, True))
    if METHOD_KEY not in model_args:
        return "flashvid" if enable else "none"
    method = model_args[METHOD_KEY]
    compresses = get_method(method).compresses  # raises naming the allowed methods
    if ENABLE_KEY in model_args and enable != compresses:
        raise ValueError(
            f"{ENABLE_KEY}={model_args[ENABLE_KEY]!r} conflicts with {METHOD_KEY}={method!r}: "
            f"{ENABLE_KEY}=False means {METHOD_KEY}=none (vanilla); give only one of them"
        )
    return method


def split_model_args(
    base_class: type,
    model_args: Mapping[str, Any],
    model_name: str,
    suite_defaults: Mapping[str, Any],
    extra_keys: Mapping[str, Any] | None = None,
) -> ModelArguments:
    """Validate `model_args` against the base class's signature (plus `extra_keys`: the keys the suite's class takes
    beyond its base class's, with their defaults), FlashVIDConfig and MethodSettings, without loading anything.

    Returns the base settings with the base class's defaults (and the extra keys'), overridden by `suite_defaults`,
    then the user's. FlashVID and baseline keys are validated for every method, also those the method does not read,
    so a sweep with a typo fails on its vanilla run too; a method ignores the other methods' keys.
    """
    signature = inspect.signature(base_class.__init__)
    base_defaults = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    }
    base_defaults.update(extra_keys or {})
    flashvid_keys, baseline_keys = flashvid_key_names(), baseline_key_names()
    allowed = (*base_defaults, *SUITE_KEYS, ENABLE_KEY, METHOD_KEY, *flashvid_keys, *baseline_keys)
    for key in model_args:
        if key not in allowed:
            raise unknown_key_error(key, allowed, model_name)
    method = resolve_method(model_args)
    flashvid_args = {key: value for key, value in model_args.items() if key in flashvid_keys}
    config = FlashVIDConfig.from_model_args(flashvid_args)
    baseline_options = {key: value for key, value in model_args.items() if key in baseline_keys}
    MethodSettings.from_options(baseline_options)  # raises naming the bad key or value
    base = {**base_defaults, **suite_defaults}
    base.update(
        {key: value for key, value in model_args.items() if key in base_defaults or key in SUITE_KEYS}
    )
    compresses = get_method(method).compresses
    return ModelArguments(base=base, enable_flashvid=compresses, flashvid_config=config if compresses else None,
                          flashvid_args=flashvid_args, method=method, baseline_options=baseline_options)  # fmt: skip


def llm_depth(base: Mapping[str, Any]) -> int:
    """The LLM's number of layers, read from the checkpoint's config alone (HF format, or LLaVA-NeXT's, whose
    config names another model type than the one it holds)."""
    from transformers import AutoConfig

    from lmms_eval_models.conversion.llava_next import llava_next_config

    next_config = llava_next_config(base["pretrained"], base.get("revision"))
    if next_config is not None:
        return int(next_config["num_hidden_layers"])
    options = {"revision": base["revision"]} if base.get("revision") else {}
    config = AutoConfig.from_pretrained(base["pretrained"], trust_remote_code=bool(base.get("trust_remote_code")),
                                        **options)  # fmt: skip
    return int(config.get_text_config().num_hidden_layers)


def check_llm_depth(arguments: ModelArguments) -> None:
    """FastV's layer K and kept share r depend on the LLM's depth: read it from the checkpoint's config (no
    weights) so that `fastv_layer` beyond the LLM or a retention_ratio FastV cannot meet fails before loading.

    Only the methods marked `depth_sensitive` (FastV): the others are valid at any depth (FlashVID's pruning_layer
    beyond the LLM prunes nothing).
    """
    if not get_method(arguments.method).depth_sensitive:
        return
    num_llm_layers = llm_depth(arguments.base)
    settings = MethodSettings.from_options(arguments.baseline_options)
    llm_pruning_plan(arguments.method, arguments.flashvid_config.retention_ratio, num_llm_layers, settings,
                     arguments.flashvid_config)


def check_batch_size(batch_size: Any) -> None:
    """FlashVID (like the official code) compresses one video prompt per call: refuse larger batches up front."""
    if str(batch_size) != "1":
        raise ValueError(
            f"batch_size={batch_size!r} is not supported: the FlashVID models run batch_size=1 only"
        )


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attn_implementation(value: Any) -> str | None:
    """`value` if it names an attention implementation (None or "None": the default); ValueError otherwise."""
    if value is None or str(value).lower() == "none":
        return None
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={value!r} is invalid: allowed None, {', '.join(ATTN_IMPLEMENTATIONS)}")
    return value


def resolve_attn_implementation(requested: Any, device: torch.device) -> str | None:
    """The attention implementation to load with: `requested` (None: the transformers default), except that
    flash_attention_2, which only runs on CUDA, becomes sdpa elsewhere, with a warning.

    flash-attention 2 and sdpa compute the same attention (they differ in rounding only, and the official code
    routes both through the same attention interface), so a CPU smoke run of an official script's model_args is
    honest with sdpa. On CUDA, a missing flash-attn package is an error naming the key, never a silent fallback: a
    GPU run is what reproduces the paper's numbers.
    """
    requested = check_attn_implementation(requested)
    if requested != "flash_attention_2":
        return requested
    if device.type != "cuda":
        # loguru, as lmms-eval logs: its CLI silences Python warnings
        logger.warning(
            f"attn_implementation=flash_attention_2 needs a CUDA device; running sdpa on {device} instead (the same "
            "attention, computed with other rounding)"
        )
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "attn_implementation=flash_attention_2 needs the flash-attn package, which is not installed: install it "
            "(pip install flash-attn) or pass attn_implementation=sdpa"
        )
    return requested


def resolve_dtype(dtype: Any) -> Any:
    if dtype in (None, "auto") or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is invalid: expected auto or a torch dtype name such as bfloat16")
    return resolved


# ------------------------------------------------------------------------------------------------------ devices


def resolve_device(accelerator: Any, device: str | None) -> torch.device:
    """One device per process: the accelerator's when several processes run (CUDA or CPU), else `device`.

    The base classes pick `cuda:<rank>` whenever several processes run, which fails on CPU-only machines.
    """
    if accelerator.num_processes > 1:
        # several CPU processes get "cpu:0", which transformers' device_map would read as GPU 0
        return torch.device("cpu") if accelerator.device.type == "cpu" else accelerator.device
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Leave Python's, NumPy's and torch's global generators (CPU and CUDA) as they were when the block began.

    Around model loading: some loaders draw from the global generator (transformers' LLaVA-OneVision draws its
    newline parameter before the weights overwrite it), and lmms-eval seeds before it loads the model. Without
    this, a run's draws (FlashVID's DPC tie-breaker, sampling) would depend on whether its model was loaded after
    seeding (lmms-eval's CLI) or before (a sweep group sharing one model).
    """
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------------------------ figures


class FlashVIDTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus the FlashVID figures; written into each sample's log."""

    def __init__(
        self, input_tokens: int | None, output_tokens: int | None, figures: Mapping[str, float]
    ) -> None:
        super().__init__(input_tokens=input_tokens, output_tokens=output_tokens)
        self.figures = dict(figures)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.figures}


@dataclass
class CallProbe:
    """What one `generate` call did: filled by the hooks and the wrapper in `instrument_generate`."""

    prefill_started: float | None = None
    prefill_ms: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    visual_placeholders: int = 0
    seconds: float = 0.0
    stats: Any = None  # the patch's FlashVIDStats of this call, if any
    error: BaseException | None = None


def _first_tensor_device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value.device
    return torch.device("cpu")


class GenerateInstrument:
    """Wraps one HF model instance's `generate` to time the prefill and collect the call's figures.

    The prefill is the first forward call inside `generate` (vision encoding, FlashVID compression and the
    LLM's prefill together); a forward pre-hook and hook pair times it. Errors raised inside `generate` are
    remembered, because some base classes catch them and return an empty answer instead.
    """

    def __init__(self, model: Any, video_token_ids: Sequence[int]) -> None:
        self.model = model
        self.video_token_ids = tuple(video_token_ids)
        self.probe: CallProbe | None = None
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        self._stock_generate = model.generate
        model.generate = self._generate  # instance attribute: other instances keep the class's generate

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self.model.__dict__.get("generate") == self._generate:
            del self.model.generate

    def _before_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.probe is not None and self.probe.prefill_started is None:
            synchronize(_first_tensor_device(args, kwargs))
            self.probe.prefill_started = time.perf_counter()

    def _after_forward(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        probe = self.probe
        if probe is not None and probe.prefill_started is not None and probe.prefill_ms is None:
            synchronize(_first_tensor_device(args, kwargs))
            probe.prefill_ms = (time.perf_counter() - probe.prefill_started) * 1000.0

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        probe = self.probe
        if probe is None:
            return self._stock_generate(*args, **kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_tensor(input_ids):
            probe.input_tokens = int(input_ids.shape[-1])
            probe.visual_placeholders = int(
                sum(int((input_ids == token).sum()) for token in self.video_token_ids)
            )
        stats_before = getattr(self.model, "flashvid_stats", None)
        started = time.perf_counter()
        try:
            output = self._stock_generate(*args, **kwargs)
        except BaseException as error:
            probe.error = error
            raise
        probe.seconds = time.perf_counter() - started
        sequences = output if torch.is_tensor(output) else getattr(output, "sequences", None)
        if torch.is_tensor(sequences) and torch.is_tensor(input_ids):
            probe.output_tokens = int(sequences.shape[-1] - input_ids.shape[-1])
        stats_after = getattr(self.model, "flashvid_stats", None)
        probe.stats = stats_after if stats_after is not stats_before else None
        return output

    @contextmanager
    def call(self) -> Iterator[CallProbe]:
        self.probe = CallProbe()
        try:
            yield self.probe
        finally:
            self.probe = None


def figures_of(probe: CallProbe, layout_tokens: int = 0) -> dict[str, float]:
    """The per-sample figures; without FlashVID stats every visual placeholder goes through uncompressed.

    `layout_tokens`: placeholders that are layout, not visual tokens (LLaVA-OneVision's one trailing newline), so
    that a vanilla run counts visual tokens as the patch does.
    """
    stats = probe.stats
    if stats is not None:
        visual_in, visual_out = stats.visual_tokens_in, stats.visual_tokens_compressed
        after_pruning, segments, compression_ms = (
            stats.visual_tokens_after_pruning,
            stats.num_segments,
            stats.compression_ms,
        )
    else:
        visual_in = visual_out = after_pruning = max(probe.visual_placeholders - layout_tokens, 0)
        segments, compression_ms = 0, 0.0
    return {
        "visual_tokens_in": int(visual_in),
        "visual_tokens_out": int(visual_out),
        "visual_tokens_after_pruning": int(after_pruning),
        "num_segments": int(segments),
        "compression_ms": float(compression_ms),
        "prefill_ms": float(probe.prefill_ms or 0.0),
    }


# -------------------------------------------------------------------------------------------------- the mixin


def request_video_paths(request_args: tuple, task_dict: Mapping[str, Any]) -> list[str]:
    """The video paths a `generate_until` request will read (its doc_to_visual's string results)."""
    _context, _gen_kwargs, doc_to_visual, doc_id, task, split = request_args[:6]
    visuals = doc_to_visual(task_dict[task][split][doc_id]) or []
    return [visual for visual in visuals if isinstance(visual, str)]


def check_video_files(paths: Sequence[str], task: str, doc_id: int) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"video file not found: {path} (task {task}, doc {doc_id})")


class FlashVIDModel:
    """Mixin for lmms-eval model classes: put it before the lmms-eval base class.

    Subclasses set `model_name`, `base_class`, and implement `_load(settings)` (set everything the base class's
    methods read) and `_generate_one(request)` (one answer, through the base class's own code where possible).
    """

    model_name: ClassVar[str]
    base_class: ClassVar[type]
    suite_defaults: ClassVar[dict[str, Any]] = {}
    # Keys the class takes beyond its base class's signature (the official scripts' keys), with their defaults.
    extra_keys: ClassVar[dict[str, Any]] = {}
    family_options: ClassVar[dict[str, Any]] = {}  # passed to apply_flashvid (e.g. the LLaVA video layout)
    # Video placeholders per prompt that are layout (newlines) rather than visual tokens, when unpatched.
    layout_placeholders: ClassVar[int] = 0

    def __init__(self, **model_args: Any) -> None:
        arguments = self.check_model_args(model_args, instance=self)
        check_llm_depth(arguments)
        lmms.__init__(self)  # not the base class's __init__: loading is ours (see the module docstring)
        self.flashvid_arguments = arguments
        self.visual_store: VisualStore | None = None
        self._in_inner_call = False
        with preserved_global_rng():
            self._load(arguments.base)
        self._apply_patches(arguments)
        self._instrument = GenerateInstrument(self.model, self._video_token_ids())

    @classmethod
    def check_model_args(cls, model_args: Mapping[str, Any], instance: FlashVIDModel | None = None) -> ModelArguments:
        """Every check of `model_args` that needs no checkpoint: keys, FlashVID and baseline values and ranges,
        batch size, dtype, the family's own settings. Raises ValueError naming the bad key; `flashvid-sweep plan`
        calls it for every run. The family's settings are parsed onto `instance` (the model being built), or onto
        a throwaway one when only checking."""
        arguments = split_model_args(cls.base_class, model_args, cls.model_name, cls.suite_defaults, cls.extra_keys)
        check_batch_size(arguments.base.get("batch_size", 1))
        resolve_dtype(arguments.base.get("dtype"))
        (instance if instance is not None else cls.__new__(cls))._check_settings(arguments.base)
        return arguments

    # ------------------------------------------------------------------------------------------ loading

    def _check_settings(self, settings: dict[str, Any]) -> None:
        """Validate the family's own settings before anything is read from disk (ValueError naming the key)."""
        check_attn_implementation(settings.get("attn_implementation"))

    def _setup_processes(self, device: str | None) -> None:
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        self._device = resolve_device(self.accelerator, device)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes

    def _apply_patches(self, arguments: ModelArguments) -> None:
        """A method that does not compress (vanilla) patches only where the family's layout needs it (LLaVA-Video),
        as vanilla runs always did, or where a visual store serves the videos (through the patch's encode hook;
        `method=none` computes what the stock model computes, bit for bit). Re-applying replaces earlier settings."""
        if not arguments.enable_flashvid:
            if self.family_options or self.visual_store is not None:
                apply_flashvid(self.model, None, method=arguments.method, **self.family_options)
            elif is_patched(self.model):
                remove_flashvid(self.model)
            return
        apply_flashvid(self.model, arguments.flashvid_config, method=arguments.method,
                       baseline_options=arguments.baseline_options, **self.family_options)  # fmt: skip

    @property
    def _patched_for_store_only(self) -> bool:
        """Vanilla patched only so that the store can serve it: its figures are reported as an unpatched run's."""
        return self.visual_store is not None and not self.flashvid_arguments.enable_flashvid and not self.family_options

    # ------------------------------------------------------------------------------------- sweep groups

    def reconfigure(self, **model_args: Any) -> None:
        """Switch this loaded model to another run's model_args: only the compression settings (`method`,
        `enable_flashvid`, the FlashVID and baseline keys) may differ from those it was loaded with; any other
        difference is a ValueError naming the keys. Leaves nothing of the previous settings' calls behind."""
        arguments = self.check_model_args(model_args)  # validated on a throwaway instance first
        loaded = self.flashvid_arguments.base
        changed = sorted(key for key in set(arguments.base) | set(loaded)
                         if arguments.base.get(key, "<unset>") != loaded.get(key, "<unset>"))  # fmt: skip
        if changed:
            details = ", ".join(f"{key}: loaded {loaded.get(key, '<unset>')!r}, asked "
                                f"{arguments.base.get(key, '<unset>')!r}" for key in changed)  # fmt: skip
            raise ValueError(
                f"reconfigure changes compression settings only; these keys differ from the loaded model's: {details}"
            )
        check_llm_depth(arguments)
        self.flashvid_arguments = arguments
        self._apply_patches(arguments)
        self._reset_call_state()

    def keep_between_runs(self) -> None:
        """Keep the model loaded when lmms-eval's evaluator ends a run: it calls `clean()`, which deletes the
        model's modules to free memory, and a sweep group's model serves the next run."""
        self._kept_between_runs = True

    def clean(self) -> None:
        if not getattr(self, "_kept_between_runs", False):
            lmms.clean(self)

    def attach_visual_store(self, store: VisualStore | None) -> None:
        """Serve this model's videos from `store` (None: decode and encode every video, as a plain run)."""
        self.visual_store = store
        self._apply_patches(self.flashvid_arguments)
        self._reset_call_state()

    def _reset_call_state(self) -> None:
        """Per-call state that must not pass from one run to the next on a shared model: lmms-eval's task table and
        response hook, the last call's figures, the Qwen models' cached rope deltas (a patch's decode maps and
        pruner belong to the patch, which `apply_flashvid` replaces)."""
        self.task_dict = {}
        self.cache_hook = CacheHook(None)
        self._in_inner_call = False
        if is_patched(self.model):
            self.model.__dict__["flashvid_stats"] = None
        inner = getattr(self.model, "model", None)
        if inner is not None and hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None

    # --------------------------------------------------------------------------------- the visual store

    def visual_settings(self) -> dict[str, Any]:
        """The family's settings that decide a video's frames, pixels and prompt record (a store key part)."""
        raise NotImplementedError

    def _decoded_call(self, request: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """One request's generate inputs from its decoded video, and the record of what the prompt took from the
        video besides the pixels (tensors; `_recorded_call` rebuilds the inputs from it)."""
        raise NotImplementedError

    def _recorded_call(self, request: Any, record: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The same inputs as `_decoded_call` without decoding: the prompt from `record`, a pixel stand-in."""
        raise NotImplementedError

    def _video_call(self, request: Any, video_path: str) -> tuple[dict[str, Any], VideoSupply | None]:
        """The generate inputs of one request about one video, and what its prefill takes the video from: None
        without a store (its own pixels), a stored entry on a hit (no decoding, no vision pass), a recording that
        stores the computed entry on a miss (when its record rebuilds the call exactly)."""
        store = self.visual_store
        if store is None:
            return self._decoded_call(request)[0], None
        key = store.key(self._visual_identity(), video_path)
        needs_statistic = get_method(self.flashvid_arguments.method).needs_statistic
        entry = store.lookup(key, needs_statistic, video_path)
        device = self.model.get_input_embeddings().weight.device
        if entry is not None:
            return self._recorded_call(request, dict(entry.record)), ServedVideo(entry, device)
        call, record = self._decoded_call(request)
        try:
            storable = same_call(call, self._recorded_call(request, record), ignore=("pixel_values_videos",))
        except (TypeError, ValueError, KeyError, RuntimeError):  # a record that cannot even be replayed
            storable = False
        if not storable:
            store.not_reproducible += 1
            warnings.warn(f"{self.model_name}: the call for {video_path} cannot be rebuilt from its record; its "
                          "visual pass is not stored", stacklevel=2)  # fmt: skip
        return call, RecordingVideo(store, key, record, store.keep_statistic, storable)

    def _visual_identity(self) -> dict[str, Any]:
        """The store key's model part: checkpoint, family settings, dtype, attention implementations, environment."""
        config = self.model.config
        vision = getattr(config, "vision_config", None)
        return {
            "model_class": self.model_name,
            "checkpoint": self._checkpoint_identity,
            "settings": self.visual_settings(),
            "dtype": str(self.model.dtype),
            "attn_implementation": [getattr(config, "_attn_implementation", None),
                                    getattr(vision, "_attn_implementation", None)],
            "environment": environment_identity(self.model.get_input_embeddings().weight.device),
        }

    @functools.cached_property
    def _checkpoint_identity(self) -> dict[str, Any]:
        """Read once per loaded model (reconfigure never changes the checkpoint)."""
        return checkpoint_identity(self.flashvid_arguments.base["pretrained"], getattr(self, "checkpoint_path", None),
                                   self.model.config)  # fmt: skip

    def _video_token_ids(self) -> list[int]:
        config = self.model.config
        # transformers 5 has both names (aliases) for LLaVA: count each id once
        ids = {getattr(config, name, None) for name in ("video_token_id", "video_token_index")}
        return sorted(token for token in ids if isinstance(token, int))

    @property
    def rank(self) -> int:
        # While the base class's generate_until answers one request, it must not draw its own progress bar
        # (it would print one bar per sample): it reads the rank to decide, so it sees a non-zero one then.
        return -1 if getattr(self, "_in_inner_call", False) else self._rank

    @contextmanager
    def _inner_call(self) -> Iterator[None]:
        self._in_inner_call = True
        try:
            yield
        finally:
            self._in_inner_call = False

    # --------------------------------------------------------------------------------------- generation

    def _generate_one(self, request: Instance) -> str:
        raise NotImplementedError

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult] = []
        records: list[dict[str, float]] = []
        for request in tqdm(requests, disable=self._rank != 0, desc=f"{self.model_name} responding"):
            _context, _gen_kwargs, _doc_to_visual, doc_id, task, _split = request.args[:6]
            check_video_files(request_video_paths(request.args, self.task_dict), task, doc_id)
            with self._instrument.call() as probe:
                answer = self._generate_one(request)
            if probe.error is not None:  # the base class caught it and answered ""
                raise RuntimeError(
                    f"generation failed for doc {doc_id} of {task}: {probe.error}"
                ) from probe.error
            if self._patched_for_store_only:
                probe.stats = None  # the figures of the unpatched vanilla run this stands for
            figures = figures_of(probe, self.layout_placeholders if probe.visual_placeholders else 0)
            results.append(
                GenerationResult(
                    answer, FlashVIDTokenCounts(probe.input_tokens, probe.output_tokens, figures)
                )
            )
            if not (request.metadata or {}).get("__padding_only__"):
                records.append({**figures, "seconds": probe.seconds, "output_tokens": probe.output_tokens})
        self._log_means(records)
        return results

    def _log_means(self, records: list[dict[str, float]]) -> None:
        """Hand every sample's figures to lmms-eval's throughput log (rank 0, after gathering all ranks).

        lmms-eval averages each extra figure over the logged entries into the results' "throughput" section
        (`avg_visual_tokens_in`, ...), so one entry per sample gives the per-sample means.
        """
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * self._world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [record for rank_records in gathered for record in rank_records]
        if self._rank != 0:
            return
        for record in records:
            seconds, tokens = record["seconds"], record["output_tokens"]
            figures = {name: record[name] for name in FIGURE_NAMES}
            log_metrics(total_elapsed_time=seconds, total_gen_tokens=tokens,
                        avg_speed=tokens / seconds if seconds > 0 else 0.0, additional_metrics=figures)  # fmt: skip
