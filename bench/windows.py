"""Long videos: windows joined in latent space during denoising vs independent windows + pixel cross-fade.

On the pretrained tiny backbone (models/backbone, no adapter: the base model follows a style prompt it was
pretrained on), the tiny profile's 9-frame windows overlapping by >= ``window_overlap`` frames, and the evaluate
defaults of the tiny profile (8 DPM++ steps, shift 16, cs_cfg t_g 2, c_g 1):

* **latent**: ``stylize_frames(..., window_frames=9)``: one VAE encode, one noise draw, every step denoises
  every window and averages the noise predictions of overlapping windows (tent weights), one decode;
* **pixel cross-fade** (the previous ``stylize``): each window stylized on its own (same seed), the decoded
  windows joined with tent weights.

Seam metric: d_i = mean |frame_{i+1} − frame_i| (uint8 scale). A transition is a *seam* when the set of
windows covering frame i differs from that of frame i+1 (a window starts or ends there), else *inside*.
Ratio = mean d over seams / mean d inside; 1 = seamless (the source's own ratio is printed as the reference:
its motion is not uniform either). With the default overlap most transitions are seams, so the ratio is
coarse; a visible seam or cross-fade ghost still shows as a ratio away from the source's. Times are the process's CPU seconds at one torch thread.

    python bench/windows.py [--frames 41] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from results import write_section  # bench/results.py (bench/ is on sys.path when run as a script)

from pickstyle.config import parse_params
from pickstyle.model.pipeline import PickStylePipeline
from pickstyle.model.windows import plan_windows
from pickstyle.stylize import stylize_frames

ROOT = Path(__file__).resolve().parents[1]
WOLF = ROOT / ".." / "shared" / "videos" / "wolf.mp4"


def blend_windows(windows: list[tuple[tuple[int, int], np.ndarray]], total: int) -> np.ndarray:
    """The previous join: per-frame weighted mean of decoded windows with tent weights (a linear cross-fade)."""
    first = windows[0][1]
    acc = np.zeros((total, *first.shape[1:]), np.float64)
    weight = np.zeros(total, np.float64)
    for (start, end), frames in windows:
        p = np.arange(end - start)
        tent = np.minimum(p + 1, end - start - p).astype(np.float64)
        acc[start:end] += frames.astype(np.float64) * tent[:, None, None, None]
        weight[start:end] += tent
    return np.clip(np.round(acc / weight[:, None, None, None]), 0, 255).astype(np.uint8)


def seam_ratio(video: np.ndarray, windows: list[tuple[int, int]]) -> tuple[float, float, float]:
    """(mean change across seams, mean change inside windows, their ratio) of a uint8 video."""
    d = np.abs(np.diff(video.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))  # [T - 1]
    covers = [frozenset(w for w, (s, e) in enumerate(windows) if s <= i < e) for i in range(len(video))]
    seam = np.array([covers[i] != covers[i + 1] for i in range(len(video) - 1)])
    a, b = float(d[seam].mean()), float(d[~seam].mean())
    return a, b, a / b


def procedural_clip(frames: int, height: int, width: int) -> tuple[np.ndarray, str]:
    """A long held-out test scene (moving cut-outs over a panning background) and its caption."""
    from pickstyle.data.clips import _settings
    from pickstyle.data.scenes import _photos, draw_scene, render_scene

    params = parse_params({})
    s = _settings(params)
    spec = draw_scene(0, s)
    descriptions = {pid: d for pid, d, _ in _photos()}
    return render_scene(spec, frames, height, width), f"anime style. {descriptions[spec['background']]}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=41, help="frames of the procedural clip (4n+1)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from pickstyle.model.components import load_pipeline

    params = parse_params({})
    profile = params.active
    sample = params.evaluate.sample  # the profile's eval steps and scales filled in
    pipe = load_pipeline(ROOT / "models" / "backbone", "cpu", pipeline_cls=PickStylePipeline)
    pipe.set_progress_bar_config(disable=True)
    h, w, length = profile.height, profile.width, profile.frames

    clips = [("procedural scene", *procedural_clip(args.frames, h, w))]
    if WOLF.is_file():
        from pickstyle.stylize import read_fitted

        wolf, _, _ = read_fitted(WOLF, h, w, "crop", max_frames=40)
        clips.append((f"wolf.mp4 ({len(wolf)} frames)", wolf, "anime style. a wolf walking in the snow"))

    rows = []
    for name, video, prompt in clips:
        windows = plan_windows(len(video), length, sample.window_overlap)
        t0 = time.process_time()
        latent = stylize_frames(pipe, video, prompt, sample, 0, window_frames=length)
        t_latent = time.process_time() - t0
        t0 = time.process_time()
        parts = [((s, e), stylize_frames(pipe, video[s:e], prompt, sample, 0)) for s, e in windows]
        pixel = blend_windows(parts, len(video))
        t_pixel = time.process_time() - t0
        # the tiny VAE keeps time: the latent windows are pixel windows over the video padded to 4n+1
        padded = 4 * ((len(video) - 1 + 3) // 4) + 1
        latent_windows = [
            (s, min(e, len(video))) for s, e in plan_windows(padded, length, sample.window_overlap)
        ]
        src = seam_ratio(video, windows)
        lat, pix = seam_ratio(latent, latent_windows), seam_ratio(pixel, windows)
        rows.append((name, len(video), len(windows), src, lat, pix, t_latent, t_pixel))
        print(
            f"{name}: seam/inside ratio latent {lat[2]:.3f}, pixel cross-fade {pix[2]:.3f} (source {src[2]:.3f}); "
            f"time latent {t_latent:.1f} s, pixel {t_pixel:.1f} s ({t_latent / t_pixel:.2f}x)",
            flush=True,
        )

    lines = [
        f"`python bench/windows.py` — pretrained tiny backbone (no adapter), {h} x {w}, {length}-frame windows "
        f"overlapping by >= {sample.window_overlap}, {sample.steps} {sample.scheduler} steps, {sample.guidance} "
        f"t_g {sample.t_guide:g} c_g {sample.c_guide:g}, seed 0; CPU seconds at 1 thread. Device: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "Change across seams / inside windows: mean |frame(i+1) − frame(i)| (0–255) over transitions where a "
        "window starts or ends vs the others; 1 = seamless.",
        "",
        "| clip | frames | windows | source ratio | latent joining: seam / inside / ratio | pixel cross-fade: "
        "seam / inside / ratio | s latent | s pixel | × |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, nw, src, lat, pix, t_lat, t_pix in rows:
        lines.append(
            f"| {name} | {n} | {nw} | {src[2]:.3f} | {lat[0]:.2f} / {lat[1]:.2f} / **{lat[2]:.3f}** | "
            f"{pix[0]:.2f} / {pix[1]:.2f} / **{pix[2]:.3f}** | {t_lat:.1f} | {t_pix:.1f} | {t_lat / t_pix:.2f} |"
        )
    lines += [
        "",
        "Latent joining runs each window's transformer passes as the independent windows do, but encodes and "
        "decodes the video once instead of once per window; its overlaps are denoised jointly, so one seed "
        "gives one video.",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        write_section("windows", text)


if __name__ == "__main__":
    main()
