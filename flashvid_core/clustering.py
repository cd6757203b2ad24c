"""DPC-kNN (density peak clustering with k nearest neighbours), used to merge each frame's contextual tokens.

`dpc_knn` is the single-call form (one cluster count for the whole batch, as in the official code);
`dpc_knn_ragged` clusters many frames at once, each with its own point count, cluster count and k, padded.
Distances use torch.cdist, which computes directly for <= 25 points and through a matrix product above that;
`dpc_knn_ragged` keeps that choice per frame (the caller groups frames by size) because exact density ties for
k <= 2 depend on the self-distance being exactly 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._transfer import int_tensors
from .backend import fast_path
from .cpu_products import frame_products

# A uniform random tie-breaker of this size is added to the densities, as in the official code.
DENSITY_NOISE_SCALE = 1e-6
# torch.cdist switches to the matrix-product formula above this many points.
CDIST_DIRECT_MAX_POINTS = 25


def draw_density_noise(num_points: list[int], device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """The tie-breaker draws of successive DPC calls, concatenated: (sum(num_points),) float32 in [0, 1).

    The official code draws torch.rand_like(density) with density (1, n) once per call. On the CPU the stream is
    serial, so one draw of the total equals the concatenated per-call draws; on other devices (Philox offsets
    advance per launch) each call is drawn separately to consume the generator exactly as the reference does.
    """
    total = sum(num_points)
    if total == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    if device.type == "cpu":
        return torch.rand(total, dtype=torch.float32, device=device, generator=generator)
    # On CUDA the accel layer draws every call's values in one kernel (same values, same generator state).
    fused = fast_path("uniform_draws")
    drawn = fused(num_points, device, generator) if fused is not None else None  # None: nothing drawn
    if drawn is not None:
        return drawn
    draws = [torch.rand(1, n, dtype=torch.float32, device=device, generator=generator) for n in num_points]
    return torch.cat(draws, dim=1).flatten()


def self_cdist(points: Tensor, point_counts: list[int] | None = None) -> Tensor:
    """torch.cdist(x, x) for x = points.float(), bit for bit, with less memory traffic.

    points: (B, n, D) any float dtype. point_counts: each frame's own point count (<= n, the rest padding), if
    the frames are padded: the reference multiplies the unpadded frames, and the CPU kernel forms these products
    only where it gives the entries of those (see cpu_products.frame_products). Above 25 points torch.cdist
    computes [-2x, |x|^2, 1] @ [x, 1, |x|^2]^T, clamped at 0, square-rooted. Here the float32 copy of the points is written straight into the right-hand
    operand, -2x straight into the left one, and the squared norms are computed once for both sides. Returns
    (B, n, n) float32.
    """
    if points.shape[-2] <= CDIST_DIRECT_MAX_POINTS:
        points = points.float()
        return torch.cdist(points, points)
    batch, num_points, dim = points.shape
    right = torch.empty(batch, num_points, dim + 2, dtype=torch.float32, device=points.device)
    x = right[..., :dim]
    x.copy_(points)
    left = torch.empty_like(right)
    # The squares go to the left operand's slots first (no temporary): row sums over the strided view are the sums
    # torch.cdist forms over its contiguous x.pow(2) (tested bit for bit).
    squares = torch.mul(x, x, out=left[..., :dim])
    norm = squares.sum(-1)
    torch.mul(x, -2, out=left[..., :dim])
    left[..., dim] = norm
    left[..., dim + 1] = 1.0
    right[..., dim] = 1.0
    right[..., dim + 1] = norm
    official_shapes = [(count, count, dim + 2) for count in sorted(set(point_counts or [num_points]))]
    return frame_products(left, right.mT, official_shapes).clamp_min_(0).sqrt_()


@torch.no_grad()
def dpc_knn(
    features: Tensor,
    num_clusters: int,
    k: int = 7,
    valid_token_mask: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Cluster each batch row's points with DPC-kNN (the official single-call form).

    features: (B, n, D). valid_token_mask: (B, n) bool, invalid points are nobody's neighbour and have density 0
    (they are still assigned to a centre). noise: (B, n) uniform draws for the density tie-breaker (default: one
    torch.rand of shape (B, n) from `generator` or the device's default generator).
    Returns cluster_indices (B, n) int64 in [0, num_clusters) and cluster_center_indices (B, num_clusters) int64
    in descending score order.
    """
    batch, num_points, dim = features.shape
    if not 1 <= num_clusters <= num_points:
        raise ValueError(f"num_clusters={num_clusters} is out of range: allowed 1..{num_points} (points)")
    if not 1 <= k <= num_points:
        raise ValueError(f"k={k} is out of range: allowed 1..{num_points} (points)")
    points = features.float()
    dists = torch.cdist(points, points) / math.sqrt(dim)
    if valid_token_mask is not None:
        invalid = ~valid_token_mask.bool()
        dists = dists.masked_fill(invalid.unsqueeze(1).expand(-1, num_points, -1), dists.max() + 1)
    nearest = torch.topk(dists, k=k, dim=-1, largest=False).values
    density = torch.mean(-(nearest**2), dim=-1).exp()
    if noise is None:
        noise = torch.rand(density.shape, dtype=density.dtype, device=density.device, generator=generator)
    density = density + noise.reshape(density.shape).to(density) * DENSITY_NOISE_SCALE
    if valid_token_mask is not None:
        density = density.masked_fill(invalid, 0.0)
    delta = _distance_to_denser(dists, density, dists.reshape(batch, -1).amax(dim=-1))
    centres = torch.topk(delta * density, k=num_clusters, dim=-1).indices
    return _assign(dists, centres, num_clusters), centres


