"""FlashVID's vision-side token compression and inner-LLM selection, in pure PyTorch.

Public API: FlashVIDConfig, Compression, compress, llm_keep_positions (plus the stages as pure functions), and
Backend / use_backend (which fast paths may run). Defaults reproduce the official implementation exactly; variants
that change outputs are opt-in config fields. The reference stages import nothing from `accel`, the fast paths
beside them; importing the package installs those (see backend.py).
"""

from . import accel  # noqa: F401  (fills the fast-path slots)
from .backend import Backend, current_backend, use_backend
from .clustering import dpc_knn, dpc_knn_ragged, draw_density_noise
from .config import TOKEN_SELECTION_METHODS, FlashVIDConfig
from .llm_pruning import last_query_attention_from_probabilities, llm_keep_positions
from .merging import spatiotemporal_merge, temporal_parents, tree_roots
from .pipeline import Compression, compress, validate_inputs
from .segmentation import segment_lengths, transition_similarities, video_segment_lengths
from .selection import (
    calibrated_distances,
    cosine_distances,
    event_relevance,
    max_min_diversity,
    select_tokens,
)

__all__ = [
    "TOKEN_SELECTION_METHODS",
    "Backend",
    "Compression",
    "FlashVIDConfig",
    "calibrated_distances",
    "compress",
    "cosine_distances",
    "current_backend",
    "dpc_knn",
    "dpc_knn_ragged",
    "draw_density_noise",
    "event_relevance",
    "last_query_attention_from_probabilities",
    "llm_keep_positions",
    "max_min_diversity",
    "segment_lengths",
    "select_tokens",
    "spatiotemporal_merge",
    "temporal_parents",
    "transition_similarities",
    "tree_roots",
    "use_backend",
    "validate_inputs",
    "video_segment_lengths",
]
