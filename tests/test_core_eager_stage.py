"""compress's CPU stage (flashvid_core/eager_stage.py): segment by segment, tree sums as bags, the low-precision walk
over merged tokens only, DPC-kNN batches and the output assembly give the whole-video reference stages' numbers bit
for bit; and one call holds no copy of the video."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import core_cases as cc
import pytest
import torch

import flashvid_core as fc
from flashvid_core import cpu_products, eager_stage, merging, pipeline, segmentation
from flashvid_core.merging import index_sum, row_sums

LOOP = cc.loop_reference()
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_compress.py"


def test_row_sums_add_in_index_add_order_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    # Values spread over many magnitudes, so that the order of the additions shows in the last bits.
    table = torch.randn(500, 33, generator=generator) * torch.exp(4 * torch.randn(500, 1, generator=generator))
    owner = torch.randint(0, 60, (400,), generator=generator) ** 2 // 60  # skewed: some bags hold many rows
    owner[owner == 7] = 8  # a bag nothing maps to sums to zero
    rows = torch.randint(0, 500, (400,), generator=generator)
    expected = torch.zeros(61, 33).index_add_(0, owner, table[rows])
    assert torch.equal(row_sums(table, rows, owner, 61), expected)
    assert torch.equal(index_sum(table[rows], owner, 61), expected)
    half = table[rows].half()  # other dtypes keep index_add_
    assert torch.equal(index_sum(half, owner, 61), torch.zeros(61, 33, dtype=torch.half).index_add_(0, owner, half))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frame_descriptors_are_the_frame_means_bit_for_bit(monkeypatch, dtype):
    features = (torch.randn(7, 13, 11, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    monkeypatch.setattr(segmentation, "DESCRIPTOR_CHUNK_BYTES", 2 * 13 * 11 * 4)  # two frames at a time
    assert torch.equal(segmentation.frame_descriptors(features), features.mean(dim=1))


def test_event_relevance_on_the_cpu_is_the_official_product():
    features, _ = LOOP.synthetic_video(5, 10, 6, "cpu", torch.float32, seed=1)
    got = fc.event_relevance(features, [2, 0, 3])
    for start, stop in ((0, 2), (2, 5)):
        segment = features[start:stop]
        official = torch.einsum("b n d, c d -> b c n", segment, segment.mean(1)).mean(1)  # the official code's form
        assert torch.equal(got[start:stop], official)


CONFIGS = [
    {},
    {"token_selection_method": "attn_div"},
    {"token_selection_method": "div", "retention_ratio": 0.4},
    {"token_selection_method": "attn"},
    {"token_selection_method": "div_er"},
    {"alpha": 0.0},
    {"alpha": 1.0},
    {"do_segment": False},
    {"min_segment_num": 1, "segment_threshold": -1.0},
    {"tstm_true_mean": True},
    {"tstm_float32_sums": True},
    {"tstm_max_depth": 2, "tstm_max_breadth": 2},
    {"tstm_spatial_window": 3},
    {"adts_forbid_repick": True, "temporal_threshold": 0.3},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_segment_stage_equals_the_whole_video_stage(dtype, overrides):
    features, attention = LOOP.synthetic_video(12, 36, 16, "cpu", dtype, seed=4)
    config = fc.FlashVIDConfig(**{"retention_ratio": 0.25, "min_segment_num": 4, **overrides})
    lengths, frame_means = pipeline._checked_segment_lengths(features, attention, config, True)
    _, num_selected, num_merged = config.budgets(36)
    plan = pipeline.VideoPlan(config, tuple(lengths), num_selected, num_merged)
    keep, passed = eager_stage.eager_stage(features, attention, plan, frame_means)
    reference_keep, reference = eager_stage.whole_video_stage(features, attention, plan)
    assert (keep is None) == (reference_keep is None)
    if keep is not None:
        assert torch.equal(keep, reference_keep)
    assert (passed is None) == (reference is None)
    if passed is None:
        return
    assert passed.counts == reference.counts and sum(passed.counts) > 0
    assert torch.equal(passed.token_index, reference.token_index)
    rows = torch.arange(sum(passed.counts))
    assert torch.equal(passed.values(rows), reference.values(rows))
    assert torch.equal(passed.values(rows.flip(0)[:5]), reference.values(rows)[rows.flip(0)[:5]])  # any rows


def test_one_frame_segments_pass_every_token_unchanged():
    features, attention = LOOP.synthetic_video(5, 9, 4, "cpu", torch.float32, seed=0)
    plan = pipeline.VideoPlan(fc.FlashVIDConfig(retention_ratio=0.5), (1,) * 5, 4, 2)
    _, passed = eager_stage.eager_stage(features, attention, plan)
    assert passed.counts == [9] * 5 and torch.equal(passed.token_index, torch.arange(45) % 9)
    assert torch.equal(passed.values(torch.tensor([0, 44])), features.reshape(45, 4)[[0, 44]])


def test_dpc_batches_keep_the_cdist_sides_apart_and_similar_sizes_together():
    counts = [196, 178, 17, 13, 18, 25, 26, 160, 140, 0, 16]
    batches = pipeline._dpc_batches([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], counts)
    assert sorted(f for batch in batches for f in batch) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    for batch in batches:
        sizes = [counts[f] for f in batch]
        assert len({size <= 25 for size in sizes}) == 1  # one side of torch.cdist's switch
        assert sizes == sorted(sizes, reverse=True) and min(sizes) >= pipeline.DPC_BATCH_FILL * max(sizes)
        assert len(batch) * max(sizes) <= max(pipeline.DPC_BATCH_POINTS, max(sizes))
    assert [counts[f] for f in batches[0]] == [25]  # the small side first, then [18, 17, 16], [13]...


def test_output_is_in_index_order_with_selected_tokens_first_among_equal_indices():
    flat = torch.arange(12.0).view(6, 2)
    selected = torch.tensor([5, 1, 3])
    clusters = [torch.full((2, 2), -1.0), torch.full((1, 2), -2.0)]
    tokens, indices = pipeline._in_index_order(flat, [selected, torch.tensor([3, 0]), torch.tensor([4])], clusters)
    assert indices.tolist() == [0, 1, 3, 3, 4, 5]
    assert tokens.tolist() == [[-1, -1], [2, 3], [6, 7], [-1, -1], [-2, -2], [10, 11]]
    empty_tokens, empty_indices = pipeline._in_index_order(flat, [torch.zeros(0, dtype=torch.long)], [])
    assert empty_tokens.shape == (0, 2) and empty_indices.numel() == 0


def test_one_call_holds_no_copy_of_the_video():
    # Resident memory of one compress call in a fresh process, above its inputs: the output and per-segment
    # workspaces, well under one copy of the features (the previous whole-video stage held several).
    shape = "32x196x1024"  # 25.7 MB of float32 features
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--peak-rss-child", "ours", "--shapes", shape, "--dtypes", "float32",
         "--retention-ratios", "0.1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    assert memory["call"] < 0.8 * 32 * 196 * 1024 * 4 / 2**20, memory


def _small_integer_frames(frames: int, tokens: int, dim: int, seed: int) -> torch.Tensor:
    # Small integers: every product and sum is exact in float32, whatever order a BLAS adds them in, so these
    # tests check the arrangement of the smaller products, not this machine's BLAS.
    return torch.randint(-3, 4, (frames, tokens, dim), generator=torch.Generator().manual_seed(seed)).float()


def test_symmetric_gram_is_the_whole_product():
    frames = _small_integer_frames(3, 37, 8, seed=0)
    assert torch.equal(cpu_products.symmetric_gram(frames), torch.bmm(frames, frames.transpose(1, 2)))


@pytest.mark.parametrize("seed", range(4))
def test_front_products_give_the_masked_similarities_of_the_whole_products(seed):
    generator = torch.Generator().manual_seed(seed)
    workspace = _small_integer_frames(5, 40, 6, seed)
    selected = torch.zeros(5, 40, dtype=torch.bool)
    for frame, count in enumerate([6, 6, 3, 9, 6]):  # unequal counts, as repeated picks give
        selected[frame, torch.randperm(40, generator=generator)[:count]] = True
    excluded = selected[1:].unsqueeze(-1) | selected[:-1].unsqueeze(1)
    expected = torch.bmm(workspace[1:], workspace[:-1].transpose(1, 2)).masked_fill(excluded, -1.0)
    width = cpu_products.front_width(selected)
    assert width == 40 - 3
    row = cpu_products.unselected_first(workspace, selected, width)
    got = cpu_products.previous_frame_similarities_of_front(workspace, width, row)
    assert torch.equal(got.masked_fill(excluded, -1.0), expected)
    assert bool((row[~selected] < width).all())  # every unselected token sits in the front


def test_the_stage_takes_the_whole_products_where_the_smaller_ones_differ(monkeypatch):
    monkeypatch.setattr(eager_stage, "use_symmetric_gram", lambda normalized: False)
    monkeypatch.setattr(eager_stage, "use_front_products", lambda workspace, width: False)
    monkeypatch.setattr(eager_stage, "symmetric_gram", None)  # any use would fail
    monkeypatch.setattr(eager_stage, "previous_frame_similarities_of_front", None)
    test_segment_stage_equals_the_whole_video_stage(torch.float32, {})
    test_segment_stage_equals_the_whole_video_stage(torch.float32, {"adts_forbid_repick": True})


def test_the_exactness_check_leaves_the_default_generator_alone():
    cpu_products.smaller_products_exact.cache_clear()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    assert isinstance(cpu_products.smaller_products_exact(48, 24, torch.float32, 40, 1), bool)
    assert isinstance(cpu_products.smaller_products_exact(48, 24, torch.float32, None, 1), bool)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_stage_forms_the_smaller_products_where_this_machine_gives_the_same_entries(monkeypatch):
    # torch's products (the C kernel, where it runs, forms the gram itself: tests/test_cpu_kernel.py).
    monkeypatch.setattr(eager_stage, "native_gram", lambda normalized: None)
    calls = {"gram": 0, "front": 0}

    def counted(name, function):
        def wrapper(*args):
            calls[name] += 1
            return function(*args)
        return wrapper

    monkeypatch.setattr(eager_stage, "symmetric_gram", counted("gram", cpu_products.symmetric_gram))
    monkeypatch.setattr(eager_stage, "previous_frame_similarities_of_front",
                        counted("front", cpu_products.previous_frame_similarities_of_front))
    test_segment_stage_equals_the_whole_video_stage(torch.float32, {})
    threads = torch.get_num_threads()
    gram_exact = cpu_products.smaller_products_exact(36, 16, torch.float32, None, threads)
    assert (calls["gram"] > 0) == gram_exact
    _, num_selected, _ = fc.FlashVIDConfig(retention_ratio=0.25).budgets(36)
    front_exact = cpu_products.smaller_products_exact(36, 16, torch.float32, 36 - num_selected, threads)
    assert (calls["front"] > 0) == front_exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(3))
def test_the_walk_over_merged_tokens_gives_the_frame_by_frame_sums(dtype, seed):
    # Sole children, parents shared by several children and chains over several frames, in three segments.
    generator = torch.Generator().manual_seed(seed)
    lengths = [4, 1, 3]
    features = torch.randn(8, 20, 5, generator=generator).to(dtype)
    merged = torch.rand(8, 20, generator=generator) < 0.6
    merged[[0, 4, 5]] = False  # the segments' first frames have no parents
    parent = torch.randint(0, 20, (8, 20), generator=generator) // torch.randint(1, 4, (8, 20), generator=generator)
    index, increments = merging.walked_root_increments(features, merged, parent, lengths)
    values, _ = merging.stepwise_tree_sums(features, merged, parent, lengths)
    flat, expected = features.reshape(160, 5), values.reshape(160, 5)
    assert index.numel() == torch.unique(index).numel() > 0
    assert not bool(merged.flatten()[index].any())  # roots only
    assert torch.equal(flat[index] + increments, expected[index])
    has_children = torch.zeros(160, dtype=torch.bool)
    frame = torch.arange(8).unsqueeze(-1)
    has_children[((frame - 1) * 20 + parent)[merged]] = True
    assert sorted(index.tolist()) == torch.nonzero(has_children & ~merged.flatten()).flatten().tolist()


def test_take_rows_moves_the_same_bits():
    table = torch.randn(9, 4).to(torch.bfloat16)
    table[0, 0] = -0.0
    index = torch.tensor([3, 0, 3, 8])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(merging.take_rows(table.to(dtype), index).view(-1).view(torch.uint8),
                           table.to(dtype).index_select(0, index).view(-1).view(torch.uint8))


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_frame_products_are_the_batched_product(batch):
    left, right = _small_integer_frames(batch, 7, 40, seed=1), _small_integer_frames(batch, 40, 9, seed=2)
    assert torch.equal(cpu_products.frame_products(left, right), torch.bmm(left, right))
    assert torch.equal(cpu_products.frame_products(left.bfloat16(), right.bfloat16()), torch.bmm(left, right).bfloat16())


def test_smaller_products_only_where_every_row_starts_on_a_64_byte_boundary():
    assert cpu_products.rows_aligned(3584, torch.float32) and cpu_products.rows_aligned(896, torch.float32)
    assert not cpu_products.rows_aligned(20, torch.float32) and not cpu_products.rows_aligned(16, torch.bfloat16)
    unaligned = torch.randn(2, 40, 20)
    assert not cpu_products.use_symmetric_gram(unaligned) and not cpu_products.use_front_products(unaligned, 30)
