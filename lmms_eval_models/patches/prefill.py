"""The prefill base every family patch stands on: one design for applying FlashVID to one model instance.

A family file (`llava_onevision.py`, `qwen2_5_vl.py`, `qwen3_vl.py`) supplies a `Family`: which arguments of a call
are its video (`video_inputs`), how its model turns them into features, the attention statistic and the token grid
(`encode`), how the compressed tokens replace the video placeholders in the prompt (`splice`), where its statistic
comes from, and its registration (`apply` / `remove`). Everything else lives here, once:

- `apply` / `remove`: the settings are validated before the model is touched (`common.plan_method`); the model's
  class is swapped, for this instance only, to a `FlashVID<Class>` subclass whose `forward` routes calls through
  this file (two instances in one process carry their own settings; `remove` restores the stock class); the
  in-LLM pruner (`llm_pruning.LLMPruner`, or any object with its attach / prefill / remove lifecycle) is attached
  to this instance's decoder layers and detached again.
- A call with `pixel_values_videos` is a video prefill (`_video_prefill`): the call is validated before any model
  work; the video is encoded at ONE call site (`encode_video`; a `VideoSupply` opened by `supplying_video` around
  a call, e.g. a visual-feature store, may serve it instead of the vision tower); the
  method compresses it (timed between device synchronisations); the family splices the tokens into the prompt;
  the stock `forward` runs on the shortened sequence inside the pruner's `prefill` scope; the figures of the call
  are published as `model.flashvid_stats` (`FlashVIDStats`).
- A decoding call that continues the KV cache such a prefill filled is translated onto the shortened sequence by
  one `DecodeMap` (generate keeps describing the original prompt); anything else runs the stock model.
- The attention statistic is captured by `StatisticCapture`: a forward pre-hook on the one vision module the family
  names, computing only while the family's `encode` arms it.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import functools
import inspect
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from flashvid_core.backend import Backend
from flashvid_core.pipeline import Compression
from lmms_eval_models.patches.common import (
    FAMILY_MODULES,
    PATCH_ATTR,
    STATS_ATTR,
    FlashVIDStats,
    MethodPlan,
    bind_arguments,
    coerce_config,
    plan_method,
    synchronize,
)
from lmms_eval_models.patches.llm_pruning import attach_llm_pruning

__all__ = [
    "DecodeMap",
    "EncodedVideo",
    "Family",
    "Patch",
    "Prompt",
    "Spliced",
    "StatisticCapture",
    "VideoInputs",
    "VideoLayout",
    "VideoSupply",
    "apply",
    "encode_call",
    "encode_video",
    "flashvid_subclass",
    "is_patched",
    "remove",
    "supplying_video",
]

# On a module whose class a patch swapped: its stock class, restored by `remove`.
ORIGINAL_CLASS_ATTR = "_flashvid_original_class"

# (module, forward positional args, forward keyword args) -> the statistic computed from that module's inputs
StatisticFunction = Callable[[nn.Module, tuple, dict], Tensor]


# ------------------------------------------------------------------------------------------- what flows


@dataclass(frozen=True)
class VideoInputs:
    """One call's video as a family's `encode` reads it; each family subclasses it with the rest of what its vision
    path takes (grid sizes, feature layer, pooling layout). pixel_values_videos: the processor's pixels;
    num_videos: the videos in the call (one is supported, as in the official code)."""

    pixel_values_videos: Tensor
    num_videos: int


@dataclass(frozen=True)
class VideoLayout:
    """Where one frame's tokens sit: the (h, w) grid, raster order, h·w = N tokens per frame."""

    grid_hw: tuple[int, int]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]


