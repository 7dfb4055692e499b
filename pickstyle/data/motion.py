"""Synthetic camera motion: one 3x3 matrix per frame, applied identically to the source and the style image.

PickStyle (arXiv 2510.07546, Sec. 3.2) turns a still (source, style) pair into a clip pair by moving a virtual
camera over both images *with the same transform*, so the adapter learns style without unlearning motion.

A clip is described by a JSON-able **spec** (drawn once from a seed, see :func:`draw_spec`)::

    {"version": 1, "seed": 123, "motion": {"kind": "zoom_in", "factor": 1.53},
     "flip": true, "crop": [x0, y0, x1, y1], "photometric": null}

Every random number lives in the spec, so :func:`render_pair` replays it to identical frames without an RNG.

Geometry (pixel centres at integer coordinates, as OpenCV):

    M_t = A_t · Z(k) · B

* ``B`` resizes the (augmented) image to cover the output and centres it (the reference's resize-and-crop);
* ``A_t`` is the camera motion at frame ``t`` in output pixels (zoom, slide, rotate, ... about the centre);
* ``Z(k)`` zooms in about the centre by the smallest ``k`` (at least the motion's own ``crop``, e.g. the
  reference's 1.5x for rotations) that keeps the output window inside the image in *every* frame, so no
  frame ever shows a border.

Each frame is then one ``cv2.warpPerspective`` of the full-resolution image per image (no per-frame crop +
resize), which is both sharper than resampling an already-resized frame and much faster (``bench/render.py``).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import albumentations as A
import cv2
import numpy as np

SPEC_VERSION = 1

#: The reference's seven moving motions (rotate drawn twice as often through ``clips.motion_mix``) + extras.
REFERENCE_MOTIONS = ("zoom_in", "zoom_out", "slide_left", "slide_right", "slide_up", "slide_down", "rotate")
EXTRA_MOTIONS = ("dolly", "handheld", "tilt")
MOTIONS = ("static", *REFERENCE_MOTIONS, *EXTRA_MOTIONS)

#: Slide distances are specified at this output width, as in the reference (480 x 832), and scaled to width.
REFERENCE_WIDTH = 832

#: Sample points stay this far (input pixels) inside the outermost pixel centres: bilinear taps never reach the
#: border even after OpenCV rounds coordinates to 1/32 pixel.
EDGE_MARGIN = 0.1

_SLIDE_DIRECTIONS = {
    "slide_left": (-1.0, 0.0),
    "slide_right": (1.0, 0.0),
    "slide_up": (0.0, -1.0),
    "slide_down": (0.0, 1.0),
}


# --------------------------------------------------------------------------------------------------- drawing
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def draw_motion(rng: np.random.Generator, mix: dict[str, float], static_prob: float) -> dict[str, Any]:
    """Draw one motion: static with ``static_prob``, else a kind from ``mix`` (relative weights) and its params.

    Ranges follow the paper / reference code: zoom factor U(1.2, 2) (geometric over the clip), slides of
    U(100, 200) px at 832 wide on a quadratic ease, rotation linear to U(-20, 20) degrees with a 1.5x crop.
    The extras: dolly (pan + zoom), handheld (smooth random translation + roll), perspective tilt.
    """
    unknown = set(mix) - set(MOTIONS)
    if unknown:
        raise ValueError(f"clips.motion_mix: unknown motion(s) {sorted(unknown)}; known: {list(MOTIONS)}")
    kinds = [k for k in MOTIONS if mix.get(k, 0.0) > 0]
    if rng.random() < static_prob or not kinds:
        return {"kind": "static"}
    weights = np.array([mix[k] for k in kinds], float)
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    if kind in ("zoom_in", "zoom_out"):
        return {"kind": kind, "factor": _u(rng, 1.2, 2.0)}
    if kind in _SLIDE_DIRECTIONS:
        return {"kind": kind, "distance": _u(rng, 100.0, 200.0)}
    if kind == "rotate":
        return {"kind": kind, "angle": _u(rng, -20.0, 20.0), "crop": 1.5}
    if kind == "dolly":
        return {
            "kind": kind,
            "factor": _u(rng, 1.1, 1.5),
            "distance": _u(rng, 60.0, 160.0),
            "direction": _u(rng, 0, 360),
        }
    if kind == "handheld":
        # three sinusoids per channel (x, y, roll), 0.5-3 cycles per clip, amplitudes 1, 1/2, 1/4
        waves = {
            ch: [[_u(rng, 0.5, 3.0), _u(rng, 0.0, 2 * math.pi)] for _ in range(3)]
            for ch in ("x", "y", "roll")
        }
        return {"kind": kind, "amplitude": _u(rng, 4.0, 12.0), "roll": _u(rng, 0.5, 2.0), "waves": waves}
    if kind == "tilt":
        return {"kind": kind, "axis": "x" if rng.random() < 0.5 else "y", "angle": _u(rng, -15.0, 15.0)}
    return {"kind": "static"}  # kinds only holds MOTIONS entries: unreachable


def draw_spec(
    seed: int,
    *,
    mix: dict[str, float],
    static_prob: float = 0.2,
    flip_prob: float = 0.5,
    crop_min: float = 1.0,
    photometric: bool = False,
) -> dict[str, Any]:
    """Draw a full clip spec (motion + shared flip/crop + optional source-only photometric seed) from ``seed``.

    Args:
        seed: Integer seed; the same seed and arguments give the same spec.
        mix: Relative weights of the moving motions (``params.clips.motion_mix``).
        static_prob: Probability of a static clip.
        flip_prob: Probability of a horizontal flip of *both* images.
        crop_min: Side fraction kept by the shared random crop (1.0 = no crop).
        photometric: Add a seed for the source-only colour jitter.
    """
    rng = np.random.default_rng(seed)
    motion = draw_motion(rng, mix, static_prob)
    flip = bool(rng.random() < flip_prob)
    side = _u(rng, crop_min, 1.0) if crop_min < 1.0 else 1.0
    x0, y0 = _u(rng, 0.0, 1.0 - side), _u(rng, 0.0, 1.0 - side)
    return {
        "version": SPEC_VERSION,
        "seed": int(seed),
        "motion": motion,
        "flip": flip,
        "crop": [x0, y0, x0 + side, y0 + side],
        "photometric": int(rng.integers(2**31)) if photometric else None,
    }


# --------------------------------------------------------------------------------------------------- geometry
def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _about(center: tuple[float, float], m: np.ndarray) -> np.ndarray:
    """``m`` applied about ``center`` instead of the origin."""
    return _translate(*center) @ m @ _translate(-center[0], -center[1])


def _scale(s: float) -> np.ndarray:
    return np.diag([s, s, 1.0])


def _rotation(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ease_in(tau: np.ndarray) -> np.ndarray:
    """Quadratic ease-in, as the reference's slides: slow start, accelerating."""
    return tau**2


