"""Long videos as one latent: the overlapping windows every denoising step runs on, and their blending weights.

MultiDiffusion (https://arxiv.org/abs/2302.08113), FreeNoise (https://arxiv.org/abs/2310.15169): each step denoises
every window and averages their noise predictions with tent weights where they overlap.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def plan_windows(total: int, length: int, overlap: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the windows covering ``total`` frames with ``length``-frame windows.

    Consecutive windows share at least ``overlap`` frames (clamped to ``length - 1``); starts are spread
    evenly so the first window starts at 0 and the last ends at ``total``.
    """
    if total <= length:
        return [(0, total)]
    overlap = min(max(overlap, 0), length - 1)
    count = max(2, math.ceil((total - overlap) / (length - overlap)))
    starts = np.round(np.linspace(0, total - length, count)).astype(int)
    return [(int(s), int(s) + length) for s in starts]


def window_weights(length: int) -> torch.Tensor:
    """Tent weights ``min(p + 1, L - p)`` of a window's frames: overlaps fade linearly from one window to the next."""
    p = torch.arange(length)
    return torch.minimum(p + 1, length - p).float()
