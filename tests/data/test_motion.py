"""Camera-motion trajectories: shared motion, replay, no borders, paper ranges, clip-size checks."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pytest

from pickstyle.config import Clips, ParamsError, parse_params
from pickstyle.data.motion import (
    MOTIONS,
    REFERENCE_WIDTH,
    camera_path,
    draw_motion,
    draw_spec,
    frame_matrices,
    prepare_pair,
    render_pair,
    warp_frames,
)

ALL_MIX = {k: 1.0 for k in MOTIONS if k != "static"}


def spec_of(kind: str, seed: int = 0, **kw) -> dict:
    mix = {} if kind == "static" else {kind: 1.0}
    return draw_spec(seed, mix=mix, static_prob=1.0 if kind == "static" else 0.0, **kw)


def coordinate_grid(h: int = 72, w: int = 100) -> np.ndarray:
    """Every pixel different: x in red, y in green, a checker pattern in blue."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), ((x // 4 + y // 4) % 2) * 255], -1).astype(
        np.uint8
    )


@pytest.mark.parametrize("kind", MOTIONS)
def test_same_image_as_source_and_style_gives_identical_clips(kind):
    grid = coordinate_grid()
    # the shared flip + crop is on: a draw made separately per image would make the clips differ
    spec = spec_of(kind, seed=3, flip_prob=0.5, crop_min=0.7)
    src_clip, style_clip = render_pair(grid, grid.copy(), spec, 9, 32, 48)
    assert src_clip.shape == (9, 32, 48, 3)
    np.testing.assert_array_equal(src_clip, style_clip)
    if kind != "static":
        assert not np.array_equal(src_clip[0], src_clip[-1])  # it moves
    else:
        assert all(np.array_equal(f, src_clip[0]) for f in src_clip)


def test_both_images_get_exactly_the_same_warps():
    grid = coordinate_grid()
    style = cv2.GaussianBlur(255 - grid, (5, 5), 0)
    spec = spec_of("tilt", seed=5, flip_prob=1.0, crop_min=0.8)
    src_clip, style_clip = render_pair(grid, style, spec, 9, 32, 48)
    a, b, mats = prepare_pair(grid, style, spec, 9, 32, 48)
    np.testing.assert_array_equal(src_clip, warp_frames(a, mats, (32, 48)))
    np.testing.assert_array_equal(style_clip, warp_frames(b, mats, (32, 48)))


def test_spec_replays_to_identical_frames():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    style = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    for seed in range(12):
        spec = draw_spec(seed, mix=ALL_MIX, static_prob=0.2, crop_min=0.8, photometric=True)
        assert spec == draw_spec(seed, mix=ALL_MIX, static_prob=0.2, crop_min=0.8, photometric=True)
        stored = json.loads(json.dumps(spec))  # what the clip's json holds
        first = render_pair(src, style, spec, 9, 32, 48)
        again = render_pair(src, style, stored, 9, 32, 48)
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])


@pytest.mark.parametrize("kind", MOTIONS)
def test_no_border_pixels_for_any_motion(kind):
    # an all-white image warped with a *black* constant border: any border pixel would show as < 255
    for in_hw, out_hw in [
        ((128, 128), (32, 48)),
        ((40, 200), (32, 48)),
        ((20, 24), (32, 48)),
        ((480, 832), (480, 832)),
    ]:
        white = np.full((*in_hw, 3), 255, np.uint8)
        for seed in range(4):
            spec = spec_of(kind, seed, flip_prob=0.5, crop_min=0.8)
            a, _, mats = prepare_pair(white, white, spec, 9 if out_hw[0] < 100 else 5, *out_hw)
            clip = warp_frames(a, mats, out_hw, border=cv2.BORDER_CONSTANT)
            assert clip.min() == 255, (kind, in_hw, seed, spec["motion"])


def test_paper_ranges_and_rotate_drawn_twice_as_often():
    rng = np.random.default_rng(0)
    draws = [draw_motion(rng, Clips().motion_mix, 0.2) for _ in range(4000)]
    kinds = Counter(d["kind"] for d in draws)
    assert set(kinds) == {
        "static",
        "zoom_in",
        "zoom_out",
        "slide_left",
        "slide_right",
        "slide_up",
        "slide_down",
        "rotate",
    }
    assert kinds["static"] / 4000 == pytest.approx(0.2, abs=0.03)
    assert kinds["rotate"] / kinds["zoom_in"] == pytest.approx(2.0, rel=0.25)
    for d in draws:
        if d["kind"].startswith("zoom"):
            assert 1.2 <= d["factor"] <= 2.0
        elif d["kind"].startswith("slide"):
            assert 100 <= d["distance"] <= 200
        elif d["kind"] == "rotate":
            assert -20 <= d["angle"] <= 20 and d["crop"] == 1.5
    assert draw_motion(rng, ALL_MIX, 1.0) == {"kind": "static"}
    with pytest.raises(ValueError, match="unknown motion"):
        draw_motion(rng, {"spin": 1.0}, 0.0)


def test_trajectory_geometry():
    h, w = 480, 832
    c = np.array([(w - 1) / 2, (h - 1) / 2, 1.0])
    zoom = camera_path({"kind": "zoom_in", "factor": 1.6}, 9, h, w)
    assert zoom[0] == pytest.approx(np.eye(3)) and zoom[-1][0, 0] == pytest.approx(1.6)
    np.testing.assert_allclose(zoom @ c, np.repeat(c[None], 9, 0))  # zooms about the centre
    slide = camera_path({"kind": "slide_right", "distance": 150.0}, 9, h, w)
    assert slide[0][0, 2] - slide[-1][0, 2] == pytest.approx(150.0 * w / REFERENCE_WIDTH)  # view moves right
    rot = camera_path({"kind": "rotate", "angle": 20.0}, 9, h, w)
    assert np.degrees(np.arctan2(rot[-1][1, 0], rot[-1][0, 0])) == pytest.approx(20.0)
    # rotation keeps the reference's 1.5x crop at least, and more when 1.5x would show corners
    mats = frame_matrices({"kind": "rotate", "angle": 20.0, "crop": 1.5}, (480, 832), (h, w), 9)
    assert mats[0][0, 0] >= 1.5


def test_source_photometric_changes_only_the_source():
    grid = coordinate_grid()
    plain = spec_of("zoom_in", seed=2)
    jitter = {**plain, "photometric": 7}
    s0, t0 = render_pair(grid, grid, plain, 5, 32, 48)
    s1, t1 = render_pair(grid, grid, jitter, 5, 32, 48)
    np.testing.assert_array_equal(t0, t1)
    assert not np.array_equal(s0, s1)


def test_clip_size_is_enforced():
    grid = coordinate_grid()
    spec = spec_of("static")
    with pytest.raises(ValueError, match="4n\\+1"):
        render_pair(grid, grid, spec, 8, 32, 48)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        render_pair(grid, grid, spec, 9, 40, 48)
    with pytest.raises(ParamsError, match="profiles.tiny.frames"):
        parse_params({"profiles": {"tiny": {"backbone": "tiny", "frames": 8, "height": 32, "width": 48}}})