def _ease_in_out(tau: np.ndarray) -> np.ndarray:
    return np.where(tau < 0.5, 2 * tau**2, 1 - 2 * (1 - tau) ** 2)


def camera_path(motion: dict[str, Any], frames: int, height: int, width: int) -> np.ndarray:
    """The camera motion ``A_t`` in output pixels (content moves by ``A_t``): ``[frames, 3, 3]``.

    Conventions: ``slide_<dir>`` moves the *view* towards ``<dir>`` (content moves the other way), centred on
    the image so the least crop-in is needed; zoom factors are geometric over time (``f ** tau``) as the
    reference; rotation angles are linear in time.
    """
    kind = motion["kind"]
    tau = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    c = ((width - 1) / 2, (height - 1) / 2)
    px = width / REFERENCE_WIDTH  # slide/dolly/handheld distances are given at 832 wide
    out = np.repeat(np.eye(3)[None], frames, axis=0)
    if kind == "static":
        return out
    if kind in ("zoom_in", "zoom_out"):
        p = tau if kind == "zoom_in" else 1.0 - tau
        for t in range(frames):
            out[t] = _about(c, _scale(motion["factor"] ** p[t]))
    elif kind in _SLIDE_DIRECTIONS:
        dx, dy = _SLIDE_DIRECTIONS[kind]
        off = (_ease_in(tau) - 0.5) * motion["distance"] * px
        for t in range(frames):
            out[t] = _translate(-dx * off[t], -dy * off[t])
    elif kind == "rotate":
        for t in range(frames):
            out[t] = _about(c, _rotation(motion["angle"] * tau[t]))
    elif kind == "dolly":
        e = _ease_in_out(tau)
        a = math.radians(motion["direction"])
        off = (e - 0.5) * motion["distance"] * px
        for t in range(frames):
            zoom = _about(c, _scale(1.0 + (motion["factor"] - 1.0) * e[t]))
            out[t] = zoom @ _translate(-math.cos(a) * off[t], -math.sin(a) * off[t])
    elif kind == "handheld":

        def wave(ch: str) -> np.ndarray:
            w = sum(
                0.5**i * np.sin(2 * math.pi * f * tau + ph) for i, (f, ph) in enumerate(motion["waves"][ch])
            )
            return w / 1.75  # sum of the amplitudes: stays within [-1, 1]

        x, y, roll = wave("x") * motion["amplitude"] * px, wave("y") * motion["amplitude"] * px, wave("roll")
        for t in range(frames):
            out[t] = _translate(x[t], y[t]) @ _about(c, _rotation(roll[t] * motion["roll"]))
    elif kind == "tilt":
        # a pinhole camera (focal length = width, ~53 degrees field of view) rotating about its x or y axis
        f = float(width)
        K = np.array([[f, 0.0, c[0]], [0.0, f, c[1]], [0.0, 0.0, 1.0]])
        angles = np.radians(motion["angle"] * _ease_in_out(tau))
        for t in range(frames):
            co, si = math.cos(angles[t]), math.sin(angles[t])
            if motion["axis"] == "x":
                R = np.array([[1.0, 0.0, 0.0], [0.0, co, -si], [0.0, si, co]])
            else:
                R = np.array([[co, 0.0, si], [0.0, 1.0, 0.0], [-si, 0.0, co]])
            out[t] = K @ R @ np.linalg.inv(K)
    else:
        raise ValueError(f"unknown motion kind {kind!r}; known: {list(MOTIONS)}")
    return out


