"""Video decode / encode / resize (PyAV + OpenCV).

Frames are always ``np.uint8`` arrays ``[T, H, W, 3]`` in RGB order.

* :func:`read_video` decodes any container FFmpeg knows (mp4, mov, webm, gif, ...) at its own frame rate.
* :func:`encode_video` writes H.264 in mp4: *near-lossless* (``libx264``, ``crf``, yuv420p — yuv444p when a side
  is odd, since 4:2:0 needs even sizes) or *lossless* (``libx264rgb`` at qp 0: RGB in, the same RGB out, bit
  for bit; plain ``libx264`` + yuv444p is not exact because of the RGB->YUV rounding).
  x264's output depends on its thread count, so encoding is pinned to one thread, and mbtree (which reads
  uninitialised memory) is off: the same frames give the same bytes on every machine and run (parallelism
  comes from rendering several clips at once).
* :func:`resize_cover_crop` is the reference's "resize to cover, centre-crop"; :func:`pad_to` letterboxes.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_path


class VideoError(PickstyleError):
    """A video could not be read (missing, empty, not a video, no frames); the message names the file."""


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be [T, H, W, 3] with T >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return frames


def _stream_fps(stream: av.video.stream.VideoStream, pts_seconds: list[float]) -> float:
    """The stream's frame rate; GIFs and variable-rate files fall back to the mean frame interval."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            fps = float(rate)
            # GIF demuxers report a 100 fps time base as the rate: trust the timestamps instead.
            if stream.codec_context.name != "gif" and 0 < fps <= 1000:
                return fps
    if len(pts_seconds) >= 2 and pts_seconds[-1] > pts_seconds[0]:
        return (len(pts_seconds) - 1) / (pts_seconds[-1] - pts_seconds[0])
    return 10.0  # a single-frame GIF or an image: any rate is right; 10 fps is the GIF default