@dataclass(frozen=True)
class EncodedVideo:
    """What `Family.encode` returns for one video; it depends only on the model's weights, the `VideoInputs` and
    whether the statistic was asked for, never on the compression settings.

    features: (F, N, D) the tokens the LLM would receive uncompressed (after projector / pooling / merger);
    statistic: (F, N) the attention each token received in the vision tower, None when not asked for;
    layout: the frames' token grid; side_features: rows that travel with the tokens, one (F·N, D') table each
    (Qwen3-VL's deepstack features, one per LLM layer they are added after), () where a family has none.
    """

    features: Tensor
    statistic: Tensor | None
    layout: VideoLayout
    side_features: tuple[Tensor, ...] = ()

    def __post_init__(self) -> None:
        frames, tokens = self.features.shape[0], self.features.shape[1]
        if tokens != self.layout.tokens_per_frame:
            raise RuntimeError(
                f"encoded frames have {tokens} tokens, not the {self.layout.grid_hw[0]}×{self.layout.grid_hw[1]} "
                "grid of the layout"
            )
        if self.statistic is not None and tuple(self.statistic.shape) != (frames, tokens):
            raise RuntimeError(
                f"the attention statistic has shape {tuple(self.statistic.shape)}, the features {(frames, tokens)}"
            )


@dataclass(frozen=True)
class Prompt:
    """The prompt of a video prefill, as `Family.splice` reads it: input_ids (1, L) with the video placeholders,
    their embeddings (1, L, D), the 2-D attention mask (1, L) (all ones where the call gave none), and the call's
    other arguments (read-only)."""

    input_ids: Tensor
    embeddings: Tensor
    attention_mask: Tensor
    arguments: Mapping[str, Any]

    def mask_at(self, source_positions: Tensor) -> Tensor:
        """The attention mask of the shortened sequence: (1, L') the columns of `source_positions` (L',)."""
        return self.attention_mask.index_select(1, source_positions.to(self.attention_mask.device))


@dataclass(frozen=True)
class Spliced:
    """The shortened sequence `Family.splice` returns.

    inputs_embeds: (1, L', D); source_positions: (L',) for each row, the original position whose attention-mask
    column it takes (a kept token its own; a row that stands for a run of placeholders, one of the run);
    visual_rows: (M,) ascending rows holding the compressed video tokens (the in-LLM pruner's visual set);
    position_ids: the positions the model receives for the L' rows; language_model_kwargs: further keyword
    arguments of the language model for this call (Qwen3-VL's deepstack rows), given it by a scoped pre-hook.
    """

    inputs_embeds: Tensor
    source_positions: Tensor
    visual_rows: Tensor
    position_ids: Tensor
    language_model_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeMap:
    """How the shortened prefill sequence maps onto the original prompt, for the decoding calls that continue the
    KV cache it filled (their mask, positions and cache positions still describe the original prompt).

    source_positions: (L',) as `Spliced.source_positions`; original_length: L; position_shift: how far decoding
    positions move left: L - L' where the shortened sequence has contiguous positions (LLaVA), 0 where every kept
    token keeps its original position (Qwen's M-RoPE).
    """

    source_positions: Tensor
    original_length: int
    position_shift: int

    @property
    def shortened_length(self) -> int:
        return int(self.source_positions.numel())

    def original_start(self, cached: int) -> int:
        """The original position of the next token, with `cached` entries in the cache's first layer (layer 0 is
        never pruned: the shortened prefill plus the tokens decoded since)."""
        return self.original_length + cached - self.shortened_length

    def continues(self, arguments: Mapping[str, Any], cached: int) -> bool:
        """Whether a call continues the cache, and not a cache object reset or refilled since: where the call says
        how long the original sequence is (a 2-D mask), it must be the prompt plus the tokens decoded since."""
        if cached < self.shortened_length:
            return False
        mask = arguments.get("attention_mask")
        length = _query_length(arguments)
        if isinstance(mask, Tensor) and mask.dim() == 2 and length is not None:
            return mask.shape[1] == self.original_start(cached) + length
        return True

    def translate(self, arguments: Mapping[str, Any], cached: int, fill_cache_position: bool) -> dict[str, Any]:
        """A continuing call's arguments on the shortened cache: the mask's prompt columns gathered at the source
        positions, given position ids moved left by the shift, cache positions counted in the cache (set where
        the stock forward takes them, `fill_cache_position`, or the call gave them)."""
        call = dict(arguments)
        mask = call.get("attention_mask")
        if mask is not None:
            _check_two_dimensional(mask)
            source = self.source_positions.to(mask.device)
            call["attention_mask"] = torch.cat((mask.index_select(1, source), mask[:, self.original_length :]), 1)
        if call.get("position_ids") is not None and self.position_shift:
            call["position_ids"] = call["position_ids"] - self.position_shift
        length = _query_length(call)
        if length is not None and (fill_cache_position or call.get("cache_position") is not None):
            call["cache_position"] = torch.arange(cached, cached + length, device=_call_device(call))
        return call


