"""The ``train`` stage: one explicit flow-matching loop that trains the context-style LoRA adapters.

Only the LoRA matrices on the VACE context blocks' self-attention q/k/v train; the Wan2.1-VACE backbone is frozen
(docs/method.md §2). A step, as in the PickStyle reference (arXiv 2510.07546, built on DiffSynth-Studio)::

    σ = shift·u / (1 + (shift−1)·u),  u ~ U(0, 1)          # shifted uniform timestep, shift 5
    x_t = (1 − σ)·x0 + σ·ε                                   # x0 = the style clip's latent
    loss = w(σ) · ‖ f(x_t, σ·1000, text, context) − (ε − x0) ‖²   # w = mid-schedule bell, mean 1

Data comes from the ``latents`` stage's WebDataset shards (``mode: cached``) or, for comparison with the reference,
from the clip shards encoded by the VAE and text encoder every step (``mode: on_the_fly``). The sample order is a
pure function of ``params.seed``, the epoch and the process rank, so a checkpoint only needs the number of samples
each process has consumed. Multi-GPU runs go through ``accelerate launch`` (``configs/accelerate/``): DDP, or
FSDP2 when a bf16 replica does not fit (14B): only rank 0 reads the weights, and checkpoints and the final adapter
gather the LoRA tensors alone (never the backbone), each rank saving its own optimizer shard.

``train(params)`` continues from the newest checkpoint made with the same settings and data
(:mod:`pickstyle.checkpoints`) and ends with the same adapter, bit for bit on CPU, as an uninterrupted run; the
data stream is :mod:`pickstyle.data.stream`, the MLflow run :func:`pickstyle.tracking.train_run`.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from pickstyle.checkpoints import (
    checkpoint_dir,
    find_resumable,
    gather_lora,
    last_checkpoint,
    load_lora,
    restore_training_state,
    run_key,
    save_checkpoint,
)
from pickstyle.config import Params
from pickstyle.data.shards import list_shards
from pickstyle.data.stream import MixedStream, collate, meta_of, motion_report, styles_in
from pickstyle.data.video import read_video
from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_path, resolve_device, write_json
from pickstyle.flow_matching import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    bell_weights,
    flow_matching_loss,
    sample_sigmas,
)
from pickstyle.latents import context_constants, decode_latents, encode_clip, null_prompt
from pickstyle.model.adapters import INFO_NAME, STYLES_NAME, WEIGHT_NAME, save_adapter, write_styles_index
from pickstyle.model.components import ensure_backbone, resolve_dtype
from pickstyle.model.trainable import build_trainable, lora_config, parameter_or_buffer
from pickstyle.progress import progress
from pickstyle.schedules import warmup_constant, warmup_cosine
from pickstyle.tracking import train_run

#: Summary keys that vary from run to run (timings, the MLflow run id, the step a resumed run started from):
#: returned and logged, never written, so a resumed run's folder (and DVC hash) is an uninterrupted run's.
VOLATILE = ("samples_per_s", "seconds", "mlflow_run_id", "device", "start_step")
#: Noise levels of the fit probe (:class:`_FitProbe`): where sampling decides a clip's colours and style.
FIT_SIGMAS = (1.0, 0.9, 0.6)


class TrainingError(PickstyleError):
    """Training cannot go on (a non-finite loss or gradient, a bad adapter setup); names the step."""


# --- the maths: small pure functions -----------------------------------------------------------------------------


def draw_noise(
    keys: list[str], shape: tuple[int, ...], shift: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ (shifted uniform, :func:`~pickstyle.flow_matching.sample_sigmas`) and ε ~ N(0, I) for a batch of
    ``shape`` ``[b, z, f, h, w]``, from the run's generator (restored on resume, so a resumed run is exact).
    ``keys`` name the batch's clips; the tests replace this function to fix the noise per clip."""
    del keys
    sigmas = sample_sigmas(shape[0], shift, generator)  # [b]
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return sigmas, noise


