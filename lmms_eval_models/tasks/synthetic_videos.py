"""Small deterministic synthetic videos for the smoke tasks, written on first use into a cache folder.

Each video is a few scenes of drifting colour gradients with a moving square, so consecutive frames are similar
within a scene and different across scenes (what FlashVID's segmentation and temporal merging react to). The
frames depend only on the video's name; the file is encoded with PyAV (an lmms-eval dependency) as MPEG-4 in an
.mp4 container, which decord, PyAV and qwen-vl-utils all read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

FRAME_SIZE = 64
NUM_FRAMES = 16
FPS = 8
NUM_SCENES = 2


def video_cache_dir() -> Path:
    """$FLASHVID_CACHE/videos/smoke (default ~/.cache/flashvid-suite/videos/smoke)."""
    root = Path(os.environ.get("FLASHVID_CACHE") or Path.home() / ".cache" / "flashvid-suite")
    return root / "videos" / "smoke"


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def synthetic_frames(name: str, num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 frames determined by `name`."""
    rng = np.random.default_rng(_seed(name))
    scene_of_frame = np.arange(num_frames) * NUM_SCENES // num_frames
    base_colours = rng.integers(0, 256, size=(NUM_SCENES, 3))
    square_colours = rng.integers(0, 256, size=(NUM_SCENES, 3))
    ramp = np.linspace(0.0, 1.0, size)
    gradient = (ramp[None, :, None] + ramp[:, None, None]) / 2  # (size, size, 1)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    square = size // 4
    for index, scene in enumerate(scene_of_frame):  # a handful of frames: a loop is clearest here
        drift = index / max(num_frames - 1, 1)
        frame = base_colours[scene] * (0.5 + 0.5 * gradient) + 40 * drift
        corner = int((size - square) * drift)
        frame[corner : corner + square, corner : corner + square] = square_colours[scene]
        frames[index] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def write_video(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """Encode `frames` to `path` atomically (temp file, then rename), so concurrent readers never see half a file."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".mp4", prefix=f".{path.stem}-", dir=path.parent)
    os.close(handle)
    try:
        with av.open(temporary, mode="w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"qscale": "2"}  # near-lossless, still a few KB at 64×64
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def ensure_video(relative_path: str, cache_dir: Path | None = None, num_frames: int = NUM_FRAMES,
                 size: int = FRAME_SIZE, fps: int = FPS) -> str:
    """The path of the synthetic video `relative_path` under the cache, written first if missing (`num_frames`
    frames of size x size at `fps`; a path names one video: give each shape its own paths)."""
    path = (cache_dir or video_cache_dir()) / relative_path
    if not path.is_file():
        write_video(path, synthetic_frames(relative_path, num_frames, size), fps)
    return str(path)
