"""Procedural images of every kind, for a VAE that must reconstruct footage it has never seen.

A VAE trained on the ~8 built-in photos learns those photos, not images: on frames of real video it
reconstructs at ~19 dB. What generalises is variety of *local* statistics (a convolutional VAE only ever
sees a few pixels at a time): noise at many scales, smooth gradients, hard edges at every angle, thin
strokes, text-like marks, flat regions, saturated and grey colours, photo crops at many zooms under colour
jitter. :func:`random_image` draws one such image from a seeded generator; the same generator state always
gives the same image.
"""

from __future__ import annotations

import cv2
import numpy as np


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 255]: often saturated, sometimes grey, sometimes near black or white."""
    kind = rng.random()
    if kind < 0.2:
        return np.full(3, rng.uniform(0, 255), np.float32)
    if kind < 0.6:
        hsv = np.uint8([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(60, 256)]]])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    return rng.uniform(0, 255, 3).astype(np.float32)


def noise_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Multi-octave value noise ``[h, w, 3]`` in [0, 255]: smooth blobs to fine grain, colour or grey."""
    out = np.zeros((h, w, 3), np.float32)
    octaves = int(rng.integers(1, 5))
    base = rng.uniform(2, 12)
    amp, total = 1.0, 0.0
    channels = 1 if rng.random() < 0.3 else 3
    for o in range(octaves):
        cells = max(2, int(base * 2**o))
        small = rng.random((cells, max(2, int(cells * w / h)), channels)).astype(np.float32)
        big = cv2.resize(
            small, (w, h), interpolation=cv2.INTER_CUBIC if rng.random() < 0.7 else cv2.INTER_NEAREST
        )
        out += amp * (big if big.ndim == 3 else big[..., None])
        total += amp
        amp *= rng.uniform(0.35, 0.8)
    out = out / total
    lo, hi = _colour(rng), _colour(rng)
    return np.clip(lo + (hi - lo) * out, 0, 255)


def gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A linear or radial colour gradient ``[h, w, 3]``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        t = np.hypot(yy - cy, xx - cx)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    lo, hi = _colour(rng), _colour(rng)
    return lo + (hi - lo) * t[..., None]


def pattern(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Stripes, a checkerboard or a sine grating at a random period and angle (hard or soft edges)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(2.5, max(3.0, min(h, w) / 2))
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / period
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / period
    kind = rng.integers(3)
    if kind == 0:
        t = (np.floor(u) % 2).astype(np.float32)
    elif kind == 1:
        t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    else:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u)
    a, b = _colour(rng), _colour(rng)
    return a + (b - a) * t[..., None]


def _shapes(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Draw filled and outlined ellipses, rectangles and polygons onto ``img`` (in place)."""
    h, w = img.shape[:2]
    for _ in range(count):
        colour = tuple(float(c) for c in _colour(rng))
        thickness = -1 if rng.random() < 0.6 else int(rng.integers(1, 4))
        kind = rng.integers(3)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        size = int(rng.integers(3, max(4, min(h, w) // 2)))
        if kind == 0:
            axes = (size, int(rng.integers(2, size + 2)))
            cv2.ellipse(
                img, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness, cv2.LINE_AA
            )
        elif kind == 1:
            cv2.rectangle(img, (cx, cy), (cx + size, cy + int(rng.integers(2, size + 2))), colour, thickness)
        else:
            pts = (np.array([cx, cy]) + rng.integers(-size, size + 1, (int(rng.integers(3, 7)), 2))).astype(
                np.int32
            )
            if thickness < 0:
                cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
            else:
                cv2.polylines(img, [pts], True, colour, thickness, cv2.LINE_AA)


def _strokes(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Thin lines, curves and text-like marks (letters and digits) onto ``img`` (in place)."""
    h, w = img.shape[:2]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    for _ in range(count):
        colour = tuple(float(c) for c in _colour(rng))
        if rng.random() < 0.5:
            text = "".join(letters[int(i)] for i in rng.integers(0, len(letters), int(rng.integers(1, 8))))
            scale = float(rng.uniform(0.25, 1.6))
            org = (int(rng.integers(-10, w)), int(rng.integers(5, h + 10)))
            font = int(
                rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX])
            )
            cv2.putText(img, text, org, font, scale, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            pts = np.cumsum(rng.normal(0, min(h, w) / 8, (int(rng.integers(2, 8)), 2)), axis=0)
            pts += np.array([rng.uniform(0, w), rng.uniform(0, h)])
            cv2.polylines(img, [pts.astype(np.int32)], False, colour, int(rng.integers(1, 3)), cv2.LINE_AA)


def photo_crop(rng: np.random.Generator, photos: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """A crop of a random photo at a random zoom (from a few pixels magnified to the whole photo shrunk)."""
    img = photos[int(rng.integers(len(photos)))]
    h0, w0 = img.shape[:2]
    frac = float(np.exp(rng.uniform(np.log(0.04), 0.0)))
    ch = max(4, int(min(h0, w0 * h / w) * frac))
    cw = max(4, int(ch * w / h))
    y, x = int(rng.integers(0, h0 - ch + 1)), int(rng.integers(0, w0 - cw + 1))
    crop = img[y : y + ch, x : x + cw]
    interp = cv2.INTER_AREA if ch > h else int(rng.choice([cv2.INTER_LINEAR, cv2.INTER_CUBIC]))
    return cv2.resize(crop, (w, h), interpolation=interp).astype(np.float32)


def colour_jitter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Random hue rotation, saturation, gamma, contrast and brightness, float ``[h, w, 3]`` -> uint8."""
    hsv = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(0, 180)) % 180 if rng.random() < 0.5 else hsv[..., 0]
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.0, 1.6), 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32) / 255.0
    out = out ** rng.uniform(0.6, 1.6)
    out = (out - 0.5) * rng.uniform(0.6, 1.3) + 0.5 + rng.uniform(-0.15, 0.15)
    return np.clip(out * 255.0, 0, 255).astype(np.uint8)


def random_image(rng: np.random.Generator, h: int, w: int, photos: list[np.ndarray]) -> np.ndarray:
    """One random uint8 RGB image ``[h, w, 3]``: a base (photo crop, noise, gradient or pattern) with shapes,
    strokes, blur, sensor noise or JPEG-like block artefacts layered on at random, then colour jitter."""
    base = rng.random()
    if base < 0.4 and photos:
        img = photo_crop(rng, photos, h, w)
    elif base < 0.65:
        img = noise_field(rng, h, w)
    elif base < 0.85:
        img = gradient(rng, h, w)
    else:
        img = pattern(rng, h, w)
    img = np.ascontiguousarray(img.astype(np.float32))
    if rng.random() < 0.3:  # a second layer blended through a noise mask: textures meeting at soft borders
        other = noise_field(rng, h, w) if rng.random() < 0.5 else pattern(rng, h, w)
        mask = noise_field(rng, h, w)[..., :1] / 255.0
        img = img * mask + other * (1 - mask)
    if rng.random() < 0.5:
        _shapes(rng, img, int(rng.integers(1, 12)))
    if rng.random() < 0.4:  # OpenCV draws text on 8-bit images only
        marked = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
        _strokes(rng, marked, int(rng.integers(1, 10)))
        img = marked.astype(np.float32)
    if rng.random() < 0.2:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=float(rng.uniform(0.5, 2.5)))
    if rng.random() < 0.2:
        img = img + rng.normal(0, rng.uniform(2, 18), img.shape).astype(np.float32)
    return colour_jitter(rng, img) if rng.random() < 0.7 else np.clip(img, 0, 255).astype(np.uint8)
