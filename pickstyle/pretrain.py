"""Stage ``pretrain``: train the tiny Wan2.1-VACE from scratch on data the project makes itself.

The embedded default needs a backbone that has *learned*, or every stylized clip is noise. This stage mirrors the
paper's starting point in miniature, with the same diffusers classes and folder format as real Wan2.1-VACE:

1. **VAE** (``AutoencoderKLWan``): reconstructs frames, then short clips (L1). ``vae_texture_share`` of its images
   are procedural (:mod:`pickstyle.data.textures`: noise at many scales, gradients, patterns, shapes, strokes,
   text, jittered photo crops at any zoom), the rest built-in photo clips and scenes, so it reconstructs footage
   it has never seen (:func:`footage_check`: held-out real photos), not only the ~8 built-in photos. It trains
   clip-wise; with ``model.tiny.vae_framewise`` (the default's) it is then marked frame-wise
   (:func:`~pickstyle.model.latent_space.framewise`): every later phase, and the backbone, encode and decode each
   frame on its own.
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
   nothing. After ``pretrain.steps``, a second cosine cycle (``refine_steps`` at ``refine_lr``, new batches) goes
   on from there, its own checkpointed phase: lengthening pretraining resumes the finished first cycle.
4. **Decoder**: the VAE decoder alone (encoder frozen, so the latent space stays) sharpened on clips.

The UMT5 text encoder keeps its seeded random weights (a fixed feature map of the tokens). Every phase checkpoints
to ``<models>/.pretrain/`` (outside the stage's DVC output, which DVC deletes before a rerun) and resumes from it
when its settings and the earlier phases' match (:data:`_PHASE_FIELDS`); each step's data and noise are drawn from
``(seed, phase, step)``, so a resumed run equals an uninterrupted one. Nothing here reads the ``clips`` section.
Deterministic on CPU for a fixed seed and thread count; runs on CUDA as well.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from pickstyle.config import WAN_NEGATIVE_PROMPT, Params, TinyBackbone
from pickstyle.data.footage import heldout_clips
from pickstyle.data.pretrain_set import (
    CHECK_SCENE_OFFSET,
    DIT_PHASE,
    PretrainError,
    phase_generator,
    phase_rng,
    pretrain_styles,
    render_clip,
    set_clip,
    to_video,
    vae_batch,
)
from pickstyle.files import atomic_path, resolve_device
from pickstyle.flow_matching import NUM_TRAIN_TIMESTEPS, add_noise, flow_matching_loss, sample_sigmas
from pickstyle.model import latent_space
from pickstyle.model.components import (
    TINY_SEED,
    calibrate_vae,
    init_tiny_pipeline,
    prompt_length,
    save_backbone,
    tiny_vae_config,
)
from pickstyle.schedules import warmup_cosine

__all__ = ["PretrainError", "footage_check", "pretrain", "pretrain_styles", "vae_check", "work_dir"]

Log = Callable[[str], None]


# --- checkpoints ------------------------------------------------------------------------------------------------


def work_dir(params: Params) -> Path:
    """Where pretraining keeps its checkpoints: beside, not inside, the stage's output (DVC deletes outputs)."""
    return Path(params.paths.models) / ".pretrain"


#: The ``pretrain`` fields each phase reads; a phase's checkpoint key holds its own and every earlier phase's, so
#: changing, say, ``steps`` resumes the finished VAE and latent set and retrains only the transformer onwards.
_PHASE_FIELDS = {
    "vae": ("seed", "holdout_styles", "vae_frame_steps", "vae_clip_steps", "vae_batch", "vae_lr",
            "vae_warmup_steps", "vae_texture_share", "scene_share", "scene_objects", "motion_mix", "static_prob"),
    "latents": ("clips", "task_mix", "controls"),
    "transformer": ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "shift", "null_text_prob"),
    "refine": ("refine_steps", "refine_lr"),
    "decoder": ("decoder_steps", "decoder_lr", "decoder_warmup_steps", "decoder_texture_share"),
}  # fmt: skip


