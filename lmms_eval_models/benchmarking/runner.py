"""Build (or load) the model, feed it videos, and time vanilla and FlashVID runs in one process.

Every configuration gets its warm-up calls first, then `repeats` timed `generate(max_new_tokens=1)` calls per
video; a row holds the medians. The same model instance serves every row: FlashVID is applied to it per ratio
and removed again, so weights, inputs and kernels are shared and the ratios are measured like for like.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmms_eval_models.benchmarking.flops import LLMShape, prefill_tflops
from lmms_eval_models.benchmarking.inputs import (
    VideoInputs,
    build_inputs,
    decode_video,
    synthetic_frames,
    to_device,
)
from lmms_eval_models.benchmarking.presets import FAMILY_LLAVA, FAMILY_QWEN2_5, ModelPreset, family_of_model
from lmms_eval_models.benchmarking.timing import (
    StageModules,
    StageProbe,
    StageTimes,
    clock_for,
    peak_memory_bytes,
    reset_peak_memory,
)

PAPER_PRUNING_LAYER = 20
PAPER_LLM_LAYERS = 28


@dataclass
class BenchSettings:
    """Everything one benchmark run depends on (what `flashvid-bench` parses)."""

    device: torch.device
    dtype: torch.dtype
    frames: int
    ratios: list[float]
    preset: ModelPreset | None = None  # build from config with random weights
    checkpoint: str | None = None  # or load this checkpoint
    video_layout: str | None = None  # LLaVA: "onevision" / "llava_video"; None: the preset's
    warmup: int = 1
    repeats: int = 3
    prompt_tokens: int = 128
    frame_size: int = 448  # Qwen2.5-VL frame side in pixels (multiple of 28)
    videos: list[str] = field(default_factory=list)  # video files; empty: one synthetic video
    seed: int = 0
    attn_implementation: str = "sdpa"
    first_token: str = "generate"  # how TTFT's first token is produced: "generate" or "forward"
    threads: int | None = None  # CPU threads; None: 1 on CPU (see cpu_threads), torch's default on GPU
    flashvid_overrides: dict[str, Any] = field(default_factory=dict)
    profile_dir: str | None = None  # also profile one call per variant: Chrome traces and top-operator tables


@dataclass
class Measurement:
    """One timed call."""

    stages: StageTimes
    compression_ms: float
    peak_memory: int | None
    stats: Any  # FlashVIDStats or None


@dataclass
class MethodRow:
    """One table row: medians over videos × repeats."""

    method: str
    retention_ratio: float | None
    vision_ms: float
    compression_ms: float
    llm_forward_ms: float
    prefill_ms: float
    ttft_ms: float
    between_ms: float
    vision_layer_ms: float  # median time of the last vision encoder layer
    peak_memory_gib: float | None
    tflops: float
    llm_visual_tokens: int
    visual_tokens_after_pruning: int
    num_segments: int | None
    vision_attention: str
    calls: int


@dataclass
class BenchResult:
    settings: BenchSettings
    model_name: str
    family: str
    video_layout: str | None
    rows: list[MethodRow]
    visual_tokens_vanilla: int
    sequence_length: int
    device_name: str
    notes: list[str]


# ------------------------------------------------------------------------------------------------ model


def build_model(preset: ModelPreset, device: torch.device, dtype: torch.dtype, attn: str, seed: int) -> nn.Module:
    """The preset's architecture with random weights, created directly on `device` in `dtype`.

    Creating under `torch.device(device)` allocates and initialises every weight there: a 7B model never
    materialises on the host.
    """
    import transformers

    config = preset.build_config()
    model_class = (
        transformers.LlavaOnevisionForConditionalGeneration
        if preset.family == FAMILY_LLAVA
        else transformers.Qwen2_5_VLForConditionalGeneration
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def load_model(path: str, device: torch.device, dtype: torch.dtype, attn: str) -> nn.Module:
    """A checkpoint from local disk (or the HF cache), loaded onto `device`."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, device_map=str(device), attn_implementation=attn
    )
    return model.eval()


def stage_modules(model: nn.Module, family: str) -> StageModules:
    """The family's stage boundaries (module names are the same in transformers 4.57 and 5.x)."""
    inner = model.model
    if family == FAMILY_LLAVA:
        tower = inner.vision_tower
        encoder = getattr(tower, "vision_model", tower).encoder
        return StageModules(tower, inner.multi_modal_projector, list(encoder.layers), inner.language_model)
    if family == FAMILY_QWEN2_5:
        visual = inner.visual
        return StageModules(visual, visual, list(visual.blocks), inner.language_model)
    raise ValueError(f"no stage map for family {family!r}")


