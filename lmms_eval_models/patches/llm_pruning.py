"""Inner-LLM pruning of visual tokens at layer K (FlashVID's second stage), for any Qwen-style decoder stack.

Works on the decoder layers of transformers' `Qwen2Model` (the LLM inside LLaVA-OneVision / LLaVA-Video),
`Qwen2_5_VLTextModel` and `Qwen3VLTextModel`, on transformers 4.57 and 5.x, with eager, sdpa and flash attention.

API::

    pruner = attach_llm_pruning(text_model.layers, pruning_layer=K, llm_retention_ratio=r)   # None if K out of range
    with pruner.prefill(visual_start=s, visual_length=n) as result:      # or prefill(visual_positions=tensor)
        outputs = text_model(inputs_embeds=..., position_ids=..., attention_mask=..., past_key_values=cache)
    result.keep_positions        # (L',) positions of the prefill sequence kept from layer K on (None: no pruning)
    result.visual_tokens_kept    # ceil(n * r), or n when nothing was pruned
    pruner.remove()              # detach every hook; the layers are stock again

`prefill` is scoped to one language-model call (the prefill of one prompt, batch size 1); the visual span is passed
through it, never through a config. Decoding calls need no context: the pruner recognises the KV cache that a
pruned prefill filled and fixes, for the layers >= K, the attention mask (and `cache_position` where the
transformers version has one), whose key dimension is shorter there than in the layers < K.

How (module hooks only; no transformers forward body is copied, and no layer is forced to eager attention):

- Layer K-1's attention module gets a forward pre-hook that, during a prefill, computes only the last query's
  softmax attention over all keys (its own q_proj/k_proj/norms and the layer's rotary embeddings), averaged over
  heads, as the official code does (softmax in float32, cast back to the activations' dtype, head mean).
- Layers >= K get a forward pre-hook. During the prefill, layer K selects the kept positions with
  `flashvid_core.llm_keep_positions` (all non-visual tokens + the ceil(n * r) visual tokens of largest attention,
  in order) and gathers the hidden states; every layer >= K then receives the gathered attention mask (query and
  key dims), rotary cos/sin, cache positions and contiguous text position ids (flash-attn reads non-contiguous
  position ids as packed sequences). During decoding, these layers receive the mask's key columns gathered at
  the kept prefill positions (plus the decoded tokens), so eager, sdpa and flash attention all see the right keys.
- A family patch with extra per-token state (Qwen3-VL's deepstack `visual_pos_masks`) reads
  `pruner.active.keep_positions` (or `pruner.active.gather_positions(tensor)`) while the context is open.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flashvid_core import llm_keep_positions
from lmms_eval_models.patches.common import rotate_half

__all__ = [
    "PRUNERS",
    "LLMPruner",
    "PrefillResult",
    "QuestionAttentionPruner",
    "attach_llm_pruning",
    "layer_last_query_attention",
    "layer_question_attention",
]


# ------------------------------------------------------------------------------------------- pure helpers


def _compose_mrope(attention: nn.Module, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, B, L, D) temporal/height/width rotary tables -> (B, L, D), for 4.57's Qwen2.5-VL, which composes them
    inside attention: channel chunk i of `mrope_section * 2` comes from component i % 3."""
    if cos.dim() != 4:
        return cos, sin
    rope_settings = getattr(attention, "rope_scaling", None) or getattr(attention, "rope_parameters", None) or {}
    section = list(rope_settings["mrope_section"]) * 2
    component = torch.repeat_interleave(
        torch.arange(len(section), device=cos.device) % 3, torch.tensor(section, device=cos.device)
    )  # (D,) which of t/h/w each channel takes
    index = component.view(1, 1, 1, -1).expand(1, *cos.shape[1:])
    return cos.gather(0, index)[0], sin.gather(0, index)[0]