def _settings_key(params: Params, phase: str) -> str:
    """What a phase's checkpoint must match to be resumed: its and the earlier phases' settings, the tiny sizes."""
    phases = list(_PHASE_FIELDS)
    fields = [f for p in phases[: phases.index(phase) + 1] for f in _PHASE_FIELDS[p]]
    # The decoder's width matters from the decoder phase on: the phases before it train the narrow VAE. The VAE
    # phase trains clip-wise either way (train_vae); frame-wise use starts with the latent set.
    tiny_exclude = {"decoder": None, "vae": {"vae_decoder_base_dim", "vae_framewise"}}.get(
        phase, {"vae_decoder_base_dim"}
    )
    payload = {
        "phase": phase,
        "pretrain": params.pretrain.model_dump(mode="json", include=set(fields)),
        "tiny": params.model.tiny.model_dump(mode="json", exclude=tiny_exclude),
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


# --- the one phase loop -----------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One optimisation phase: what it trains, how long, at which learning rate, and what one step computes.

    ``step_fn(step)`` returns the step's loss (a tensor to back-propagate) and, optionally, a callable giving extra
    numbers to log (called only on logging steps, e.g. the batch's PSNR).
    """

    name: str
    module: torch.nn.Module  # saved and restored by the phase's checkpoint
    trainable: list[torch.nn.Parameter]
    steps: int
    lr: float
    warmup: int
    step_fn: Callable[[int], tuple[torch.Tensor, Callable[[], dict[str, float]] | None]]
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    #: Log the mean loss since the last log line (the noisy flow-matching loss) instead of the last batch's
    #: (which goes with the last batch's PSNR).
    running_mean: bool = False


def run_phase(phase: Phase, params: Params, device: torch.device, log: Log, history: list[dict]) -> None:
    """AdamW with linear warm-up then cosine decay, gradient clipping at 1, a checkpoint every
    ``pretrain.checkpoint_every`` steps (model, optimizer and curve) that a rerun with the same settings resumes."""
    cfg = params.pretrain
    path, key = work_dir(params) / f"{phase.name}.pt", _settings_key(params, phase.name)
    opt = torch.optim.AdamW(phase.trainable, lr=phase.lr, weight_decay=phase.weight_decay, betas=phase.betas)
    start, state = 0, _load_state(path, key, log)
    if state is not None:
        phase.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history.extend(state["history"])
        start = state["step"]
        log(f"pretrain/{phase.name}: resumed at step {start}/{phase.steps}")
    if start >= phase.steps:
        return
    phase.module.to(device).train()
    t0, running = time.perf_counter(), []
    for step in range(start, phase.steps):
        for group in opt.param_groups:
            group["lr"] = phase.lr * warmup_cosine(step, phase.warmup, phase.steps)
        loss, extra = phase.step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(phase.trainable, 1.0)
        opt.step()
        running.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0 or done == phase.steps:
            shown_loss = float(np.mean(running)) if phase.running_mean else running[-1]
            row = {"phase": phase.name, "step": done, "loss": round(shown_loss, 5)}
            row.update({k: round(v, 3) for k, v in (extra() if extra else {}).items()})
            running = []
            history.append(row)
            rate = (done - start) / (time.perf_counter() - t0)
            shown = " ".join(f"{k} {v}" for k, v in row.items() if k not in ("phase", "step"))
            log(f"pretrain/{phase.name} step {done}/{phase.steps} {shown} ({rate:.2f} steps/s)")
        if done % cfg.checkpoint_every == 0 or done == phase.steps:
            own = [r for r in history if r["phase"] == phase.name]
            state = {
                "key": key,
                "step": done,
                "model": phase.module.state_dict(),
                "optimizer": opt.state_dict(),
            }
            _save_state(path, {**state, "history": own})
    phase.module.eval()


# --- phase 1: the VAE -------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.detach().clamp(-1, 1) - b.detach().clamp(-1, 1)) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def _vae_step(vae: Any, params: Params, device: torch.device, offset: int, frozen_encoder: bool):
    """A VAE step: L1 (``+ MSE`` for the decoder phase, encoder frozen, on ``decoder_texture_share`` procedural
    images) on the batch of step ``offset + i``."""
    share = params.pretrain.decoder_texture_share if frozen_encoder else None

    def step_fn(step: int):
        x = vae_batch(params, offset + step, share).to(device)
        with torch.no_grad() if frozen_encoder else contextlib.nullcontext():
            z = latent_space.vae_encode(vae, x).mode()
        y = latent_space.vae_decode(vae, z)
        loss = (y - x).abs().mean()
        if frozen_encoder:
            loss = loss + ((y - x) ** 2).mean()
        return loss, lambda: {"psnr": psnr(y, x)}

    return step_fn


def train_vae(pipe: Any, params: Params, device: torch.device, log: Log, history: list[dict]) -> None:
    """Phase 1: L1 reconstruction, frame-first (``vae_frame_steps``) then 5-frame clips (``vae_clip_steps``).

    Always clip-wise (the clips' later frames are more training data for the causal convolutions); the VAE is
    then marked frame-wise when ``model.tiny.vae_framewise`` says so, for every later phase and the backbone.
    Measured: this VAE used frame-wise reconstructs held-out real frames at 24.3 dB (23.5 clip-wise), one trained
    frame-wise from the start at 23.3 (colour errors on the portrait); README "The tiny backbone".
    """
    cfg = params.pretrain
    latent_space.set_framewise(pipe.vae, False)
    phase = Phase(
        name="vae",
        module=pipe.vae,
        trainable=list(pipe.vae.parameters()),
        steps=cfg.vae_frame_steps + cfg.vae_clip_steps,
        lr=cfg.vae_lr,
        warmup=cfg.vae_warmup_steps,
        step_fn=_vae_step(pipe.vae, params, device, 0, frozen_encoder=False),
    )
    run_phase(phase, params, device, log, history)
    latent_space.set_framewise(pipe.vae, params.model.tiny.vae_framewise)


@torch.no_grad()
def vae_check(pipe: Any, params: Params, device: torch.device, clips: int = 4) -> float:
    """Mean VAE reconstruction PSNR (dB) on ``clips`` procedural scenes that no phase trains on."""
    values = []
    frames = params.active.frames
    for i in range(clips):
        src, _, _ = render_clip(
            phase_rng(params.pretrain.seed, 9, i), params, frames, None, CHECK_SCENE_OFFSET + i
        )
        x = to_video(src)[None].to(device)
        y = latent_space.roundtrip(pipe.vae, x)
        values.append(psnr(y, x))
    return float(np.mean(values))


@torch.no_grad()
def footage_check(pipe: Any, params: Params, device: torch.device) -> dict[str, float]:
    """VAE reconstruction PSNR (dB) per held-out real clip (:mod:`pickstyle.data.footage`) and their ``mean``."""
    p = params.active
    values = {}
    for name, clip in heldout_clips(p.frames, p.height, p.width):
        x = to_video(clip)[None].to(device)
        y = latent_space.roundtrip(pipe.vae, x)
        values[name] = round(psnr(y, x), 3)
    values["mean"] = round(float(np.mean(list(values.values()))), 3) if values else float("nan")
    return values


# --- phase 2: the latent set ------------------------------------------------------------------------------------


@torch.no_grad()
def _encode(pipe: Any, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    return latent_space.encode(pipe.vae, to_video(frames)[None].to(device))[0].cpu()  # [16, f, h, w]


@torch.no_grad()
def _embed(pipe: Any, caption: str, device: torch.device) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(
        prompt=caption,
        do_classifier_free_guidance=False,
        max_sequence_length=prompt_length(pipe),
        device=device,
    )
    return embeds[0].cpu()


def build_latent_set(pipe: Any, params: Params, device: torch.device, log: Log) -> dict[str, Any]:
    """Phase 2: render (:func:`~pickstyle.data.pretrain_set.set_clip`) and encode the transformer's clips, after
    calibrating the VAE's latent statistics. Stores each clip's target latent, its context's reactive latent (zeros
    for text-to-video, flagged by ``has_context``) as fp16, its caption and task."""
    cfg = params.pretrain
    path, key = work_dir(params) / "latents.pt", _settings_key(params, "latents")
    state = _load_state(path, key, log)
    if state is not None:
        pipe.vae.register_to_config(latents_mean=state["latents_mean"], latents_std=state["latents_std"])
        return state
    frames = params.active.frames
    # Latent statistics of the trained VAE, on clips of the set's own kind.
    calib = [render_clip(phase_rng(cfg.seed, 8, i), params, frames, None, None)[0] for i in range(8)]
    calibrate_vae(pipe.vae, torch.stack([to_video(c) for c in calib]).to(device))
    targets, contexts, has_context, captions, tasks = [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(cfg.clips):
        clip = set_clip(params, i)
        target = _encode(pipe, clip["target"], device)
        if clip["task"] == "reconstruct":
            context = target  # the RGB source is the target: encoded once
        elif clip["context"] is not None:
            context = _encode(pipe, clip["context"], device)
        else:
            context = None
        targets.append(target.half())
        contexts.append((context if context is not None else torch.zeros_like(target)).half())
        has_context.append(context is not None)
        captions.append(clip["caption"])
        tasks.append(clip["task"])
        if (i + 1) % 100 == 0:
            log(f"pretrain/latents {i + 1}/{cfg.clips} ({time.perf_counter() - t0:.0f} s)")
    unique = sorted(set(captions))
    state = {
        "key": key,
        "targets": torch.stack(targets),
        "contexts": torch.stack(contexts),
        "has_context": torch.tensor(has_context),
        "captions": captions,
        "tasks": tasks,
        "embeds": {c: _embed(pipe, c, device) for c in unique},
        "null": _embed(pipe, WAN_NEGATIVE_PROMPT, device),
        "latents_mean": list(pipe.vae.config.latents_mean),
        "latents_std": list(pipe.vae.config.latents_std),
    }
    _save_state(path, state)
    kinds = {t: tasks.count(t) for t in sorted(set(tasks))}
    log(f"pretrain/latents: {cfg.clips} clips {kinds}, {len(unique)} captions")
    return state


# --- phase 3: the transformer -----------------------------------------------------------------------------------


def _batch(data: dict[str, Any], zeros: torch.Tensor, mask_channels: int, params: Params, step: int):
    """Latents, contexts and text embeddings of one step, and its noise and sigmas."""
    cfg = params.pretrain
    rng = phase_rng(cfg.seed, DIT_PHASE, step)
    gen = phase_generator(cfg.seed, DIT_PHASE, step)
    idx = rng.integers(len(data["captions"]), size=cfg.batch_size)
    latents, contexts, texts = [], [], []
    ones = torch.ones(mask_channels, *zeros.shape[1:])
    for i in idx:
        target = data["targets"][i].float()
        # text-to-video: an empty (zeros) video, as VACE gets for plain text-to-video
        reactive = data["contexts"][i].float() if bool(data["has_context"][i]) else zeros
        contexts.append(latent_space.vace_context(zeros, reactive, ones))  # [32 + mask, f, h, w]
        latents.append(target)
        null = rng.random() < cfg.null_text_prob
        texts.append(data["null"] if null else data["embeds"][data["captions"][i]])
    latents = torch.stack(latents)
    sigmas = sample_sigmas(cfg.batch_size, cfg.shift, gen)
    noise = torch.randn(latents.shape, generator=gen)
    return latents, torch.stack(contexts), torch.stack(texts), noise, sigmas


def train_transformer(
    pipe: Any,
    data: dict[str, Any],
    params: Params,
    device: torch.device,
    log: Log,
    history: list[dict],
    refine: bool = False,
) -> None:
    """Phase 3: flow matching of the whole transformer (main and VACE blocks) on the latent set.

    With ``refine``, the same training continues for a second cosine cycle (a warm restart at
    ``pretrain.refine_lr`` for ``pretrain.refine_steps``, on batches the first cycle never drew): its own phase and
    checkpoint, so lengthening pretraining resumes the finished first cycle instead of redoing it.
    """
    cfg = params.pretrain
    model = pipe.transformer
    p = params.active
    # Normalised VAE(zeros), exactly as the pipeline makes the context's inactive half.
    zeros = latent_space.zeros_latent(pipe.vae, (1, 3, p.frames, p.height, p.width), device)[0].cpu()
    mask_channels = model.config.vace_in_channels - 2 * zeros.shape[0]
    offset = cfg.steps if refine else 0

    def step_fn(step: int):
        latents, contexts, texts, noise, sigmas = (
            t.to(device) for t in _batch(data, zeros, mask_channels, params, offset + step)
        )
        pred = model(
            hidden_states=add_noise(latents, noise, sigmas),
            timestep=sigmas * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=texts,
            control_hidden_states=contexts,
            return_dict=False,
        )[0]
        return flow_matching_loss(pred, latents, noise), None

    phase = Phase(
        name="refine" if refine else "transformer",
        module=model,
        trainable=list(model.parameters()),
        steps=cfg.refine_steps if refine else cfg.steps,
        lr=cfg.refine_lr if refine else cfg.lr,
        warmup=cfg.warmup_steps,
        step_fn=step_fn,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.99),
        running_mean=True,
    )
    run_phase(phase, params, device, log, history)


# --- phase 4: the VAE decoder ---------------------------------------------------------------------------------


def widen_decoder(vae: Any, tiny: TinyBackbone) -> Any:
    """The final VAE: ``vae``'s encoder (and latent statistics) with a fresh decoder of ``vae_decoder_base_dim``
    channels, or ``vae`` itself when the decoder keeps the encoder's width."""
    width = tiny.vae_decoder_base_dim or tiny.vae_base_dim
    if width == (vae.config.get("decoder_base_dim") or vae.config.base_dim):
        return vae
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED + 3)
        wide = AutoencoderKLWan(**tiny_vae_config(tiny)).to(vae.device)
    for name in ("encoder", "quant_conv", "post_quant_conv"):
        getattr(wide, name).load_state_dict(getattr(vae, name).state_dict())
    wide.register_to_config(
        latents_mean=list(vae.config.latents_mean), latents_std=list(vae.config.latents_std)
    )
    latent_space.set_framewise(wide, latent_space.framewise(vae))
    return wide


def finetune_decoder(pipe: Any, params: Params, device: torch.device, log: Log, history: list[dict]) -> None:
    """Phase 4: the decoder alone (encoder frozen: the transformer's latent space stays), L1 + MSE on clips.

    With ``model.tiny.vae_decoder_base_dim`` wider than the encoder, a new, wider decoder is trained from scratch
    here (:func:`widen_decoder`; ``pipe.vae`` is replaced); otherwise the VAE phase's decoder is fine-tuned.
    """
    cfg = params.pretrain
    pipe.vae = widen_decoder(pipe.vae, params.model.tiny).to(device)
    vae = pipe.vae
    frozen = [vae.encoder, vae.quant_conv]
    for module in frozen:
        module.requires_grad_(False)
    offset = cfg.vae_frame_steps + cfg.vae_clip_steps  # clip batches the VAE phase never drew
    phase = Phase(
        name="decoder",
        module=vae,
        trainable=[p for p in vae.parameters() if p.requires_grad],
        steps=cfg.decoder_steps,
        lr=cfg.decoder_lr,
        warmup=cfg.decoder_warmup_steps,
        step_fn=_vae_step(vae, params, device, offset, frozen_encoder=True),
    )
    run_phase(phase, params, device, log, history)
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
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="first cycle")
        if phase == "transformer":
            # the second cycle (warm restart) continues the step axis after the first
            offset = rows[-1]["step"] if rows else 0
            refine = [r for r in history if r["phase"] == "refine"]
            if refine:
                ax.plot(
                    [offset + r["step"] for r in refine], [r["loss"] for r in refine], label="second cycle"
                )
                ax.legend(fontsize=7)
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
        until: Stop after this phase (``vae``, ``latents`` or ``transformer``, its second cycle included),
            keeping its checkpoint; ``None`` = all.

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
    # Phases 1-3 train the VAE with a decoder as narrow as its encoder (fast); phase 4 may widen the decoder.
    pipe = init_tiny_pipeline(params.model.tiny.model_copy(update={"vae_decoder_base_dim": None}))
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
    train_transformer(pipe, data, params, device, log, history, refine=True)
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
            for p in ("vae", "transformer", "refine", "decoder")
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