# ------------------------------------------------------------------------------------------- the family


class Family(abc.ABC):
    """What one model family supplies. A family is a frozen dataclass whose fields are its family options (validated
    in `__post_init__`); `apply` keeps the instance it was given on the patch."""

    supported_class: ClassVar[str]  # the transformers class (or a base of it) this family patches
    keeps_original_positions: ClassVar[bool]  # see DecodeMap.position_shift
    # Arguments of the stock forward that `splice` folds into the embeddings: the shortened call goes without them.
    consumed_arguments: ClassVar[frozenset[str]]

    @abc.abstractmethod
    def video_inputs(self, model: nn.Module, arguments: Mapping[str, Any]) -> VideoInputs:
        """The call's video, as `encode` reads it; a ValueError names a missing or bad argument."""

    @abc.abstractmethod
    def encode(self, model: nn.Module, inputs: VideoInputs, capture: StatisticCapture | None) -> EncodedVideo:
        """Features, statistic (computed through `capture` only when it is given) and layout of the video."""

    @abc.abstractmethod
    def splice(self, model: nn.Module, prompt: Prompt, encoded: EncodedVideo, compression: Compression) -> Spliced:
        """The shortened sequence: the compression's tokens (global indices f·N + n) in place of the placeholders."""

    def decode_position_ids(
        self, model: nn.Module, first_position: int, length: int, batch: int, device: torch.device
    ) -> Tensor | None:
        """Position ids of a continuing call that gave none, for original positions first..first+length-1; None:
        the stock model's own fallback (counted from the shortened cache) is right."""
        return None

    def module_patches(self, model: nn.Module) -> tuple[tuple[nn.Module, Callable[[type], type]], ...]:
        """Further modules of this instance whose class the patch swaps: (module, original class -> subclass)."""
        return ()

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack the in-LLM pruner hooks (its `layers`)."""
        return model.model.language_model


class InLLMPruner(Protocol):
    """The lifecycle the base asks of an in-LLM pruner (`llm_pruning.LLMPruner`): attached at apply, one `prefill`
    scope per video prefill (its result tells `visual_tokens_kept`), `remove` at remove; `active` is the result of
    the prefill in progress (with `keep_positions`), for family code that follows the pruned rows."""

    @property
    def active(self) -> Any: ...

    def prefill(self, *, visual_positions: Tensor) -> contextlib.AbstractContextManager[Any]: ...

    def remove(self) -> None: ...


def attach_pruner(layers: nn.ModuleList, plan: MethodPlan) -> InLLMPruner | None:
    """The in-LLM pruner the method plan asks for on these decoder layers; None for no pruning (FlashVID with K
    beyond the LLM, as the official code, and the methods without inner pruning)."""
    pruning = plan.llm_pruning
    if pruning is None:
        return None
    return attach_llm_pruning(layers, pruning.pruning_layer, pruning.llm_retention_ratio, pruning.scoring)


# ------------------------------------------------------------------------------------------- the statistic


class StatisticCapture:
    """The attention statistic of one vision module, computed from that module's own inputs while `armed`.

    One forward pre-hook per module, registered the first time it is armed and idle otherwise: the module keeps its
    own (fast) attention implementation, and nothing is computed outside `armed`. `remove` detaches the hooks.
    `captures` counts the statistics computed since the patch was applied.
    """

    def __init__(self) -> None:
        # keyed by id: the capture must not hold the modules, which hold it through their hook
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._armed: tuple[nn.Module, StatisticFunction] | None = None
        self._captured: list[Tensor] = []
        self.captures = 0

    @contextlib.contextmanager
    def armed(self, module: nn.Module, compute: StatisticFunction) -> Iterator[list[Tensor]]:
        """While open, each forward of `module` appends compute(module, args, kwargs) to the yielded list."""
        if id(module) not in self._handles:
            self._handles[id(module)] = module.register_forward_pre_hook(self._hook, with_kwargs=True)
        self._armed, self._captured = (module, compute), []
        try:
            yield self._captured
        finally:
            self._armed = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._armed is None or self._armed[0] is not module:
            return None
        with torch.no_grad():  # the statistic only steers token selection: no graph for its probabilities
            self._captured.append(self._armed[1](module, args, kwargs))
        self.captures += 1
        return None

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


def capturing(
    capture: StatisticCapture | None, module: nn.Module, compute: StatisticFunction
) -> contextlib.AbstractContextManager[list[Tensor]]:
    """`capture.armed(module, compute)`, or an empty list where no statistic is asked for."""
    return capture.armed(module, compute) if capture is not None else contextlib.nullcontext([])


def one_statistic(captured: list[Tensor]) -> Tensor:
    """The one statistic a vision pass must have produced."""
    if len(captured) != 1:
        raise RuntimeError(f"expected one attention statistic from the vision tower, got {len(captured)}")
    return captured[0]


# ------------------------------------------------------------------------------------------- patch state


@dataclass
class Patch:
    """One patched instance's settings (family with its options, config, method plan) and its runtime parts (the
    pruner, the statistic hooks, the decode maps of the caches its prefills filled). It holds no reference to the
    model's modules (the modules hold it), so a deleted model is freed without waiting for the garbage collector."""

    family: Family
    config: Any  # flashvid_core.FlashVIDConfig, or None for a method without compression
    plan: MethodPlan
    pruner: InLLMPruner | None
    capture: StatisticCapture = field(default_factory=StatisticCapture)
    decode_maps: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)

    def decode_map(self, cache: Any) -> DecodeMap | None:
        if cache is None:
            return None
        try:
            return self.decode_maps.get(cache)
        except TypeError:  # a cache object that cannot be weakly referenced was never filled by a FlashVID prefill
            return None

    def remember(self, cache: Any, decode: DecodeMap) -> None:
        with contextlib.suppress(TypeError):
            self.decode_maps[cache] = decode


