"""PickStylePipeline invariants on the tiny backbone (5 frames, 32x48, 2 steps)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from pickstyle.config import WAN_NEGATIVE_PROMPT
from pickstyle.model.components import load_pipeline
from pickstyle.model.pipeline import PickStylePipeline
from pickstyle.model.schedulers import make_scheduler

FRAMES, HEIGHT, WIDTH, STEPS = 5, 32, 48, 2
PROMPT = "anime style. a wolf in the snow"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(tiny_backbone):
    return load_pipeline(tiny_backbone, "cpu", pipeline_cls=PickStylePipeline)


@pytest.fixture(scope="module")
def video() -> np.ndarray:
    rng = np.random.default_rng(0)
    coarse = rng.random((FRAMES, 4, 6, 3))
    big = coarse.repeat(HEIGHT // 4, axis=1).repeat(WIDTH // 6, axis=2)
    return (big * 255).astype(np.uint8)


def run(pipe, video, seed=0, **kwargs) -> np.ndarray:
    """Final latents by default (``output_type="latent"``: the VAE decode would dominate the test time)."""
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("max_sequence_length", 32)
    kwargs.setdefault("output_type", "latent")
    out = pipe(
        video,
        kwargs.pop("prompt", PROMPT),
        kwargs.pop("negative_prompt", None),
        height=HEIGHT,
        width=WIDTH,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return np.asarray(out.frames[0])


@pytest.fixture(scope="module")
def pipe_2x_time(tmp_path_factory):
    """A random-init tiny backbone whose VAE halves time: diffusers' stock ``WanVACEPipeline`` cannot run a VAE
    with 1x temporal compression (it "rounds" 4n+1 frames to 4n+2), the pretrained tiny backbone's."""
    from pickstyle.config import TinyBackbone
    from pickstyle.model.components import build_tiny_backbone

    folder = build_tiny_backbone(
        tmp_path_factory.mktemp("t2") / "b", TinyBackbone(vae_temporal_downsample=[True], vae_framewise=False)
    )
    return load_pipeline(folder, "cpu", pipeline_cls=PickStylePipeline)


def test_cfg_reproduces_stock_wan_vace(pipe_2x_time, video):
    from diffusers import WanVACEPipeline

    pipe = pipe_2x_time
    stock = WanVACEPipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    expected = (
        stock(
            video=[PIL.Image.fromarray(f) for f in video],
            prompt=PROMPT,
            negative_prompt=WAN_NEGATIVE_PROMPT,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            max_sequence_length=32,
            output_type="latent",
        )
        .frames[0]
        .numpy()
    )
    sequential = run(pipe, video, guidance="cfg", t_guide=5.0, batched=False)
    np.testing.assert_array_equal(sequential, expected)
    batched = run(pipe, video, guidance="cfg", t_guide=5.0, batched=True)
    np.testing.assert_allclose(batched, expected, atol=1e-4)


def test_cs_cfg_with_zero_context_guidance_equals_cfg(pipe, video):
    a = run(pipe, video, guidance="cfg", batched=False)
    b = run(pipe, video, guidance="cs_cfg", c_guide=0.0, batched=False)
    np.testing.assert_array_equal(a, b)
    c = run(pipe, video, guidance="cs_cfg", c_guide=4.0, batched=False)
    assert np.abs(a - c).max() > 1e-3


def test_batched_equals_sequential(pipe, video):
    for guidance in ("cs_cfg", "cs_cfg_apg"):
        a = run(pipe, video, guidance=guidance, batched=True)
        b = run(pipe, video, guidance=guidance, batched=False)
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=guidance)


def test_seeded_and_default_negative_prompt(pipe, video):
    a = run(pipe, video, seed=3)
    np.testing.assert_array_equal(a, run(pipe, video, seed=3, negative_prompt=WAN_NEGATIVE_PROMPT))
    assert np.abs(a - run(pipe, video, seed=4)).max() > 1e-3
    assert np.abs(a - run(pipe, video, seed=3, negative_prompt="")).max() > 0  # empty allowed, and different


def test_precomputed_prompt_embeds(pipe, video):
    embeds, negative = pipe.encode_prompt(PROMPT, WAN_NEGATIVE_PROMPT, max_sequence_length=32, device="cpu")
    a = run(pipe, video, guidance="cs_cfg")
    b = run(
        pipe, video, guidance="cs_cfg", prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative
    )
    np.testing.assert_allclose(a, b, atol=1e-4)  # float32 summation order differs slightly


@pytest.mark.parametrize("scheduler", ["unipc", "dpmpp", "euler"])
def test_skip_runs_exactly_steps_k_to_n(pipe, video, scheduler):
    steps, skip = 4, 2
    seen: list[float] = []

    def hook(module, args, kwargs):
        seen.append(float(kwargs["timestep"][0]))

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = run(
            pipe,
            video,
            guidance="cs_cfg",
            scheduler=scheduler,
            shift=16.0,
            num_inference_steps=steps,
            skip=skip,
        )
    finally:
        handle.remove()
    reference = make_scheduler(scheduler, 16.0)
    reference.set_timesteps(steps)
    assert seen == [float(t) for t in reference.timesteps[skip:]]  # one batch-3 forward per step k..N-1
    assert np.isfinite(out).all()


