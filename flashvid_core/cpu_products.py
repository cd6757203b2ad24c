"""Smaller matrix products for the CPU stage, with the official products' numbers.

The selection's similarities U @ U^T are symmetric: the lower block triangle is computed and mirrored (3/4 of the
work). TSTM's consecutive-frame similarities are masked to -1 wherever either token is selected: each frame's
unselected tokens are moved to the front of the (disposable) unit-norm workspace, only those rows are multiplied,
and the products are put back in token order with -1 elsewhere.

Both forms read entries of smaller products as entries of the official (whole) ones, which holds where the BLAS
forms every entry from its two rows alone, in a fixed order, whatever the shapes around it. MKL does so on the
project host when every row starts on a 64-byte boundary (D a multiple of 16 in float32; the 7B models' 3584 and
the small ones' 896 are), and not always otherwise. So they are used only for such rows, and
`smaller_products_exact` checks each shape once on this machine's BLAS, bit for bit; elsewhere the stage forms the
whole products.

Where the accel layer's C kernel gives the entries of the reference's own products on this machine
(`native_products`; checked per shape), it forms these products, about twice as fast as MKL on the project host
(the selection's similarities as their lower triangle, mirrored: `native_gram`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .backend import current_backend, fast_path

# Below this many tokens per frame the whole products are cheap: no blocking.
MIN_BLOCKED_TOKENS = 32


def native_products(left: Tensor, right_rows: Tensor, official_shapes: Sequence[tuple[int, int, int]],
                    lower: bool = False) -> Tensor | None:
    """left (B, M, K) @ right_rows (B, N, K)^T from the accel layer's CPU kernel, or None where it does not run
    (not float32 on the CPU, turned off in the Backend, or not giving this machine's entries of the reference's
    own products at every (M, N, K) in official_shapes). lower: only the entries on and below the diagonal are
    meaningful (see mirrored_lower)."""
    if left.dtype != torch.float32 or left.device.type != "cpu" or not current_backend().native_cpu_products:
        return None
    kernel = fast_path("cpu_run_products")
    return kernel(left, right_rows, official_shapes, lower) if kernel is not None else None


def mirrored_lower(products: Tensor) -> Tensor:
    """(B, N, N) with meaningful entries on and below the diagonal -> the symmetric matrices they define."""
    num_tokens = products.shape[-1]
    upper = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=products.device).triu_(1)
    return torch.where(upper, products.transpose(1, 2), products)


def native_gram(normalized: Tensor) -> Tensor | None:
    """normalized @ normalized^T per frame from the CPU kernel, its lower triangle formed and mirrored: (B, N, D)
    -> (B, N, N), the entries of the reference's whole product; None where the kernel does not run."""
    _, num_tokens, dim = normalized.shape
    lower = native_products(normalized, normalized, [(num_tokens, num_tokens, dim)], lower=True)
    return mirrored_lower(lower) if lower is not None else None


def frame_products(left: Tensor, right: Tensor, official_shapes: Sequence[tuple[int, int, int]] = ()) -> Tensor:
    """torch.bmm(left, right): (B, M, K) @ (B, K, N) -> (B, M, N). official_shapes: the (M, N, K) shapes of the
    reference's own products whose entries these are; given, the accel layer's CPU kernel forms them where it
    gives those products' entries (native_products). On the CPU in float32 an odd batch of three or more is split
    into an even batch and one single product: MKL shares a batch's matrices between the threads, and with two
    threads the odd one out ran alone (up to 30% slower per matrix); each entry is the same."""
    if official_shapes:
        native = native_products(left, right.transpose(1, 2), official_shapes)
        if native is not None:
            return native
    batch = left.shape[0]
    if left.is_cuda or left.dtype != torch.float32 or batch < 3 or batch % 2 == 0:
        return torch.bmm(left, right)
    products = left.new_empty((batch, left.shape[1], right.shape[2]))
    torch.bmm(left[:-1], right[:-1], out=products[:-1])
    torch.mm(left[-1], right[-1], out=products[-1])
    return products


def symmetric_gram(normalized: Tensor) -> Tensor:
    """normalized @ normalized^T per frame from two row blocks: (B, N, D) -> (B, N, N), the entries of the whole
    product. The upper right block is the mirror of the lower left one."""
    batch, num_tokens, _ = normalized.shape
    half = num_tokens // 2
    gram = normalized.new_empty((batch, num_tokens, num_tokens))
    gram[:, :half, :half] = frame_products(normalized[:, :half], normalized[:, :half].transpose(1, 2))
    gram[:, half:] = frame_products(normalized[:, half:], normalized.transpose(1, 2))
    gram[:, :half, half:] = gram[:, half:, :half].transpose(1, 2)
    return gram


def front_width(selected: Tensor) -> int:
    """selected (L, N) bool -> the rows that hold every frame's unselected tokens: N minus the fewest selected."""
    return selected.shape[-1] - int(selected.sum(dim=-1).min())