def is_patched(model: Any) -> bool:
    """Whether FlashVID is currently applied to this model instance."""
    return getattr(model, PATCH_ATTR, None) is not None


def check_supported_class(model: Any, supported_class: str) -> None:
    """TypeError unless `model` is (a subclass of) the class named `supported_class`, listing every supported one."""
    if not any(cls.__name__ == supported_class for cls in type(model).__mro__):
        raise TypeError(
            f"this patch supports {supported_class}, got {type(model).__name__}; supported model classes: "
            f"{', '.join(sorted(FAMILY_MODULES))}"
        )


def apply(
    model: nn.Module,
    family: Family,
    config: Any,
    method: str | None = None,
    baseline_options: Mapping[str, Any] | None = None,
    backend: Backend | None = None,
) -> nn.Module:
    """Patch this instance with `family` (carrying its options) to compress its videos with `method` at
    `config.retention_ratio`; method None: "flashvid" with a config, "none" (the family's layout only) without.

    config: a `FlashVIDConfig`, a mapping of its fields (`FlashVIDConfig.from_mapping`) or None. Everything is
    validated before the model is touched; re-applying replaces the previous settings. Returns the model.
    """
    check_supported_class(model, family.supported_class)
    config = coerce_config(config)
    if method is None:
        method = "none" if config is None else "flashvid"
    layers = family.language_model(model).layers
    plan = plan_method(method, baseline_options, config, len(layers), backend)
    if is_patched(model):
        remove(model, family.supported_class)
    patch = Patch(family=family, config=config, plan=plan, pruner=attach_pruner(layers, plan))
    for module, make_class in ((model, _entry_class), *family.module_patches(model)):
        module.__dict__[ORIGINAL_CLASS_ATTR] = type(module)
        module.__class__ = make_class(type(module))
        module.__dict__[PATCH_ATTR] = patch
    model.__dict__[STATS_ATTR] = None
    return model


