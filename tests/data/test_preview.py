"""``data/clips/preview.gif`` carries column titles and each row's style and prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pickstyle.data.clip_preview import write_preview
from pickstyle.data.images import text_strip
from pickstyle.data.shards import ShardSink
from pickstyle.data.video import encode_video


def test_text_strip_fits_and_shows_its_text() -> None:
    short, long = text_strip(120, "anime"), text_strip(120, "anime style. " + "a very long caption " * 10)
    assert short.shape == long.shape == (12, 120, 3)
    assert short.min() < 128 and (short[:, 60:] == 255).all()  # dark text at the left, nothing further
    assert (long[:, -2:] == 255).all()  # cut to fit, with a margin
    assert text_strip(6, "tiny").shape == (12, 6, 3)  # too narrow for anything: still returns


def test_preview_rows_are_labelled(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    captions = {"k0": ("anime", "anime style. a cat"), "k1": ("sepia", "sepia style. coins on a table")}
    with ShardSink(tmp_path, "clips", 8) as sink:
        for key, (style, caption) in captions.items():
            video = encode_video(rng.integers(0, 255, (5, 64, 96, 3), dtype=np.uint8), fps=8)
            meta = {"caption": caption, "style": style, "frames": 5, "height": 64, "width": 96}
            sink.write({"__key__": key, "src.mp4": video, "style.mp4": video, "json": json.dumps(meta)})
    out = write_preview(tmp_path, [{"shard": "clips-000000.tar", "keys": list(captions)}], 2, 8)
    gif = Image.open(out)
    assert gif.n_frames == 5
    frame = np.asarray(gif.convert("RGB"))
    # titles (12) | gap (2) + label (12) + row (64) | gap + label + row
    assert frame.shape == (12 + 2 * (2 + 12 + 64), 2 * 96 + 2, 3)

    def shows(strip: np.ndarray, text: str) -> bool:  # GIF colours are quantised: compare loosely
        return np.abs(strip.astype(int) - text_strip(strip.shape[1], text)).mean() < 8

    titles = np.concatenate([text_strip(96, "source"), text_strip(98, "style (target)")], axis=1)
    assert np.abs(frame[:12].astype(int) - titles).mean() < 8
    assert shows(frame[14:26], "anime: anime style. a cat")
    assert shows(frame[14 + 78 : 26 + 78], "sepia: sepia style. coins on a table")
    assert not shows(frame[14:26], "sepia: sepia style. coins on a table")