def hook_counts(modules: StageModules) -> list[int]:
    """Forward (pre-)hooks inside each vision encoder layer (the layer itself excluded: the harness hooks it)."""
    return [
        sum(len(sub._forward_pre_hooks) + len(sub._forward_hooks) for sub in list(layer.modules())[1:])
        for layer in modules.vision_layers
    ]


def swapped_layers(modules: StageModules) -> int:
    """Vision layers holding a module whose class a patch swapped (`prefill.apply` marks it with `_flashvid_original_class`)."""
    return sum(
        1 for layer in modules.vision_layers
        if any("_flashvid_original_class" in sub.__dict__ for sub in list(layer.modules())[1:])
    )  # fmt: skip


def vision_attention_description(model: nn.Module, layers: int, swapped: int, hooked: int) -> str:
    """How the vision encoder's attention runs: its implementation, and where a patch adds statistic work.

    A patch either swaps the class of the attention module it reads the statistic from (`swapped`) or hooks that
    module (`hooked`: layers with more hooks patched than unpatched; transformers 5 itself hooks attention modules
    to record outputs, so absolute counts say nothing). Both patches keep the layer on its own attention
    implementation and compute the statistic in a separate chunked pass beside it.
    """
    vision_config = getattr(model.config, "vision_config", None)
    implementation = getattr(vision_config, "_attn_implementation", None) or "default"
    if implementation == "eager":
        return f"eager ×{layers} (eager everywhere)"
    description = f"{implementation} ×{layers}"
    if swapped or hooked:
        description += f" + statistic pass in {swapped + hooked} layer(s)"
    return description


# ------------------------------------------------------------------------------------------------ inputs