def test_skip_starts_from_the_source(pipe, video):
    # the last step of a 20-step schedule barely changes the noised source latent: the output follows the
    # source video much more closely than a from-noise run does
    src = video.astype(np.float32) / 255
    kw = {"guidance": "none", "scheduler": "euler", "shift": 1.0, "output_type": "np"}
    late = run(pipe, video, num_inference_steps=20, skip=19, **kw)
    noise = run(pipe, video, num_inference_steps=2, **kw)
    assert np.abs(late - src).mean() < np.abs(noise - src).mean()


def test_rejects_wrong_size_and_skip(pipe, video):
    with pytest.raises(ValueError, match="height, width"):
        pipe(video, PROMPT, height=HEIGHT + 16, width=WIDTH, num_inference_steps=1, max_sequence_length=32)
    with pytest.raises(ValueError, match="skip"):
        run(pipe, video, skip=STEPS)
    with pytest.raises(ValueError, match="4n\\+1"):
        pipe(video[:4], PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=1, max_sequence_length=32)


# The single-window output recorded before long videos were joined in latent space (cs_cfg, 2 steps, seed 0):
# sha256 prefix on this machine's torch build, and summary values that survive other CPUs' float ordering.
# (Re-recorded for the backbone whose transformer trains a second cosine cycle.)
_RECORDED = {"sha256": "e8f246136a8d0e1c", "mean": -0.08865906298160553, "abs_mean": 5.049782752990723}
#: Where the bits were recorded: torch build and CPU model (``/proc/cpuinfo``).
_RECORDING_BUILD = ("2.13.0+cpu", "AMD EPYC")


def _build() -> tuple[str, str]:
    try:
        cpu = next(line for line in open("/proc/cpuinfo") if line.startswith("model name")).split(":", 1)[1]
    except (OSError, StopIteration):
        cpu = "?"
    return torch.__version__, cpu.strip()


def test_single_window_is_unchanged(pipe, video):
    """Machine-independent: the recorded summary values, and a window as long as the clip (or longer) is the same
    single-window run bit for bit (both computed here)."""
    plain = run(pipe, video, guidance="cs_cfg")
    assert plain.mean() == pytest.approx(_RECORDED["mean"], abs=1e-4)
    assert np.abs(plain).mean() == pytest.approx(_RECORDED["abs_mean"], abs=1e-4)
    for window_frames in (5, 9):
        np.testing.assert_array_equal(run(pipe, video, guidance="cs_cfg", window_frames=window_frames), plain)


def test_single_window_bits_on_the_recording_build(pipe, video):
    """The exact bits recorded on the development machine's torch build (other CPUs order floats differently:
    there the test above is the check, and this one is skipped)."""
    import hashlib

    if _build() != _RECORDING_BUILD:
        pytest.skip(
            f"recorded on {_RECORDING_BUILD}, this is {_build()}: the summary values are checked above"
        )
    digest = hashlib.sha256(run(pipe, video, guidance="cs_cfg").tobytes()).hexdigest()[:16]
    assert digest == _RECORDED["sha256"]


def test_long_clip_is_one_latent_in_windows(pipe):
    frames = (
        17  # 9-frame windows overlapping by >= 4: starts 0, 4, 8 (the tiny VAE keeps time: 17 latent frames)
    )
    rng = np.random.default_rng(2)
    long_video = (rng.random((frames, 4, 6, 3)).repeat(8, axis=1).repeat(8, axis=2) * 255).astype(np.uint8)
    seen: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].shape[2]), with_kwargs=True
    )
    try:
        out = run(pipe, long_video, guidance="cs_cfg", window_frames=9, cache_threshold=0.0, output_type="np")
    finally:
        handle.remove()
    assert seen == [9] * 3 * STEPS  # every step denoises every window (one batch-3 forward each)
    assert set(pipe.cache_stats) == {
        "c+t+0@0",
        "c+t+0@1",
        "c+t+0@2",
    }  # the step cache keeps one state per window
    assert out.shape == (frames, HEIGHT, WIDTH, 3) and np.isfinite(out).all()
    assert all(f.std() > 0 for f in out)
    again = run(pipe, long_video, guidance="cs_cfg", window_frames=9, output_type="np")
    np.testing.assert_array_equal(again, out)  # one seed, one video (threshold 0 = no cache)