def layer_last_query_attention(
    attention: nn.Module, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Softmax attention of the last query over all keys, averaged over heads.

    hidden_states: (1, L, D) the attention module's input; position_embeddings: the layer's rotary (cos, sin).
    Returns (L,) in the activations' dtype. Only this one row is computed (O(L) work, not O(L^2)).
    """
    batch, length, _ = hidden_states.shape
    head_dim = attention.head_dim
    query = attention.q_proj(hidden_states[:, -1:]).view(batch, 1, -1, head_dim)
    key = attention.k_proj(hidden_states).view(batch, length, -1, head_dim)
    if getattr(attention, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before the rotation
        query, key = attention.q_norm(query), attention.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, H, 1, d), (B, Hkv, L, d)
    cos, sin = _compose_mrope(attention, *position_embeddings)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query = query * cos[:, :, -1:] + rotate_half(query) * sin[:, :, -1:]
    key = key * cos + rotate_half(key) * sin
    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query attention
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(head_dim)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return probs.mean(dim=1)[0, 0]


def layer_question_attention(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    visual_positions: torch.Tensor,
    query_chunk: int = 128,
) -> torch.Tensor:
    """PruneVID's score of each visual token: the largest softmax attention any head of any question token pays it.

    hidden_states: (1, L, D) the attention module's input; position_embeddings: the layer's rotary (cos, sin);
    visual_positions: (n,) ascending. The question tokens are the positions after the last visual one (the last
    position alone when the video ends the sequence). Each query's softmax runs over the keys up to its own
    position (causal), in float32, cast back to the activations' dtype as eager attention does; queries go in
    chunks of `query_chunk` so memory stays (H, chunk, L). Returns (L,) in the activations' dtype: the scores at
    the visual positions, 0 elsewhere.
    """
    batch, length, _ = hidden_states.shape
    scores = torch.zeros(length, dtype=hidden_states.dtype, device=hidden_states.device)
    if visual_positions.numel() == 0:
        return scores
    head_dim = attention.head_dim
    first_question = min(int(visual_positions[-1]) + 1, length - 1)
    key = attention.k_proj(hidden_states).view(batch, length, -1, head_dim)
    if getattr(attention, "k_norm", None) is not None:  # Qwen3: per-head RMSNorm before the rotation
        key = attention.k_norm(key)
    cos, sin = _compose_mrope(attention, *position_embeddings)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, L, d)
    key = key.transpose(1, 2)
    key = key * cos + rotate_half(key) * sin
    visual_positions = visual_positions.to(hidden_states.device)
    best = torch.full((visual_positions.numel(),), float("-inf"), dtype=hidden_states.dtype,
                      device=hidden_states.device)
    for start in range(first_question, length, query_chunk):
        rows = torch.arange(start, min(start + query_chunk, length), device=hidden_states.device)
        query = attention.q_proj(hidden_states[:, rows]).view(batch, rows.numel(), -1, head_dim)
        if getattr(attention, "q_norm", None) is not None:
            query = attention.q_norm(query)
        query = query.transpose(1, 2)  # (B, H, q, d)
        query = query * cos[:, :, rows] + rotate_half(query) * sin[:, :, rows]
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query attention
        logits = torch.matmul(query, keys.transpose(-1, -2)) / math.sqrt(head_dim)  # (B, H, q, L)
        future = torch.arange(length, device=rows.device).unsqueeze(0) > rows.unsqueeze(1)  # (q, L) causal
        logits = logits.masked_fill(future, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        best = torch.maximum(best, probs[0][..., visual_positions].amax(dim=(0, 1)))
    scores[visual_positions] = best
    return scores


def _keep_positions(
    attention: torch.Tensor, visual_positions: torch.Tensor, llm_retention_ratio: float
) -> torch.Tensor:
    """All non-visual positions + the top ceil(n * r) visual ones (n = len(visual_positions)), ascending.

    A non-contiguous visual set (Qwen3-VL frames separated by timestamps) is moved to the front first, keeping
    its order, so `flashvid_core.llm_keep_positions` (which takes one span) breaks ties exactly as it would on a
    contiguous span.
    """
    length = attention.shape[0]
    visual_count = int(visual_positions.numel())
    start = int(visual_positions[0]) if visual_count else 0
    if visual_count and int(visual_positions[-1]) - start + 1 == visual_count:
        return llm_keep_positions(attention, start, visual_count, llm_retention_ratio)
    is_visual = torch.zeros(length, dtype=torch.bool, device=attention.device)
    is_visual[visual_positions] = True
    order = torch.cat([visual_positions.to(attention.device), torch.nonzero(~is_visual).flatten()])
    kept = llm_keep_positions(attention[order], 0, visual_count, llm_retention_ratio)
    return torch.sort(order[kept]).values


def _gather_mask(mask: Any, rows: torch.Tensor | None, columns: torch.Tensor) -> Any:
    """Gather an attention mask: 4-D (B, 1, Q, K) on query rows and key columns, 2-D (B, K) on key columns."""
    if not isinstance(mask, torch.Tensor):
        if mask is None:
            return None
        raise TypeError(
            f"inner-LLM pruning supports tensor attention masks (eager, sdpa, flash attention), not {type(mask).__name__}"
        )
    columns = columns.to(mask.device)
    if mask.dim() == 2:
        return mask.index_select(1, columns)
    if rows is not None:
        mask = mask.index_select(2, rows.to(mask.device))
    return mask.index_select(3, columns)


# ------------------------------------------------------------------------------------------- state


@dataclass
class PrefillResult:
    """Filled in while the prefill runs; readable inside and after the `prefill` context."""

    visual_positions: torch.Tensor
    visual_tokens_kept: int
    keep_positions: torch.Tensor | None = None  # (L',) kept positions of the prefill sequence, set at layer K
    last_query_attention: torch.Tensor | None = None  # (L,) from layer K-1
    _gathered: dict[int, Any] = field(default_factory=dict, repr=False)  # id(original kwarg) -> gathered copy

    def gather_positions(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """A per-position tensor of the prefill sequence, restricted to the kept positions (along `dim`)."""
        if self.keep_positions is None:
            return tensor
        return tensor.index_select(dim, self.keep_positions.to(tensor.device))


@dataclass
class _PrunedCache:
    """Layout of a KV cache filled by a pruned prefill: layers >= K hold only `keep_positions` of the first
    `prefill_length` entries that layers < K hold."""

    keep_positions: torch.Tensor
    prefill_length: int

    @property
    def removed(self) -> int:
        return self.prefill_length - int(self.keep_positions.numel())


class LLMPruner:
    """Hooks on one decoder-layer stack that prune visual tokens at layer `pruning_layer` during a prefill."""

    def __init__(self, layers: nn.ModuleList, pruning_layer: int, llm_retention_ratio: float) -> None:
        if not 1 <= pruning_layer < len(layers):
            raise ValueError(f"pruning_layer={pruning_layer} is out of range: allowed 1..{len(layers) - 1}")
        if not 0.0 < llm_retention_ratio <= 1.0:
            raise ValueError(f"llm_retention_ratio={llm_retention_ratio} is out of range: allowed (0, 1]")
        self.pruning_layer = pruning_layer
        self.llm_retention_ratio = float(llm_retention_ratio)
        self._active: PrefillResult | None = None
        self._caches: weakref.WeakKeyDictionary[Any, _PrunedCache] = weakref.WeakKeyDictionary()
        self._handles = [
            layers[pruning_layer - 1].self_attn.register_forward_pre_hook(self._score_hook, with_kwargs=True)
        ]
        for index in range(pruning_layer, len(layers)):
            hook = self._make_layer_hook(index == pruning_layer)
            self._handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))

    # ------------------------------------------------------------------------------------------- public

    @property
    def active(self) -> PrefillResult | None:
        """The result of the prefill in progress (inside `prefill`), else None."""
        return self._active

    @contextlib.contextmanager
    def prefill(
        self,
        visual_start: int | None = None,
        visual_length: int | None = None,
        *,
        visual_positions: torch.Tensor | None = None,
    ) -> Iterator[PrefillResult]:
        """Scope one language-model prefill call whose visual tokens are [start, start + length) or the given
        ascending `visual_positions` of the sequence the language model receives."""
        if visual_positions is None:
            if visual_start is None or visual_length is None:
                raise ValueError("prefill needs visual_start and visual_length, or visual_positions")
            visual_positions = torch.arange(visual_start, visual_start + visual_length)
        visual_positions = visual_positions.flatten().long()
        visual_count = int(visual_positions.numel())
        kept = math.ceil(visual_count * self.llm_retention_ratio)
        self._active = PrefillResult(visual_positions=visual_positions, visual_tokens_kept=visual_count)
        try:
            yield self._active
        finally:
            result, self._active = self._active, None
            if result.keep_positions is None:
                result.visual_tokens_kept = visual_count
            else:
                result.visual_tokens_kept = kept

    def remove(self) -> None:
        """Detach all hooks; the layers behave like stock ones again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._caches = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------------------------------- hooks

    def _score_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        result = self._active
        if result is None or result.last_query_attention is not None:
            return None
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden_states.shape[0] != 1:
            raise ValueError(f"inner-LLM pruning supports batch size 1, got {hidden_states.shape[0]}")
        position_embeddings = kwargs.get("position_embeddings")
        if position_embeddings is None:
            raise ValueError("inner-LLM pruning needs the layer's rotary position_embeddings (cos, sin)")
        with torch.no_grad():
            result.last_query_attention = self._score(module, hidden_states, position_embeddings, result)
        return None

    def _score(self, module: nn.Module, hidden_states: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor], result: PrefillResult) -> torch.Tensor:
        """Layer K − 1's ranking score of the visual tokens: the last token's head-averaged attention."""
        return layer_last_query_attention(module, hidden_states, position_embeddings)

    def _make_layer_hook(self, is_pruning_layer: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._active is not None:
                return self._prefill_layer(module, args, kwargs, is_pruning_layer)
            return self._decode_layer(module, args, kwargs)

        return hook

    def _prefill_layer(
        self, module: nn.Module, args: tuple, kwargs: dict, is_pruning_layer: bool
    ) -> tuple[tuple, dict] | None:
        result = self._active
        assert result is not None
        if is_pruning_layer:
            if result.last_query_attention is None or result.visual_positions.numel() == 0:
                return None  # nothing to prune (no visual token, or layer K-1 did not run in this context)
            attention = result.last_query_attention
            keep = _keep_positions(attention, result.visual_positions.to(attention.device), self.llm_retention_ratio)
            result.keep_positions = keep
            args, kwargs = self._gather_hidden_states(args, kwargs, keep)
            cache = kwargs.get("past_key_values")
            if cache is not None:
                if getattr(cache, "is_compileable", False):  # static caches size every layer's mask alike
                    raise ValueError(
                        f"inner-LLM pruning needs a dynamic KV cache (layers keep different lengths); got "
                        f"{type(cache).__name__}. Use the default cache or set pruning_layer beyond the last layer"
                    )
                self._caches[cache] = _PrunedCache(keep_positions=keep, prefill_length=attention.shape[0])
        if result.keep_positions is None:
            return None
        keep = result.keep_positions
        for name in ("attention_mask", "position_embeddings", "cache_position", "position_ids"):
            if kwargs.get(name) is not None:
                kwargs[name] = self._gathered_kwarg(result, name, kwargs[name], keep)
        return args, kwargs

    @staticmethod
    def _gather_hidden_states(args: tuple, kwargs: dict, keep: torch.Tensor) -> tuple[tuple, dict]:
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = kwargs["hidden_states"].index_select(1, keep)
        else:
            args = (args[0].index_select(1, keep.to(args[0].device)), *args[1:])
        return args, kwargs

    @staticmethod
    def _gathered_kwarg(result: PrefillResult, name: str, value: Any, keep: torch.Tensor) -> Any:
        """The kept-position version of one per-token kwarg, computed once per prefill for each original object
        (full and sliding-window layers may receive different masks)."""
        cached = result._gathered.get(id(value))
        if cached is not None and cached[0] is value:
            return cached[1]
        if name == "attention_mask":
            gathered = _gather_mask(value, keep, keep)
        elif name == "position_embeddings":
            gathered = tuple(table.index_select(-2, keep.to(table.device)) for table in value)
        elif name == "cache_position":
            # this layer's cache is filled from position 0 with the kept tokens only
            gathered = torch.arange(keep.numel(), device=value.device, dtype=value.dtype) + value[0]
        else:  # text position ids: only flash-attn reads them, to detect packing; keep them contiguous
            start = value.min()
            gathered = (torch.arange(keep.numel(), device=value.device, dtype=value.dtype) + start).expand(
                *value.shape[:-1], keep.numel()
            )
        result._gathered[id(value)] = (value, gathered)  # keep `value` alive so its id stays unique
        return gathered

    def _decode_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = kwargs.get("past_key_values")
        layout = self._caches.get(cache) if cache is not None else None
        if layout is None:
            return None
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        query_length = hidden_states.shape[1]
        layer_cached = cache.get_seq_length(module.self_attn.layer_idx)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            key_width = mask.shape[-1]
            if key_width - query_length - layer_cached != layout.removed:
                return None  # the cache was reset or reused for another prompt: not the pruned layout any more
            device = mask.device
            columns = torch.cat(
                [layout.keep_positions.to(device), torch.arange(layout.prefill_length, key_width, device=device)]
            )
            kwargs["attention_mask"] = _gather_mask(mask, None, columns)
        cache_position = kwargs.get("cache_position")
        if cache_position is not None:
            kwargs["cache_position"] = torch.arange(
                layer_cached, layer_cached + query_length, device=cache_position.device, dtype=cache_position.dtype
            )
        return args, kwargs


class QuestionAttentionPruner(LLMPruner):
    """PruneVID's inner-LLM pruning: `LLMPruner` ranking the visual tokens by the question's attention.

    The same hooks, lifecycle and kept count (all text + the ceil(n · r) top visual tokens from layer K on, the
    shorter KV cache of layers >= K during decoding); only the score differs: at layer K − 1, the largest softmax
    attention that any head of any token after the video pays each visual token (`layer_question_attention`),
    instead of the last token's head-averaged attention. `PrefillResult.last_query_attention` holds that score.
    """

    def _score(self, module: nn.Module, hidden_states: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor], result: PrefillResult) -> torch.Tensor:
        return layer_question_attention(module, hidden_states, position_embeddings, result.visual_positions)


# LLMPruning.scoring (lmms_eval_models.methods) -> the pruner that ranks the visual tokens that way.
PRUNERS: dict[str, type[LLMPruner]] = {"last_query": LLMPruner, "question": QuestionAttentionPruner}


def attach_llm_pruning(
    layers: nn.ModuleList, pruning_layer: int, llm_retention_ratio: float, scoring: str = "last_query"
) -> LLMPruner | None:
    """Hook inner-LLM pruning onto a decoder-layer stack; None when `pruning_layer` is not inside it (no pruning:
    the official setting for models with fewer layers than K). scoring: a key of `PRUNERS`."""
    if scoring not in PRUNERS:
        raise ValueError(f"scoring={scoring!r} is invalid: allowed {', '.join(PRUNERS)}")
    if not 1 <= pruning_layer < len(layers):
        return None
    return PRUNERS[scoring](layers, pruning_layer, llm_retention_ratio)
