"""Shard reading errors name the shard and the sample: a cut-short tar, a clip that decodes short."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pickstyle.data.clip_reader import iter_clips
from pickstyle.data.shards import ShardError, ShardSink, iter_samples
from pickstyle.data.video import encode_video


def _clip_shard(folder: Path, frames: dict[str, int], recorded: int = 9) -> Path:
    """``clips-000000.tar`` with one clip per key (``frames[key]`` frames; the json says ``recorded``)."""
    rng = np.random.default_rng(0)
    with ShardSink(folder, "clips", 8) as sink:
        for key, count in frames.items():
            video = encode_video(rng.integers(0, 255, (count, 16, 24, 3), dtype=np.uint8), fps=8)
            meta = {"caption": "x", "frames": recorded, "height": 16, "width": 24}
            sink.write({"__key__": key, "src.mp4": video, "style.mp4": video, "json": json.dumps(meta)})
    return folder / "clips-000000.tar"


@pytest.mark.parametrize("cut", [0.2, 0.45, 0.5, 0.8])
def test_a_truncated_shard_names_its_file_and_sample(tmp_path: Path, cut: float) -> None:
    shard = _clip_shard(tmp_path, {"k0": 9, "k1": 9, "k2": 9})
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ShardError, match=rf"^{shard}: truncated (at|after) .*sample 'k\d'") as err:
        list(iter_samples([shard]))
    assert "\n" not in str(err.value)


def test_a_complete_shard_reads_every_sample(tmp_path: Path) -> None:
    shard = _clip_shard(tmp_path, {"k0": 9, "k1": 9})
    assert [s["__key__"] for s in iter_samples([shard])] == ["k0", "k1"]


def test_a_clip_that_decodes_short_names_its_file_and_sample(tmp_path: Path) -> None:
    shard = _clip_shard(tmp_path, {"k0": 9, "k1": 5})
    with pytest.raises(ShardError, match=rf"^{shard}: sample k1: src.mp4 decodes to \[5, 16, 24\]"):
        list(iter_clips(tmp_path))
