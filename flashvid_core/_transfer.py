"""Host-to-device transfer of small integer metadata without stalling the CPU.

`torch.tensor(list, device="cuda")` copies from pageable memory, which waits for the GPU to reach that point of
the stream: a hidden sync. Here all lists of one stage travel in ONE pinned, non-blocking copy.
"""

from __future__ import annotations

import torch
from torch import Tensor


def int_tensors(device: torch.device, *lists: list[int]) -> list[Tensor]:
    """One int64 tensor per list, on `device`, from a single (non-blocking on CUDA) transfer."""
    sizes = [len(values) for values in lists]
    flat = torch.tensor([value for values in lists for value in values], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    return list(torch.split(flat, sizes))