def cover_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
    """``B``: input pixels -> output pixels, scaled to cover the output and centred (resize + centre crop)."""
    (h0, w0), (h, w) = in_hw, out_hw
    s = max(h / h0, w / w0)
    # pixel-centre convention: x_out + 0.5 = s * (x_in + 0.5) - (s * w0 - w) / 2
    return np.array(
        [
            [s, 0.0, s * 0.5 - 0.5 - (s * w0 - w) / 2],
            [0.0, s, s * 0.5 - 0.5 - (s * h0 - h) / 2],
            [0.0, 0.0, 1.0],
        ]
    )


def crop_in_factor(
    camera: np.ndarray, in_hw: tuple[int, int], out_hw: tuple[int, int], minimum: float = 1.0
) -> float:
    """The smallest zoom ``k >= minimum`` about the centre that keeps every frame's window inside the image.

    The output window's corners, mapped back through ``A_t``, must land (after ``Z(k)^-1``) inside the image's
    footprint under ``B``: an axis-aligned box centred on the output centre with half-extents ``e``. The window
    and the footprint are convex, so its four corners suffice.
    """
    (h0, w0), (h, w) = in_hw, out_hw
    s = max(h / h0, w / w0)
    half = np.array([s * (w0 - 1 - 2 * EDGE_MARGIN) / 2, s * (h0 - 1 - 2 * EDGE_MARGIN) / 2])
    if (half <= 0).any():
        raise ValueError(f"image of {h0}x{w0} is too small to render")
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float).T  # [3, 4]
    need = minimum
    for a in camera:
        u = np.linalg.solve(a, corners)
        u = u[:2] / u[2]
        need = max(need, float((np.abs(u - c[:, None]) / half[:, None]).max()))
    return need


def frame_matrices(
    motion: dict[str, Any], in_hw: tuple[int, int], out_hw: tuple[int, int], frames: int
) -> np.ndarray:
    """``M_t = A_t · Z(k) · B`` for every frame: input pixels -> output pixels, ``[frames, 3, 3]``."""
    h, w = out_hw
    camera = camera_path(motion, frames, h, w)
    k = crop_in_factor(camera, in_hw, out_hw, float(motion.get("crop", 1.0)))
    zoom = _about(((w - 1) / 2, (h - 1) / 2), _scale(k))
    return camera @ zoom @ cover_matrix(in_hw, out_hw)


def max_scale(mats: np.ndarray, out_hw: tuple[int, int]) -> float:
    """Largest local magnification (output px per input px) of the forward maps over the output window."""
    h, w = out_hw
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [0, h - 1, 1], [w - 1, h - 1, 1]], float).T
    best = 0.0
    for m in mats:
        p = np.linalg.solve(m, corners)
        p = p / p[2]
        for x, y, _ in p.T:
            wz = m[2, 0] * x + m[2, 1] * y + m[2, 2]
            xo = (m[0, 0] * x + m[0, 1] * y + m[0, 2]) / wz
            yo = (m[1, 0] * x + m[1, 1] * y + m[1, 2]) / wz
            jac = np.array(
                [
                    [m[0, 0] - xo * m[2, 0], m[0, 1] - xo * m[2, 1]],
                    [m[1, 0] - yo * m[2, 0], m[1, 1] - yo * m[2, 1]],
                ]
            )
            best = max(best, float(np.linalg.svd(jac / wz, compute_uv=False)[0]))
    return best


