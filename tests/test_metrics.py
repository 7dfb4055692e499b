"""Weight-free metrics: flow and occlusion, warp error, structure, edges, PSNR, colour, the optional CLIP score."""

import math

import numpy as np
import pytest

from pickstyle import metrics
from tests.conftest import H, T, W


def _noised(video: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, video.shape)
    return np.clip(video.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def test_flow_recovers_the_pan(source, flows):
    fwd, bwd = flows[0]
    inner = (slice(8, -8), slice(8, -8))
    # frame t+1 = frame t moved by (-3, -1): the content at (x, y) in t is at (x-3, y-1) in t+1.
    assert np.median(fwd[inner][..., 0]) == pytest.approx(-3, abs=0.3)
    assert np.median(fwd[inner][..., 1]) == pytest.approx(-1, abs=0.3)
    assert np.median(bwd[inner][..., 0]) == pytest.approx(3, abs=0.3)


def test_occlusion_mask_shape_and_range(flows):
    fwd, bwd = flows[0]
    mask = metrics.occlusion_mask(fwd, bwd)
    assert mask.shape == (H, W) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    # The pan moves content left: the pixels of the left border leave the frame and must be masked out.
    assert mask[:, :2].mean() < 0.5
    assert 0.5 < mask.mean() < 1.0


def test_occlusion_mask_flags_inconsistent_flow():
    fwd = np.zeros((8, 8, 2), np.float32)
    bwd = np.zeros((8, 8, 2), np.float32)
    bwd[2:4, 2:4] = 5.0  # the way back disagrees here
    mask = metrics.occlusion_mask(fwd, bwd)
    assert mask[2:4, 2:4].sum() == 0 and mask.sum() == 64 - 4


def test_identical_video_scores_like_the_source(source, flows):
    scores = metrics.score_clip(source.copy(), source, source, flows)
    assert scores["warp_error"] == pytest.approx(metrics.warp_error(source, flows=flows))
    assert scores["warp_error"] == pytest.approx(metrics.warp_error(source, source))
    assert scores["structure_ssim"] == pytest.approx(1.0)
    assert scores["edge_f1"] == pytest.approx(1.0)
    assert scores["style_psnr"] == metrics.PSNR_MAX_DB
    assert scores["style_ssim"] == pytest.approx(1.0)
    assert scores["color_dist"] == pytest.approx(0.0, abs=1e-6)
    assert scores["texture_dist"] == pytest.approx(0.0)


def test_source_warp_error_is_small(source, flows):
    # A pure pan warps almost exactly; per-frame noise does not.
    assert metrics.warp_error(source, flows=flows) < 2e-3
    per_frame = metrics.warp_error_per_frame(_noised(source, 20), flows=flows)
    assert per_frame.shape == (T - 1,)
    assert np.all(per_frame > 0.005)


def test_more_noise_is_worse(source, flows):
    light, heavy = _noised(source, 5), _noised(source, 30)
    assert metrics.warp_error(light, flows=flows) < metrics.warp_error(heavy, flows=flows)
    assert metrics.psnr(light, source) > metrics.psnr(heavy, source)
    assert metrics.structure_ssim(light, source) > metrics.structure_ssim(heavy, source)


def test_psnr_formula():
    a = np.zeros((1, 4, 4, 3), np.uint8)
    b = np.full((1, 4, 4, 3), 255, np.uint8)
    assert metrics.psnr(a, b) == pytest.approx(0.0)
    c = np.full((1, 4, 4, 3), 51, np.uint8)  # MSE = 0.2² = 0.04 -> 13.98 dB
    assert metrics.psnr(a, c) == pytest.approx(10 * math.log10(1 / 0.04))


def test_color_distance_sees_a_tint(source):
    tinted = source.copy()
    tinted[..., 0] = np.clip(tinted[..., 0].astype(int) + 60, 0, 255)
    assert metrics.color_distance(tinted, source) > 3.0
    assert metrics.color_distance(source, source) == pytest.approx(0.0, abs=1e-6)


def test_shape_mismatch_is_a_clear_error(source):
    with pytest.raises(metrics.MetricsError, match="differ in shape"):
        metrics.structure_ssim(source[:3], source)
    with pytest.raises(metrics.MetricsError, match="uint8"):
        metrics.psnr(source.astype(np.float32), source)


def test_clip_score_from_a_local_folder(tiny_clip, source, tmp_path):
    scorer = metrics.ClipScorer(tiny_clip)
    a = scorer(source, "sepia style. an astronaut")
    assert -1.0 <= a <= 1.0 and a == pytest.approx(scorer(source, "sepia style. an astronaut"))
    assert a != pytest.approx(scorer(source, "anime noise"))
    with pytest.raises(metrics.MetricsError, match="not a folder"):
        metrics.ClipScorer(tmp_path / "missing")


def test_degraded_videos_score_worse(source, flows):
    ident = metrics.score_clip(source, source, source, flows)
    noised = metrics.score_clip(_noised(source, 20), source, source, flows)
    # a video whose content does not follow the source's motion: every frame is the first one
    frozen = np.repeat(source[:1], T, axis=0)
    assert noised["warp_error"] > 5 * ident["warp_error"]
    assert metrics.warp_error(frozen, flows=flows) > 5 * ident["warp_error"]
    assert noised["structure_ssim"] < 0.9
    assert noised["edge_f1"] < 0.9
    assert 10 < noised["style_psnr"] < 40
    assert noised["style_ssim"] < 0.9
    assert noised["texture_dist"] > 0.05
    shifted = np.roll(source, 4, axis=2)
    assert metrics.structure_ssim(shifted, source) < 0.9
    assert metrics.edge_f1(shifted, source) < metrics.edge_f1(source, source)


def test_edge_f1_edge_cases():
    flat = np.full((2, 16, 16, 3), 128, np.uint8)
    assert metrics.edge_f1(flat, flat) == 1.0
    square = flat.copy()
    square[:, 4:12, 4:12] = 255
    assert metrics.edge_f1(square, flat) == 0.0
