"""Procedural VAE images, structure controls and held-out real frames: pure, seeded, the right kind of image."""

from __future__ import annotations

import numpy as np
import pytest

from pickstyle.data.controls import CONTROLS, apply_control
from pickstyle.data.footage import heldout_clips, pan_clip
from pickstyle.data.images import load_builtin_photos
from pickstyle.data.textures import random_image


def _photos() -> list[np.ndarray]:
    return [img for _, img in load_builtin_photos()[0]]


def test_random_images_replay_from_their_seed_and_vary() -> None:
    photos = _photos()
    a = [random_image(np.random.default_rng([0, i]), 64, 96, photos) for i in range(24)]
    b = [random_image(np.random.default_rng([0, i]), 64, 96, photos) for i in range(24)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.shape == (64, 96, 3) and x.dtype == np.uint8 for x in a)
    # variety: flat and busy images, dark and bright ones, grey and colourful ones
    detail = [float(np.abs(np.diff(x.astype(np.float32), axis=1)).mean()) for x in a]
    mean = [float(x.mean()) for x in a]
    chroma = [float(np.ptp(x.astype(np.float32), axis=2).mean()) for x in a]
    assert max(detail) > 4 * min(detail) and max(mean) - min(mean) > 60 and max(chroma) > 40 > min(chroma)


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_controls_are_per_frame_structure_maps(name: str) -> None:
    rng = np.random.default_rng(1)
    clip = np.stack([random_image(rng, 64, 96, _photos()) for _ in range(3)])
    out = apply_control(name, clip)
    assert out.shape == clip.shape and out.dtype == np.uint8
    assert np.array_equal(out[1], apply_control(name, clip[1:2])[0])  # frame by frame
    assert not np.array_equal(out, clip)
    if name in ("grey", "edges"):  # colour removed
        assert np.array_equal(out[..., 0], out[..., 2])


def test_unknown_control_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown control 'depth'; known: grey"):
        apply_control("depth", np.zeros((1, 16, 16, 3), np.uint8))


def test_held_out_clips_pan_across_their_photo() -> None:
    clips = heldout_clips(9, 64, 96)
    assert {name.split("@")[0] for name, _ in clips} >= {"grace_hopper", "brick"}
    for _, clip in clips:
        assert clip.shape == (9, 64, 96, 3) and clip.dtype == np.uint8
        assert not np.array_equal(clip[0], clip[-1])  # the camera moves
    image = np.zeros((90, 200, 3), np.uint8)
    image[:, 100:] = 255
    pan = pan_clip(image, 5, 32, 48)
    assert pan.shape == (5, 32, 48, 3) and pan[0].mean() < pan[-1].mean()  # panning towards the bright half
