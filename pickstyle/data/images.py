"""Images: the built-in photos, loading any image file to 8-bit RGB, deterministic PNG bytes, shard-safe keys.

Shared by the pairs stage, its folder importers, the clips stage and the test scenes (one definition each).
"""

from __future__ import annotations

import functools
import io
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from pickstyle.data.shards import ShardError
from pickstyle.files import atomic_path

#: Smallest accepted image side: the styles' windows and the later video crops need a few pixels to work on.
MIN_SIDE = 16
#: zlib level of every PNG: fixed, with no metadata chunks, so encoding is byte-deterministic.
PNG_COMPRESS_LEVEL = 6
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Photo:
    """A built-in photo: scikit-image loader name and a one-line description for the caption."""

    id: str
    loader: str
    description: str


#: Real photos whose files ship inside the scikit-image wheel (they load offline, no pooch download).
BUILTIN_PHOTOS: tuple[Photo, ...] = (
    Photo(
        "astronaut",
        "astronaut",
        "A smiling astronaut in an orange spacesuit in front of a flag and a model shuttle.",
    ),
    Photo("coffee", "coffee", "A cup of espresso with crema on a red saucer on a wooden table."),
    Photo("chelsea", "chelsea", "A close-up of a tabby cat's face with green eyes and white whiskers."),
    Photo("rocket", "rocket", "A rocket on its launch pad between two towers under a deep blue evening sky."),
    Photo("motorcycle", "stereo_motorcycle", "A red motorcycle parked in a cluttered garage full of boxes."),
    Photo(
        "hubble", "hubble_deep_field", "Countless distant galaxies scattered across the black of deep space."
    ),
    Photo("camera", "camera", "A man in a dark coat filming with a camera on a tripod in a grassy field."),
    Photo("coins", "coins", "Rows of old silver coins laid out on a dark cloth."),
)


@functools.cache
def load_builtin_photos() -> tuple[tuple[tuple[Photo, np.ndarray], ...], tuple[dict[str, Any], ...]]:
    """The built-in photos that load offline, as RGB (loaded once per process); failures are reported, not fatal."""

    photos, failed = [], []
    for photo in BUILTIN_PHOTOS:
        try:
            img = getattr(skimage.data, photo.loader)()
            if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
                img = img[0]
        except Exception as err:  # a dataset that needs a download (pooch) or is missing from the wheel
            failed.append(
                {"file": f"skimage.data.{photo.loader}", "reason": f"photo unavailable: {err}", "style": None}
            )
            continue
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append((photo, np.ascontiguousarray(img[..., :3].astype(np.uint8))))
    return tuple(photos), tuple(failed)


class Reject(Exception):
    """One pair is invalid; ``reason`` is a short fixed phrase (grouped in the summary), ``detail`` the rest."""

    def __init__(self, file: str | Path, reason: str, detail: str | None = None, style: str | None = None):
        super().__init__(reason)
        self.file, self.reason, self.detail, self.style = str(file), reason, detail, style

    def record(self) -> dict[str, Any]:
        reason = f"{self.reason}: {self.detail}" if self.detail else self.reason
        return {"file": self.file, "reason": reason, "style": self.style}


def to_rgb8(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> ``uint8 [h, w, 3]`` RGB: alpha on white, 16-bit scaled to 8 bit, grey/palette to RGB."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img).astype(np.float64)
        # 16-bit (and 32-bit integer holding 16-bit data) -> 8 bit by /257 (65535 -> 255); float assumed 0..1 or 0..255.
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        grey = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_image(path: str | Path) -> np.ndarray:
    """Fully decode an image file to ``uint8 [h, w, 3]`` RGB (EXIF orientation applied).

    Raises:
        Reject: missing, not an image, truncated/corrupt, or smaller than :data:`MIN_SIDE`.
    """
    path = Path(path)
    if not path.is_file():
        raise Reject(path, "missing file")
    try:
        with Image.open(path) as img:
            img.load()  # decode everything now: truncation shows up here, not later in a worker
            rgb = to_rgb8(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise Reject(path, "not an image", "Pillow cannot identify the format") from None
    except Image.DecompressionBombError as err:
        raise Reject(path, "image too large", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
        raise Reject(path, "unreadable or truncated image", f"{type(err).__name__}: {err}") from None
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise Reject(path, "image too small", f"{w}x{h}, need >= {MIN_SIDE} px per side")
    return np.ascontiguousarray(rgb)


def encode_png(rgb: np.ndarray) -> bytes:
    """Deterministic PNG bytes (fixed compression level, no metadata chunks)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(
        buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buf.getvalue()


def decode_png(data: bytes, where: str) -> np.ndarray:
    """PNG (or any Pillow image) bytes -> ``uint8 [h, w, 3]`` RGB; a broken image raises ``ShardError`` naming
    ``where`` (the shard and sample it came from)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB")).copy()
    except Exception as err:  # Pillow raises many types for broken data
        raise ShardError(f"{where}: unreadable image ({type(err).__name__}: {err})") from None


def key_slug(text: str) -> str:
    """A WebDataset-safe key part: letters, digits, ``_`` and ``-`` only (no dots)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def text_strip(width: int, text: str, height: int = 12) -> np.ndarray:
    """A white ``[height, width, 3]`` strip with ``text`` in black (PIL's default font), cut with "..." to fit."""

    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    while len(text) > 3 and draw.textlength(text) > width - 4:
        text = text[:-4] + "..."
    draw.text((2, 0), text, fill=(0, 0, 0))
    return np.asarray(strip)


def write_gif(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """An animated, looping GIF of ``uint8 [T, H, W, 3]`` frames, written atomically; returns ``path``."""
    images = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=round(1000 / max(fps, 1)),
            loop=0,
        )
    return Path(path)


def write_still(path: str | Path, rows: list[tuple[str, np.ndarray]], picks: int = 4, scale: int = 2) -> Path:
    """A PNG to look at: one labelled row per clip (``(label, uint8 [T, H, W, 3])``), ``picks`` frames evenly
    spaced over time side by side, enlarged ``scale`` x (nearest); written atomically; returns ``path``."""
    length = min(len(clip) for _, clip in rows)
    times = sorted({round(i * (length - 1) / max(1, picks - 1)) for i in range(picks)})
    height, width = rows[0][1].shape[1:3]
    gap = np.full((height, 4, 3), 255, np.uint8)
    lines = []
    for label, clip in rows:
        frames = [x for t in times for x in (clip[t], gap)][:-1]
        line = np.concatenate(frames, axis=1)
        lines.append(np.concatenate([text_strip(line.shape[1], label, height=12), line], axis=0))
    still = np.concatenate(lines, axis=0)
    still = np.repeat(np.repeat(still, scale, axis=0), scale, axis=1)
    with atomic_path(path) as tmp:
        Image.fromarray(still).save(tmp, format="PNG")
    return Path(path)