def remove(model: nn.Module, supported_class: str) -> nn.Module:
    """Undo `apply` on this instance: afterwards it computes exactly what the stock model computes."""
    check_supported_class(model, supported_class)
    patch: Patch | None = model.__dict__.get(PATCH_ATTR)
    if patch is None:
        return model
    if patch.pruner is not None:
        patch.pruner.remove()
    patch.capture.remove()
    for module in model.modules():
        if module.__dict__.get(PATCH_ATTR) is patch:
            module.__class__ = module.__dict__.pop(ORIGINAL_CLASS_ATTR)
            del module.__dict__[PATCH_ATTR]
    model.__dict__.pop(STATS_ATTR, None)
    return model


def flashvid_subclass(original: type, methods: dict[str, Any]) -> type:
    """`FlashVID<Original>`: a subclass of `original` with `methods`, named so in tracebacks and reprs (kept in the
    original's module, which transformers reads for some class-level lookups)."""
    return type(f"FlashVID{original.__name__}", (original,), {**methods, "__module__": original.__module__})


@functools.cache
def _entry_class(original: type) -> type:
    """The swapped model class: its `forward` routes video prefills and their decoding through the patch."""
    stock_forward = original.forward
    signature = inspect.signature(stock_forward)
    takes_cache_position = "cache_position" in signature.parameters

    # `wraps` keeps the stock name and docs; generate inspects the signature (position_ids, cache_position).
    @functools.wraps(stock_forward)
    def flashvid_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        patch: Patch | None = self.__dict__.get(PATCH_ATTR)
        if patch is None:
            return stock_forward(self, *args, **kwargs)
        arguments = bind_arguments(signature, self, args, kwargs)
        if (arguments.get("mm_encoder_outputs") or {}).get("video") is not None:
            raise ValueError(
                "FlashVID needs pixel_values_videos (it takes its attention statistic inside the vision tower), "
                "not pre-encoded video outputs (mm_encoder_outputs)"
            )
        if arguments.get("pixel_values_videos") is not None:
            with patch.plan.scope():
                return _video_prefill(self, patch, stock_forward, arguments, takes_cache_position)
        continued = _continued_call(self, patch, arguments, takes_cache_position)
        return stock_forward(self, **(arguments if continued is None else continued))

    # transformers 5 `generate` pre-encodes images and videos (mm_encoder_outputs) when forward accepts them, through
    # the stock get_video_features, outside the prefill. Hiding that parameter makes `generate` pass the raw pixels
    # to the first forward, as 4.57 always does: the video is encoded at the one call site, with its statistic.
    flashvid_forward.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "mm_encoder_outputs"]
    )
    return flashvid_subclass(original, {"forward": flashvid_forward})


# ------------------------------------------------------------------------------------------- video prefill


class VideoSupply(Protocol):
    """What serves the `EncodedVideo` of the video prefills inside a `supplying_video` scope (a visual-feature
    store: `lmms_eval_models.models.visual_store`).

    `encoded_video(encode, needs_statistic)` returns the video the method compresses: with the statistic exactly
    when `needs_statistic`. `encode(with_statistic)` runs the family's vision path on the call's own pixels (the
    supply may call it, e.g. on a miss, or not at all, e.g. on a hit whose call carries no pixels).
    """

    def encoded_video(self, encode: Callable[[bool], EncodedVideo], needs_statistic: bool) -> EncodedVideo: ...


# The supply of the calls in the current context (None: every prefill encodes its own pixels). A context variable,
# not model state: it belongs to the caller's call (one request), not to the model or its settings.
_VIDEO_SUPPLY: contextvars.ContextVar[VideoSupply | None] = contextvars.ContextVar("flashvid_video_supply",
                                                                                     default=None)


@contextlib.contextmanager
def supplying_video(supply: VideoSupply | None) -> Iterator[None]:
    """While open, the video prefills of patched models called from this context take their `EncodedVideo` from
    `supply` (None: encode as usual). Scoped to one call by its caller: the handoff of a store's entry to the
    prefill, never written into the model or its patch."""
    token = _VIDEO_SUPPLY.set(supply)
    try:
        yield
    finally:
        _VIDEO_SUPPLY.reset(token)


