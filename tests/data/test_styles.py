"""The built-in styles: pure, deterministic, fast, and clearly different from each other and from the source."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import skimage.data

from pickstyle.config import Pairs
from pickstyle.data.styles import STYLES, apply_style, style_caption_name


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    """A real photo at the tiny profile's frame size (64 x 96)."""
    return cv2.resize(skimage.data.astronaut(), (96, 64), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def styled(frame: np.ndarray) -> dict[str, np.ndarray]:
    return {name: apply_style(name, frame) for name in STYLES}


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_registry_covers_the_default_styles():
    assert len(STYLES) >= 5
    assert set(Pairs().styles) <= set(STYLES)
    assert style_caption_name("anime") == "Anime"
    for name in STYLES:
        caption_name = style_caption_name(name)
        assert caption_name[0].isupper() and "." not in caption_name


@pytest.mark.parametrize("name", sorted(STYLES))
@pytest.mark.parametrize("hw", [(16, 16), (64, 96), (17, 33), (120, 200)])
def test_pure_deterministic_any_size(name: str, hw: tuple[int, int]):
    rgb = cv2.resize(skimage.data.coffee(), (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
    before = rgb.copy()
    out = apply_style(name, rgb)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.array_equal(rgb, before), "a style must not modify its input"
    assert np.array_equal(out, apply_style(name, rgb.copy())), "same input must give the same output"


def test_styles_differ_from_source_and_each_other(frame: np.ndarray, styled: dict[str, np.ndarray]):
    for name, out in styled.items():
        assert _mad(out, frame) > 20, f"{name} is too close to the source"
    for a, b in itertools.combinations(styled, 2):
        assert _mad(styled[a], styled[b]) > 25, f"{a} and {b} look alike"


def test_colour_and_texture_signatures(frame: np.ndarray, styled: dict[str, np.ndarray]):
    # Pencil sketch: grey, mostly paper white.
    sk = styled["sketch"].astype(int)
    assert np.array_equal(sk[..., 0], sk[..., 1]) and np.array_equal(sk[..., 1], sk[..., 2])
    assert sk.mean() > frame.mean() + 30
    # Sepia: warm toned (R >= G >= B nearly everywhere), little hue spread.
    se = styled["sepia"].astype(int)
    assert ((se[..., 0] >= se[..., 1]) & (se[..., 1] >= se[..., 2])).mean() > 0.97
    hue = cv2.cvtColor(styled["sepia"], cv2.COLOR_RGB2HSV)[..., 0]
    assert hue.std() < 0.5 * cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)[..., 0].std()
    # Pixel art: constant square blocks on a 6-level-per-channel palette.
    px = styled["pixel"]
    block = max(2, round(64 / 24))
    blocks = px[: 64 // block * block, : 96 // block * block].reshape(
        64 // block, block, 96 // block, block, 3
    )
    assert (blocks == blocks[:, :1, :, :1]).all()
    assert set(np.unique(px)) <= {0, 51, 102, 153, 204, 255}
    # Anime: flat cel colours (far fewer distinct colours than the photo) and dark outlines.
    an = styled["anime"]
    n_colours = len(np.unique(an.reshape(-1, 3), axis=0))
    assert n_colours < 0.6 * len(np.unique(frame.reshape(-1, 3), axis=0))
    assert (an.max(axis=2) < 40).mean() > 0.05
    # Watercolour: lighter and less saturated than the photo, smooth (less high-frequency energy).
    wc = styled["watercolor"]
    sat = cv2.cvtColor(wc, cv2.COLOR_RGB2HSV)[..., 1].mean()
    assert wc.mean() > frame.mean() + 15
    assert sat < cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)[..., 1].mean()


def test_unknown_style_lists_known(frame: np.ndarray):
    with pytest.raises(KeyError, match="known styles: anime"):
        apply_style("oil", frame)
    with pytest.raises(KeyError, match="known styles"):
        style_caption_name("oil")


@pytest.mark.parametrize(
    "bad", [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3), np.float32)]
)
def test_rejects_non_rgb_uint8(bad: np.ndarray):
    with pytest.raises(ValueError, match=r"uint8 \[h, w, 3\]"):
        apply_style("sepia", bad)
