"""Built-in procedural styles: pure, deterministic image filters on ``uint8`` RGB ``[h, w, 3]`` arrays.

A style is a pure function of one frame, so a clip styled frame by frame later has an exact ground truth (what
the evaluation compares against). Every size-dependent constant (filter radius, block size, edge window) is
relative to the image's short side, so the same style looks alike on a 512 px photo and a 64 px video frame.
Each filter takes a few milliseconds at 96x64 (``cv2`` does the heavy lifting).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

StyleFn = Callable[[np.ndarray], np.ndarray]


def _odd(n: float, minimum: int = 3) -> int:
    """Nearest odd integer >= ``minimum`` (OpenCV window sizes must be odd)."""
    k = max(minimum, int(round(n)))
    return k if k % 2 else k + 1


def _short_side(rgb: np.ndarray) -> int:
    return min(rgb.shape[0], rgb.shape[1])


def anime(rgb: np.ndarray) -> np.ndarray:
    """Cel / cartoon: edge-preserving smoothing, boosted saturation, banded brightness, dark outlines."""
    s = _short_side(rgb)
    # The window grows with the image but is capped: bilateral cost is quadratic in it (512 px stays ~50 ms).
    sigma_space = min(max(2.0, s / 40), 4.0)
    smooth = rgb
    # Two light bilateral passes flatten texture into cel-like regions while keeping their borders sharp.
    for _ in range(2):
        smooth = cv2.bilateralFilter(
            smooth, d=_odd(sigma_space * 2, 5), sigmaColor=40, sigmaSpace=sigma_space
        )
    hsv = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.45 + 20, 0, 255)
    # Brightness in 5 flat bands (the "cel" shading), centred in each band so mid-tones stay where they were.
    levels = 5
    band = 256 / levels
    hsv[..., 2] = np.clip(np.floor(hsv[..., 2] / band) * band + band / 2 + 10, 0, 255)
    cel = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    # Outlines: a local-mean threshold on a denoised luminance; the offset C keeps flat areas free of specks.
    grey = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), _odd(s / 50))
    edges = cv2.adaptiveThreshold(
        grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, blockSize=_odd(s / 12, 5), C=10
    )
    ink = np.array([25, 20, 35], np.uint8)  # dark blue-black outlines, as inked cels
    return np.where(edges[..., None] == 0, ink, cel).astype(np.uint8)


def sketch(rgb: np.ndarray) -> np.ndarray:
    """Pencil sketch (grey): colour-dodge of the luminance with its blurred negative, then darker strokes."""
    s = _short_side(rgb)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    blurred_neg = cv2.GaussianBlur(255.0 - grey, (0, 0), sigmaX=max(1.0, s / 30))
    # Colour dodge: flat regions go to paper white, only luminance edges survive as strokes.
    dodge = np.clip(grey * 255.0 / np.maximum(255.0 - blurred_neg, 1.0), 0, 255)
    # A gamma > 1 darkens the strokes (a plain dodge looks washed out), plus a slight paper tone.
    paper = 245.0 * (dodge / 255.0) ** 2.2 + 5.0
    out = np.clip(paper, 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


def sepia(rgb: np.ndarray) -> np.ndarray:
    """Old photograph: sepia toning, softened detail, raised contrast and a vignette."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    soft = cv2.GaussianBlur(rgb, (0, 0), sigmaX=max(0.6, s / 160)).astype(np.float32)
    # The classic sepia matrix (rows = output R, G, B).
    m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
    toned = soft @ m.T
    toned = (toned - 128.0) * 1.15 + 118.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2
    vignette = np.clip(1.0 - 0.35 * r2, 0.45, 1.0)
    return np.clip(toned * vignette[..., None], 0, 255).astype(np.uint8)


