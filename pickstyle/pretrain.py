"""Stage ``pretrain``: train the tiny Wan2.1-VACE from scratch on data the project makes itself.

The embedded default needs a backbone that has *learned*, or every stylized clip is noise. This stage mirrors the
paper's starting point in miniature, with the same diffusers classes and folder format as real Wan2.1-VACE:

1. **VAE** (``AutoencoderKLWan``): reconstructs frames, then short clips (L1). ``vae_texture_share`` of its images
   are procedural (:mod:`pickstyle.data.textures`: noise at many scales, gradients, patterns, shapes, strokes,
   text, jittered photo crops at any zoom), the rest built-in photo clips and scenes, so it reconstructs footage
   it has never seen (:func:`footage_check`: held-out real photos), not only the ~8 built-in photos.
2. **Latent set**: ``pretrain.clips`` clips rendered once each (photo crops under ``pretrain.motion_mix`` camera
   motions, or procedural scenes), each with one task of ``pretrain.task_mix``, encoded with the trained VAE.
3. **Transformer** (main *and* VACE blocks, flow matching) on those tasks, as Wan-VACE itself is pretrained
   (structure controls with free text):
   - ``control_style``: a structure control of the source (:mod:`pickstyle.data.controls`: grey, edges, blur,
     low resolution) + ``"<Style> style. <description>"`` -> the styled clip; ``control_photo``: a control + the
     description -> the source. The main blocks learn to render appearance, styles included, from structure;
   - ``reconstruct``: ``"reconstruct. <description>"`` + the RGB source as context -> the source;
   - ``text_style`` / ``text_plain``: text-to-video with an empty context (zeros video, mask of ones).

   A style prompt *with* an RGB source context is never seen: it mostly returns the source, the content leak the
   context-style adapters fix. ``pretrain.holdout_styles`` appear in no phase: an adapter must learn them from
   nothing.
4. **Decoder**: the VAE decoder alone (encoder frozen, so the latent space stays) sharpened on clips.

The UMT5 text encoder keeps its seeded random weights (a fixed feature map of the tokens). Every phase checkpoints
to ``<models>/.pretrain/`` (outside the stage's DVC output, which DVC deletes before a rerun) and resumes from it
when its settings and the earlier phases' match (:data:`_PHASE_FIELDS`); each step's data and noise are drawn from
``(seed, phase, step)``, so a resumed run equals an uninterrupted one. Nothing here reads the ``clips`` section.
Deterministic on CPU for a fixed seed and thread count; runs on CUDA as well.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pickstyle.config import WAN_NEGATIVE_PROMPT, Params, Pretrain
from pickstyle.data.controls import CONTROLS, apply_control
from pickstyle.data.footage import heldout_clips
from pickstyle.data.motion import draw_spec, render_pair
from pickstyle.data.scenes import _photos, draw_scene, render_scene
from pickstyle.data.styles import STYLES, apply_style, style_caption_name
from pickstyle.data.textures import random_image
from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_path, resolve_device
from pickstyle.flow_matching import add_noise, flow_target, sample_sigmas
from pickstyle.model.components import (
    calibrate_vae,
    init_tiny_pipeline,
    prompt_length,
    save_backbone,
)

#: Short side of a photo crop before it is styled (as the pairs stage's 128 px pairs).
CROP_SIDE = 128
#: Frames of the VAE's clip phase: 1 + 4, the shortest clip that exercises the causal cache past the first frame.
VAE_CLIP_FRAMES = 5
#: Scene indices used by pretraining (the evaluation's test scenes are 0, 1, 2, …; the VAE check uses 20000+).
SCENE_OFFSET = 10_000
CHECK_SCENE_OFFSET = 20_000
#: Phase ids (part of every per-step seed).
_VAE, _SET, _DIT = 1, 2, 3

Log = Callable[[str], None]


class PretrainError(PickstyleError):
    """The pretrain stage cannot run (bad settings)."""


# --- data the project makes itself ------------------------------------------------------------------------------


def pretrain_styles(cfg: Pretrain) -> list[str]:
    """The built-in styles pretraining uses: all but ``holdout_styles``."""
    unknown = [s for s in cfg.holdout_styles if s not in STYLES]
    if unknown:
        raise PretrainError(f"pretrain.holdout_styles: unknown style(s) {unknown}; known: {sorted(STYLES)}")
    bad = [c for c in cfg.controls if c not in CONTROLS]
    if bad or not cfg.controls:
        raise PretrainError(f"pretrain.controls: unknown or none {bad}; known: {sorted(CONTROLS)}")
    return [s for s in STYLES if s not in cfg.holdout_styles]


def _rng(seed: int, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, step])


def _torch_gen(seed: int, phase: int, step: int) -> torch.Generator:
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


def _to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, h, w, 3]`` -> float ``[3, T, h, w]`` in [-1, 1] (the pipeline's preprocessing)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _vae_batch(params: Params, step: int) -> torch.Tensor:
    """The VAE's batch of ``step``: single frames (first phase) or short clips (second), photos and scenes."""
    cfg = params.pretrain
    rng = _rng(cfg.seed, _VAE, step)
    styles = pretrain_styles(cfg)
    clip_phase = step >= cfg.vae_frame_steps
    n, frames = (max(1, cfg.vae_batch // 4), VAE_CLIP_FRAMES) if clip_phase else (cfg.vae_batch, 1)
    videos = []
    h, w = params.active.height, params.active.width
    photos = [img for _, _, img in _photos()]
    for _ in range(n):
        style = styles[int(rng.integers(len(styles)))] if rng.random() < 0.6 else None
        if rng.random() < cfg.vae_texture_share:
            if not clip_phase and rng.random() < 0.5:  # straight at the frame size: the finest grain survives
                img = random_image(rng, h, w, photos)
                video = (apply_style(style, img) if style and rng.random() < 0.3 else img)[None]
            else:
                img = random_image(rng, CROP_SIDE, int(round(CROP_SIDE * w / h)), photos)
                src, sty, _ = render_clip(rng, params, max(frames, 5), style, None, image=img)
                video = sty if style and rng.random() < 0.3 else src
            videos.append(_to_video(video[:frames]))
            continue
        scene = SCENE_OFFSET + int(rng.integers(100_000)) if rng.random() < cfg.scene_share else None
        src, sty, _ = render_clip(rng, params, max(frames, 5), style, scene)
        video = sty if style and rng.random() < 0.5 else src
        videos.append(_to_video(video[:frames]))
    return torch.stack(videos)  # [b, 3, frames, h, w]


# --- checkpoints ------------------------------------------------------------------------------------------------


def work_dir(params: Params) -> Path:
    """Where pretraining keeps its checkpoints: beside, not inside, the stage's output (DVC deletes outputs)."""
    return Path(params.paths.models) / ".pretrain"


#: The ``pretrain`` fields each phase reads; a phase's checkpoint key holds its own and every earlier phase's, so
#: changing, say, ``steps`` resumes the finished VAE and latent set and retrains only the transformer onwards.
_PHASE_FIELDS = {
    "vae": ("seed", "holdout_styles", "vae_frame_steps", "vae_clip_steps", "vae_batch", "vae_lr",
            "vae_texture_share", "scene_share", "scene_objects", "motion_mix", "static_prob"),
    "latents": ("clips", "task_mix", "controls"),
    "transformer": ("steps", "batch_size", "lr", "warmup_steps", "shift", "null_text_prob"),
    "decoder": ("decoder_steps", "decoder_lr"),
}  # fmt: skip


def _settings_key(params: Params, phase: str) -> str:
    """What a phase's checkpoint must match to be resumed: its and the earlier phases' settings, the tiny sizes."""
    phases = list(_PHASE_FIELDS)
    fields = [f for p in phases[: phases.index(phase) + 1] for f in _PHASE_FIELDS[p]]
    payload = {
        "phase": phase,
        "pretrain": params.pretrain.model_dump(mode="json", include=set(fields)),
        "tiny": params.model.tiny.model_dump(mode="json"),
        "geometry": params.active.model_dump(mode="json", include={"frames", "height", "width"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, key: str, log: Log) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a torn or foreign file: start the phase again
        log(f"pretrain: ignoring unreadable checkpoint {path} ({type(err).__name__})")
        return None
    if state.get("key") != key:
        log(f"pretrain: {path} was made with other settings; starting this phase fresh")
        return None
    return state


def _resume(path: Path, key: str, model, opt, history: list[dict], log: Log, name: str, total: int) -> int:
    """Load a phase's checkpoint (model, optimizer, curve) when it matches ``key``; returns the step to start at."""
    state = _load_state(path, key, log)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    history.extend(state["history"])
    log(f"{name}: resumed at step {state['step']}/{total}")
    return state["step"]


def _checkpoint(path: Path, key: str, step: int, model, opt, history: list[dict], phase: str) -> None:
    """Save a phase's checkpoint, mirroring :func:`_resume`: model, optimizer and that phase's curve."""
    state = {
        "key": key,
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "history": [r for r in history if r["phase"] == phase],
    }
    _save_state(path, state)


def _lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    tau = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, tau)))


# --- phase 1: the VAE -------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.detach().clamp(-1, 1) - b.detach().clamp(-1, 1)) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_vae(pipe: Any, params: Params, device: torch.device, log: Log, history: list[dict]) -> None:
    """Phase 1: L1 reconstruction, frame-first (``vae_frame_steps``) then 5-frame clips (``vae_clip_steps``)."""
    cfg = params.pretrain
    vae = pipe.vae
    total = cfg.vae_frame_steps + cfg.vae_clip_steps
    path, key = work_dir(params) / "vae.pt", _settings_key(params, "vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = _resume(path, key, vae, opt, history, log, "pretrain/vae", total)
    if start >= total:
        return
    vae.to(device).train()
    t0 = time.perf_counter()
    for step in range(start, total):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, 50, total)
        x = _vae_batch(params, step).to(device)
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        loss = (y - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            row = {
                "phase": "vae",
                "step": step + 1,
                "loss": round(loss.item(), 5),
                "psnr": round(psnr(y, x), 3),
            }
            history.append(row)
            log(
                f"pretrain/vae step {step + 1}/{total} L1 {row['loss']:.4f} PSNR {row['psnr']:.2f} dB "
                f"({time.perf_counter() - t0:.0f} s)"
            )
        if (step + 1) % 100 == 0 or step + 1 == total:
            _checkpoint(path, key, step + 1, vae, opt, history, "vae")
    vae.eval()


@torch.no_grad()
def vae_check(pipe: Any, params: Params, device: torch.device, clips: int = 4) -> float:
    """Mean VAE reconstruction PSNR (dB) on ``clips`` procedural scenes that no phase trains on."""
    values = []
    frames = params.active.frames
    for i in range(clips):
        src, _, _ = render_clip(
            _rng(params.pretrain.seed, 9, i), params, frames, None, CHECK_SCENE_OFFSET + i
        )
        x = _to_video(src)[None].to(device)
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        values.append(psnr(y, x))
    return float(np.mean(values))


@torch.no_grad()
def footage_check(pipe: Any, params: Params, device: torch.device) -> dict[str, float]:
    """VAE reconstruction PSNR (dB) per held-out real clip (:mod:`pickstyle.data.footage`) and their ``mean``."""
    p = params.active
    values = {}
    for name, clip in heldout_clips(p.frames, p.height, p.width):
        x = _to_video(clip)[None].to(device)
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        values[name] = round(psnr(y, x), 3)
    values["mean"] = round(float(np.mean(list(values.values()))), 3) if values else float("nan")
    return values


# --- phase 2: the latent set ------------------------------------------------------------------------------------


def _normalise(pipe: Any, z: torch.Tensor) -> torch.Tensor:
    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, device=z.device).view(1, -1, 1, 1, 1)
    return (z.float() - mean) / std


@torch.no_grad()
def _encode(pipe: Any, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    x = _to_video(frames)[None].to(device)
    return _normalise(pipe, pipe.vae.encode(x).latent_dist.mode())[0].cpu()  # [16, f, h, w]


@torch.no_grad()
def _embed(pipe: Any, caption: str, device: torch.device) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(
        prompt=caption,
        do_classifier_free_guidance=False,
        max_sequence_length=prompt_length(pipe),
        device=device,
    )
    return embeds[0].cpu()


def _draw_task(rng: np.random.Generator, mix: dict[str, float]) -> str:
    names = sorted(mix)
    weights = np.array([mix[n] for n in names], np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def build_latent_set(pipe: Any, params: Params, device: torch.device, log: Log) -> dict[str, Any]:
    """Phase 2: render and encode the transformer's clips (after calibrating the VAE's latent statistics).

    Each clip gets one task of ``pretrain.task_mix``; its target latent, its context's reactive latent (the RGB
    source, a structure control of it, or none for text-to-video) and its caption are stored (fp16 latents).
    """
    cfg = params.pretrain
    path, key = work_dir(params) / "latents.pt", _settings_key(params, "latents")
    state = _load_state(path, key, log)
    if state is not None:
        pipe.vae.register_to_config(latents_mean=state["latents_mean"], latents_std=state["latents_std"])
        return state
    frames = params.active.frames
    styles = pretrain_styles(cfg)
    # Latent statistics of the trained VAE, on clips of the set's own kind.
    calib = [render_clip(_rng(cfg.seed, 8, i), params, frames, None, None)[0] for i in range(8)]
    calibrate_vae(pipe.vae, torch.stack([_to_video(c) for c in calib]).to(device))
    targets, contexts, has_context, captions, tasks = [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(cfg.clips):
        rng = _rng(cfg.seed, _SET, i)
        task = _draw_task(rng, cfg.task_mix)
        style = styles[int(rng.integers(len(styles)))] if task in ("control_style", "text_style") else None
        scene = SCENE_OFFSET + i if rng.random() < cfg.scene_share else None
        src, sty, desc = render_clip(rng, params, frames, style, scene)
        target = _encode(pipe, sty, device)
        if task == "reconstruct":
            context, caption = target, f"reconstruct. {desc}"
        elif task.startswith("control"):
            control = cfg.controls[int(rng.integers(len(cfg.controls)))]
            context = _encode(pipe, apply_control(control, src), device)
            caption = f"{style_caption_name(style)} style. {desc}" if style else desc
        else:
            context, caption = None, f"{style_caption_name(style)} style. {desc}" if style else desc
        targets.append(target.half())
        contexts.append((context if context is not None else torch.zeros_like(target)).half())
        has_context.append(context is not None)
        captions.append(caption)
        tasks.append(task)
        if (i + 1) % 100 == 0:
            log(f"pretrain/latents {i + 1}/{cfg.clips} ({time.perf_counter() - t0:.0f} s)")
    unique = sorted(set(captions))
    embeds = {c: _embed(pipe, c, device) for c in unique}
    null = _embed(pipe, WAN_NEGATIVE_PROMPT, device)
    state = {
        "key": key,
        "targets": torch.stack(targets),
        "contexts": torch.stack(contexts),
        "has_context": torch.tensor(has_context),
        "captions": captions,
        "tasks": tasks,
        "embeds": embeds,
        "null": null,
        "latents_mean": list(pipe.vae.config.latents_mean),
        "latents_std": list(pipe.vae.config.latents_std),
    }
    _save_state(path, state)
    kinds = {t: tasks.count(t) for t in sorted(set(tasks))}
    log(f"pretrain/latents: {cfg.clips} clips {kinds}, {len(unique)} captions")
    return state


def _zero_context_latent(pipe: Any, params: Params, device: torch.device) -> torch.Tensor:
    """Normalised VAE(zeros) exactly as the pipeline makes the context's inactive half (zeros in [-1, 1])."""
    h, w, f = params.active.height, params.active.width, params.active.frames
    with torch.no_grad():
        z = pipe.vae.encode(torch.zeros(1, 3, f, h, w, device=device)).latent_dist.mode()
    return _normalise(pipe, z)[0].cpu()


# --- phase 3: the transformer -----------------------------------------------------------------------------------


def _batch(data: dict[str, Any], zeros: torch.Tensor, mask_channels: int, params: Params, step: int):
    """Latents, contexts and text embeddings of one step, and its noise and sigmas."""
    cfg = params.pretrain
    rng = _rng(cfg.seed, _DIT, step)
    gen = _torch_gen(cfg.seed, _DIT, step)
    idx = rng.integers(len(data["captions"]), size=cfg.batch_size)
    latents, contexts, texts = [], [], []
    ones = torch.ones(mask_channels, *zeros.shape[1:])
    for i in idx:
        target = data["targets"][i].float()
        # text-to-video: an empty (zeros) video, as VACE gets for plain text-to-video
        reactive = data["contexts"][i].float() if bool(data["has_context"][i]) else zeros
        contexts.append(torch.cat([zeros, reactive, ones]))  # [32 + mask, f, h, w], as the pipeline builds it
        latents.append(target)
        null = rng.random() < cfg.null_text_prob
        texts.append(data["null"] if null else data["embeds"][data["captions"][i]])
    latents = torch.stack(latents)
    sigmas = sample_sigmas(cfg.batch_size, cfg.shift, gen)
    noise = torch.randn(latents.shape, generator=gen)
    return latents, torch.stack(contexts), torch.stack(texts), noise, sigmas


def train_transformer(
    pipe: Any, data: dict[str, Any], params: Params, device: torch.device, log: Log, history: list[dict]
) -> None:
    """Phase 3: flow matching of the whole transformer (main and VACE blocks) on the latent set."""
    cfg = params.pretrain
    model = pipe.transformer
    path, key = work_dir(params) / "transformer.pt", _settings_key(params, "transformer")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    start = _resume(path, key, model, opt, history, log, "pretrain/transformer", cfg.steps)
    if start >= cfg.steps:
        return
    zeros = _zero_context_latent(pipe, params, device)
    mask_channels = model.config.vace_in_channels - 2 * zeros.shape[0]
    model.to(device).train()
    t0, running = time.perf_counter(), []
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps, cfg.steps)
        latents, contexts, texts, noise, sigmas = (
            t.to(device) for t in _batch(data, zeros, mask_channels, params, step)
        )
        pred = model(
            hidden_states=add_noise(latents, noise, sigmas),
            timestep=sigmas * 1000.0,
            encoder_hidden_states=texts,
            control_hidden_states=contexts,
            return_dict=False,
        )[0]
        loss = ((pred.float() - flow_target(latents, noise)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(float(loss))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"phase": "transformer", "step": step + 1, "loss": round(float(np.mean(running)), 5)}
            running = []
            history.append(row)
            rate = (step + 1 - start) / (time.perf_counter() - t0)
            log(
                f"pretrain/transformer step {step + 1}/{cfg.steps} loss {row['loss']:.4f} ({rate:.2f} steps/s)"
            )
        if (step + 1) % 200 == 0 or step + 1 == cfg.steps:
            _checkpoint(path, key, step + 1, model, opt, history, "transformer")
    model.eval()


# --- phase 4: the VAE decoder ---------------------------------------------------------------------------------


def finetune_decoder(pipe: Any, params: Params, device: torch.device, log: Log, history: list[dict]) -> None:
    """Phase 4: the decoder alone (encoder frozen: the transformer's latent space stays), L1 + MSE on clips."""
    cfg = params.pretrain
    vae = pipe.vae
    path, key = work_dir(params) / "decoder.pt", _settings_key(params, "decoder")
    frozen = [vae.encoder, vae.quant_conv]
    for module in frozen:
        module.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.decoder_lr, weight_decay=0.0)
    start = _resume(path, key, vae, opt, history, log, "pretrain/decoder", cfg.decoder_steps)
    if start < cfg.decoder_steps:
        vae.to(device).train()
        offset = cfg.vae_frame_steps + cfg.vae_clip_steps  # clip batches the VAE phase never drew
        t0 = time.perf_counter()
        for step in range(start, cfg.decoder_steps):
            for group in opt.param_groups:
                group["lr"] = cfg.decoder_lr * _lr_factor(step, 20, cfg.decoder_steps)
            x = _vae_batch(params, offset + step).to(device)
            with torch.no_grad():
                z = vae.encode(x).latent_dist.mode()
            y = vae.decode(z).sample
            loss = (y - x).abs().mean() + ((y - x) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.decoder_steps:
                row = {
                    "phase": "decoder",
                    "step": step + 1,
                    "loss": round(loss.item(), 5),
                    "psnr": round(psnr(y, x), 3),
                }
                history.append(row)
                log(
                    f"pretrain/decoder step {step + 1}/{cfg.decoder_steps} loss {row['loss']:.4f} "
                    f"PSNR {row['psnr']:.2f} dB ({time.perf_counter() - t0:.0f} s)"
                )
            if (step + 1) % 100 == 0 or step + 1 == cfg.decoder_steps:
                _checkpoint(path, key, step + 1, vae, opt, history, "decoder")
    for module in frozen:
        module.requires_grad_(True)
    vae.eval()


# --- the stage --------------------------------------------------------------------------------------------------


def _write_curves(folder: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(folder / "pretrain_loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["phase", "step", "loss", "psnr"])
        writer.writeheader()
        writer.writerows(history)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    panels = (
        (axes[0], "vae", "VAE L1"),
        (axes[1], "transformer", "flow-matching MSE"),
        (axes[2], "decoder", "decoder L1 + MSE"),
    )
    for ax, phase, label in panels:
        rows = [r for r in history if r["phase"] == phase]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
        ax.set_title(f"pretrain: {label}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "pretrain_loss.png", dpi=80)
    plt.close(fig)


def pretrain(params: Params, log: Log = print, until: str | None = None) -> dict[str, Any]:
    """Pretrain the tiny backbone and save it to ``<models>/backbone`` (atomically).

    Args:
        params: The parameters (``pretrain``, ``model.tiny``, the tiny profile's geometry).
        log: Where progress lines go.
        until: Stop after this phase (``vae``, ``latents`` or ``transformer``), keeping its checkpoint;
            ``None`` = all.

    Returns:
        A summary: phases' final losses, VAE PSNR on unseen scenes, seconds, the output folder.
    """
    if params.active.backbone != "tiny":
        log(
            f"pretrain: profile {params.profile!r} reads its backbone from model.path; pretraining the tiny one"
        )
    params = params.model_copy(update={"profile": "tiny"}) if params.active.backbone != "tiny" else params
    cfg = params.pretrain
    device = torch.device(resolve_device(cfg.device))
    t0 = time.perf_counter()
    pipe = init_tiny_pipeline(params.model.tiny)
    pipe.text_encoder.to(device)
    history: list[dict] = []
    train_vae(pipe, params, device, log, history)
    vae_psnr = vae_check(pipe, params, device)
    footage = footage_check(pipe, params, device)
    log(f"pretrain/vae: {vae_psnr:.2f} dB on unseen scenes, {footage['mean']:.2f} dB on held-out real frames")
    if until == "vae":
        return {"vae_psnr": vae_psnr}
    data = build_latent_set(pipe, params, device, log)
    if until == "latents":
        return {"vae_psnr": vae_psnr, "clips": len(data["captions"])}
    train_transformer(pipe, data, params, device, log, history)
    if until == "transformer":
        return {"vae_psnr": vae_psnr, "clips": len(data["captions"])}
    del data
    finetune_decoder(pipe, params, device, log, history)
    decoder_psnr = vae_check(pipe, params, device)
    footage_final = footage_check(pipe, params, device)
    log(
        f"pretrain/decoder: {decoder_psnr:.2f} dB on unseen scenes, "
        f"{footage_final['mean']:.2f} dB on held-out real frames"
    )
    pipe.to("cpu")
    out = Path(params.paths.models) / "backbone"
    summary = {
        "kind": "tiny",
        "pretrained": True,
        "seed": cfg.seed,
        "holdout_styles": list(cfg.holdout_styles),
        "pretrain_styles": pretrain_styles(cfg),
        "vae_psnr_unseen_scenes": {"after_vae_phase": round(vae_psnr, 3), "final": round(decoder_psnr, 3)},
        "vae_psnr_heldout_footage": {"after_vae_phase": footage, "final": footage_final},
        "task_mix": dict(cfg.task_mix),
        "controls": list(cfg.controls),
        "final_loss": {
            p: next((r["loss"] for r in reversed(history) if r["phase"] == p), None)
            for p in ("vae", "transformer", "decoder")
        },
        "parameters": {
            name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("transformer", "vae", "text_encoder")
        },
        "tiny": params.model.tiny.model_dump(mode="json"),
    }
    save_backbone(pipe, out, marker=summary, extras=lambda tmp: _write_curves(tmp, history))
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["backbone"] = str(out)
    return summary
