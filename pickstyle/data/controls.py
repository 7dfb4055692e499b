"""Structure controls: what Wan-VACE's own pretraining puts in the VACE context instead of RGB video.

Real Wan-VACE learns from many controls (depth, pose, grey, scribble, flow, layout) with free text, so its main
blocks render *appearance from text* given a structure hint. The content leak PickStyle fixes comes from RGB
context: with an RGB source in the context, a style prompt mostly returns the source. The tiny backbone is
pretrained the same way, on the controls below (pure per-frame functions of a uint8 RGB clip, sizes relative to
the frame so they look alike at any resolution), and never on RGB context with a style prompt.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np


def grey(frame: np.ndarray) -> np.ndarray:
    """Luminance as three equal channels (Wan-VACE's "gray" control)."""
    g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return np.repeat(g[..., None], 3, axis=2)


def edges(frame: np.ndarray) -> np.ndarray:
    """Canny edges of the lightly smoothed luminance, white on black (a scribble / line-art control)."""
    g = cv2.GaussianBlur(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (0, 0), sigmaX=0.8)
    e = cv2.Canny(g, 60, 140)
    return np.repeat(e[..., None], 3, axis=2)


def blur(frame: np.ndarray) -> np.ndarray:
    """A strong Gaussian low-pass (layout and colour, no detail)."""
    s = min(frame.shape[:2])
    return cv2.GaussianBlur(frame, (0, 0), sigmaX=max(1.5, s / 24))


def downscaled(frame: np.ndarray) -> np.ndarray:
    """Shrunk by 6 and blown back up (a low-resolution control)."""
    h, w = frame.shape[:2]
    small = cv2.resize(frame, (max(2, w // 6), max(2, h // 6)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


#: The controls by name (``pretrain.controls`` names).
CONTROLS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "grey": grey,
    "edges": edges,
    "blur": blur,
    "downscaled": downscaled,
}


def apply_control(name: str, clip: np.ndarray) -> np.ndarray:
    """Apply the control ``name`` to every frame of a uint8 clip ``[T, h, w, 3]``."""
    if name not in CONTROLS:
        raise KeyError(f"unknown control {name!r}; known: {', '.join(CONTROLS)}")
    return np.stack([CONTROLS[name](np.ascontiguousarray(f)) for f in clip])
