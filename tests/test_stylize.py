"""`pickstyle stylize`: any input video -> mp4 at the source fps; clear one-line errors, never a partial output."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest

from pickstyle.cli import main
from pickstyle.data.video import read_video, write_video
from pickstyle.model.windows import plan_windows
from pickstyle.stylize import resample_frames

PROMPT = "anime style. a wolf in the snow"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models_dir(tiny_backbone) -> Path:
    """The models folder holding the pretrained tiny backbone (no adapter: the base model stylizes)."""
    return tiny_backbone.parent


@pytest.fixture(autouse=True)
def _workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the embedded defaults (tiny profile)


def _clip(path: Path, frames: int, height: int, width: int, fps: float) -> Path:
    t = np.linspace(0, 1, frames)[:, None, None, None]
    y = np.linspace(0, 1, height)[None, :, None, None]
    x = np.linspace(0, 1, width)[None, None, :, None]
    shape = (frames, height, width, 1)
    channels = [x, (y + t) % 1, (x * y + t) % 1]  # a pattern that moves with time
    rgb = np.concatenate([np.broadcast_to(c, shape) for c in channels], axis=-1) * 255
    return write_video(path, rgb.astype(np.uint8), fps)


def _stylize(input: Path, output: Path, models_dir: Path, *extra: str) -> int:
    return main(
        [
            "stylize",
            str(input),
            "-o",
            str(output),
            "--prompt",
            PROMPT,
            "--steps",
            "2",
            "--device",
            "cpu",
            "-S",
            f"paths.models={models_dir}",
            *extra,
        ]
    )


def _zero_frame_mp4(path: Path) -> Path:
    import av

    container = av.open(str(path), "w", format="mp4")
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()
    container.close()
    return path


@pytest.mark.parametrize("kind", ["missing", "zero_bytes", "text", "zero_frames"])
def test_bad_inputs_fail_with_one_line_and_no_output(kind, tmp_path, models_dir, capsys):
    src = tmp_path / f"in_{kind}.mp4"
    if kind == "zero_bytes":
        src.write_bytes(b"")
    elif kind == "text":
        src.write_text("this is not a video\n")
    elif kind == "zero_frames":
        _zero_frame_mp4(src)
    out = tmp_path / "out" / "result.mp4"
    assert _stylize(src, out, models_dir) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and src.name in err[0], err
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no temp file left behind either


def test_missing_adapter_fails_cleanly(tmp_path, models_dir, capsys):
    src = _clip(tmp_path / "in.mp4", 5, 40, 60, 12)
    out = tmp_path / "result.mp4"
    assert _stylize(src, out, models_dir, "--adapter", str(tmp_path / "nope")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter" in err[0]
    assert not out.exists()


def test_per_style_adapters_follow_the_prompt(tmp_path, models_dir, tiny_backbone, capsys):
    """A per-style folder (the tiny profile's ``models/adapter``): the prompt's style, or ``--style``, picks the
    adapter; a prompt naming none of its styles fails before anything is written."""
    from tests.projects import random_style_adapters

    adapters = random_style_adapters(tiny_backbone, tmp_path / "adapter", ("anime", "sepia"))
    src = _clip(tmp_path / "in.mp4", 5, 40, 60, 8)
    outs = {}
    for name, extra in {
        "anime": (),  # PROMPT is "anime style. ..."
        "anime_alone": ("--adapter", str(adapters / "anime")),
        "sepia": ("--style", "sepia"),
    }.items():
        extra = extra if name == "anime_alone" else ("--adapter", str(adapters), *extra)
        assert _stylize(src, tmp_path / f"{name}.mp4", models_dir, *extra) == 0
        outs[name], _ = read_video((tmp_path / f"{name}.mp4").read_bytes())
    np.testing.assert_array_equal(outs["anime"], outs["anime_alone"])
    assert not np.array_equal(outs["anime"], outs["sepia"])
    capsys.readouterr()
    argv = ["stylize", str(src), "-o", str(tmp_path / "oil.mp4"), "--prompt", "Oil style. a wolf"]
    assert main([*argv, "--adapter", str(adapters), "-S", f"paths.models={models_dir}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names none of the styles" in err[0] and "anime, sepia" in err[0], err
    assert not (tmp_path / "oil.mp4").exists()


def test_long_clip_in_windows_keeps_fps_and_frame_count(tmp_path, models_dir):
    src = _clip(tmp_path / "in.mov", 12, 40, 60, 12.0)  # > 9 frames: one latent denoised in two windows
    out = tmp_path / "result.mp4"
    assert _stylize(src, out, models_dir) == 0
    frames, fps = read_video(out)
    assert frames.shape == (12, 64, 96, 3)
    assert fps == pytest.approx(12.0)


def test_long_video_is_one_latent_denoised_in_windows(tmp_path, models_dir, monkeypatch):
    from pickstyle.model.pipeline import PickStylePipeline

    calls, real = [], PickStylePipeline.__call__

    def spy(self, video, *args, **kw):
        calls.append((len(video), kw["window_frames"], kw["window_overlap"]))
        return real(self, video, *args, **kw)

    monkeypatch.setattr(PickStylePipeline, "__call__", spy)
    src = _clip(tmp_path / "in.mp4", 22, 40, 60, 8.0)  # the profile's 8 fps: 22 model frames, > 9
    out = tmp_path / "long.mp4"
    assert _stylize(src, out, models_dir) == 0
    assert calls == [(25, 9, 4)]  # one call for the whole video (padded to 4n+1), 9-frame windows
    frames, fps = read_video(out)
    assert frames.shape == (22, 64, 96, 3) and fps == pytest.approx(8.0)
    assert all(f.std() > 0 for f in frames)  # every frame rendered


def test_side_by_side_short_clip(tmp_path, models_dir):
    src = _clip(tmp_path / "in.mp4", 6, 48, 48, 7.5)  # 6 frames: padded to 9 internally, trimmed back
    out = tmp_path / "sbs.mp4"
    assert _stylize(src, out, models_dir, "--side-by-side", "--guidance", "cs_cfg_apg") == 0
    frames, fps = read_video(out)
    assert frames.shape == (6, 64, 192, 3)
    assert fps == pytest.approx(7.5)


def test_pad_fit_cuts_the_letterbox(tmp_path, models_dir):
    src = _clip(tmp_path / "in.mp4", 5, 40, 40, 10)
    out = tmp_path / "pad.mp4"
    assert _stylize(src, out, models_dir, "--fit", "pad", "--skip", "1") == 0
    frames, _ = read_video(out)
    assert frames.shape == (5, 64, 64, 3)


def test_cut_long_video_warns(tmp_path, models_dir, caplog):
    src = _clip(tmp_path / "in.mp4", 14, 40, 60, 10)
    out = tmp_path / "cut.mp4"
    with caplog.at_level(logging.WARNING, logger="pickstyle.stylize"):
        assert _stylize(src, out, models_dir, "--long", "cut") == 0
    assert read_video(out)[0].shape[0] == 11  # one 9-frame clip at the profile's 8 fps = 11 frames at 10 fps
    assert any("keeping the first 11 frames" in r.message for r in caplog.records)


def test_portrait_input_gets_the_portrait_size(tmp_path, models_dir):
    src = _clip(tmp_path / "phone.mp4", 5, 96, 54, 8)  # 9:16
    out = tmp_path / "portrait.mp4"
    assert _stylize(src, out, models_dir) == 0
    assert read_video(out)[0].shape == (5, 96, 64, 3)  # the tiny 64x96 turned, not a landscape crop
    assert _stylize(src, out, models_dir, "--orientation", "profile") == 0
    assert read_video(out)[0].shape == (5, 64, 96, 3)


def test_fps_is_resampled_for_the_model_and_the_duration_kept(tmp_path, models_dir, monkeypatch):
    import pickstyle.stylize as st

    seen, real = [], st.stylize_frames

    def spy(pipe, frames, *args, **kw):
        seen.append(len(frames))
        return real(pipe, frames, *args, **kw)

    monkeypatch.setattr(st, "stylize_frames", spy)
    src = _clip(tmp_path / "in.mp4", 24, 40, 60, 24.0)  # 1 s at 24 fps
    out = tmp_path / "out.mp4"
    assert _stylize(src, out, models_dir) == 0
    assert seen == [8]  # 1 s at the profile's 8 fps: the motion per frame the model was trained on
    frames, fps = read_video(out)
    assert frames.shape[0] == 24 and fps == pytest.approx(24.0)  # the source's rate and duration
    assert _stylize(src, out, models_dir, "--fps", "12") == 0
    frames, fps = read_video(out)
    assert frames.shape[0] == 12 and fps == pytest.approx(12.0)


def test_resample_frames_keeps_duration():
    frames = np.arange(30)[:, None, None, None]
    assert resample_frames(frames, 30, 30) is frames
    down = resample_frames(frames, 30, 10)
    assert down[:, 0, 0, 0].tolist() == list(range(0, 30, 3))
    up = resample_frames(down, 10, 30, count=30)
    assert len(up) == 30 and up[0, 0, 0, 0] == 0 and up[-1, 0, 0, 0] == 27


def test_real_video(tmp_path, models_dir, real_video):
    _, src_fps = read_video(real_video, max_frames=2)
    out = tmp_path / "wolf.mp4"
    assert _stylize(real_video, out, models_dir, "--max-frames", "13") == 0
    frames, fps = read_video(out)
    assert frames.shape == (13, 64, 96, 3)
    assert fps == pytest.approx(src_fps)


def test_plan_windows_cover_every_frame():
    assert plan_windows(5, 9, 4) == [(0, 5)]
    assert plan_windows(9, 9, 4) == [(0, 9)]
    for total in (10, 13, 14, 15, 40, 81):
        windows = plan_windows(total, 9, 4)
        assert windows[0][0] == 0 and windows[-1][1] == total
        assert all(e - s == 9 for s, e in windows)
        assert all(b[0] <= a[1] - 4 for a, b in itertools.pairwise(windows))  # overlap >= 4


def test_guidance_reuse_applies_to_cs_cfg_modes_only():
    from types import SimpleNamespace

    from pickstyle.config import Sample
    from pickstyle.stylize import stylize_frames

    seen = []

    def pipe(frames, *args, **kw):
        seen.append(kw["guidance_every"])
        return SimpleNamespace(frames=[np.zeros((len(frames), 16, 16, 3), np.float32)])

    frames = np.zeros((5, 16, 16, 3), np.uint8)
    for guidance in ("cs_cfg", "cs_cfg_apg", "cfg", "cfg_joint"):
        stylize_frames(pipe, frames, PROMPT, Sample(guidance=guidance, guidance_every=2))
    assert seen == [2, 2, 1, 1]  # cfg / cfg_joint (evaluate's baselines) stay exact
    assert Sample().guidance_every == 2  # the default: bench/RESULTS.md "sample"


def test_reconstruct_through_the_cli_returns_the_source(tmp_path, models_dir, real_video):
    """Pixels, not shapes: `pickstyle stylize --prompt "reconstruct. …" --guidance none` on the base model gives
    the (fitted) source video back, as the backbone was pretrained to."""
    from pickstyle.metrics import psnr
    from pickstyle.stylize import read_fitted

    out = tmp_path / "recon.mp4"
    argv = ["stylize", str(real_video), "-o", str(out), "--prompt", "reconstruct. a real video clip"]
    argv += ["--guidance", "none", "--max-frames", "9", "--device", "cpu", "-S", f"paths.models={models_dir}"]
    assert main(argv) == 0
    frames, _ = read_video(out)
    source, _, _ = read_fitted(real_video, 64, 96, "crop", 9)
    assert frames.shape == source.shape == (9, 64, 96, 3)
    # measured 18.67 dB on wolf.mp4 with the committed backbone (at 8 steps, the profile's sampling then; the backbone
    # pretrained 4,000 steps: 16.98, and 16.71 on the generated pan); noise alone gives ~8 dB
    assert psnr(frames, source) >= 15.0
