"""The pretraining data the project makes itself: seeded clips for the VAE and the transformer's task mix.

Every draw comes from ``(pretrain.seed, phase, step)`` (:func:`phase_rng`), so a resumed run sees exactly the data
an uninterrupted one does. Nothing here reads the ``clips`` section: pretraining has its own motions
(``pretrain.motion_mix``) and scenes (``pretrain.scene_objects``), so tuning the adapter's data never invalidates
the backbone. The tasks (:func:`set_clip`) are described in :mod:`pickstyle.pretrain`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cv2
import numpy as np
import torch

from pickstyle.config import Params, Pretrain
from pickstyle.data.controls import CONTROLS, apply_control
from pickstyle.data.motion import draw_spec, render_pair
from pickstyle.data.scenes import _photos, draw_scene, render_scene
from pickstyle.data.styles import STYLES, apply_style, style_caption_name
from pickstyle.data.textures import random_image
from pickstyle.errors import PickstyleError

#: Short side of a photo crop before it is styled (as the pairs stage's 128 px pairs).
CROP_SIDE = 128
#: Frames of the VAE's clip phase: 1 + 4, the shortest clip that exercises the causal cache past the first frame.
VAE_CLIP_FRAMES = 5
#: Scene indices used by pretraining (the evaluation's test scenes are 0, 1, 2, …; the VAE check uses 20000+).
SCENE_OFFSET = 10_000
CHECK_SCENE_OFFSET = 20_000
#: Phase ids (part of every per-step seed).
VAE_PHASE, SET_PHASE, DIT_PHASE = 1, 2, 3


class PretrainError(PickstyleError):
    """The pretrain stage cannot run (bad settings)."""


def pretrain_styles(cfg: Pretrain) -> list[str]:
    """The built-in styles pretraining uses: all but ``holdout_styles``."""
    unknown = [s for s in cfg.holdout_styles if s not in STYLES]
    if unknown:
        raise PretrainError(f"pretrain.holdout_styles: unknown style(s) {unknown}; known: {sorted(STYLES)}")
    bad = [c for c in cfg.controls if c not in CONTROLS]
    if bad or not cfg.controls:
        raise PretrainError(f"pretrain.controls: unknown or none {bad}; known: {sorted(CONTROLS)}")
    return [s for s in STYLES if s not in cfg.holdout_styles]


def phase_rng(seed: int, phase: int, step: int) -> np.random.Generator:
    """The numpy generator of one step of one phase: the same draws on every run and after a resume."""
    return np.random.default_rng([seed, phase, step])


def phase_generator(seed: int, phase: int, step: int) -> torch.Generator:
    """The torch generator (noise, timesteps) of one step of one phase."""
    digest = hashlib.sha256(f"{seed}:{phase}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8]) >> 1)


def _photo_crop(rng: np.random.Generator, aspect: float) -> tuple[str, np.ndarray]:
    """A random crop of a random built-in photo with ``width / height = aspect``, short side :data:`CROP_SIDE`."""
    photos = _photos()
    _, desc, img = photos[int(rng.integers(len(photos)))]
    h0, w0 = img.shape[:2]
    frac = rng.uniform(0.35, 1.0)
    ch = int(min(h0, w0 / aspect) * frac)
    cw = int(ch * aspect)
    y, x = int(rng.integers(0, h0 - ch + 1)), int(rng.integers(0, w0 - cw + 1))
    crop = img[y : y + ch, x : x + cw]
    size = (int(round(CROP_SIDE * aspect)), CROP_SIDE)
    crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if ch > CROP_SIDE else cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return desc, np.ascontiguousarray(crop)


def _scene_settings(params: Params) -> dict[str, Any]:
    p = params.active
    return {
        "seed": params.pretrain.seed,
        "height": p.height,
        "width": p.width,
        "test_objects": params.pretrain.scene_objects,
        "styles": pretrain_styles(params.pretrain),
    }


def render_clip(
    rng: np.random.Generator,
    params: Params,
    frames: int,
    style: str | None,
    scene_index: int | None,
    image: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """One (source, styled) clip pair, uint8 ``[frames, h, w, 3]`` each, and the source's description.

    ``scene_index``: a procedural scene with moving cut-outs; else a photo crop (or ``image``) under a camera
    motion drawn from ``pretrain.motion_mix`` (the same motion on both). ``style=None``: the styled clip is the
    source.
    """
    h, w = params.active.height, params.active.width
    if scene_index is not None:
        spec = draw_scene(scene_index, _scene_settings(params))
        src = render_scene(spec, frames, h, w)
        desc = next(d for pid, d, _ in _photos() if pid == spec["background"])
        sty = np.stack([apply_style(style, f) for f in src]) if style else src
        return src, sty, desc
    desc, crop = _photo_crop(rng, w / h) if image is None else ("A procedural texture.", image)
    styled = apply_style(style, crop) if style else crop
    c = params.pretrain
    spec = draw_spec(
        int(rng.integers(2**31)), mix=dict(c.motion_mix), static_prob=c.static_prob, flip_prob=0.0
    )
    src, sty = render_pair(crop, styled, spec, frames, h, w)
    return src, sty, desc


def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, h, w, 3]`` -> float ``[3, T, h, w]`` in [-1, 1] (the pipeline's preprocessing)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def vae_batch(params: Params, step: int, texture_share: float | None = None) -> torch.Tensor:
    """The VAE's batch of ``step``: single frames (first phase) or short clips (second), photos and scenes;
    ``texture_share`` of them procedural (default ``pretrain.vae_texture_share``)."""
    cfg = params.pretrain
    share = cfg.vae_texture_share if texture_share is None else texture_share
    rng = phase_rng(cfg.seed, VAE_PHASE, step)
    styles = pretrain_styles(cfg)
    clip_phase = step >= cfg.vae_frame_steps
    n, frames = (max(1, cfg.vae_batch // 4), VAE_CLIP_FRAMES) if clip_phase else (cfg.vae_batch, 1)
    videos = []
    h, w = params.active.height, params.active.width
    photos = [img for _, _, img in _photos()]
    for _ in range(n):
        style = styles[int(rng.integers(len(styles)))] if rng.random() < 0.6 else None
        if rng.random() < share:
            if not clip_phase and rng.random() < 0.5:  # straight at the frame size: the finest grain survives
                img = random_image(rng, h, w, photos)
                video = (apply_style(style, img) if style and rng.random() < 0.3 else img)[None]
            else:
                img = random_image(rng, CROP_SIDE, int(round(CROP_SIDE * w / h)), photos)
                src, sty, _ = render_clip(rng, params, max(frames, 5), style, None, image=img)
                video = sty if style and rng.random() < 0.3 else src
            videos.append(to_video(video[:frames]))
            continue
        scene = SCENE_OFFSET + int(rng.integers(100_000)) if rng.random() < cfg.scene_share else None
        src, sty, _ = render_clip(rng, params, max(frames, 5), style, scene)
        video = sty if style and rng.random() < 0.5 else src
        videos.append(to_video(video[:frames]))
    return torch.stack(videos)  # [b, 3, frames, h, w]


def draw_task(rng: np.random.Generator, mix: dict[str, float]) -> str:
    """One task of ``pretrain.task_mix`` (weights need not sum to 1)."""
    names = sorted(mix)
    weights = np.array([mix[n] for n in names], np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def set_clip(params: Params, index: int) -> dict[str, Any]:
    """Clip ``index`` of the transformer's latent set, rendered from its own seed.

    Returns:
        ``task``, ``caption``, ``target`` (uint8 ``[T, h, w, 3]``: the styled or plain clip) and ``context``: the
        frames of the VACE context's reactive half (the RGB source for ``reconstruct``, a structure control of
        it for the control tasks), or ``None`` for text-to-video (an empty context).
    """
    cfg = params.pretrain
    rng = phase_rng(cfg.seed, SET_PHASE, index)
    styles = pretrain_styles(cfg)
    task = draw_task(rng, cfg.task_mix)
    style = styles[int(rng.integers(len(styles)))] if task in ("control_style", "text_style") else None
    scene = SCENE_OFFSET + index if rng.random() < cfg.scene_share else None
    src, sty, desc = render_clip(rng, params, params.active.frames, style, scene)
    styled_caption = f"{style_caption_name(style)} style. {desc}" if style else desc
    if task == "reconstruct":
        return {"task": task, "caption": f"reconstruct. {desc}", "target": sty, "context": src}
    if task.startswith("control"):
        control = cfg.controls[int(rng.integers(len(cfg.controls)))]
        return {
            "task": task,
            "caption": styled_caption,
            "target": sty,
            "context": apply_control(control, src),
        }
    return {"task": task, "caption": styled_caption, "target": sty, "context": None}