def encode_video(model: nn.Module, patch: Patch, inputs: VideoInputs) -> EncodedVideo:
    """The one call site of a family's `encode` (the hook point of a visual-feature store).

    Its result depends only on the model's weights, `inputs` and whether the method reads the statistic
    (`patch.plan.needs_statistic`), never on the compression settings: a store may key it on those and serve
    it to later calls with other settings. Inside `supplying_video(supply)` the supply answers instead.
    """
    needs_statistic = patch.plan.needs_statistic

    def encode(with_statistic: bool) -> EncodedVideo:
        return patch.family.encode(model, inputs, patch.capture if with_statistic else None)

    supply = _VIDEO_SUPPLY.get()
    if supply is None:
        return encode(needs_statistic)
    encoded = supply.encoded_video(encode, needs_statistic)
    if (encoded.statistic is not None) != needs_statistic:
        raise RuntimeError(
            f"the video supply returned {'a' if encoded.statistic is not None else 'no'} attention statistic for a "
            f"method that {'reads' if needs_statistic else 'does not read'} it"
        )
    return encoded


def encode_call(model: nn.Module, **arguments: Any) -> EncodedVideo:
    """What a patched model's method would compress for a call with these video arguments (for inspection and
    tests): the same encode call site as a prefill."""
    patch: Patch | None = model.__dict__.get(PATCH_ATTR)
    if patch is None:
        raise ValueError("encode_call needs a model patched with apply_flashvid")
    return encode_video(model, patch, patch.family.video_inputs(model, arguments))


def _video_prefill(
    model: nn.Module, patch: Patch, stock_forward: Callable, arguments: dict[str, Any], takes_cache_position: bool
) -> Any:
    family = patch.family
    video = family.video_inputs(model, arguments)
    prompt = _checked_prompt(model, arguments, video)  # everything refused before any model work
    encoded = encode_video(model, patch, video)
    compression, compression_ms = _timed_compression(patch, encoded)
    spliced = family.splice(model, prompt, encoded, compression)

    call = _shortened_call(arguments, family, prompt, spliced, takes_cache_position)
    pruning = (
        patch.pruner.prefill(visual_positions=spliced.visual_rows)
        if patch.pruner is not None
        else contextlib.nullcontext()
    )
    with pruning as pruned, _language_model_kwargs(family.language_model(model), spliced.language_model_kwargs):
        outputs = stock_forward(model, **call)

    # the cache the caller passed (generate always does), else the one the model made (tuple outputs have none)
    cache = arguments.get("past_key_values")
    if cache is None:
        cache = getattr(outputs, "past_key_values", None)
    if cache is not None:
        original_length = int(prompt.input_ids.shape[1])
        shift = 0 if family.keeps_original_positions else original_length - spliced.inputs_embeds.shape[1]
        patch.remember(cache, DecodeMap(spliced.source_positions, original_length, shift))
    compressed = int(spliced.visual_rows.numel())
    model.__dict__[STATS_ATTR] = FlashVIDStats(
        visual_tokens_in=encoded.features.shape[0] * encoded.features.shape[1],
        visual_tokens_compressed=compressed,
        visual_tokens_after_pruning=compressed if pruned is None else pruned.visual_tokens_kept,
        num_segments=int(compression.segment_lengths.numel()),
        compression_ms=compression_ms,
    )
    return outputs


def _checked_prompt(model: nn.Module, arguments: dict[str, Any], video: VideoInputs) -> Prompt:
    """The prompt of a video prefill; a ValueError for what the patch cannot do, before any model work."""
    input_ids = arguments.get("input_ids")
    if input_ids is None:
        raise ValueError("FlashVID needs input_ids (the video placeholders locate the video); got inputs_embeds only")
    if input_ids.shape[0] != 1 or video.num_videos != 1:
        raise ValueError(
            f"FlashVID compresses one video per call (batch size 1, as the official code); got {input_ids.shape[0]} "
            f"prompt(s) and {video.num_videos} video(s). Call the model once per sample, or remove_flashvid(model) "
            "to run the stock model"
        )
    cache = arguments.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("FlashVID compresses a video in a prefill from an empty KV cache; got a non-empty cache")
    if arguments.get("labels") is not None:
        raise ValueError("FlashVID shortens the sequence, so labels for the original one cannot be scored")
    mask = arguments.get("attention_mask")
    if mask is not None:
        _check_two_dimensional(mask)
    if not bool((input_ids == model.config.video_token_id).any()):
        raise ValueError("pixel_values_videos given but the prompt has no video placeholder token")
    return Prompt(
        input_ids=input_ids,
        embeddings=model.get_input_embeddings()(input_ids),
        attention_mask=torch.ones_like(input_ids) if mask is None else mask,
        arguments=MappingProxyType(arguments),
    )


