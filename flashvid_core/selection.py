"""Per-frame token selection: attention (ATS), diversity (DTS) and the calibrated variants (ADTS).

All functions run on a batch of frames at once; the greedy Max-Min selection keeps a running minimum, so each
step costs O(N) per frame instead of re-reducing over all picked rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._transfer import int_tensors
from .backend import fast_path
from .config import TOKEN_SELECTION_METHODS

# The official code scales the attention statistic by 1e6 "to avoid numerical issues"; it changes the products.
ATTENTION_SCALE = 1e6


def cosine_distances(features: Tensor, normalized: Tensor | None = None, similarities: Tensor | None = None
                     ) -> Tensor:
    """1 - cosine similarity between the tokens of each frame, in float32.

    features: (B, N, D) any float dtype. normalized: optional float32 features / their L2 norm, if the caller
    already has it (the same value this function would compute). similarities: optional (B, N, N) the product
    normalized @ normalized^T, if the caller already has it. Returns (B, N, N) float32.
    """
    if similarities is not None:
        return 1.0 - similarities
    if normalized is None:
        features = features.float()
        normalized = features / features.norm(p=2, dim=-1, keepdim=True)
    return 1.0 - torch.bmm(normalized, normalized.transpose(-1, -2))


def event_relevance(features: Tensor, segment_lengths: Tensor | list[int] | None = None) -> Tensor:
    """E[b, j] = mean over the frames c of b's segment of dot(X[b, j], mean_n X[c, n]), in float32.

    features: (B, N, D); segment_lengths: (S,) summing to B, or None for one segment of all B frames.
    Returns (B, N). On the CPU as the official code forms it, segment by segment (`segment_relevance`: the same
    numbers, bit for bit). On CUDA as the dot product with the segment's mean frame descriptor, one fixed-shape
    product for all frames (the CUDA stage's form; equal within float rounding, at 1/L of the cost).
    """
    features = features.float()
    num_frames = features.shape[0]
    host_lengths = [num_frames] if segment_lengths is None else [
        int(v) for v in (segment_lengths.tolist() if isinstance(segment_lengths, Tensor) else segment_lengths)
    ]
    if not features.is_cuda:
        return torch.cat([segment_relevance(segment, segment.mean(dim=1)) for segment in features.split(host_lengths)])
    frame_means = features.mean(dim=1)  # (B, D)
    if segment_lengths is None:
        return relevance_to(features, frame_means.mean(dim=0, keepdim=True).expand(num_frames, -1))
    ids = [segment for segment, length in enumerate(host_lengths) for _ in range(length)]
    (segment_ids,) = int_tensors(features.device, ids)
    return relevance_to(features, _segment_means_by_frame(frame_means, segment_ids))


def segment_relevance(features: Tensor, frame_means: Tensor) -> Tensor:
    """Event relevance within one segment, as the official code forms it: features (L, N, D) float32, frame_means
    (L, D) float32 their frames' mean tokens -> (L, N), the (L * N, D) @ (D, L) products averaged over the L
    frames."""
    return torch.einsum("bnd,cd->bcn", features, frame_means).mean(dim=1)


def relevance_to(features: Tensor, descriptors: Tensor) -> Tensor:
    """Each token's dot product with its frame's descriptor: features (B, N, D) float32, descriptors (B, D) ->
    (B, N) float32."""
    return torch.bmm(features, descriptors.unsqueeze(-1)).squeeze(-1)


def event_relevance_from_ids(features: Tensor, segment_ids: Tensor) -> Tensor:
    """`event_relevance` with the frames' segments given as a device tensor: features (B, N, D), segment_ids
    (B,) int64 -> (B, N) float32, with fixed shapes and no host data (what a CUDA graph can capture). On CUDA it
    equals event_relevance; on the CPU it agrees within float32 rounding (a matrix product instead of index_add_)."""
    features = features.float()
    return relevance_to(features, _segment_means_by_frame(features.mean(dim=1), segment_ids))


def _segment_means_by_frame(frame_means: Tensor, segment_ids: Tensor) -> Tensor:
    # Each frame's segment sum as a row of a same-segment (B, B) one-hot product: a fixed summation order (CUDA's
    # index_add_ is atomic, and its order could flip near-tie picks between runs) and fixed shapes.
    same_segment = (segment_ids.unsqueeze(1) == segment_ids.unsqueeze(0)).to(torch.float32)
    return (same_segment @ frame_means) / same_segment.sum(dim=-1, keepdim=True)


def calibrated_distances(
    features: Tensor,
    attention: Tensor | None,
    method: str,
    segment_lengths: Tensor | list[int] | None = None,
    normalized: Tensor | None = None,
    segment_ids: Tensor | None = None,
    *,
    relevance: Tensor | None = None,  # keyword only: the event relevance, if the caller has it
    similarities: Tensor | None = None,  # keyword only: the cosine similarities, if the caller has them
) -> Tensor:
    """The distance matrix that the greedy selection maximises the minimum of, in float32.

    features: (B, N, D); attention: (B, N) (unused by div). Returns (B, N, N) where column j is scaled:
    div: 1 - cos; attn_div: (1 - cos) * (A[j] * 1e6); attn_div_v2: ((1 - cos) * (A[j] * 1e6)) * E[j];
    div_er: (1 - cos) * E[j] (the paper's "w/ E.R." ablation). segment_ids: (B,) device tensor used for event
    relevance instead of segment_lengths (see event_relevance_from_ids). relevance: (B, N) the event relevance
    E if the caller already has it (then neither segment_lengths nor segment_ids is read). similarities: (B, N, N)
    float32 the unit-norm features' products, if the caller already has them (see cosine_distances).
    """
    features = features.float()  # once: both terms below work in float32
    distances = cosine_distances(features, normalized, similarities)
    if method in ("attn_div", "attn_div_v2"):
        if attention is None:
            raise ValueError(f"token_selection_method={method!r} needs the attention statistic")
        distances = distances * (attention.float() * ATTENTION_SCALE).unsqueeze(1)
    if method in ("attn_div_v2", "div_er"):
        if relevance is None:
            relevance = (event_relevance_from_ids(features, segment_ids) if segment_ids is not None
                         else event_relevance(features, segment_lengths))
        distances = distances * relevance.unsqueeze(1)
    return distances


def max_min_diversity(
    distances: Tensor, num_tokens: int, forbid_repick: bool = True, picked_value: float = -1.0
) -> Tensor:
    """Greedy Max-Min diversity selection on each frame's distance matrix.

    distances: (B, N, N), entry [i, j] is the distance from i to candidate j. Returns (B, num_tokens) int64 in
    pick order. First pick: the column whose second-smallest entry is largest (the smallest is normally the
    token itself). Then: the column with the largest minimum distance to the picked rows. Ties go to the lowest
    index. forbid_repick=False reproduces the official attn_div_v2, which can pick a token twice.
    picked_value: the score given to picked columns (the official -1.0 only forbids re-picks while the distances
    stay above -1; -inf always does).
    On CUDA the accel layer provides the loop as one Triton kernel, or else as a CUDA graph replay of this loop
    (fast path "greedy_max_min": the same comparisons and tie rule).
    """
    batch, num_candidates, _ = distances.shape
    if num_tokens <= 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=distances.device)
    if num_candidates == 1:
        # The official code needs two rows for its first pick; with one token the only choice is that token.
        return torch.zeros(batch, num_tokens, dtype=torch.long, device=distances.device)
    accelerated = fast_path("greedy_max_min") if distances.is_cuda else None
    picks = accelerated(distances, num_tokens, forbid_repick, picked_value) if accelerated else None
    return picks if picks is not None else greedy_loop(distances, num_tokens, forbid_repick, picked_value)


def second_smallest_per_column(distances: Tensor) -> Tensor:
    """(B, N, N) -> (B, N): the second-smallest entry of each column, the value topk(k=2, dim=1, largest=False)
    gives (a repeated minimum counts twice), by two min-reductions instead of a strided topk."""
    smallest_row = distances.argmin(dim=1, keepdim=True)  # (B, 1, N)
    without_smallest = distances.scatter(1, smallest_row, float("inf"))
    return without_smallest.amin(dim=1)


def greedy_loop(distances: Tensor, num_tokens: int, forbid_repick: bool, picked_value: float) -> Tensor:
    """The greedy loop with a running minimum: O(N) per frame and step. distances (B, N, N) -> (B, K)."""
    batch, num_candidates, _ = distances.shape
    pick = second_smallest_per_column(distances).argmax(dim=-1, keepdim=True)  # (B, 1)
    picks = [pick]
    # Row `pick` of each frame: gather along dim 1 with an expanded (view-only) index.
    running_min = torch.gather(distances, 1, pick.unsqueeze(-1).expand(-1, 1, num_candidates)).squeeze(1)
    if forbid_repick:
        # The official code sets picked columns to -1 before the argmax; a separate mask keeps the running
        # minimum exact whatever the sign of the distances.
        picked = torch.zeros(batch, num_candidates, dtype=torch.bool, device=distances.device)
        picked.scatter_(1, pick, True)
    for step in range(1, num_tokens):
        scores = running_min.masked_fill(picked, picked_value) if forbid_repick else running_min
        pick = scores.argmax(dim=-1, keepdim=True)
        picks.append(pick)
        if step + 1 < num_tokens:
            row = torch.gather(distances, 1, pick.unsqueeze(-1).expand(-1, 1, num_candidates)).squeeze(1)
            torch.minimum(running_min, row, out=running_min)
            if forbid_repick:
                picked.scatter_(1, pick, True)
    return torch.cat(picks, dim=1)


def select_tokens(
    features: Tensor,
    attention: Tensor | None,
    num_tokens: int,
    method: str,
    segment_lengths: Tensor | list[int] | None = None,
    forbid_repick: bool | None = None,
    normalized: Tensor | None = None,
    segment_ids: Tensor | None = None,
) -> Tensor:
    """Per-frame token selection. Returns keep indices (B, num_tokens) int64, ascending within each frame.

    features: (B, N, D); attention: (B, N) (ignored by div and div_er); segment_lengths: the frames' segments,
    used by attn_div_v2 and div_er for event relevance (None: all B frames form one segment).
    forbid_repick: None = the official behaviour of each method (only attn_div_v2 may pick a token twice).
    normalized: optional precomputed float32 unit-norm features (see cosine_distances). segment_ids: optional
    (B,) device tensor of the frames' segments, used instead of segment_lengths (no host data).
    """
    if method not in TOKEN_SELECTION_METHODS:
        raise ValueError(f"token_selection_method={method!r} is invalid: allowed {', '.join(TOKEN_SELECTION_METHODS)}")
    batch, num_candidates, _ = features.shape
    if num_tokens < 0 or num_tokens > num_candidates:
        raise ValueError(f"num_tokens={num_tokens} is out of range: allowed 0..{num_candidates} (tokens per frame)")
    if num_tokens == 0 or batch == 0:
        return torch.zeros(batch, num_tokens, dtype=torch.long, device=features.device)
    if method == "attn":
        if attention is None:
            raise ValueError("token_selection_method='attn' needs the attention statistic")
        return torch.topk(attention, k=num_tokens, dim=-1).indices.sort(dim=-1).values
    distances = calibrated_distances(features, attention, method, segment_lengths, normalized, segment_ids)
    return diversity_picks(distances, num_tokens, method, forbid_repick)


def diversity_picks(distances: Tensor, num_tokens: int, method: str, forbid_repick: bool | None = None) -> Tensor:
    """A diversity method's greedy Max-Min picks on its calibrated distances (B, N, N): (B, num_tokens) int64,
    ascending within each frame. forbid_repick: None = the method's official behaviour (see select_tokens)."""
    if forbid_repick is None:
        forbid_repick = method != "attn_div_v2"
    # div_er is not in the official code: its distances can be far below -1 (negative event relevance), so picked
    # columns get -inf there; the official methods keep their -1.
    picked_value = float("-inf") if method == "div_er" or (forbid_repick and method == "attn_div_v2") else -1.0
    return max_min_diversity(distances, num_tokens, forbid_repick, picked_value).sort(dim=-1).values


def gather_tokens(features: Tensor, indices: Tensor) -> Tensor:
    """features (B, N, D), indices (B, K) -> (B, K, D), the original values (input dtype)."""
    return torch.gather(features, 1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