def test_guidance_reuse_computes_the_extra_predictions_every_k_steps(pipe, video):
    batches: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        exact = run(pipe, video, guidance="cs_cfg", num_inference_steps=4)
        batches.clear()
        every2 = run(pipe, video, guidance="cs_cfg", num_inference_steps=4, guidance_every=2)
        assert batches == [3, 1, 3, 1]  # CFG's price: 2 predictions per step on average
        batches.clear()
        context = run(
            pipe, video, guidance="cs_cfg", num_inference_steps=4, guidance_every=2, guidance_reuse="context"
        )
        assert batches == [3, 2, 3, 2]
    finally:
        handle.remove()
    # an approximation: different from the exact run, and closer to it than its own size (RMS ratio measured 0.73
    # and 0.72 on the committed backbone at the pipeline's default t_g 5 / c_g 4; reused directions at 2 of 4 steps)
    rms = lambda a: float(np.sqrt(np.mean(np.square(a))))  # noqa: E731
    for fast in (every2, context):
        assert np.isfinite(fast).all() and 0 < rms(fast - exact) < 0.9 * rms(exact)
    # no guidance (t_g = 1, c_g = 0) leaves only ε_c, whatever is reused
    plain = run(pipe, video, guidance="none", num_inference_steps=4)
    unguided = run(
        pipe, video, guidance="cs_cfg", t_guide=1.0, c_guide=0.0, num_inference_steps=4, guidance_every=2
    )
    np.testing.assert_allclose(unguided, plain, atol=1e-4)


def test_reuse_guidance_keeps_the_directions():
    from pickstyle.model.guidance import cs_cfg
    from pickstyle.model.guiders import reuse_guidance

    g = torch.Generator().manual_seed(0)
    eps = {b: torch.randn(1, 2, 3, generator=g) for b in ("c", "t", "0")}
    offsets: dict[str, torch.Tensor] = {}
    assert reuse_guidance(eps, ("c", "t", "0"), offsets, full=True) is eps
    new_c = torch.randn(1, 2, 3, generator=g)
    rebuilt = reuse_guidance({"c": new_c}, ("c", "t", "0"), offsets, full=False)
    expected = new_c + (5.0 - 1) * (eps["c"] - eps["t"]) + 4.0 * (eps["t"] - eps["0"])
    torch.testing.assert_close(cs_cfg(rebuilt["c"], rebuilt["t"], rebuilt["0"], 5.0, 4.0), expected)
    new_t = torch.randn(1, 2, 3, generator=g)
    rebuilt = reuse_guidance({"c": new_c, "t": new_t}, ("c", "t", "0"), offsets, full=False)
    torch.testing.assert_close(rebuilt["t"] - rebuilt["0"], eps["t"] - eps["0"])  # only the context direction


def test_plan_windows_and_weights():
    from pickstyle.model.windows import plan_windows, window_weights

    assert plan_windows(17, 9, 4) == [(0, 9), (4, 13), (8, 17)]
    assert plan_windows(21, 21, 4) == [(0, 21)]
    assert window_weights(5).tolist() == [1.0, 2.0, 3.0, 2.0, 1.0]


def test_adapter_changes_output_and_scale_zero_restores_base(tiny_backbone, video, tmp_path):
    from diffusers import WanVACETransformer3DModel

    from pickstyle.model.adapters import add_context_style_adapter, load_adapter, save_adapter

    transformer = WanVACETransformer3DModel.from_pretrained(tiny_backbone / "transformer")
    add_context_style_adapter(transformer, rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:  # B starts at zero (no effect): make the adapter do something
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    save_adapter(transformer, tmp_path / "adapter")

    pipe = load_pipeline(tiny_backbone, "cpu", pipeline_cls=PickStylePipeline)
    base = run(pipe, video, guidance="cs_cfg")
    load_adapter(pipe, tmp_path / "adapter", scale=1.0)
    styled = run(pipe, video, guidance="cs_cfg")
    assert np.abs(styled - base).max() > 1e-3
    load_adapter(pipe, tmp_path / "adapter", scale=0.0)
    np.testing.assert_allclose(run(pipe, video, guidance="cs_cfg"), base, atol=1e-6)


def test_guidance_that_adds_nothing_computes_one_prediction() -> None:
    """t_g = 1 (and c_g = 0 for CS-CFG, the tiny profile's default) is the conditional prediction alone: one
    forward pass a step, not two or three; any other scale keeps the mode's branches."""
    from pickstyle.model.guiders import make_guider

    for mode, c_guide in (("cfg", 4.0), ("cfg_joint", 4.0), ("cs_cfg", 0.0)):
        guider = make_guider(mode, t_guide=1.0, c_guide=c_guide)
        assert guider.branches == ("c",) and guider.name == "none", mode
    assert make_guider("cs_cfg", t_guide=1.0, c_guide=0.1).branches == ("c", "t", "0")
    assert make_guider("cs_cfg", t_guide=1.5, c_guide=0.0).branches == ("c", "t", "0")
    assert make_guider("cs_cfg_apg", t_guide=1.0, c_guide=0.0).branches == ("c", "t", "0")  # other convention
    eps = {"c": torch.randn(1, 4, 2, 3, 3), "t": torch.randn(1, 4, 2, 3, 3), "0": torch.randn(1, 4, 2, 3, 3)}
    full = make_guider("cs_cfg", t_guide=1.25, c_guide=0.0).combine(eps)
    torch.testing.assert_close(make_guider("cs_cfg", t_guide=1.0, c_guide=0.0).combine(eps), eps["c"])
    assert not torch.allclose(full, eps["c"])