def _shortened_call(
    arguments: dict[str, Any], family: Family, prompt: Prompt, spliced: Spliced, takes_cache_position: bool
) -> dict[str, Any]:
    """The stock forward's arguments for the shortened sequence: embeddings instead of ids, the mask's columns at
    the source positions, the family's positions, cache positions 0..L'-1 (where the forward takes them), and
    without the arguments the splice consumed."""
    call = {name: value for name, value in arguments.items() if name not in family.consumed_arguments}
    call["input_ids"] = None
    call["inputs_embeds"] = spliced.inputs_embeds
    call["attention_mask"] = prompt.mask_at(spliced.source_positions)
    call["position_ids"] = spliced.position_ids
    if takes_cache_position or arguments.get("cache_position") is not None:
        call["cache_position"] = torch.arange(spliced.inputs_embeds.shape[1], device=spliced.inputs_embeds.device)
    return call


def _timed_compression(patch: Patch, encoded: EncodedVideo) -> tuple[Compression, float]:
    """The method's compression of the video and its wall time in ms (device-synchronised; 0.0 for a method that
    compresses nothing, as unpatched runs report)."""
    device = encoded.features.device
    synchronize(device)
    started = time.perf_counter()
    compression = patch.plan.compress(encoded.features, encoded.statistic, encoded.layout.grid_hw, patch.config)
    synchronize(device)
    elapsed_ms = (time.perf_counter() - started) * 1e3 if patch.plan.compresses else 0.0
    return compression, elapsed_ms


@contextlib.contextmanager
def _language_model_kwargs(language_model: nn.Module, extra: Mapping[str, Any]) -> Iterator[None]:
    """While open, the language model's calls receive `extra` in place of the stock values of those arguments."""
    if not extra:
        yield
        return

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, **extra}

    # first of the pre-hooks, so that other hooks (the user's too) see the call as the language model receives it
    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------- decoding


def _continued_call(
    model: nn.Module, patch: Patch, arguments: dict[str, Any], takes_cache_position: bool
) -> dict[str, Any] | None:
    """A call continuing the cache of a FlashVID prefill, translated onto the shortened sequence; None otherwise."""
    cache = arguments.get("past_key_values")
    decode = patch.decode_map(cache)
    if decode is None:
        return None
    cached = cache.get_seq_length()
    if not decode.continues(arguments, cached):
        # The cache object was reset or refilled since the FlashVID prefill: this call starts something else.
        del patch.decode_maps[cache]
        return None
    call = decode.translate(arguments, cached, takes_cache_position)
    length = _query_length(call)
    if call.get("position_ids") is None and length is not None:
        batch = int((call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]).shape[0])
        positions = patch.family.decode_position_ids(
            model, decode.original_start(cached), length, batch, _call_device(call)
        )
        if positions is not None:
            call["position_ids"] = positions
    return call


def _query_length(call: Mapping[str, Any]) -> int | None:
    tokens = call.get("input_ids")
    if tokens is None:
        tokens = call.get("inputs_embeds")
    return None if tokens is None else int(tokens.shape[1])


def _call_device(call: Mapping[str, Any]) -> torch.device:
    tokens = call.get("input_ids")
    return tokens.device if tokens is not None else call["inputs_embeds"].device


def _check_two_dimensional(mask: Any) -> None:
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"FlashVID takes a 2-D attention_mask (batch, sequence), got {shape}: a 4-D mask (static caches) is "
            "built in the original sequence's coordinates"
        )