def video_inputs(settings: BenchSettings, family: str, config: Any) -> list[VideoInputs]:
    """One input set per video: the given files, or one synthetic video."""
    if settings.videos:
        clips = [decode_video(path, settings.frames) for path in settings.videos]
    else:
        side = settings.frame_size if family == FAMILY_QWEN2_5 else config.vision_config.image_size
        clips = [synthetic_frames(settings.frames, side, side, seed=settings.seed)]
    return [
        to_device(build_inputs(family, config, clip, settings.prompt_tokens, settings.frame_size, settings.seed),
                  settings.device, settings.dtype)
        for clip in clips
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- FlashVID


def flashvid_config(family: str, ratio: float, llm_layers: int, overrides: dict[str, Any]) -> Any:
    """The official scripts' settings for the family at `ratio`, with the pruning layer kept at K/L = 20/28.

    LLaVA: attn_div_v2, min_segment_num 8; Qwen2.5-VL: attn_div, min_segment_num 4 (paper App. C.2, scripts).
    """
    from flashvid_core import FlashVIDConfig

    values: dict[str, Any] = {"retention_ratio": ratio}
    if family == FAMILY_QWEN2_5:
        values.update(token_selection_method="attn_div", min_segment_num=4)
    else:
        values.update(token_selection_method="attn_div_v2", min_segment_num=8)
    if llm_layers != PAPER_LLM_LAYERS:
        values["pruning_layer"] = max(1, round(llm_layers * PAPER_PRUNING_LAYER / PAPER_LLM_LAYERS))
    values.update(overrides)
    return FlashVIDConfig.from_mapping(values)


def _apply(model: nn.Module, config: Any, family: str, video_layout: str | None) -> None:
    from lmms_eval_models.patches import apply_flashvid

    options = {"video_layout": video_layout} if family == FAMILY_LLAVA and video_layout else {}
    apply_flashvid(model, config, **options)


def _remove(model: nn.Module) -> None:
    from lmms_eval_models.patches import is_patched, remove_flashvid

    if is_patched(model):
        remove_flashvid(model)


# ------------------------------------------------------------------------------------------------ timing


def _generate_kwargs(model: nn.Module) -> dict[str, Any]:
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    eos = getattr(text_config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    return {"max_new_tokens": 1, "do_sample": False, "pad_token_id": eos if eos is not None else 0}


def first_token(model: nn.Module, inputs: VideoInputs, mode: str) -> None:
    """Produce the first generated token: `generate(max_new_tokens=1)` (default), or one forward with a cache
    and an argmax (`forward`: the same work without generate()'s bookkeeping)."""
    with torch.inference_mode():
        if mode == "generate":
            model.generate(**inputs.model_kwargs, **_generate_kwargs(model))
        elif mode == "forward":
            logits = model(**inputs.model_kwargs, use_cache=True, logits_to_keep=1).logits
            logits[:, -1].argmax(dim=-1)
        else:
            raise ValueError(f"first-token mode must be 'generate' or 'forward', got {mode!r}")


def time_call(
    model: nn.Module, probe: StageProbe, inputs: VideoInputs, device: torch.device, mode: str = "generate"
) -> Measurement:
    """One first-token call (TTFT) with its stage times."""
    clock = probe.clock
    probe.reset()
    model.__dict__.pop("flashvid_stats", None)  # a stale value would be read as this call's
    reset_peak_memory(device)
    clock.synchronize()
    start = clock.mark()
    first_token(model, inputs, mode)
    end = clock.mark()
    stages = probe.times(start, end)
    stats = getattr(model, "flashvid_stats", None)
    compression_ms = float(stats.compression_ms) if stats is not None else 0.0
    return Measurement(stages, compression_ms, peak_memory_bytes(device), stats)


def _require_patch_ran(model: nn.Module, calls: Sequence[Measurement], mode: str) -> None:
    """A FlashVID row must come from calls that went through the patch; otherwise it would be vanilla again."""
    if any(call.stats is None for call in calls):
        import transformers

        raise RuntimeError(
            f"the FlashVID patch did not run during {mode}() on {type(model).__name__} with transformers "
            f"{transformers.__version__} (model.flashvid_stats was not set), so this row would time the stock "
            "model. Some transformers versions encode videos in generate() before the model's forward "
            "(mm_encoder_outputs); try --first-token forward, and report it to the patch's owners."
        )


@dataclass
class Variant:
    """One table row's configuration: vanilla (flashvid None) or FlashVID at one ratio."""

    method: str
    ratio: float | None
    flashvid: Any  # FlashVIDConfig or None
    calls: list[Measurement] = field(default_factory=list)
    vision_attention: str = ""

    @property
    def label(self) -> str:
        """A file-name-safe name: vanilla, flashvid_r0.1, ..."""
        return "vanilla" if self.ratio is None else f"{self.method.lower()}_r{self.ratio:g}"


def _activate(model: nn.Module, variant: Variant, family: str, layout: str | None) -> None:
    # LLaVA-Video's vanilla layout (169 + newline per frame) exists only through the patch, uncompressed.
    if variant.flashvid is not None or layout == "llava_video":
        _apply(model, variant.flashvid, family, layout)


def measure_round_robin(
    model: nn.Module,
    probe: StageProbe,
    inputs: Sequence[VideoInputs],
    variants: Sequence[Variant],
    context: tuple[BenchSettings, str, str | None, StageModules],
    progress: Callable[[], None],
) -> None:
    """Warm up every variant, then time them in turns (repeat × video × variant), filling `variant.calls`.

    Taking turns exposes every variant to the same drift in load and clocks (a shared CPU varies by 2x within
    a minute), so the ratios between rows stay meaningful. Switching is a class swap on the instance.
    """
    settings, family, layout, modules = context
    mode = settings.first_token

    def call(variant: Variant, video: VideoInputs) -> Measurement:
        _activate(model, variant, family, layout)
        try:
            measurement = time_call(model, probe, video, settings.device, mode)
            swapped, patched_hooks = swapped_layers(modules), hook_counts(modules)
        finally:
            _remove(model)
        hooked = sum(1 for patched, stock in zip(patched_hooks, hook_counts(modules)) if patched > stock)
        variant.vision_attention = vision_attention_description(model, len(modules.vision_layers), swapped, hooked)
        progress()
        return measurement

    for variant in variants:
        for _ in range(settings.warmup):
            call(variant, inputs[0])
    for _ in range(settings.repeats):
        for video in inputs:
            for variant in variants:
                variant.calls.append(call(variant, video))
    for variant in variants:
        if variant.flashvid is not None:
            _require_patch_ran(model, variant.calls, mode)
    if settings.profile_dir is not None:
        for variant in variants:
            _activate(model, variant, family, layout)
            try:
                profile_call(model, inputs[0], settings.device, mode, settings.profile_dir, variant.label)
            finally:
                _remove(model)


def profile_call(model: nn.Module, inputs: VideoInputs, device: torch.device, mode: str, out_dir: str,
                 label: str) -> None:
    """Profile one first-token call (after the timed ones, so it is warm): `<label>.json` (a Chrome trace) and
    `<label>.txt` (the operators taking the most time) under out_dir."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        first_token(model, inputs, mode)
        if cuda:
            torch.cuda.synchronize(device)
    prof.export_chrome_trace(str(folder / f"{label}.json"))
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (folder / f"{label}.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=40,
                                                                   max_name_column_width=70))


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarise(
    method: str,
    ratio: float | None,
    calls: list[Measurement],
    text_tokens: int,
    shape: LLMShape,
    pruning_layer: int | None,
    vision_attention: str,
) -> MethodRow:
    """Medians over the timed calls; TFLOPs by Eq. 12 from the token counts the LLM actually received."""
    compression = _median([c.compression_ms for c in calls])
    llm_forward = _median([c.stages.llm_forward_ms for c in calls])
    llm_visual = int(_median([c.stages.llm_sequence_length - text_tokens for c in calls]))
    stats = calls[-1].stats
    pruned_away = 0
    if stats is not None:
        pruned_away = max(0, stats.visual_tokens_compressed - stats.visual_tokens_after_pruning)
    after_pruning = llm_visual - pruned_away
    peaks = [c.peak_memory for c in calls if c.peak_memory is not None]
    # The statistic comes from the last encoder layer (LLaVA: the last used SigLIP layer; Qwen2.5-VL: the last,
    # full-attention block), so that layer's time is the "one layer" FlashVID may add to vision encoding.
    layer_times = [c.stages.vision_layer_ms[-1] for c in calls if c.stages.vision_layer_ms]
    return MethodRow(
        method=method,
        retention_ratio=ratio,
        vision_ms=_median([c.stages.vision_ms for c in calls]),
        compression_ms=compression,
        llm_forward_ms=llm_forward,
        prefill_ms=_median([c.compression_ms + c.stages.llm_forward_ms for c in calls]),
        ttft_ms=_median([c.stages.total_ms for c in calls]),
        between_ms=_median([c.stages.between_ms for c in calls]),
        vision_layer_ms=_median(layer_times),
        peak_memory_gib=max(peaks) / 2**30 if peaks else None,
        tflops=prefill_tflops(shape, llm_visual, after_pruning, pruning_layer if pruned_away else None),
        llm_visual_tokens=llm_visual,
        visual_tokens_after_pruning=after_pruning,
        num_segments=stats.num_segments if stats is not None else None,
        vision_attention=vision_attention,
        calls=len(calls),
    )


# ------------------------------------------------------------------------------------------------- run


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def cpu_threads(settings: BenchSettings) -> Iterator[None]:
    """torch's CPU thread count for the run, restored afterwards.

    On CPU the default is one thread: tiny kernels split over threads that other processes preempt stall at
    every barrier (seen: 5x spread between identical calls on a shared 2-core machine), one thread repeats.
    """
    previous = torch.get_num_threads()
    wanted = settings.threads or (1 if settings.device.type == "cpu" else None)
    if wanted:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_benchmark(settings: BenchSettings, progress_factory: Callable[[int], Any] | None = None) -> BenchResult:
    """Vanilla and FlashVID at each ratio, on one model instance. Returns the rows (vanilla first)."""
    with cpu_threads(settings):
        return _run_benchmark(settings, progress_factory)


def _run_benchmark(settings: BenchSettings, progress_factory: Callable[[int], Any] | None) -> BenchResult:
    if settings.preset is None and settings.checkpoint is None:
        raise ValueError("give a model preset or a checkpoint path")
    if settings.checkpoint is not None:
        model = load_model(settings.checkpoint, settings.device, settings.dtype, settings.attn_implementation)
        family, name = family_of_model(model), settings.checkpoint
        layout = settings.video_layout or ("onevision" if family == FAMILY_LLAVA else None)
    else:
        preset = settings.preset
        model = build_model(preset, settings.device, settings.dtype, settings.attn_implementation, settings.seed)
        family, name = preset.family, preset.name
        layout = settings.video_layout or (
            ("llava_video" if preset.llava_video_layout else "onevision") if family == FAMILY_LLAVA else None
        )
    config = model.config
    shape = LLMShape.from_text_config(config.get_text_config() if hasattr(config, "get_text_config") else config.text_config)
    inputs = video_inputs(settings, family, config)
    modules = stage_modules(model, family)
    probe = StageProbe(modules, clock_for(settings.device))
    total_calls = (1 + len(settings.ratios)) * (settings.warmup + settings.repeats * len(inputs))
    bar = progress_factory(total_calls) if progress_factory else None
    tick = bar.update if bar is not None else (lambda *_: None)
    # Text tokens: the prompt around the video placeholders (Qwen's vision start/end markers included), which
    # Eq. 12 does not count; the LLM's visual tokens are its input length minus these.
    text_tokens = inputs[0].sequence_length - inputs[0].visual_tokens
    notes: list[str] = []
    variants = [Variant("Vanilla", None, None)] + [
        Variant("FlashVID", ratio, flashvid_config(family, ratio, shape.layers, settings.flashvid_overrides))
        for ratio in settings.ratios
    ]
    try:
        measure_round_robin(model, probe, inputs, variants, (settings, family, layout, modules), tick)
    finally:
        probe.remove()
        if bar is not None:
            bar.close()
    rows = [
        summarise(variant.method, variant.ratio, variant.calls, text_tokens, shape,
                  variant.flashvid.pruning_layer if variant.flashvid is not None else None, variant.vision_attention)
        for variant in variants
    ]  # fmt: skip
    return BenchResult(
        settings=settings,
        model_name=name,
        family=family,
        video_layout=layout,
        rows=rows,
        visual_tokens_vanilla=rows[0].llm_visual_tokens,
        sequence_length=inputs[0].sequence_length,
        device_name=_device_name(settings.device),
        notes=notes,
    )