def frame_window(
    window: int | None, generator: torch.Generator, *videos: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The same random window of ``window`` latent frames (dim 2) of every ``[b, c, f, h, w]`` tensor of one
    step, its start drawn from the run's generator; all frames when ``window`` is null or covers the clip.

    A step on w of f frames costs less than a whole-clip step (3 of 9: about half; per-step overheads stay), so
    the same time buys more steps; the windows start anywhere, so every frame (and its rotary position 0 .. w-1) is trained."""
    frames = videos[0].shape[2]
    if not window or window >= frames:
        return videos
    start = int(torch.randint(frames - window + 1, (1,), generator=generator))
    return tuple(v[:, :, start : start + window] for v in videos)


# --- the data of one step ------------------------------------------------------------------------------------


def _decode_cached(raw: dict[str, Any]) -> dict[str, torch.Tensor]:

    return decode_latents(raw)


def _encode_on_the_fly(pipe, raw: dict[str, Any], params: Params) -> dict[str, torch.Tensor]:
    """Decode a clip sample's videos and encode them like the reference does every step (VAE + text)."""

    meta = meta_of(raw)
    src, _ = read_video(raw["src.mp4"])
    style, _ = read_video(raw["style.mp4"])
    with torch.no_grad():
        enc = encode_clip(pipe, src, style, meta["caption"])
    return {k: v.detach().to("cpu", torch.float32) for k, v in enc.items() if torch.is_tensor(v)}


# --- outputs -----------------------------------------------------------------------------------------------------


def _write_loss_outputs(history: list[dict[str, float]], out: Path, fit_base: float | None = None) -> None:
    """``loss.csv`` (DVC plots: x=step, y=loss; ``fit_loss`` where the probe ran) and ``loss.png``: the raw loss,
    its 20-step moving average and, on a second panel, the fit probe against the backbone alone (``fit_base``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(out / "loss.csv") as tmp, open(tmp, "w", newline="") as f:
        # no timings: the same params give the same file (and DVC hash) on any machine
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "fit_loss"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fit = [(h["step"], h["fit_loss"]) for h in history if "fit_loss" in h]
    if fit:
        fig, (ax, fax) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
        fax.plot([s for s, _ in fit], [v for _, v in fit], marker="o", ms=3, label="adapter")
        if fit_base is not None:
            fax.axhline(fit_base, color="grey", ls="--", label="backbone alone")
        fax.set_xlabel("step")
        fax.set_ylabel(f"fixed-noise loss, σ ∈ {{{', '.join(map(str, FIT_SIGMAS))}}}")
        fax.set_title("fit probe (the same training clips and noise)", fontsize=9)
        fax.grid(alpha=0.3)
        fax.legend()
    else:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 20:
        avg = np.convolve(losses, np.ones(20) / 20, mode="valid")
        ax.plot(steps[19:], avg, lw=1.6, label="20-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@dataclass
class _FitProbe:
    """``train.fit_clips`` training clips with fixed noise at :data:`FIT_SIGMAS`: a deterministic loss curve.

    The training loss is one clip at one random σ per step, noise far larger than what the adapter changes; the
    probe scores the same clips with the same noise every ``train.fit_every`` steps (and the backbone alone once,
    the curve's reference), so the curve shows whether the adapter is learning its pairs at all. With
    ``train.frame_window`` it scores the clips' first window, the length a step trains on.
    """

    batches: list[dict[str, Any]]
    noises: list[list[torch.Tensor]]
    base: float | None = None

    @classmethod
    def draw(cls, target: _Target, params: Params) -> _FitProbe | None:
        if params.train.fit_clips == 0:
            return None
        # Its own stream and generator: the training draws (and so a resumed run's bits) stay as they are.
        stream = MixedStream(
            target.shards, seed=params.seed + 1, rank=0, world_size=1, recon_ratio=0.0, style=target.style
        )
        generator = torch.Generator().manual_seed(params.seed + 1)
        batches = [collate([decode_latents(next(stream))]) for _ in range(params.train.fit_clips)]
        # As a step sees them: the first ``train.frame_window`` frames (the training's clip length and cost).
        window = params.train.frame_window
        batches = [
            {**b, "latents": b["latents"][:, :, :window], "context": b["context"][:, :, :window]}
            if window
            else b
            for b in batches
        ]
        noises = [[torch.randn(b["latents"].shape, generator=generator) for _ in FIT_SIGMAS] for b in batches]
        return cls(batches, noises)

    def loss(self, run: _Run, device: torch.device, adapter: bool = True) -> float:
        """Mean flow-matching loss over the probe's clips and noise levels (no gradients)."""
        model = run.model
        inner = getattr(model, "module", model)  # DDP: the wrapped model, whose adapters can be switched off
        was_training = model.training
        model.eval()
        if not adapter:
            inner.disable_adapters()
        losses = []
        try:
            with (
                torch.no_grad(),
                torch.autocast(
                    device.type, dtype=run.compute_dtype, enabled=run.compute_dtype != torch.float32
                ),
            ):
                for batch, noises in zip(self.batches, self.noises, strict=True):
                    latents = batch["latents"].to(device, torch.float32)
                    for sigma, noise in zip(FIT_SIGMAS, noises, strict=True):
                        sigmas = torch.full((latents.shape[0],), sigma, device=device)
                        noise = noise.to(device)
                        pred = _predict(
                            model,
                            latents,
                            noise,
                            sigmas,
                            batch["prompt_embeds"].to(device, torch.float32),
                            batch["context"].to(device, torch.float32),
                            run.scale,
                        )
                        losses.append(flow_matching_loss(pred, latents, noise).item())
        finally:
            if not adapter:
                inner.enable_adapters()
            model.train(was_training)
        return float(np.mean(losses))


# --- the loop ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One adapter a run trains: on the clips of ``style`` (None: every style, the joint adapter) in ``shards``,
    written to ``out``, checkpointed in ``ckpt_root``."""

    style: str | None
    out: Path
    ckpt_root: Path
    shards: list[Path]


@dataclass
class _Run:
    """What the loop works on: the prepared model and optimizer, the data stream, and where a resumed run stands."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: MixedStream
    next_batch: Callable[[], dict[str, Any]]
    generator: torch.Generator
    scale: torch.Tensor
    compute_dtype: torch.dtype
    key: dict[str, Any]
    lora: dict[str, Any]
    lora_params: int
    target: _Target
    start_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    #: The null text's embedding ``[L, D]`` that ``train.caption_dropout`` swaps in (None: no dropout).
    null_prompt: torch.Tensor | None = None
    #: The fixed-noise fit probe (None with ``train.fit_clips: 0``).
    fit: _FitProbe | None = None


def train(
    params: Params, fresh: bool = False, *, on_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train the context-style LoRA adapter(s); writes ``<models>/adapter/`` and an MLflow run per adapter.

    With ``train.adapters: joint`` one adapter learns every style of the data (the paper); with ``per_style``
    each style of the data gets its own adapter, trained on that style's clips alone for ``train.steps`` steps,
    in ``<models>/adapter/<style>/`` beside an index (:data:`~pickstyle.model.adapters.STYLES_NAME`) that
    :class:`~pickstyle.model.adapters.AdapterSet` reads to pick the adapter a prompt names.

    Runs as one process or under ``accelerate launch`` / ``torchrun`` (DDP: every process draws its own
    samples, noise and timesteps; gradients are averaged, so all processes hold the same adapter; or FSDP2).

    Args:
        params: The pipeline params (``train``, ``paths``, the active profile's LoRA defaults, ``seed``).
        fresh: Start from step 0 and delete the old checkpoints. Otherwise the run continues from the newest
            checkpoint in ``<models>/.checkpoints/adapter`` made with the same settings and data (a killed
            ``dvc repro`` picks up where it stopped); one made with other settings is replaced, and the log
            says which settings differ.
        on_step: Called with the step number after each optimizer step, counted over all adapters (progress
            reporting; an exception it raises stops the run the way a kill would, after the last checkpoint).

    Returns:
        The summary also written to ``train_summary.json``: losses, steps, samples/s, LoRA size, MLflow run id
        (per style under ``styles`` with ``per_style``).

    Raises:
        TrainingError: A non-finite loss or gradient (the message names the step; the last good checkpoint
            stays). CheckpointError: an incompatible checkpoint. StreamError: data with no usable sample.
    """
    t = params.train
    _prefer_expandable_segments()
    accelerator = Accelerator(cpu=resolve_device(t.device) == "cpu")
    main = accelerator.is_main_process
    out, data_dir = Path(params.paths.models) / "adapter", Path(params.paths.data)
    shards = (
        list_shards(data_dir / "latents", "latents")
        if t.mode == "cached"
        else list_shards(data_dir / "clips", "clips")
    )
    if t.adapters == "joint":
        if main:
            _clear_layout(out, styles=None)
        return _train_adapter(
            params, accelerator, fresh, _Target(None, out, checkpoint_dir(params), shards), on_step
        )

    styles = styles_in(shards)
    if not styles:
        raise TrainingError(f"{shards[0].parent}: no pair clip names its style (train.adapters: per_style)")
    if main:
        _clear_layout(out, styles=list(styles))
    accelerator.wait_for_everyone()
    summaries = {}
    for i, (style, entry) in enumerate(styles.items()):
        print(
            f"train: adapter {i + 1}/{len(styles)}, {style!r} ({len(entry['shards'])} of {len(shards)} shards)"
        )
        target = _Target(
            style, out / style, checkpoint_dir(params).with_name(f"adapter-{style}"), entry["shards"]
        )
        hook = None if on_step is None else functools.partial(_offset_step, on_step, i * t.steps)
        summaries[style] = _train_adapter(params, accelerator, fresh, target, hook)
    summary = _styles_summary(summaries, out)
    if main:
        write_styles_index(out, {style: entry["names"] for style, entry in styles.items()})
        _write_styles_loss(out, list(styles))
        write_json(out / "train_summary.json", _stable(summary))
    accelerator.wait_for_everyone()
    return summary


def _offset_step(on_step: Callable[[int], None], offset: int, step: int) -> None:
    on_step(offset + step)


def _stable(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without what varies from run to run (:data:`VOLATILE`), also inside ``styles``."""
    out = {k: v for k, v in summary.items() if k not in VOLATILE}
    if "styles" in out:
        out["styles"] = {s: _stable(v) for s, v in out["styles"].items()}
    return out


def _clear_layout(out: Path, styles: list[str] | None) -> None:
    """Remove what the other layout (or other styles) left in ``out``: a joint run drops a per-style index and
    its folders; a per-style run drops a joint adapter's files and the folders of styles no longer trained."""
    if not out.is_dir():
        return
    (out / "train_summary.json").unlink(missing_ok=True)  # present = the adapter(s) in ``out`` are complete
    (out / STYLES_NAME).unlink(missing_ok=True)
    for sub in sorted(p for p in out.iterdir() if p.is_dir() and (p / WEIGHT_NAME).is_file()):
        if styles is None or sub.name not in styles:
            shutil.rmtree(sub)
    if styles is not None:
        for name in (WEIGHT_NAME, INFO_NAME, "loss.csv", "loss.png"):
            (out / name).unlink(missing_ok=True)


def _styles_summary(summaries: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """One summary over the per-style runs: their shared settings, the mean losses, and each run's own."""
    first = next(iter(summaries.values()))
    seconds = sum(s["seconds"] for s in summaries.values())
    samples = sum((s["samples_per_s"] or 0.0) * s["seconds"] for s in summaries.values())

    def mean(key: str) -> float | None:
        values = [s[key] for s in summaries.values() if s.get(key) is not None]
        return float(np.mean(values)) if values else None

    shared = ("steps", "world_size", "batch_size", "grad_accum", "mode", "device", "lora", "lora_params")
    return {
        "adapters": "per_style",
        **{k: first[k] for k in shared},
        "first_loss": mean("first_loss"),
        "final_loss": mean("final_loss"),
        "fit_loss_base": mean("fit_loss_base"),
        "fit_loss_final": mean("fit_loss_final"),
        "samples_per_s": samples / seconds if seconds else None,
        "seconds": seconds,
        "adapter_dir": str(out),
        "styles": summaries,
    }


def _write_styles_loss(out: Path, styles: list[str]) -> None:
    """``loss.png`` of a per-style folder: every style's 20-step mean loss and fit probe, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, fax) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    for i, style in enumerate(styles):
        with open(out / style / "loss.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        colour = f"C{i}"
        losses = [float(r["loss"]) for r in rows]
        if len(losses) >= 20:
            ax.plot(
                range(20, len(losses) + 1),
                np.convolve(losses, np.ones(20) / 20, mode="valid"),
                color=colour,
                label=style,
            )
        fit = [(int(r["step"]), float(r["fit_loss"])) for r in rows if r.get("fit_loss")]
        if fit:
            fax.plot([s for s, _ in fit], [v for _, v in fit], marker="o", ms=3, color=colour, label=style)
        summary = out / style / "train_summary.json"
        base = json.loads(summary.read_text()).get("fit_loss_base") if summary.is_file() else None
        if base is not None:
            fax.axhline(base, color=colour, ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("weighted flow-matching loss (20-step mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:  # runs shorter than the 20-step window draw no curve
        ax.legend(fontsize=8)
    fax.set_xlabel("step")
    fax.set_ylabel(f"fixed-noise loss, σ ∈ {{{', '.join(map(str, FIT_SIGMAS))}}}")
    fax.set_title("fit probe per adapter (dashed: the backbone alone)", fontsize=9)
    fax.grid(alpha=0.3)
    if fax.lines:
        fax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _train_adapter(
    params: Params,
    accelerator: Accelerator,
    fresh: bool,
    target: _Target,
    on_step: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Train the adapter of ``target`` (the loop of :func:`train`); returns its summary."""
    t = params.train
    main = accelerator.is_main_process
    run = _setup(params, accelerator, fresh, target)
    if run.fit is not None:
        run.fit.base = run.fit.loss(run, accelerator.device, adapter=False)
    pbar = progress(total=t.steps, initial=run.start_step, disable=not main, desc="train", unit="step")
    with (
        train_run(params, run.mlflow_run_id, enabled=main and t.mlflow, style=target.style) as run_id,
        contextlib.closing(pbar),
    ):
        seconds, samples, window, step, grad_norm = 0.0, 0, [], run.start_step, None
        for step in range(run.start_step + 1, t.steps + 1):
            tic = time.perf_counter()
            loss, n, grad_norm, lr = _optimizer_step(run, params, accelerator, step)
            took = time.perf_counter() - tic
            seconds, samples = seconds + took, samples + n
            run.history.append({"step": step, "loss": loss, "lr": lr, "samples_per_s": round(n / took, 3)})
            window.append(loss)
            if run.fit is not None and (step % t.fit_every == 0 or step == t.steps):
                run.history[-1]["fit_loss"] = run.fit.loss(run, accelerator.device)
                if run_id is not None:
                    mlflow.log_metric("fit_loss", run.history[-1]["fit_loss"], step=step)
            pbar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                pbar.set_postfix(loss=f"{np.mean(window):.4f}", samples_s=f"{samples / seconds:.2f}")
                if run_id is not None:
                    mlflow.log_metrics(
                        {"loss": float(np.mean(window)), "lr": lr, "samples_per_s": samples / seconds},
                        step=step,
                    )
                window = []
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0:
                _checkpoint(run, params, accelerator, step, loss, run_id)
            if on_step is not None:
                on_step(step)
        summary = _summary(run, params, accelerator, step, grad_norm, samples, seconds, run_id)
        # Gathered on every process (a collective under FSDP), written by the main one: whole tensors, never shards.
        lora = gather_lora(accelerator, run.model)
        if main:
            _write_final(
                accelerator.unwrap_model(run.model),
                lora,
                target.out,
                run.history,
                summary,
                run_id,
            )
        accelerator.wait_for_everyone()
    return summary


def _prefer_expandable_segments() -> None:
    """Before CUDA starts: growable segments instead of fixed blocks, so the allocator does not fragment on
    the varying activation sizes of checkpointed blocks (the user's own setting wins)."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def _setup(params: Params, accelerator: Accelerator, fresh: bool, target: _Target) -> _Run:
    """Data, model, optimizer and scheduler, resumed from the newest matching checkpoint unless ``fresh``."""
    t = params.train
    device = accelerator.device
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out, ckpt_root, shards = target.out, target.ckpt_root, target.shards
    data_dir = Path(params.paths.data)
    if main:
        (out / "train_summary.json").unlink(missing_ok=True)  # present = the adapter in ``out`` is complete
        ensure_backbone(params)
    lora_cfg = lora_config(params)
    key = run_key(params, shards, lora_cfg, world)
    if target.style is not None:
        key["style"] = target.style
    ckpt, why = (None, "fresh start requested") if fresh else find_resumable(ckpt_root, key, t.steps)
    if main:
        print(f"train: {why}")
        if ckpt is None:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()

    # Per-process seeds: processes must draw different noise, and a rerun must draw the same.
    random.seed(params.seed + rank)
    np.random.seed(params.seed + rank)
    torch.manual_seed(params.seed + rank)
    generator = torch.Generator().manual_seed(params.seed * 1_000_003 + rank)

    # FSDP (version 2 only: bf16 base and fp32 LoRA in one unit) with RAM-efficient loading: only the main process
    # reads the weights; the others build an empty model, and accelerate broadcasts the main one's into the shards.
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not accelerator.is_fsdp2:
        raise TrainingError("FSDP training needs fsdp_version: 2 (configs/accelerate/fsdp-14b.yaml)")
    ram_efficient = fsdp and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading
    empty = ram_efficient and t.mode == "cached" and not main
    transformer, pipe = build_trainable(params, str(device), t.mode, empty=empty)
    if ram_efficient:
        # accelerate's broadcast (fsdp2_load_full_state_dict) looks tensors up with transformers'
        # ``get_parameter_or_buffer``, which diffusers models lack.
        transformer.get_parameter_or_buffer = functools.partial(parameter_or_buffer, transformer)
    state = load_lora(ckpt, transformer, lora=lora_cfg, world_size=world, empty=empty) if ckpt else {}
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    if fsdp:
        # accelerate swaps the optimizer's parameters for the sharded ones by data_ptr, which is 0 for every meta
        # parameter of an empty model: point it at the sharded trainable parameters (same order, no state yet).
        optimizer.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
    if t.lr_schedule == "cosine":
        factor = functools.partial(warmup_cosine, warmup_steps=t.warmup_steps, total=t.steps)
    else:
        factor = functools.partial(warmup_constant, warmup_steps=t.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    position = (
        restore_training_state(ckpt, optimizer=optimizer, scheduler=scheduler, generator=generator, rank=rank)
        if ckpt
        else None
    )
    stream = MixedStream(
        shards,
        seed=params.seed,
        rank=rank,
        world_size=world,
        recon_ratio=t.recon_ratio,
        position=position,
        style=target.style,
    )

    null = None
    if t.caption_dropout > 0:
        if pipe is not None:
            null = null_prompt(pipe, device)
        else:
            null = context_constants(data_dir / "latents").get("null_prompt")
            if null is None:
                raise TrainingError(
                    f"{data_dir / 'latents'}: no null_prompt for train.caption_dropout (latents made by an older "
                    "version: rerun `dvc repro latents`, or set train.caption_dropout: 0)"
                )

    def next_batch() -> dict[str, Any]:
        samples = []
        for _ in range(t.batch_size):
            raw = next(stream)
            sample = _decode_cached(raw) if pipe is None else _encode_on_the_fly(pipe, raw, params)
            samples.append({**sample, "__key__": raw["__key__"]})
        return collate(samples)

    return _Run(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        stream=stream,
        next_batch=next_batch,
        generator=generator,
        scale=torch.ones(len(accelerator.unwrap_model(model).config.vace_layers), device=device),
        # Autocast by device type and the base weights' dtype: bf16 compute wherever the frozen base is bf16 (CUDA
        # or CPU), none for an fp32 base. LoRA master weights stay fp32 either way.
        compute_dtype=resolve_dtype(params.model.dtype, str(device)),
        key=key,
        lora=lora_cfg,
        lora_params=lora_params,
        target=target,
        start_step=int(state.get("step", 0)),
        history=list(state.get("history", [])),
        mlflow_run_id=state.get("mlflow_run_id"),
        null_prompt=null,
        fit=_FitProbe.draw(target, params) if t.mode == "cached" else None,
    )


def _optimizer_step(
    run: _Run, params: Params, accelerator: Accelerator, step: int
) -> tuple[float, int, float | None, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, clips, gradient norm, lr)."""
    t = params.train
    ckpt_root = run.target.ckpt_root
    autocast = run.compute_dtype != torch.float32
    loss_value, samples, grad_norm = 0.0, 0, None
    for micro in range(t.grad_accum):
        batch = run.next_batch()
        # Only the last micro-batch all-reduces the summed gradients across processes.
        sync = micro == t.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(run.model):
            loss = _micro_step(
                run.model,
                batch,
                params,
                run.scale,
                run.generator,
                accelerator.device,
                run.compute_dtype,
                autocast,
                run.null_prompt,
            )
            # Gradients of a mean over grad_accum x batch_size clips: each micro-batch's mean loss / grad_accum.
            accelerator.backward(loss / t.grad_accum)
        loss_value += accelerator.reduce(loss.detach(), reduction="mean").item() / t.grad_accum
        samples += batch["latents"].shape[0] * accelerator.num_processes
    if not math.isfinite(loss_value):
        raise TrainingError(
            f"step {step}: the loss is {loss_value}; stopped. Last good checkpoint: "
            f"{last_checkpoint(ckpt_root)} (lower train.lr, then resume or restart)"
        )
    if t.grad_clip > 0:
        grad_norm = float(accelerator.clip_grad_norm_(run.model.parameters(), t.grad_clip))
        if not math.isfinite(grad_norm):
            raise TrainingError(
                f"step {step}: the gradient norm is {grad_norm}; stopped. Last good checkpoint: "
                f"{last_checkpoint(ckpt_root)}"
            )
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_value, samples, grad_norm, lr


def _checkpoint(
    run: _Run, params: Params, accelerator: Accelerator, step: int, loss: float, run_id: str | None
) -> None:
    save_checkpoint(
        run.target.ckpt_root,
        step,
        accelerator=accelerator,
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        generator=run.generator,
        position=run.stream.position,
        state={
            "step": step,
            "loss": loss,
            "history": run.history,
            "lora": run.lora,
            "world_size": accelerator.num_processes,
            "mlflow_run_id": run_id,
            "seed": params.seed,
            "key": run.key,
        },
        keep=params.train.keep_checkpoints,
    )


def _summary(
    run: _Run,
    params: Params,
    accelerator: Accelerator,
    step: int,
    grad_norm: float | None,
    samples: int,
    seconds: float,
    run_id: str | None,
) -> dict[str, Any]:
    t, history, world = params.train, run.history, accelerator.num_processes
    return {
        **({"style": run.target.style} if run.target.style is not None else {}),
        "steps": step,
        "start_step": run.start_step,
        "world_size": world,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "mode": t.mode,
        "device": str(accelerator.device),
        "lora_params": run.lora_params,
        **motion_report(Path(params.paths.data) / "latents", t.steps * t.batch_size * t.grad_accum * world),
        "lora": run.lora,
        "first_loss": float(np.mean([h["loss"] for h in history[:20]])) if history else None,
        "final_loss": float(np.mean([h["loss"] for h in history[-20:]])) if history else None,
        # the last step's gradient norm before clipping (None with grad_clip 0)
        "grad_norm": grad_norm,
        # the fixed-noise probe (_FitProbe): the backbone alone, and the adapter at its last check
        "fit_loss_base": run.fit.base if run.fit is not None else None,
        "fit_loss_final": next((h["fit_loss"] for h in reversed(history) if "fit_loss" in h), None),
        "samples_per_s": samples / seconds if seconds else None,
        "seconds": seconds,
        "adapter_dir": str(run.target.out),
        "mlflow_run_id": run_id,
    }


def _micro_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    params: Params,
    scale: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
    compute_dtype: torch.dtype,
    autocast: bool,
    null_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """One micro-batch's weighted flow-matching loss (forward only; the caller runs the backward pass).

    With ``train.activation_offload`` the tensors autograd saves for the backward pass go to CPU memory as they
    are made (``save_on_cpu``, pinned on CUDA) and come back one block at a time during backward.
    """
    t = params.train
    latents = batch["latents"].to(device, torch.float32)  # [b, 16, f, h, w]
    context = batch["context"].to(device, torch.float32)  # [b, 96, f, h, w]
    prompt_embeds = batch["prompt_embeds"].to(device, torch.float32)  # [b, L, D]
    if null_prompt is not None:
        # Caption dropout, drawn from the run's generator (restored on resume, so a resumed run stays exact).
        drop = torch.rand(prompt_embeds.shape[0], generator=generator) < t.caption_dropout
        null = null_prompt.to(device, torch.float32)[None].expand_as(prompt_embeds)
        prompt_embeds = torch.where(drop.to(device)[:, None, None], null, prompt_embeds)
    sigmas, noise = draw_noise(batch["keys"], tuple(latents.shape), t.shift, generator)
    noise = noise.to(device)
    latents, context, noise = frame_window(t.frame_window, generator, latents, context, noise)
    weights = bell_weights(sigmas, t.shift) if t.weighting == "bell" else torch.ones_like(sigmas)
    sigmas, weights = sigmas.to(device), weights.to(device)
    offload = (
        torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
        if t.activation_offload
        else contextlib.nullcontext()
    )
    with offload, torch.autocast(device_type=device.type, dtype=compute_dtype, enabled=autocast):
        pred = _predict(model, latents, noise, sigmas, prompt_embeds, context, scale)
    return flow_matching_loss(pred, latents, noise, weights)


def _predict(
    model: torch.nn.Module,
    latents: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    context: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The transformer's velocity prediction for ``latents`` noised to ``sigmas`` with ``noise`` (a training
    step's and the fit probe's forward pass alike)."""
    return model(
        hidden_states=add_noise(latents, noise, sigmas),
        timestep=sigmas * NUM_TRAIN_TIMESTEPS,
        encoder_hidden_states=prompt_embeds,
        control_hidden_states=context,
        control_hidden_states_scale=scale,
        return_dict=False,
    )[0]


def _write_final(
    transformer,
    lora: dict[str, torch.Tensor],
    out: Path,
    history: list[dict],
    summary: dict[str, Any],
    run_id: str | None,
) -> None:
    """Write the adapter (diffusers LoRA + metadata), loss curve and summary into ``out``; log them to MLflow.

    ``lora`` is :func:`~pickstyle.checkpoints.gather_lora` (whole tensors even under FSDP, where ``transformer`` holds only shards);
    ``transformer`` supplies the peft config.

    ``save_adapter`` replaces the folder it writes as a whole, so it writes a staging folder whose files then
    replace ``out``'s one by one; ``train_summary.json`` goes last (the run is
    complete when it is there).
    """

    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    extra = {"steps": summary["steps"], "final_loss": summary["final_loss"], "mode": summary["mode"]}
    save_adapter(transformer, staging, extra_metadata=extra, state_dict=lora)
    _write_loss_outputs(history, staging, summary.get("fit_loss_base"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_summary.json").unlink(missing_ok=True)
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    shutil.rmtree(staging, ignore_errors=True)
    # Timings and the run id stay out of the stage's output (they are in the returned summary and MLflow):
    # the same params and data give a byte-identical folder, so a fresh clone reproduces dvc.lock.
    write_json(out / "train_summary.json", _stable(summary))
    if run_id is not None:
        for f in sorted(out.iterdir()):
            if f.is_file():
                mlflow.log_artifact(str(f), artifact_path="adapter")
        mlflow.log_artifact(str(out / "loss.png"))
        mlflow.log_metrics(
            {"final_loss": summary["final_loss"], "train_samples_per_s": summary["samples_per_s"] or 0.0},
            step=summary["steps"],
        )
