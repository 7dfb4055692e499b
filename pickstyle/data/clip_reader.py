"""Reading the clips stage's shards (``src.mp4``, ``style.mp4``, ``json``): what training, latents and evaluation
import, apart from the stage's writers, so changing how clips are rendered or previewed reruns only that stage."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pickstyle.data.shards import ShardError, iter_samples, list_shards
from pickstyle.data.video import VideoError, read_video

PREFIX = "clips"
TEST_PREFIX = "testclips"
VAL_PREFIX = "valclips"
#: The held-out splits' folders (and shard prefixes) under ``paths.data``.
SPLIT_PREFIX = {"test": TEST_PREFIX, "val": VAL_PREFIX}


def iter_clips(folder: str | Path, prefix: str = PREFIX, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Yield the clips of ``folder`` in shard order (after the first ``skip``, which are not decoded).

    Yields:
        ``{"key", "src": uint8 [T, H, W, 3], "style": uint8 [T, H, W, 3], "meta": dict}``.

    Raises:
        ShardError: No shards, an unreadable shard, or a sample missing a part or holding a broken video.
    """
    yield from iter_clip_shards(list_shards(folder, prefix), skip=skip)


def iter_clip_shards(
    shards: Sequence[str | Path], keys: set[str] | None = None, skip: int = 0
) -> Iterator[dict[str, Any]]:
    """Decode the clips of ``shards`` (only those in ``keys`` when given; not the first ``skip``)."""
    for sample in itertools.islice(iter_samples(shards), skip, None):
        key, url = sample["__key__"], sample.get("__url__", "?")
        if keys is not None and key not in keys:
            continue
        missing = [p for p in ("src.mp4", "style.mp4", "json") if p not in sample]
        if missing:
            raise ShardError(f"{url}: sample {key} lacks {', '.join(missing)}")
        try:
            src, _ = read_video(sample["src.mp4"])
            style, _ = read_video(sample["style.mp4"])
            meta = json.loads(sample["json"])
        except (VideoError, ValueError) as err:
            raise ShardError(f"{url}: sample {key}: {err}") from None
        # A cut or damaged mp4 still decodes its first frames: compare with the geometry the json recorded.
        want = [meta.get(k) for k in ("frames", "height", "width")]
        for part, frames in (("src.mp4", src), ("style.mp4", style)):
            if None not in want and list(frames.shape[:3]) != want:
                raise ShardError(
                    f"{url}: sample {key}: {part} decodes to {list(frames.shape[:3])} frames x height x width, "
                    f"the json says {want} (a truncated or corrupt clip)"
                )
        yield {"key": key, "src": src, "style": style, "meta": meta}
