"""Video decode/encode round trips, error messages, resize helpers."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pickstyle.data.video import (
    VideoError,
    encode_video,
    pad_to,
    read_video,
    resize_contain,
    resize_cover_crop,
    write_video,
)
from pickstyle.errors import PickstyleError


def noise_frames(t: int = 5, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def smooth_frames(t: int = 5, h: int = 32, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [np.stack([(x * 4 + i * 3) % 256, (y * 6) % 256, (x + y + 10 * i) % 256], -1) for i in range(t)]
    ).astype(np.uint8)


@pytest.mark.parametrize("shape", [(5, 32, 48), (3, 33, 47)])
def test_lossless_round_trip_is_exact(shape):
    frames = noise_frames(*shape)
    decoded, fps = read_video(encode_video(frames, 12.5, lossless=True))
    assert fps == pytest.approx(12.5)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape
    np.testing.assert_array_equal(decoded, frames)


@pytest.mark.parametrize("shape", [(5, 32, 48), (3, 33, 47)])  # odd sides fall back from 4:2:0 to 4:4:4
def test_near_lossless_round_trip_is_close(shape):
    frames = smooth_frames(*shape)
    decoded, fps = read_video(encode_video(frames, 16, crf=12))
    assert fps == 16 and decoded.shape == frames.shape
    err = np.abs(decoded.astype(int) - frames.astype(int)).mean()
    assert 0 < err < 6  # lossy, but barely


def test_encoding_is_deterministic_whatever_the_heap_holds():
    # x264's mbtree and FFmpeg's row padding once made the bytes depend on leftover heap contents
    rng = np.random.default_rng(0)
    frames = np.ascontiguousarray(np.cumsum(noise_frames(5, 64, 96), axis=2).astype(np.uint8) // 2)
    for lossless in (False, True):
        outputs = set()
        for _ in range(4):
            junk = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in rng.integers(100, 200_000, 100)]
            del junk
            outputs.add(encode_video(frames, 8, lossless=lossless))
        assert len(outputs) == 1


def test_write_video_and_read_from_path(tmp_path):
    frames = noise_frames()
    path = write_video(tmp_path / "sub" / "v.mp4", frames, 8, lossless=True)
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    decoded, _ = read_video(path, max_frames=3)
    np.testing.assert_array_equal(decoded, frames[:3])


def _write_with_av(path: Path, frames: np.ndarray, codec: str, fps: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize(("suffix", "codec"), [(".webm", "libvpx-vp9"), (".mov", "libx264")])
def test_reads_other_containers_at_their_fps(tmp_path, suffix, codec):
    frames = smooth_frames(4)
    _write_with_av(tmp_path / f"v{suffix}", frames, codec, 24)
    decoded, fps = read_video(tmp_path / f"v{suffix}")
    assert decoded.shape == frames.shape and fps == pytest.approx(24)


def test_reads_gif_with_its_frame_rate(tmp_path):
    frames = smooth_frames(4)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    decoded, fps = read_video(tmp_path / "a.gif")
    assert decoded.shape == frames.shape and fps == pytest.approx(10, rel=0.05)


def test_errors_name_the_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video")
    with av.open(str(tmp_path / "noframes.mp4"), "w") as c:  # a container without a single frame
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    cases = {
        "missing.mp4": "no such file",
        "empty.mp4": "empty",
        "text.mp4": "not a readable video",
        "noframes.mp4": "no video stream",
    }
    for name, why in cases.items():
        with pytest.raises(VideoError, match=why) as info:
            read_video(tmp_path / name)
        assert name in str(info.value)
        assert isinstance(info.value, PickstyleError)
    with pytest.raises(VideoError, match="empty"):
        read_video(b"")
    with pytest.raises(VideoError, match="not a readable video"):
        read_video(b"garbage bytes")


def test_resize_cover_crop_and_pad():
    frames = smooth_frames(2, 40, 40)
    out = resize_cover_crop(frames, 32, 48)
    assert out.shape == (2, 32, 48, 3)
    assert resize_cover_crop(frames[0], 16, 16).shape == (16, 16, 3)  # single image keeps its rank
    fit = resize_contain(frames, 32, 48)
    assert fit.shape == (2, 32, 32, 3)
    padded = pad_to(fit, 32, 48)
    assert padded.shape == (2, 32, 48, 3)
    np.testing.assert_array_equal(padded[:, :, 8:40], fit)  # centred: (48 - 32) // 2 = 8
    assert (padded[:, :, :8] == 0).all() and (padded[:, :, 40:] == 0).all()
    with pytest.raises(ValueError, match="do not fit"):
        pad_to(frames, 32, 32)


def test_reads_a_real_video(real_video):
    frames, fps = read_video(real_video, max_frames=5)
    assert frames.shape[0] == 5 and frames.shape[-1] == 3 and fps > 0
