"""``pickstyle stylize``: re-render any video in a style with a (registered) context-style adapter.

What happens to the input, in order:

1. Decode it with PyAV (mp4, mov, webm, gif, ...; any size, fps, length), frame by frame, fitting each
   frame as it comes (memory stays at the model's resolution). Missing, empty, non-video or frameless
   inputs raise :class:`~pickstyle.data.video.VideoError` before any model is loaded.
2. Fit every frame to the profile's ``height x width``: ``fit="crop"`` resizes to cover and centre-crops (the
   reference's preprocessing); ``fit="pad"`` resizes to fit inside and letterboxes, and the letterbox is cut
   off the result again.
3. Time: a video of at most ``frames`` (the profile's clip length, 4n+1) frames is one window, padded to the
   next 4n+1 length by repeating its last frame (the padding is dropped afterwards). A longer one is either
   cut to its first ``frames`` frames with a warning (``on_long="cut"``) or stylized whole
   (``on_long="windows"``): padded to 4n+1 the same way, VAE-encoded once and denoised as one latent whose
   overlapping windows of ``frames`` frames (sharing at least ``sample.window_overlap`` frames) are all
   denoised at every step and averaged where they overlap (``PickStylePipeline(window_frames=...)``). One
   seed, one noise draw, one decode: no pixel cross-fade and no seams between windows.
   Before that, frames are resampled (nearest frame) to the profile's fps, the rate whose motion per frame the
   model was trained on, and the result back to the output fps (the source's unless ``fps`` is given), so the
   output keeps the source's duration. A portrait input gets the profile's size turned to portrait
   (``orientation="auto"``: 480x832 becomes 832x480) rather than a landscape centre crop.
4. Output: H.264 mp4 at the output fps with one frame per (used) input frame, at the model's resolution
   (no upscaling back to the source size: it would add no detail). ``side_by_side`` writes the fitted
   source | result (twice the width). The file is written atomically: an error never leaves a partial
   OUTPUT behind.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from pickstyle.config import Params, Sample
from pickstyle.data.images import write_still
from pickstyle.data.video import (
    VideoError,
    _stream_fps,
    pad_to,
    read_video,
    resize_contain,
    resize_cover_crop,
    write_video,
)
from pickstyle.errors import PickstyleError
from pickstyle.files import resolve_device
from pickstyle.model.adapters import AdapterError, AdapterSet
from pickstyle.model.components import ensure_backbone, load_pipeline, offload_text_encoder
from pickstyle.model.pipeline import PickStylePipeline

logger = logging.getLogger(__name__)


class StylizeError(PickstyleError):
    """``stylize`` cannot run with these arguments (bad output path, missing adapter, unusable size)."""


def _next_4n1(n: int) -> int:
    return 4 * math.ceil((n - 1) / 4) + 1


def stylize_frames(
    pipe: Any,
    frames: np.ndarray,
    prompt: str,
    sample: Sample,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    window_frames: int | None = None,
) -> np.ndarray:
    """Stylize frames already fitted to the model's size (one window, or one latent in windows).

    Args:
        pipe: a ``PickStylePipeline`` (adapter loaded or not).
        frames: ``np.uint8 [T, H, W, 3]``; T need not be 4n+1 (padded by repeating the last frame, then trimmed).
        prompt: the style prompt, e.g. ``"anime style. a wolf walking in the snow"``.
        sample: sampling settings (guidance, scales, steps, skip, scheduler, cache, ...).
        seed: seeds the noise and the null-context permutations (a CPU generator: same result on any device).
        height, width: the frame size passed to the pipeline (default: the frames' own size; they must agree).
        window_frames: frames per denoising window (the profile's clip length); ``None`` = all frames in one
            window. Longer inputs are denoised as one latent in windows overlapping by ``sample.window_overlap``.

    Returns:
        ``np.uint8 [T, H, W, 3]``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise StylizeError(f"frames must be [T, H, W, 3] with T >= 1, got {frames.shape}")
    count, h, w, _ = frames.shape
    height, width = height or h, width or w
    if (h, w) != (height, width):
        raise StylizeError(f"frames are {h}x{w} but height x width is {height}x{width}: fit them first")
    padded = _next_4n1(count)
    if padded > count:
        frames = np.concatenate([frames, np.repeat(frames[-1:], padded - count, axis=0)])
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(
        frames.astype(np.uint8, copy=False),
        prompt,
        sample.negative_prompt,
        height=height,
        width=width,
        num_frames=padded,
        num_inference_steps=sample.steps,
        guidance=sample.guidance,
        t_guide=sample.t_guide,
        c_guide=sample.c_guide,
        skip=sample.skip,
        batched=sample.batched,
        scheduler=sample.scheduler,
        shift=sample.shift,
        cache_threshold=sample.cache_threshold if sample.cache_threshold > 0 else None,
        cache_warmup=sample.cache_warmup,
        # reuse is CS-CFG's speed-up: cfg and cfg_joint (evaluate's baselines) stay exact
        guidance_every=sample.guidance_every if sample.guidance in ("cs_cfg", "cs_cfg_apg") else 1,
        guidance_reuse=sample.guidance_reuse,
        generator=generator,
        output_type="np",
        window_frames=window_frames,
        window_overlap=sample.window_overlap,
    ).frames[0]  # float [T, H, W, 3] in [0, 1]
    return (np.clip(out[:count], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def resample_frames(
    frames: np.ndarray, src_fps: float, dst_fps: float, count: int | None = None
) -> np.ndarray:
    """Nearest-frame resampling from ``src_fps`` to ``dst_fps`` keeping the duration (``count`` frames if given).

    Output frame ``i`` shows the input at time ``i / dst_fps``. Equal rates return the frames unchanged.
    """
    if count is None:
        if abs(src_fps - dst_fps) < 1e-6:
            return frames
        count = max(1, round(len(frames) * dst_fps / src_fps))
    index = np.clip(np.round(np.arange(count) * src_fps / dst_fps), 0, len(frames) - 1).astype(int)
    return frames[index]


def oriented_size(path: Path, height: int, width: int, orientation: str) -> tuple[int, int]:
    """The model size for ``path``: the profile's, turned to portrait for a portrait input (``auto``).

    A 9:16 phone video centre-cropped into a 16:9 frame would lose two thirds of its picture; the model sees
    the same number of tokens either way.
    """

    if orientation == "profile":
        return height, width
    if orientation != "auto":
        raise StylizeError(f"orientation must be 'auto' or 'profile', got {orientation!r}")
    first, _ = read_video(path, max_frames=1)  # also the clear error for a missing or broken input
    h, w = first.shape[1:3]
    if (h > w) != (height > width) and h != w:
        return width, height
    return height, width


def _fit(frames: np.ndarray, height: int, width: int, fit: str) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Frames at ``height x width`` and the region of them that holds picture (all of it unless padded)."""

    if fit == "crop":
        return resize_cover_crop(frames, height, width), (slice(0, height), slice(0, width))
    if fit == "pad":
        inner = resize_contain(frames, height, width)
        h, w = inner.shape[1:3]
        top, left = (height - h) // 2, (width - w) // 2
        return pad_to(inner, height, width), (slice(top, top + h), slice(left, left + w))
    raise StylizeError(f"fit must be 'crop' or 'pad', got {fit!r}")


def read_fitted(
    path: Path, height: int, width: int, fit: str, max_frames: int | None = None
) -> tuple[np.ndarray, float, tuple[slice, slice]]:
    """Decode ``path`` frame by frame, fitting each frame as it comes.

    Memory stays at the model's resolution whatever the input's (a minute of 4K would need ~45 GB as
    full frames). ``read_video`` is asked for the first frame first, so a missing, empty, non-video or
    frameless input raises its ``VideoError`` message. A decoding error after some frames keeps those frames
    (as ``read_video`` does).

    Returns:
        ``(frames [T, height, width, 3] uint8, fps, picture region)``.
    """

    read_video(path, max_frames=1)
    fitted: list[np.ndarray] = []
    pts: list[float] = []
    region = (slice(0, height), slice(0, width))
    with av.open(str(path), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                one, region = _fit(frame.to_ndarray(format="rgb24")[None], height, width, fit)
                fitted.append(one[0])
                if frame.time is not None:
                    pts.append(float(frame.time))
                if max_frames is not None and len(fitted) >= max_frames:
                    break
        except (av.FFmpegError, ValueError) as err:
            if not fitted:
                raise VideoError(f"{path}: not a readable video ({err})") from None
        fps = _stream_fps(stream, pts)
    return np.stack(fitted), fps, region


def stylize_file(
    input: str | Path,
    output: str | Path,
    prompt: str,
    *,
    params: Params,
    sample: Sample,
    adapter: str | Path | None = None,
    backbone: str | Path | None = None,
    side_by_side: bool = False,
    fit: str = "crop",
    seed: int = 0,
    max_frames: int | None = None,
    on_long: str = "windows",
    orientation: str = "auto",
    fps: float | None = None,
    preview: str | Path | None = None,
    style: str | None = None,
) -> Path:
    """Stylize a video file and write the result as mp4 (see the module docstring for every step).

    Args:
        input: any video PyAV reads.
        output: the mp4 to write (atomically; never partially).
        prompt: the style prompt, e.g. ``"anime style. a wolf walking in the snow"``.
        params: the project params (profile size and clip length, backbone, paths).
        sample: sampling settings (``params.sample`` with CLI overrides).
        adapter: adapter folder (diffusers LoRA format), or a folder of per-style adapters (the tiny profile's
            ``models/adapter``: the prompt's style picks one); ``None`` = the base model. A registered model's
            adapter and backbone come from :func:`pickstyle.register.load_registered` (the CLI's ``--model``).
        backbone: backbone folder (default: the params' backbone, built if missing for the tiny profile).
        side_by_side: write source | result.
        fit: ``crop`` (resize to cover + centre crop) or ``pad`` (letterbox, cut off again afterwards).
        seed: noise and null-context seed.
        max_frames: read at most this many input frames.
        on_long: ``windows`` (one latent denoised in overlapping windows) or ``cut`` (first clip only, with a warning).
        orientation: ``auto`` turns the profile's size to portrait for a portrait input; ``profile`` keeps it.
        fps: output frame rate (default: the source's). The model always sees the profile's fps (the motion
            per frame it was trained on); the output keeps the source's duration.
        preview: also write this PNG: four frames of the source above the same frames of the result.
        style: of per-style adapters, use this style's (default: the style the prompt names).

    Returns:
        ``output`` as a Path.
    """

    input, output = Path(input), Path(output)
    if output.is_dir():
        raise StylizeError(f"{output}: is a folder; give the output .mp4 file name")
    if input.exists() and output.exists() and output.resolve() == input.resolve():
        raise StylizeError(f"{output}: the output would overwrite the input")
    if on_long not in ("windows", "cut"):
        raise StylizeError(f"on_long must be 'windows' or 'cut', got {on_long!r}")
    if max_frames is not None and max_frames < 1:
        raise StylizeError(f"max_frames must be >= 1, got {max_frames}")
    if not 0 <= sample.skip < sample.steps:
        raise StylizeError(f"skip must be in [0, steps={sample.steps}), got {sample.skip}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise StylizeError(f"fps must be a positive number, got {fps}")
    profile = params.active
    length = profile.frames
    height, width = oriented_size(input, profile.height, profile.width, orientation)

    if fit not in ("crop", "pad"):
        raise StylizeError(f"fit must be 'crop' or 'pad', got {fit!r}")
    # VideoError (missing, empty, not a video, no frames) before any model is loaded.
    fitted, src_fps, region = read_fitted(input, height, width, fit, max_frames)
    if on_long == "cut":  # one clip at the model's fps
        keep = max(1, math.floor(length * src_fps / profile.fps))
        if len(fitted) > keep:
            logger.warning(
                "%s: longer than one %d-frame clip at %g fps; keeping the first %d frames (--long windows for all)",
                input,
                length,
                profile.fps,
                keep,
            )
            fitted = fitted[:keep]

    adapter_dir = Path(adapter) if adapter is not None else None
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise StylizeError(f"{adapter_dir}: adapter folder not found")
    adapters = None
    if adapter_dir is not None:
        try:  # before the backbone loads: a prompt naming no style of the folder fails at once
            adapters = AdapterSet.open(adapter_dir)
            chosen = adapters.pick(prompt, style)
        except AdapterError as err:
            raise StylizeError(str(err)) from None
        if adapters.per_style:
            logger.info("%s: the %r adapter", adapter_dir, chosen)
    pipe = load_pipeline(
        Path(backbone) if backbone is not None else ensure_backbone(params),
        device=resolve_device(sample.device),
        dtype=params.model.dtype,
        pipeline_cls=PickStylePipeline,
    )
    # Every window encodes the same prompts: encode them once; on CUDA UMT5 then waits on the CPU.
    offload_text_encoder(pipe)
    base = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    if height % base or width % base:
        raise StylizeError(f"profile size {height}x{width}: this backbone needs multiples of {base}")
    if adapters is not None:
        # one prompt, one style: only its adapter is loaded
        adapters.load(pipe, sample.adapter_scale, names=[chosen]).activate(
            pipe, prompt, sample.adapter_scale, style
        )

    return render_fitted(
        pipe,
        fitted,
        src_fps,
        region,
        output,
        prompt,
        sample,
        seed,
        length=length,
        side_by_side=side_by_side,
        model_fps=profile.fps,
        out_fps=fps,
        preview=preview,
        prompt_label=prompt,
    )


def render_fitted(
    pipe: Any,
    fitted: np.ndarray,
    fps: float,
    region: tuple[slice, slice],
    output: str | Path,
    prompt: str,
    sample: Sample,
    seed: int = 0,
    *,
    length: int,
    side_by_side: bool = False,
    model_fps: float | None = None,
    out_fps: float | None = None,
    preview: str | Path | None = None,
    prompt_label: str | None = None,
) -> Path:
    """Stylize frames already fitted to the model size (:func:`read_fitted`) and write the mp4.

    Shared by :func:`stylize_file` and the registered MLflow model, which keeps its pipeline loaded.

    Args:
        pipe: a loaded :class:`~pickstyle.model.pipeline.PickStylePipeline` (adapter, if any, already set).
        fitted: uint8 ``[T, H, W, 3]`` at the model size.
        fps: the source's frame rate.
        region: the rows/columns of real content (``pad`` letterbox bars are cut off again).
        output: the mp4 to write (atomically).
        prompt: the style prompt.
        sample: sampling settings.
        seed: noise and null-context seed (one noise draw for the whole video).
        length: frames per denoising window (the profile's clip length, 4n+1).
        side_by_side: write source | result.
        model_fps: the frame rate the model sees (the profile's; ``None`` = ``fps``): frames are resampled to it
            and back, so a 30 fps input moves per frame as the 16 fps training clips did.
        out_fps: the output's frame rate (``None`` = ``fps``); the output keeps the input's duration.
        preview: also write this PNG (source frames above result frames, labelled with ``prompt_label``).
        prompt_label: the preview's label of the result row (default: ``prompt``).
    """

    height, width = fitted.shape[1:3]
    out_fps = out_fps or fps
    out_count = max(1, round(len(fitted) * out_fps / fps))
    source = fitted
    fitted = resample_frames(fitted, fps, model_fps) if model_fps else fitted
    show = sys.stderr.isatty()
    pipe.set_progress_bar_config(disable=not show, desc="steps", leave=False)
    styled = stylize_frames(pipe, fitted, prompt, sample, seed, height, width, window_frames=length)
    styled = resample_frames(styled, model_fps or fps, out_fps, out_count)

    rows, cols = region
    styled = styled[:, rows, cols]
    shown = resample_frames(source, fps, out_fps, out_count)[:, rows, cols]
    if preview is not None:
        write_still(preview, [("source", shown), (prompt_label or prompt, styled)])
    if side_by_side:
        styled = np.concatenate([shown, styled], axis=2)
    return write_video(output, styled, out_fps)
