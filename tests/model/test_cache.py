"""The VACE step cache: exact when off, reuses VACE + main blocks together when on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pickstyle.config import TinyBackbone
from pickstyle.model.cache import CALIBRATIONS, StepCache, calibration_key, step_cache
from pickstyle.model.components import load_pipeline, tiny_latent_geometry
from pickstyle.model.pipeline import PickStylePipeline

HEIGHT, WIDTH = 32, 48
C, F, LH, LW = tiny_latent_geometry(TinyBackbone(), 5, HEIGHT, WIDTH)
Z = TinyBackbone().vae_z_dim  # latent channels


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_backbone):
    return load_pipeline(tiny_backbone, "cpu", pipeline_cls=PickStylePipeline)


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    return (np.random.default_rng(1).random((5, HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)


def _inputs(transformer, batch: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, Z, F, LH, LW, generator=g),
        "timestep": torch.full((batch,), 500.0),
        "encoder_hidden_states": torch.randn(batch, 8, transformer.config.text_dim, generator=g),
        "control_hidden_states": torch.randn(batch, C, F, LH, LW, generator=g),
        "return_dict": False,
    }


def _count_calls(module: torch.nn.Module, counter: dict, key: str):
    def hook(*_):
        counter[key] = counter.get(key, 0) + 1

    return module.register_forward_pre_hook(hook)


def test_cached_forward_computes_exactly_the_stock_forward(pipe):
    transformer = pipe.transformer
    inputs = _inputs(transformer, batch=3)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        with step_cache(transformer, threshold=0.0):
            got = transformer(**inputs)[0]
    assert torch.equal(got, expected)
    assert "forward" not in transformer.__dict__  # the original forward is back


def test_threshold_zero_equals_no_cache(pipe, video):
    def run(**kw):
        out = pipe(
            video,
            "anime style. a wolf",
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=4,
            guidance="cs_cfg",
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            max_sequence_length=32,
            **kw,
        )
        return out.frames[0]

    plain = run()
    zero = run(cache_threshold=0.0)
    assert torch.equal(zero, plain)
    assert pipe.cache_stats == {"c+t+0": {"computed": 4, "reused": 0}}
    # with guidance reuse too (its steps in between are batch-1 "c" calls with their own cache state)
    cached = run(guidance_every=2, cache_threshold=0.0)
    assert pipe.cache_stats == {"c+t+0": {"computed": 2, "reused": 0}, "c": {"computed": 2, "reused": 0}}
    assert torch.equal(cached, run(guidance_every=2))


def test_reuse_skips_vace_and_main_blocks_together(pipe):
    """Same input twice: a reused step must give the computed output (hints not added a second time)."""
    transformer = pipe.transformer
    inputs = _inputs(transformer)
    calls: dict[str, int] = {}
    handles = [
        _count_calls(transformer.blocks[0], calls, "main"),
        _count_calls(transformer.vace_blocks[0], calls, "vace"),
    ]
    try:
        with torch.no_grad(), step_cache(transformer, threshold=0.5, coefficients=None) as cache:
            first = transformer(**inputs)[0]
            second = transformer(**inputs)[0]
    finally:
        for h in handles:
            h.remove()
    assert calls == {"main": 1, "vace": 1}  # the second call skipped both stacks
    assert cache.stats() == {"default": {"computed": 1, "reused": 1}}
    torch.testing.assert_close(second, first, atol=1e-5, rtol=1e-5)


def test_branches_keep_separate_state(pipe):
    transformer = pipe.transformer
    a, b = _inputs(transformer, seed=0), _inputs(transformer, seed=1)
    with torch.no_grad(), step_cache(transformer, threshold=0.5, coefficients=None) as cache:
        with cache.branch("cond"):
            out_a = transformer(**a)[0]
        with cache.branch("uncond"):
            out_b = transformer(**b)[0]  # first call of this branch: computed, not cond's residual
        with cache.branch("uncond"):
            again_b = transformer(**b)[0]
    assert cache.stats() == {"cond": {"computed": 1, "reused": 0}, "uncond": {"computed": 1, "reused": 1}}
    torch.testing.assert_close(again_b, out_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_a, out_b)


def test_large_threshold_reuses_steps_and_stays_close(pipe, video):
    def run(threshold):
        return pipe(
            video,
            "anime style. a wolf",
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=8,
            guidance="cs_cfg",
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            max_sequence_length=32,
            cache_threshold=threshold,
        ).frames[0]

    plain = run(None)
    cached = run(10.0)
    stats = pipe.cache_stats["c+t+0"]
    # warmup step and last step are always computed; everything between is reused at a huge threshold
    assert stats == {"computed": 2, "reused": 6}
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, plain)


def test_rule_accumulates_and_resets():
    cache = StepCache(threshold=0.25, warmup=1, num_steps=10)
    x = torch.ones(1, 4, 3)
    decisions = [cache.should_reuse(x * (1 + 0.1 * i), x.shape) for i in range(3)]
    assert decisions == [False, False, False]  # no residual stored yet: nothing to reuse
    cache.store(torch.zeros(1, 4, 3))
    cache.reset(num_steps=10)
    cache.should_reuse(x, x.shape)
    cache.store(torch.zeros(1, 4, 3))
    # relative changes 0.1 each: accumulated 0.1, 0.2 (< 0.25: reuse), then 0.3 >= 0.25 (compute and reset)
    got = [cache.should_reuse(x * (1 + 0.1 * (i + 1)), x.shape) for i in range(3)]
    assert got == [True, True, False]
    with pytest.raises(ValueError):
        StepCache(threshold=-1.0)


def test_calibrated_distance_never_negative_and_tiny_backbone_calibrated(pipe):
    assert calibration_key(pipe.transformer) in CALIBRATIONS  # so the pipeline tests above ran rescaled
    # a fitted polynomial that dips below zero must not make threshold 0 reuse anything
    cache = StepCache(threshold=0.0, warmup=1, num_steps=10, coefficients=[-1.0, 0.0])
    x = torch.ones(1, 4, 3)
    cache.should_reuse(x, x.shape)
    cache.store(torch.zeros(1, 4, 3))
    assert not any(cache.should_reuse(x * (1 + 0.1 * i), x.shape) for i in range(1, 5))
    rescaled = StepCache(threshold=1.0, warmup=1, num_steps=10, coefficients=[0.0, 0.6])  # 0.6 per step
    rescaled.should_reuse(x, x.shape)
    rescaled.store(torch.zeros(1, 4, 3))
    assert [rescaled.should_reuse(x, x.shape) for _ in range(3)] == [True, False, True]


def test_calibration_pairs_are_recorded(pipe, video):
    pipe(
        video,
        "anime style. a wolf",
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=3,
        guidance="cs_cfg",
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        max_sequence_length=32,
        cache_threshold=0.0,
    )
    assert len(pipe.cache_pairs) == 2 and all(x >= 0 and y > 0 for x, y in pipe.cache_pairs)