def pixel(rgb: np.ndarray) -> np.ndarray:
    """Pixel art: block averaging (block = short side / 24, at least 2 px), a 216-colour palette, hard edges."""
    h, w = rgb.shape[:2]
    block = max(2, int(round(min(h, w) / 24)))
    small_h, small_w = -(-h // block), -(-w // block)
    small = cv2.resize(rgb, (small_w, small_h), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.3, 0, 255)
    small = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    # 6 levels per channel (the 216-colour "web-safe" palette), like an old console palette.
    small = (np.round(small.astype(np.float32) / 51.0) * 51.0).astype(np.uint8)
    # Exact square blocks anchored at the top-left corner, cropped back to the input size.
    big = np.repeat(np.repeat(small, block, axis=0), block, axis=1)
    return np.ascontiguousarray(big[:h, :w])


def _paper(h: int, w: int) -> np.ndarray:
    """Paper grain ``[h, w]`` around 1.0: fixed noise that depends only on the size (so the filter stays pure)."""
    noise = np.random.default_rng(20251008).standard_normal((h, w)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=1.2)
    return 1.0 + 0.035 * noise / max(float(noise.std()), 1e-6)


def watercolor(rgb: np.ndarray) -> np.ndarray:
    """Watercolour: flattened, bled, pastel colour on grainy paper with pigment pooled at region borders."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    # Edge-preserving smoothing keeps brightness (cv2.stylization darkens small images with its edge mask).
    flat = cv2.edgePreservingFilter(rgb, flags=cv2.RECURS_FILTER, sigma_s=max(4.0, s * 0.2), sigma_r=0.45)
    # Wet-on-wet bleeding: colour diffuses a little across borders.
    bled = cv2.GaussianBlur(flat, (0, 0), sigmaX=max(0.7, s / 100)).astype(np.float32)
    hsv = cv2.cvtColor(bled.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] *= 0.8
    f = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    # Translucent pigment on white paper.
    f = 0.7 * f + 0.3 * 255.0
    # Pigment pools where the flattened image changes: darker, soft rims along region borders.
    grey = cv2.cvtColor(flat, cv2.COLOR_RGB2GRAY)
    grad = cv2.morphologyEx(grey, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(np.float32)
    grad = cv2.GaussianBlur(grad, (0, 0), sigmaX=max(0.6, s / 200))
    f *= 1.0 - 0.25 * np.clip(grad / 48.0, 0.0, 1.0)[..., None]
    f *= _paper(h, w)[..., None]
    return np.clip(f, 0, 255).astype(np.uint8)


#: Built-in styles by id (``params.pairs.styles`` names), each a pure ``uint8 RGB -> uint8 RGB`` function.
STYLES: dict[str, StyleFn] = {
    "anime": anime,
    "sketch": sketch,
    "sepia": sepia,
    "pixel": pixel,
    "watercolor": watercolor,
}

#: How each style is named in captions (``"<name> style. <description>"``).
_CAPTION_NAMES = {
    "anime": "Anime",
    "sketch": "Pencil sketch",
    "sepia": "Sepia",
    "pixel": "Pixel art",
    "watercolor": "Watercolor",
}


def _check_style(name: str) -> None:
    if name not in STYLES:
        raise KeyError(f"unknown style {name!r}; known styles: {', '.join(sorted(STYLES))}")


def style_caption_name(name: str) -> str:
    """The style's name as captions use it, e.g. ``"anime"`` -> ``"Anime"``."""
    _check_style(name)
    return _CAPTION_NAMES.get(name, name.replace("_", " ").capitalize())


def apply_style(name: str, rgb: np.ndarray) -> np.ndarray:
    """Apply the built-in style ``name`` to one image or frame.

    Args:
        name: A key of :data:`STYLES`.
        rgb: ``uint8`` array ``[h, w, 3]`` (RGB), any size (>= 16 px per side looks right).

    Returns:
        A new ``uint8`` array ``[h, w, 3]``; the same input always gives the same output.

    Raises:
        KeyError: ``name`` is not a built-in style (the message lists the known ones).
        ValueError: ``rgb`` is not a ``uint8`` ``[h, w, 3]`` array.
    """
    _check_style(name)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"apply_style expects a uint8 [h, w, 3] RGB array, got {rgb.dtype} {rgb.shape}")
    out = STYLES[name](np.ascontiguousarray(rgb))
    assert out.shape == rgb.shape and out.dtype == np.uint8, (name, out.shape, out.dtype)
    return out
