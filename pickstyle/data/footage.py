"""Held-out real frames: photographs that ship inside installed packages and that no stage ever trains on.

The VAE and the pretraining see only the built-in photos (``images.BUILTIN_PHOTOS``) and procedural images, so
these measure how the tiny backbone does on footage it has never seen: matplotlib's portrait of Grace Hopper
(a person, as real footage mostly is) and scikit-image's real textures (brick, grass, gravel), each turned into
a short clip under a fixed, slow camera pan (a deterministic, seed-free replay).
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def _matplotlib_sample(name: str) -> np.ndarray | None:
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / name
        return np.asarray(Image.open(path).convert("RGB"))
    except (ImportError, OSError):
        return None


def _skimage_grey(name: str) -> np.ndarray | None:
    try:
        import skimage.data

        img = np.asarray(getattr(skimage.data, name)())
    except Exception:  # noqa: BLE001 - a dataset missing from the wheel is simply left out
        return None
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


@functools.cache
def heldout_images() -> tuple[tuple[str, np.ndarray], ...]:
    """(name, uint8 RGB image) of every held-out photo that loads here."""
    found = [("grace_hopper", _matplotlib_sample("grace_hopper.jpg"))]
    found += [(name, _skimage_grey(name)) for name in ("brick", "grass", "gravel")]
    return tuple((n, img.astype(np.uint8)) for n, img in found if img is not None)


def pan_clip(image: np.ndarray, frames: int, height: int, width: int, zoom: float = 1.0) -> np.ndarray:
    """A clip ``[frames, height, width, 3]`` of ``image``: a crop of 1/``zoom`` of its largest centred
    ``width:height`` window panning slowly left to right (area-resampled, as a camera would see it)."""
    h0, w0 = image.shape[:2]
    ch = int(min(h0, w0 * height / width) / zoom)
    cw = int(ch * width / height)
    travel = max(0, min(w0 - cw, cw // 4))
    x0, y0 = (w0 - cw - travel) // 2, (h0 - ch) // 2
    out = []
    for t in range(frames):
        x = x0 + int(round(travel * t / max(1, frames - 1)))
        crop = image[y0 : y0 + ch, x : x + cw]
        out.append(cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def heldout_clips(frames: int, height: int, width: int) -> list[tuple[str, np.ndarray]]:
    """The held-out clips: each held-out photo whole and zoomed 2x (faces and texture at two scales)."""
    clips = []
    for name, img in heldout_images():
        for zoom in (1.0, 2.0):
            clips.append((f"{name}@{zoom:g}x", pan_clip(img, frames, height, width, zoom)))
    return clips
