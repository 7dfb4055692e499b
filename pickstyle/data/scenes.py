"""Held-out procedural test scenes for the ``clips`` stage: a scene spec, and the scene rendered from it.

A scene is drawn from the built-in photos (:data:`pickstyle.data.images.BUILTIN_PHOTOS`): a background with
parallax, a ground layer moving with the camera pan, and ``clips.test_objects`` cut-out objects that translate,
rotate and scale independently. :func:`draw_scene` gives the JSON-able spec (seeded from ``params.seed`` and the
scene index), :func:`render_scene` the frames; the stage (:mod:`pickstyle.data.clips`) applies the built-in style
per frame for the exact ground-truth style clip and writes the ``testclips`` shards. Never used for training.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cv2
import numpy as np

from pickstyle.data.images import load_builtin_photos
from pickstyle.data.motion import job_seed
from pickstyle.data.video import resize_cover_crop
from pickstyle.errors import PickstyleError


class ScenesError(PickstyleError):
    """No test scene can be drawn (no built-in photo loads)."""


@functools.cache
def _photos() -> tuple[tuple[str, str, np.ndarray], ...]:
    """The built-in photos (id, description, RGB) of :mod:`pickstyle.data.images`, loaded offline."""
    out = tuple((photo.id, photo.description, img) for photo, img in load_builtin_photos()[0])
    if not out:
        raise ScenesError("no built-in photo could be loaded from scikit-image for the test clips")
    return out


def _affine(center: np.ndarray, angle: float, scale: float, pivot: np.ndarray) -> np.ndarray:
    """2x3 matrix: rotate/scale about ``pivot`` (patch coords), then put the pivot at ``center`` (canvas)."""
    m = cv2.getRotationMatrix2D((float(pivot[0]), float(pivot[1])), angle, scale)
    m[:, 2] += center - pivot
    return m


def draw_scene(index: int, s: dict[str, Any], split: str = "test") -> dict[str, Any]:
    """The JSON-able spec of ``split``'s scene ``index``: photos, camera pan, and each object's crop and path.

    The ``val`` split draws from its own seeds and starts its backgrounds half-way through the photos, so scene ``i``
    of the two splits differs in objects, paths and pan, and in its background photo."""
    rng = np.random.default_rng(job_seed(s["seed"], split, index))
    photos = _photos()
    n = len(photos)
    first = n // 2 if split == "val" else 0
    h, w = s["height"], s["width"]
    objects = []
    for j in range(s["test_objects"]):
        pid = int(rng.integers(n))
        ph, pw = photos[pid][2].shape[:2]
        side = float(rng.uniform(0.2, 0.4)) * min(ph, pw)
        x0, y0 = float(rng.uniform(0, pw - side)), float(rng.uniform(0, ph - side))
        objects.append(
            {
                "photo": photos[pid][0],
                "crop": [x0, y0, x0 + side, y0 + side],
                "shape": ["ellipse", "rounded_rect", "diamond"][j % 3],
                "size": float(rng.uniform(0.3, 0.45)) * min(h, w),
                "start": [float(rng.uniform(0.15, 0.85)) * w, float(rng.uniform(0.2, 0.8)) * h],
                "end": [float(rng.uniform(0.15, 0.85)) * w, float(rng.uniform(0.2, 0.8)) * h],
                "angle": [float(rng.uniform(-30, 30)), float(rng.uniform(-60, 60))],
                "scale": [float(rng.uniform(0.7, 1.0)), float(rng.uniform(0.8, 1.3))],
            }
        )
    return {
        "kind": "scene",
        "index": index,
        "style": s["styles"][index % len(s["styles"])],
        "background": photos[(first + index) % n][0],
        "ground": photos[(first + index + 3) % n][0],
        # camera pan in output pixels over the clip; the ground moves with it, the background at half speed
        "pan": [float(rng.uniform(-0.15, 0.15)) * w, float(rng.uniform(-0.05, 0.05)) * h],
        "ground_height": float(rng.uniform(0.25, 0.4)),
        "objects": objects,
    }


def _object_mask(shape: str, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    c, r = size // 2, size // 2 - 1
    if shape == "ellipse":
        cv2.ellipse(mask, (c, c), (r, int(r * 0.7)), 0, 0, 360, 255, -1, cv2.LINE_AA)
    elif shape == "diamond":
        pts = np.array([[c, 1], [size - 2, c], [c, size - 2], [1, c]], np.int32)
        cv2.fillConvexPoly(mask, pts, 255, cv2.LINE_AA)
    else:
        q = size // 5
        cv2.rectangle(mask, (q, 1), (size - 1 - q, size - 2), 255, -1)
        cv2.rectangle(mask, (1, q), (size - 2, size - 1 - q), 255, -1)
        for x, y in ((q, q), (size - 1 - q, q), (q, size - 1 - q), (size - 1 - q, size - 1 - q)):
            cv2.circle(mask, (x, y), q - 1, 255, -1, cv2.LINE_AA)
    return mask


def render_scene(spec: dict[str, Any], frames: int, height: int, width: int) -> np.ndarray:
    """Render a test scene spec: background (parallax), ground layer and moving cut-outs, ``[T, h, w, 3]`` uint8."""
    photos = {pid: img for pid, _, img in _photos()}
    h, w = height, width
    tau = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    pan = np.array(spec["pan"])
    margin = np.abs(pan).max() + 2
    # layers are made larger than the frame by the pan, then translated: no border ever shows
    big = (h + 2 * int(margin), w + 2 * int(margin))
    background = resize_cover_crop(photos[spec["background"]], *big)
    gh = int(spec["ground_height"] * h) + int(margin)
    ground = resize_cover_crop(photos[spec["ground"]], gh, big[1])
    xs = np.arange(big[1])
    edge = (4 + 3 * np.sin(xs / big[1] * 2 * math.pi * 3)).astype(int)  # a wavy horizon
    ground_alpha = (np.arange(gh)[:, None] >= edge[None, :]).astype(np.float32)
    ground_alpha = cv2.GaussianBlur(ground_alpha, (3, 3), 0)[..., None]
    patches = []
    for obj in spec["objects"]:
        x0, y0, x1, y1 = (int(round(v)) for v in obj["crop"])
        size = max(8, int(round(obj["size"])))
        patch = cv2.resize(photos[obj["photo"]][y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
        patches.append((patch, _object_mask(obj["shape"], size).astype(np.float32) / 255.0, obj))
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        cam = pan * tau[t]
        far = _affine(np.array([w / 2, h / 2]) + 0.5 * cam, 0.0, 1.0, np.array([big[1] / 2, big[0] / 2]))
        canvas = cv2.warpAffine(background, far, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32)
        near = _affine(np.array([w / 2, h - gh / 2 + margin]) + cam, 0.0, 1.0, np.array([big[1] / 2, gh / 2]))
        g = cv2.warpAffine(ground, near, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32)
        ga = cv2.warpAffine(ground_alpha, near, (w, h), flags=cv2.INTER_LINEAR)[..., None]
        canvas = canvas * (1 - ga) + g * ga
        for patch, mask, obj in patches:
            e = 0.5 - 0.5 * math.cos(math.pi * tau[t])  # ease in-out: objects start and stop smoothly
            center = (1 - e) * np.array(obj["start"]) + e * np.array(obj["end"]) + cam
            angle = (1 - tau[t]) * obj["angle"][0] + tau[t] * obj["angle"][1]
            scale = (1 - tau[t]) * obj["scale"][0] + tau[t] * obj["scale"][1]
            m = _affine(center, angle, scale, np.array([(patch.shape[1] - 1) / 2, (patch.shape[0] - 1) / 2]))
            o = cv2.warpAffine(patch, m, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32)
            a = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
            canvas = canvas * (1 - a) + o * a
        out[t] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return out
