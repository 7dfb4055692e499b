"""``preview.gif`` of the clips stage: a few clips spread over its output, one labelled row each (source | style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pickstyle.data.clip_reader import iter_clip_shards
from pickstyle.data.images import text_strip, write_gif

#: Widest preview cell (each row is source | style); keeps the GIF small at 832 px.
PREVIEW_CELL_WIDTH = 192


def write_preview(out_dir: Path, results: list[dict[str, Any]], n: int, fps: int) -> Path | None:
    """``preview.gif``: ``n`` clips spread over the stage's output, one row each (source | style).

    Column titles on top; above each row its style and prompt (the caption the adapter trains with)."""
    target = out_dir / "preview.gif"
    keys = [(r["shard"], k) for r in results for k in r["keys"]]
    if n <= 0 or not keys:
        target.unlink(missing_ok=True)
        return None
    chosen = [
        keys[i]
        for i in sorted({round(i * (len(keys) - 1) / max(1, n - 1)) for i in range(min(n, len(keys)))})
    ]
    rows, labels = [], []
    for shard in dict.fromkeys(s for s, _ in chosen):
        want = {k for s, k in chosen if s == shard}
        for clip in iter_clip_shards([out_dir / shard], keys=want):
            gap = np.full_like(clip["src"][:, :, :2], 255)
            rows.append(np.concatenate([clip["src"], gap, clip["style"]], axis=2))
            meta = clip["meta"]
            labels.append(f"{meta.get('style_name') or meta.get('style') or '?'}: {meta.get('caption', '')}")
    t = min(len(r) for r in rows)
    width = min(rows[0].shape[2], 2 * PREVIEW_CELL_WIDTH + 2)
    scaled = []
    for r in rows:
        h = round(r.shape[1] * width / r.shape[2])
        scaled.append(np.stack([cv2.resize(f, (width, h), interpolation=cv2.INTER_AREA) for f in r[:t]]))
    sep = np.full((t, 2, width, 3), 255, np.uint8)
    half = (width - 2) // 2
    titles = np.concatenate([text_strip(half, "source"), text_strip(width - half, "style (target)")], axis=1)
    parts = [np.repeat(titles[None], t, axis=0)]
    for r, label in zip(scaled, labels, strict=True):
        parts += [sep, np.repeat(text_strip(width, label)[None], t, axis=0), r]
    grid = np.concatenate(parts, axis=1)
    return write_gif(target, grid, fps)