# --------------------------------------------------------------------------------------------------- rendering
def check_clip_size(frames: int, height: int, width: int) -> None:
    """Wan's VAE needs 4n+1 frames and sides that are multiples of 16 (8x VAE, 2x patch)."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4n+1 (e.g. 9, 17, 81), got {frames}")
    for name, v in (("height", height), ("width", width)):
        if v < 16 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {v}")


def warp_frames(
    image: np.ndarray, mats: np.ndarray, out_hw: tuple[int, int], border: int = cv2.BORDER_REPLICATE
) -> np.ndarray:
    """One warp per frame: ``[T, h, w, 3]`` uint8 from one ``[H, W, 3]`` RGB image.

    ``cv2.warpPerspective``; when every matrix is affine (all reference motions) the equivalent, ~2x faster
    ``cv2.warpAffine``. A frame whose matrix equals the previous one is copied, not re-warped (static clips).
    The windows lie inside the image (:func:`crop_in_factor`), so ``border`` never shows; replicate is only a
    belt for sub-pixel rounding. Tests pass ``BORDER_CONSTANT`` to prove it.
    """
    h, w = out_hw
    out = np.empty((len(mats), h, w, 3), np.uint8)
    # OpenCV's SIMD warp paths are ~2x faster on 4-channel uint8 than on 3-channel: warp RGBA, drop alpha
    rgba = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2RGBA)
    frame = np.empty((h, w, 4), np.uint8)
    affine = bool(np.allclose(mats[:, 2], [0.0, 0.0, 1.0], rtol=0.0, atol=1e-12))
    for t, m in enumerate(mats):
        if t and np.array_equal(m, mats[t - 1]):
            out[t] = out[t - 1]
            continue
        if affine:
            cv2.warpAffine(rgba, m[:2], (w, h), dst=frame, flags=cv2.INTER_LINEAR, borderMode=border)
        else:
            cv2.warpPerspective(rgba, m, (w, h), dst=frame, flags=cv2.INTER_LINEAR, borderMode=border)
        cv2.cvtColor(frame, cv2.COLOR_RGBA2RGB, dst=out[t])
    return out


def shared_augment(src: np.ndarray, style: np.ndarray, spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The spec's flip + crop on *both* images with one albumentations call (``additional_targets``).

    Both are pure index operations (no resampling); the spec fixes every value, so the call is deterministic.
    """
    h0, w0 = src.shape[:2]
    x0, y0, x1, y1 = spec.get("crop", [0.0, 0.0, 1.0, 1.0])
    box = dict(x_min=round(x0 * w0), y_min=round(y0 * h0), x_max=round(x1 * w0), y_max=round(y1 * h0))
    transforms = [A.HorizontalFlip(p=1.0)] if spec.get("flip") else []
    if box != dict(x_min=0, y_min=0, x_max=w0, y_max=h0):
        transforms.append(A.Crop(**box, p=1.0))
    if not transforms:
        return src, style
    out = A.Compose(transforms, additional_targets={"style": "image"})(image=src, style=style)
    return out["image"], out["style"]


def source_photometric(src: np.ndarray, seed: int) -> np.ndarray:
    """Mild source-only colour jitter (the style image keeps its colours: they *are* the style)."""
    jitter = A.ColorJitter(
        brightness=(0.9, 1.1), contrast=(0.9, 1.1), saturation=(0.9, 1.1), hue=(-0.02, 0.02), p=1.0
    )
    return A.Compose([jitter], seed=int(seed))(image=src)["image"]


def prepare_pair(
    src: np.ndarray, style: np.ndarray, spec: dict[str, Any], frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Augment both images as the spec says and compute the frame matrices: ``(src, style, mats)``.

    When every frame shrinks the image by more than ~10 %, both images are first reduced once with
    ``INTER_AREA`` to the largest scale any frame needs (anti-aliasing, and a smaller image to warp).
    """
    check_clip_size(frames, height, width)
    if src.shape != style.shape:
        raise ValueError(f"source {src.shape} and style {style.shape} images differ in size")
    src, style = shared_augment(src, style, spec)
    if spec.get("photometric") is not None:
        src = source_photometric(src, spec["photometric"])
    out_hw = (height, width)
    mats = frame_matrices(spec["motion"], src.shape[:2], out_hw, frames)
    r = max_scale(mats, out_hw)
    if r < 0.9:
        h0, w0 = src.shape[:2]
        size = (max(width, math.ceil(w0 * r)), max(height, math.ceil(h0 * r)))
        src = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
        style = cv2.resize(style, size, interpolation=cv2.INTER_AREA)
        mats = frame_matrices(spec["motion"], src.shape[:2], out_hw, frames)
    return src, style, mats


def render_pair(
    src: np.ndarray, style: np.ndarray, spec: dict[str, Any], frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Render the (source, style) clip pair of ``spec``: two ``np.uint8 [frames, height, width, 3]`` arrays.

    The same matrices warp both images, so any pixel difference between the two clips comes from the images.
    """
    src, style, mats = prepare_pair(src, style, spec, frames, height, width)
    return warp_frames(src, mats, (height, width)), warp_frames(style, mats, (height, width))


def job_seed(seed: int, *parts: str | int) -> int:
    """Independent seed per (params seed, parts): a clip or scene never depends on how many others exist."""
    words = [int(seed)] + [zlib.crc32(str(p).encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1)[0])