def _distance_to_denser(dists: Tensor, density: Tensor, max_dist: Tensor) -> Tensor:
    """For each point the distance to its nearest denser point; the densest gets max_dist.

    dists (B, n, n), density (B, n), max_dist (B,). Returns (B, n).
    """
    denser = density.unsqueeze(1) > density.unsqueeze(2)  # [b, i, j]: j is denser than i
    return torch.where(denser, dists, max_dist.view(-1, 1, 1)).amin(dim=-1)


def _assign(dists: Tensor, centres: Tensor, num_clusters: int | Tensor) -> Tensor:
    """Nearest-centre assignment, each centre forced into its own cluster.

    dists (B, n, n); centres (B, K). num_clusters: int, or (B,) tensor when rows use fewer than K (columns beyond
    a row's count are ignored). Returns (B, n) int64.
    """
    batch, num_points, _ = dists.shape
    width = centres.shape[1]
    to_centres = torch.gather(dists, 2, centres.unsqueeze(1).expand(-1, num_points, -1))  # (B, n, K)
    slot = torch.arange(width, device=dists.device).expand(batch, -1)
    if isinstance(num_clusters, Tensor):
        used = slot < num_clusters.unsqueeze(-1)
        to_centres = to_centres.masked_fill(~used.unsqueeze(1), float("inf"))
    assignment = to_centres.argmin(dim=-1)
    if not isinstance(num_clusters, Tensor):
        return assignment.scatter(1, centres, slot)
    # Only the real centres are forced. Unused slots may repeat a real centre's index (exact-tie rows leave them
    # 0), so a plain scatter could overwrite that centre's slot: the max over -1 and its one real slot cannot.
    forced = torch.full_like(assignment, -1).scatter_reduce(1, centres, torch.where(used, slot, -1), "amax")
    return torch.where(forced >= 0, forced, assignment)