def read_video(src: str | Path | bytes, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video into RGB frames.

    Args:
        src: A file path, or the encoded bytes (e.g. a shard's ``src.mp4``).
        max_frames: Stop after this many frames (``None`` = all).

    Returns:
        ``(frames, fps)``: ``np.uint8 [T, H, W, 3]`` and the frame rate.

    Raises:
        VideoError: The file is missing or empty, is not a video, or has no decodable frame.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        name = "<video bytes>"
        if len(src) == 0:
            raise VideoError(f"{name}: empty (0 bytes)")
        handle: str | io.BytesIO = io.BytesIO(bytes(src))
    else:
        path = Path(src)
        name = str(path)
        if not path.exists():
            raise VideoError(f"{name}: no such file")
        if path.is_dir():
            raise VideoError(f"{name}: is a folder, not a video file")
        if path.stat().st_size == 0:
            raise VideoError(f"{name}: empty file (0 bytes)")
        handle = str(path)
    try:
        container = av.open(handle, mode="r")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise VideoError(f"{name}: not a readable video ({err})") from None
    frames: list[np.ndarray] = []
    pts_seconds: list[float] = []
    with container:
        if not container.streams.video:
            raise VideoError(f"{name}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if frame.time is not None:
                    pts_seconds.append(float(frame.time))
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except (av.FFmpegError, ValueError) as err:
            if not frames:
                raise VideoError(f"{name}: not a readable video ({err})") from None
            # a truncated tail: keep the frames decoded so far (players do the same)
        if not frames:
            raise VideoError(f"{name}: no frames")
        fps = _stream_fps(stream, pts_seconds)
    if len({f.shape for f in frames}) > 1:
        raise VideoError(f"{name}: frame size changes mid-stream ({frames[0].shape} -> {frames[-1].shape})")
    return np.stack(frames), fps


def _plane_rows(rows: np.ndarray, visible: int, line_size: int, bpp: int) -> np.ndarray:
    """``rows`` cut to ``visible`` bytes and padded to ``line_size`` by repeating the last pixel."""
    rows = rows[:, :visible]
    reps = -(-(line_size - visible) // bpp)
    pad = np.tile(rows[:, visible - bpp : visible], reps)[:, : line_size - visible] if reps else rows[:, :0]
    return np.ascontiguousarray(np.concatenate([rows, pad], axis=1))


def _av_frame(rgb: np.ndarray, pix_fmt: str) -> av.VideoFrame:
    """A fresh FFmpeg frame in ``pix_fmt`` holding ``rgb`` (converted by swscale), every byte defined.

    FFmpeg leaves row padding uninitialised and x264 reads some of it (SIMD plane copies): the encoded bytes
    then depended on whatever the heap held (found by the byte-determinism test). Copying the planes into a
    fresh frame with the padding filled makes the output a function of the frames alone.
    """
    h, w, _ = rgb.shape
    src = av.VideoFrame(w, h, "rgb24")
    src.planes[0].update(_plane_rows(rgb.reshape(h, 3 * w), 3 * w, src.planes[0].line_size, 3))
    if pix_fmt == "rgb24":
        return src
    converted = src.reformat(format=pix_fmt)
    out = av.VideoFrame(w, h, pix_fmt)
    for plane, target in zip(converted.planes, out.planes, strict=True):
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        target.update(_plane_rows(rows, plane.width, target.line_size, 1))
    return out


def encode_video(
    frames: np.ndarray, fps: float, crf: int = 12, lossless: bool = False, chroma: str = "420"
) -> bytes:
    """Encode RGB frames as H.264 in an mp4 container.

    Args:
        frames: ``np.uint8 [T, H, W, 3]``.
        fps: Frame rate (any positive number; stored as a fraction).
        crf: x264 constant-rate factor for the near-lossless mode (0 best .. 51 worst; 12 is visually lossless).
        lossless: ``libx264rgb`` at qp 0: decoding gives back exactly ``frames``.
        chroma: ``420`` (half-resolution colour; 4:4:4 when a side is odd) or ``444`` (full-resolution colour).

    Returns:
        The mp4 file as bytes (identical for identical inputs).
    """
    frames = _check_frames(frames)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _, height, width, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        if lossless:
            stream = container.add_stream("libx264rgb", rate=rate)
            stream.pix_fmt = "rgb24"
            stream.options = {"qp": "0", "preset": "fast"}
        else:
            stream = container.add_stream("libx264", rate=rate)
            even = height % 2 == 0 and width % 2 == 0
            stream.pix_fmt = "yuv420p" if chroma == "420" and even else "yuv444p"
            # mbtree reads uninitialised lookahead memory: with it, the same frames gave different bytes from
            # run to run (found by the byte-determinism test). Without it x264 is reproducible. superfast: ~3x
            # faster than fast at the same PSNR at crf 12 (43.4 dB on a 480x832 clip: 4:2:0 dominates the error).
            stream.options = {"crf": str(int(crf)), "preset": "superfast", "x264-params": "mbtree=0"}
        stream.width, stream.height = width, height
        stream.codec_context.thread_count = 1  # x264 output depends on the thread count: pin it
        for frame in frames:
            for packet in stream.encode(_av_frame(frame, stream.pix_fmt)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_video(
    path: str | Path, frames: np.ndarray, fps: float, crf: int = 12, lossless: bool = False
) -> Path:
    """Encode ``frames`` (see :func:`encode_video`) and write the mp4 to ``path`` atomically."""
    data = encode_video(frames, fps, crf=crf, lossless=lossless)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def resize_cover_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize so the frames cover ``height x width``, then centre-crop to exactly that size (as the reference).

    Accepts ``[T, H, W, 3]`` or one ``[H, W, 3]`` image (returned with the same rank).
    """
    single = np.asarray(frames).ndim == 3
    frames = _check_frames(frames)
    _, h0, w0, _ = frames.shape
    scale = max(height / h0, width / w0)
    new_h, new_w = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    # INTER_AREA when shrinking avoids aliasing; bilinear when enlarging
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        resized = (
            frame if (new_h, new_w) == (h0, w0) else cv2.resize(frame, (new_w, new_h), interpolation=interp)
        )
        out[i] = resized[top : top + height, left : left + width]
    return out[0] if single else out


def resize_contain(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize so the frames fit inside ``height x width`` keeping the aspect ratio (then :func:`pad_to`)."""
    single = np.asarray(frames).ndim == 3
    frames = _check_frames(frames)
    _, h0, w0, _ = frames.shape
    scale = min(height / h0, width / w0)
    new_h, new_w = min(height, max(1, round(h0 * scale))), min(width, max(1, round(w0 * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = np.stack([cv2.resize(f, (new_w, new_h), interpolation=interp) for f in frames])
    return out[0] if single else out


def pad_to(frames: np.ndarray, height: int, width: int, value: int = 0) -> np.ndarray:
    """Centre the frames on a ``height x width`` canvas filled with ``value`` (letterbox).

    The frames start at row ``(height - H) // 2`` and column ``(width - W) // 2``, so the padding can be cut off
    again after processing. Frames larger than the canvas raise ``ValueError``.
    """
    single = np.asarray(frames).ndim == 3
    frames = _check_frames(frames)
    t, h0, w0, _ = frames.shape
    if h0 > height or w0 > width:
        raise ValueError(f"frames of {h0}x{w0} do not fit in {height}x{width}: resize first")
    top, left = (height - h0) // 2, (width - w0) // 2
    out = np.full((t, height, width, 3), value, np.uint8)
    out[:, top : top + h0, left : left + w0] = frames
    return out[0] if single else out