def unselected_first(workspace: Tensor, selected: Tensor, width: int) -> Tensor:
    """Move each frame's unselected tokens into the first `width` rows of the workspace (see front_width), in place.

    workspace (L, N, D) the frames' unit-norm features (overwritten: only its first rows stay meaningful);
    selected (L, N) bool. Unselected tokens beyond the front take the rows of selected ones inside it. Returns
    row (L, N) int64, where each token now lives: a row >= width for a selected token whose row was taken (no
    product is formed there).
    """
    num_frames, num_tokens, dim = workspace.shape
    position = torch.arange(num_tokens, device=workspace.device).expand(num_frames, -1)
    outside = ~selected & (position >= width)  # unselected tokens to move in
    inside = selected & (position < width)  # rows they may take
    moves = outside.sum(dim=-1, keepdim=True)
    taken = inside & (torch.cumsum(inside.to(torch.int32), dim=-1) <= moves)  # the first `moves` of each frame
    frame_offset = torch.arange(num_frames, device=workspace.device).unsqueeze(-1) * num_tokens
    source = (position + frame_offset)[outside]  # both in frame order, then token order: pairs line up
    target = (position + frame_offset)[taken]
    flat = workspace.view(num_frames * num_tokens, dim)
    flat.index_copy_(0, target, flat.index_select(0, source))
    row = position.clone().view(-1)
    row[source] = target % num_tokens
    row[target] = source % num_tokens
    return row.view(num_frames, num_tokens)


def previous_frame_similarities_of_front(workspace: Tensor, width: int, row: Tensor) -> Tensor:
    """TSTM's consecutive-frame similarities (L - 1, N, N) in token order from a workspace arranged by
    `unselected_first`: [t - 1, n, m] compares token n of frame t with token m of frame t - 1; the entries of
    tokens outside the front are -1 (selected tokens: the official mask gives them -1 anyway)."""
    num_tokens, dim = workspace.shape[1:]
    front = frame_products(workspace[1:, :width], workspace[:-1, :width].transpose(1, 2),
                           [(num_tokens, num_tokens, dim)])
    padded = torch.nn.functional.pad(front, (0, num_tokens - width, 0, num_tokens - width), value=-1.0)
    rows = padded.gather(1, row[1:].unsqueeze(-1).expand(-1, -1, num_tokens))
    return rows.gather(2, row[:-1].unsqueeze(1).expand(-1, num_tokens, -1))


@functools.lru_cache(maxsize=256)
def smaller_products_exact(num_tokens: int, dim: int, dtype: torch.dtype, width: int | None, threads: int) -> bool:
    """Whether this machine's CPU products give the official entries in the smaller forms above: symmetric_gram
    (width None) or the front products of `width` rows, for frames of num_tokens x dim in dtype, with `threads`
    torch threads. Checked bit for bit on seeded random unit-norm frames (its own generator: the default one,
    which the DPC tie-breaker draws from, is not touched)."""
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(4, num_tokens, dim, generator=generator)
    frames = (frames / frames.norm(p=2, dim=-1, keepdim=True)).to(dtype)
    if width is None:  # three frames: an odd batch, as frame_products splits it
        return torch.equal(symmetric_gram(frames[:3]), torch.bmm(frames[:3], frames[:3].transpose(1, 2)))
    whole = torch.bmm(frames[1:], frames[:-1].transpose(1, 2))[:, :width, :width]
    return torch.equal(frame_products(frames[1:, :width], frames[:-1, :width].transpose(1, 2)), whole)


def rows_aligned(dim: int, dtype: torch.dtype) -> bool:
    """Whether every row of a (.., D) tensor in dtype starts on a 64-byte boundary (given an aligned start, as
    torch allocates): then no block starts where the whole product's rows do not, and the check below sees the
    alignments of every call (MKL's last bits can depend on where an operand starts)."""
    return dim * torch.empty(0, dtype=dtype).element_size() % 64 == 0


def use_symmetric_gram(normalized: Tensor) -> bool:
    """Whether the selection's similarities of these (L, N, D) CPU features may use symmetric_gram."""
    _, num_tokens, dim = normalized.shape
    return num_tokens >= MIN_BLOCKED_TOKENS and rows_aligned(dim, normalized.dtype) and smaller_products_exact(
        num_tokens, dim, normalized.dtype, None, torch.get_num_threads()
    )


def use_front_products(workspace: Tensor, width: int) -> bool:
    """Whether TSTM's products of these (L, N, D) CPU features may be formed on the front `width` rows: float32
    only (the bfloat16/float16 products take contiguous operands, and copying the fronts costs more than the
    rows saved)."""
    _, num_tokens, dim = workspace.shape
    if workspace.dtype != torch.float32:
        return False
    return (num_tokens >= MIN_BLOCKED_TOKENS and width < num_tokens and rows_aligned(dim, workspace.dtype)
            and smaller_products_exact(num_tokens, dim, workspace.dtype, width, torch.get_num_threads()))