@torch.no_grad()
def dpc_knn_ragged(
    points: Tensor,
    num_points: Tensor,
    num_clusters: Tensor,
    num_neighbours: Tensor,
    noise: Tensor,
    point_counts: list[int],
    cluster_counts: list[int],
    neighbour_counts: list[int],
    exact_ties: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """DPC-kNN on C padded frames at once, each with its own sizes; same result per frame as `dpc_knn`.

    points: (C, n, D) any float dtype (distances in float32), row c valid in [0, num_points[c]); num_points,
    num_clusters, num_neighbours (k): (C,) int64; noise: (C, n) uniform draws (padding ignored); point_counts, cluster_counts, neighbour_counts:
    the same three as host-side lists (the host knows them; no device sync). exact_ties: see _top_scores.
    All frames of one call should be on the same side of the 25-point cdist switch (the caller groups them).
    Returns cluster_indices (C, n) (padding: arbitrary) and centres (C, max K) in descending score order
    (slots >= num_clusters[c]: arbitrary).
    """
    batch, width, dim = points.shape
    slots = torch.arange(width, device=points.device)
    valid = slots.unsqueeze(0) < num_points.unsqueeze(1)  # (C, n)
    dists = self_cdist(points, point_counts) / math.sqrt(dim)
    neighbour_dists = dists.masked_fill(~valid.unsqueeze(1), float("inf"))
    nearest = torch.topk(neighbour_dists, k=max(neighbour_counts), dim=-1, largest=False).values  # (C, n, k_max)
    # torch.mean over exactly k columns, one k at a time (at most 7 values), so each frame's density is computed
    # as the single-call form computes it: exact density ties (k <= 2) must stay exact ties.
    density = torch.zeros(batch, width, dtype=torch.float32, device=points.device)
    for k in sorted(set(neighbour_counts)):
        density_k = torch.mean(-(nearest[:, :, :k].contiguous() ** 2), dim=-1).exp()
        density = torch.where((num_neighbours == k).unsqueeze(1), density_k, density)
    density = density + noise * DENSITY_NOISE_SCALE
    density = density.masked_fill(~valid, float("-inf"))
    pair_valid = valid.unsqueeze(1) & valid.unsqueeze(2)
    max_dist = dists.masked_fill(~pair_valid, float("-inf")).reshape(batch, -1).amax(dim=-1)
    delta = _distance_to_denser(dists, density, max_dist)
    score = (delta * density).masked_fill(~valid, float("-inf"))
    centres = _top_scores(score, point_counts, cluster_counts, exact_ties)
    return _assign(dists, centres, num_clusters), centres


def _top_scores(score: Tensor, point_counts: list[int], cluster_counts: list[int], exact_ties: bool | None) -> Tensor:
    """Centres = the top-K scores of each row, in descending order. score: (C, n). Returns (C, max K).

    Scores tie exactly when densities do (k <= 2, or duplicate tokens), and torch.topk's order among ties
    depends on the row's length and on k. The rows that need it are ranked one by one with exactly the
    reference's call (an unpadded (1, n) row, its own K): every row on the CPU (exact_ties None or True), only
    the K <= 2 rows elsewhere (where per-row launches cost more; exact_ties True forces all rows).
    """
    batch = score.shape[0]
    max_clusters = max(cluster_counts)
    if exact_ties is None:
        exact_ties = score.device.type == "cpu"
    exact_rows = [c for c in range(batch) if exact_ties or cluster_counts[c] <= 2]
    exact_set = set(exact_rows)
    batched_rows = [c for c in range(batch) if c not in exact_set]
    if not exact_rows:
        return torch.topk(score, k=max_clusters, dim=-1).indices
    centres = torch.zeros(batch, max_clusters, dtype=torch.long, device=score.device)
    if batched_rows:
        (rows,) = int_tensors(score.device, batched_rows)
        width = max(cluster_counts[c] for c in batched_rows)
        centres[rows, :width] = torch.topk(score[rows], k=width, dim=-1).indices
    for c in exact_rows:
        count = cluster_counts[c]
        centres[c, :count] = torch.topk(score[c : c + 1, : point_counts[c]], k=count, dim=-1).indices[0]
    return centres
