"""The ``train`` stage: one explicit flow-matching loop that trains the context-style LoRA adapters.

Only the LoRA matrices on the VACE context blocks' self-attention q/k/v train; the Wan2.1-VACE backbone is frozen
(DESIGN §2). A step, as in the PickStyle reference (arXiv 2510.07546, built on DiffSynth-Studio)::

    σ = shift·u / (1 + (shift−1)·u),  u ~ U(0, 1)          # shifted uniform timestep, shift 5
    x_t = (1 − σ)·x0 + σ·ε                                   # x0 = the style clip's latent
    loss = w(σ) · ‖ f(x_t, σ·1000, text, context) − (ε − x0) ‖²   # w = mid-schedule bell, mean 1

Data comes from the ``latents`` stage's WebDataset shards (``mode: cached``) or, for comparison with the reference,
from the clip shards encoded by the VAE and text encoder every step (``mode: on_the_fly``). The sample order is a
pure function of ``params.seed``, the epoch and the process rank, so a checkpoint only needs the number of samples
each process has consumed. Multi-GPU runs go through ``accelerate launch`` (``configs/accelerate/``): DDP, or
FSDP2 when a bf16 replica does not fit (14B): only rank 0 reads the weights, and checkpoints and the final adapter
gather the LoRA tensors alone (never the backbone), each rank saving its own optimizer shard.

Checkpoints (``<models>/.checkpoints/adapter/step-N/``) hold the LoRA weights, optimizer, lr scheduler, every
process's RNG states and data position. They live outside the stage's DVC output (``dvc repro`` deletes
``models/adapter`` before it reruns the stage) and carry a *run key*: a hash of everything that decides the
adapter (the train params but the step count and bookkeeping, the LoRA, the seed, the data and the backbone).
``train(params)`` continues from the newest checkpoint whose key matches, and ends with the same adapter, bit for
bit on CPU, as an uninterrupted run; a checkpoint of other settings is set aside (the message says what differs).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from pickstyle.config import Params
from pickstyle.data.shards import files_fingerprint, list_shards
from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_path, resolve_device, write_json
from pickstyle.flow_matching import NUM_TRAIN_TIMESTEPS, add_noise, flow_target, sample_sigmas, shift_sigmas

#: Samples held in the shuffle buffer of each process (the tiny dataset fits whole).
SHUFFLE_BUFFER = 256
CHECKPOINT_PREFIX = "step-"


class TrainingError(PickstyleError):
    """Training cannot go on (a non-finite loss, missing data, an incompatible checkpoint); names the step."""


# --- the maths: small pure functions -----------------------------------------------------------------------------


def fixed_noise(
    keys: list[str], shape: tuple[int, ...], shift: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and ε drawn once per clip key (the same at every visit): the "overfit one batch" sanity check.

    With the noise and timestep fixed, a handful of clips is a finite set of (input, target) pairs that the
    adapter can memorise, so the loss must fall; with fresh noise its floor is the irreducible noise term.
    """
    sigmas, noises = [], []
    for key in keys:
        g = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8])
        )
        sigmas.append(sample_sigmas(1, shift, g))
        noises.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    return torch.cat(sigmas), torch.stack(noises)


def _bell(sigmas: torch.Tensor) -> torch.Tensor:
    # exp(−2(σ − ½)²) minus its value at the ends (σ = 0 or 1), so the weight falls to 0 there.
    return torch.exp(-2.0 * (sigmas - 0.5) ** 2) - math.exp(-0.5)


def bell_weights(sigmas: torch.Tensor, shift: float, grid: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Mid-schedule loss weights w(σ) = (exp(−2(σ − ½)²) − exp(−½)) / Z, with mean 1 over the training draws.

    This is the reference's weighting (DiffSynth-Studio ``FlowMatchScheduler`` in training mode, used by the
    PickStyle code): a Gaussian bump over the timestep ``t = 1000σ`` peaking at t = 500, shifted to be 0 at the
    ends. ``Z`` is the bump's mean over the ``grid`` shifted noise levels σ_i = shift((i + ½)/grid), so that
    ``E[w(σ)] = 1`` when σ is drawn as :func:`sample_sigmas` draws it: the weighting changes which timesteps
    matter, not the loss's overall scale (nor the right learning rate).

    Args:
        sigmas: Noise levels in [0, 1], any shape.
        shift: The timestep shift the sigmas were drawn with.
        grid: Number of points of the normalising grid.
    """
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    z = _bell(shift_sigmas(u, shift)).mean().item()
    return (_bell(sigmas.double()) / z).to(sigmas.dtype)


def warmup_constant(step: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup_steps`` optimizer steps, then constant 1."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def flow_matching_loss(
    pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted MSE to the flow target, per clip then averaged: mean_b w_b · mean((pred_b − (ε_b − x0_b))²)."""
    target = flow_target(latents.float(), noise.float())
    per_clip = ((pred.float() - target) ** 2).flatten(1).mean(dim=1)  # [b]
    return (weights.float() * per_clip).mean()


# --- data: deterministic WebDataset streams ----------------------------------------------------------------------


def is_reconstruction(meta: dict[str, Any]) -> bool:
    """A real-video "reconstruct." clip (its target is its own source), by ``kind`` or caption prefix."""
    return meta.get("kind") == "reconstruct" or str(meta.get("caption", "")).startswith("reconstruct.")


def _meta_of(raw: dict[str, Any]) -> dict[str, Any]:
    data = raw.get("json")
    if data is None:
        return {}
    return json.loads(data.decode("utf-8") if isinstance(data, bytes | bytearray) else data)


def visits(meta: dict[str, Any], seed: int, epoch: int) -> bool:
    """Whether epoch ``epoch`` visits this clip: one motion variant per pair per epoch, a new one each epoch.

    The clips stage renders K variants of each pair (``variant`` 0..K-1 of ``variants`` K in the meta). Epoch e
    visits variant ``(e + offset) mod K`` of a pair, the offset drawn per pair from the seed, so an epoch is one
    pass over the pairs and K epochs show each pair in K different camera motions (the reference draws a fresh
    motion on every visit). Clips without variants (test, "reconstruct.", old caches) are visited every epoch.
    """
    k = int(meta.get("variants") or 1)
    if k <= 1 or "variant" not in meta:
        return True
    offset = int.from_bytes(hashlib.sha256(f"variant:{seed}:{meta.get('pair_key')}".encode()).digest()[:4])
    return int(meta["variant"]) == (epoch + offset) % k


def distinct_motions(steps: int, samples_per_step: int, pairs: int, variants: int) -> float:
    """Mean number of distinct motion variants each pair is trained on over ``steps`` (reported by ``train``)."""
    if pairs <= 0:
        return 0.0
    visits = steps * samples_per_step / pairs  # epochs
    full, part = int(visits), visits - int(visits)
    return min(variants, full) + (part if full < variants else 0.0)


def _motion_report(latents_dir: Path, samples: int) -> dict[str, Any]:
    """Pairs, motion variants and the distinct motions per pair a run of ``samples`` clips shows (from the
    latents stage's summary; empty when it has none)."""
    try:
        summary = json.loads((latents_dir / "summary.json").read_text())
        pairs, variants = int(summary["pairs"]), int(summary["variants"])
    except (OSError, KeyError, ValueError):
        return {}
    return {
        "pairs": pairs,
        "motion_variants": variants,
        "motions_per_pair": round(distinct_motions(samples, 1, pairs, variants), 2),
    }


def sample_stream(
    shards: list[str | Path],
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    keep: Callable[[dict[str, Any]], bool] | None = None,
    skip: int = 0,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Iterator[dict[str, Any]]:
    """Endless stream of one process's raw samples (bytes per extension), the same for the same arguments.

    Epoch ``e`` permutes the shard list with a seed of (``seed``, e), identical on every process; with at least
    as many shards as processes, ``wds.split_by_node`` gives each process its own shards (and
    ``wds.split_by_worker`` each DataLoader worker), otherwise every process reads all shards and keeps every
    ``world_size``-th sample. A seeded shuffle buffer mixes samples across shards. Of a pair rendered in K
    motion variants, each epoch keeps one (:func:`visits`).

    Args:
        shards: The shard files (or ``pipe:`` URLs).
        seed: The run's seed.
        rank: This process's rank; ``world_size`` the number of processes.
        keep: Filter on the decoded ``json`` meta (e.g. pairs only); applied before ``skip``.
        skip: Samples to pass over first (the data position of a checkpoint); they are not decoded.
        shuffle_buffer: Shuffle-buffer size per process.

    Raises:
        TrainingError: An epoch yields no sample for this process.
    """
    urls = [str(s) for s in shards]
    by_shard = len(urls) >= world_size
    epoch = 0
    while True:
        order = list(urls)
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
        ds = wds.WebDataset(
            order,
            shardshuffle=False,  # the epoch's permutation above is the shard shuffle, the same on every rank
            nodesplitter=wds.split_by_node if by_shard else None,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        # Split by sample, every process must shuffle alike (then each keeps its own indices).
        ds = ds.shuffle(shuffle_buffer, seed=f"samples:{seed}:{epoch}:{rank if by_shard else 'all'}")
        yielded = 0
        for index, raw in enumerate(ds):
            if not by_shard and index % world_size != rank:
                continue
            meta = _meta_of(raw)
            if not visits(meta, seed, epoch) or (keep is not None and not keep(meta)):
                continue
            yielded += 1
            if skip > 0:
                skip -= 1
                continue
            yield raw
        if yielded == 0:
            raise TrainingError(
                f"epoch {epoch}: no training sample for process {rank} of {world_size} in {len(urls)} shard(s)"
            )
        epoch += 1


class MixedStream:
    """Pairs and "reconstruct." clips mixed by ``recon_ratio``, with a resumable position.

    Whether sample ``i`` of this process is a reconstruction clip is drawn from an RNG seeded by
    (seed, rank, i) alone, so the position is just the three counters in :attr:`position`.
    """

    def __init__(
        self,
        shards: list[Path],
        *,
        seed: int,
        rank: int,
        world_size: int,
        recon_ratio: float,
        position: dict[str, int] | None = None,
    ) -> None:
        self.seed, self.rank, self.recon_ratio = seed, rank, recon_ratio
        self.position = dict(position or {"samples": 0, "pairs": 0, "recon": 0})
        common = {"seed": seed, "rank": rank, "world_size": world_size}
        self._pairs = sample_stream(
            shards, keep=lambda m: not is_reconstruction(m), skip=self.position["pairs"], **common
        )
        # Opened lazily on the first draw: with recon_ratio 0 the reconstruction clips are never read.
        self._recon = sample_stream(shards, keep=is_reconstruction, skip=self.position["recon"], **common)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        i = self.position["samples"]
        recon = (
            self.recon_ratio > 0
            and random.Random(f"mix:{self.seed}:{self.rank}:{i}").random() < self.recon_ratio
        )
        try:
            raw = next(self._recon if recon else self._pairs)
        except TrainingError as err:
            kind = '"reconstruct." clips (train.recon_ratio > 0)' if recon else "pair clips"
            raise TrainingError(f"no {kind} in the training data: {err}") from None
        self.position["samples"] += 1
        self.position["recon" if recon else "pairs"] += 1
        return raw


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch; prompt embeddings are zero-padded to the longest (Wan pads text with zeros, too)."""
    length = max(s["prompt_embeds"].shape[0] for s in samples)
    prompts = []
    for s in samples:
        p = s["prompt_embeds"]
        prompts.append(
            torch.cat([p, p.new_zeros(length - p.shape[0], p.shape[1])]) if p.shape[0] < length else p
        )
    return {
        "keys": [s.get("__key__", "") for s in samples],
        "latents": torch.stack([s["target"] for s in samples]),  # [b, 16, f, h, w]
        "context": torch.stack([s["context"] for s in samples]),  # [b, 96, f, h, w]
        "prompt_embeds": torch.stack(prompts),  # [b, L, D]
    }


# --- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_dir(params: Params) -> Path:
    """``<models>/.checkpoints/adapter``: beside, not inside, the stage's output (DVC deletes outputs on rerun)."""
    return Path(params.paths.models) / ".checkpoints" / "adapter"


#: Train fields that do not change the adapter a step produces: a checkpoint made under other values resumes.
_BOOKKEEPING = {
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "mlflow",
    "experiment",
    "device",
}


def run_key(params: Params, shards: list[Path], lora: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Everything that decides the adapter; a checkpoint resumes only under an equal key."""
    from pickstyle.model.components import backbone_path

    t = params.train.model_dump(mode="json")
    backbone = backbone_path(params)
    configs = sorted(p for p in backbone.rglob("*.json") if p.is_file())
    return {
        "train": {k: v for k, v in sorted(t.items()) if k not in _BOOKKEEPING},
        "lora": lora,
        "seed": params.seed,
        "world_size": world_size,
        "dtype": params.model.dtype,
        "data": files_fingerprint(shards),
        "backbone": files_fingerprint(configs + sorted(backbone.rglob("*.safetensors"))),
    }


def _key_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The first-level fields (and train fields) that differ, for the "starting fresh" message."""
    diff = []
    for k in sorted(set(saved) | set(current)):
        if saved.get(k) == current.get(k):
            continue
        if k == "train" and isinstance(saved.get(k), dict):
            a, b = saved[k], current[k]
            diff += [
                f"train.{f}: {a.get(f)!r} -> {b.get(f)!r}"
                for f in sorted(set(a) | set(b))
                if a.get(f) != b.get(f)
            ]
        else:
            diff.append(k)
    return ", ".join(diff) or "unknown"


def find_resumable(folder: Path, key: dict[str, Any], steps: int) -> tuple[Path | None, str]:
    """The newest checkpoint of ``folder`` made under ``key`` (and not past ``steps``), and a one-line reason."""
    found = list_checkpoints(folder)
    if not found:
        return None, f"no checkpoint in {folder}: starting from step 0"
    newest = found[-1]
    state = json.loads((newest / "state.json").read_text())
    if state.get("key") != key:
        why = _key_difference(state.get("key") or {}, key)
        return None, f"{newest} was made with other settings ({why}): starting from step 0"
    if int(state["step"]) > steps:
        return None, f"{newest} is past train.steps={steps}: starting from step 0"
    return newest, f"resuming from {newest} (step {state['step']})"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints ``step-N`` in ``folder``, oldest first (half-written ones are hidden temp folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    found = [p for p in found if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _last_checkpoint(folder: Path) -> str:
    found = list_checkpoints(folder)
    return str(found[-1]) if found else "none"


def _np_state_to_tensors(state: tuple) -> tuple:
    # numpy's MT19937 state holds an ndarray: store it as a tensor so torch.load(weights_only=True) accepts it.
    name, keys, pos, has_gauss, gauss = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss))


def _np_state_from_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _np_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(_np_state_from_tensors(state["numpy"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lora_state(accelerator, model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) tensors by parameter name, whole, fp32, as CPU copies; the same on every process.

    Under FSDP2 each parameter is a DTensor holding this rank's shard: only the trainable ones are gathered
    (``full_tensor()``, a collective every rank joins, in the same order), never the frozen backbone: ~70 MB for the
    14B's LoRA instead of its ~34 GB state dict (``accelerator.get_state_dict`` would gather the whole model).
    """
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        value = param.detach()
        if isinstance(value, DTensor):
            value = value.full_tensor()
        state[name] = value.to("cpu", torch.float32, copy=True).contiguous()
    return state


def _local_optimizer_state(optimizer) -> dict[str, Any]:
    """This process's optimizer state with every sharded (DTensor) value replaced by its local shard.

    Under FSDP2 Adam's moments are DTensors like their parameters: each rank saves only its own shard, as plain
    tensors that ``torch.load(weights_only=True)`` reads back; :func:`_sharded_optimizer_state` undoes it.
    """
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {
        i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in per_param.items()}
        for i, per_param in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]}


def _sharded_optimizer_state(optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_local_optimizer_state` for this optimizer's (possibly sharded) parameters.

    A saved value shaped like its parameter's local shard becomes a DTensor on that parameter's mesh and
    placements again (Adam's scalar ``step`` stays a plain tensor); without sharded parameters nothing changes.
    """
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, per_param in saved["state"].items():
        param = params[int(i)]
        if isinstance(param, DTensor):
            local = param.to_local()
            per_param = {
                k: DTensor.from_local(
                    v.to(local.device),
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
                if torch.is_tensor(v) and v.dim() > 0 and v.shape == local.shape
                else v
                for k, v in per_param.items()
            }
        state[i] = per_param
    return {"state": state, "param_groups": saved["param_groups"]}


def _save_checkpoint(
    folder: Path,
    step: int,
    *,
    accelerator,
    model,
    optimizer,
    scheduler,
    generator: torch.Generator,
    position: dict[str, int],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step-N`` atomically: every process writes into one temp folder, rank 0 renames it when complete."""
    from accelerate.utils import DistributedType
    from safetensors.torch import save_file

    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".{final.name}.tmp"
    main = accelerator.is_main_process
    lora = _lora_state(accelerator, model)  # collective under FSDP: every rank takes part
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    torch.save({"rng": _rng_state(generator), "position": dict(position)}, tmp / f"rank-{rank}.pt")
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:  # each rank holds its own optimizer shard; the frozen backbone is never saved
        torch.save(_local_optimizer_state(optimizer), tmp / f"optimizer-rank-{rank}.pt")
    if main:
        save_file(lora, str(tmp / "lora.safetensors"))
        if not sharded:  # DDP: the optimizer state is identical on every rank
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_checkpoints(folder)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _check_compatible(state: dict[str, Any], lora: dict[str, Any], world_size: int, path: Path) -> None:
    if state.get("lora") != lora:
        raise TrainingError(f"{path}: checkpoint LoRA {state.get('lora')} differs from the params' {lora}")
    if state.get("world_size") != world_size:
        raise TrainingError(
            f"{path}: checkpoint written by {state.get('world_size')} process(es), resumed with {world_size}: "
            "exact resume needs the same number (the data order depends on it)"
        )


# --- the model ---------------------------------------------------------------------------------------------------


def _lora_config(params: Params) -> dict[str, Any]:
    t = params.train
    return {
        "rank": params.lora_rank,
        "alpha": params.lora_alpha,
        "dropout": t.lora_dropout,
        "init": t.lora_init,
        "targets": t.lora_targets,
    }


def _empty_transformer(path: Path, dtype: torch.dtype):
    """The backbone transformer's structure with its parameters on the meta device: no weight is read.

    Dtypes as ``from_pretrained(dtype=...)`` gives them (its ``_keep_in_fp32_modules`` stay fp32); buffers (the
    RoPE tables, not in the checkpoint) are real. For FSDP's RAM-efficient loading, where the main process's weights
    are broadcast into every rank's shards.
    """
    from accelerate import init_empty_weights
    from diffusers import WanVACETransformer3DModel

    with init_empty_weights():  # parameters on meta, buffers real
        transformer = WanVACETransformer3DModel.from_config(
            WanVACETransformer3DModel.load_config(path / "transformer")
        )
    keep_fp32 = transformer._keep_in_fp32_modules or []
    for name, param in transformer.named_parameters():
        if not any(m in name.split(".") for m in keep_fp32):
            param.data = param.data.to(dtype)
    return transformer


def _parameter_or_buffer(module: torch.nn.Module, name: str) -> torch.Tensor:
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


def _build_model(params: Params, device: str, mode: str, empty: bool = False):
    """The frozen backbone transformer with the context-style LoRA added; plus the pipeline for on-the-fly mode.

    Args:
        params: The pipeline params.
        device: Where the model goes.
        mode: ``cached`` (the transformer alone: neither VAE nor text encoder is loaded) or ``on_the_fly``.
        empty: Cached mode: build the transformer on the meta device without reading its weights (FSDP with
            ``fsdp_cpu_ram_efficient_loading`` on every process but the main one, which broadcasts them).

    Returns:
        ``(transformer, pipe_or_None)``. Base weights in the profile's dtype (bf16 on CUDA), LoRA params fp32.
    """
    from diffusers import WanVACETransformer3DModel

    from pickstyle.model.adapters import add_context_style_adapter
    from pickstyle.model.components import ensure_backbone, load_pipeline, resolve_dtype

    path = ensure_backbone(params)
    dtype = resolve_dtype(params.model.dtype, device)
    pipe = None
    if mode == "on_the_fly":
        pipe = load_pipeline(path, device=device, dtype=dtype)
        transformer = pipe.transformer
        for module in (pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
    elif empty:
        transformer = _empty_transformer(path, dtype)
    else:
        # Cached latents need only the transformer: the text encoder (UMT5-XXL, 11 GB) stays on disk.
        transformer = WanVACETransformer3DModel.from_pretrained(path / "transformer", dtype=dtype).to(device)
    transformer.requires_grad_(False)
    cfg = _lora_config(params)
    # The LoRA init draws from torch's global RNG: seed it so every process starts from the same adapter.
    # Only the CPU generator: torch.manual_seed would also reseed (and, with devices=[], not restore) every CUDA
    # generator, overwriting the per-rank seeds; peft creates and initialises LoRA weights on the CPU.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(params.seed)
        add_context_style_adapter(
            transformer,
            cfg["rank"],
            cfg["alpha"],
            dropout=cfg["dropout"],
            init=cfg["init"],
            targets=cfg["targets"],
        )
    # add_context_style_adapter froze everything but the LoRA matrices and made those fp32 (master weights
    # even when the base is bf16; autocast computes in bf16). Check it, as the tests do.
    wrong = [n for n, p in transformer.named_parameters() if p.requires_grad != (".lora_" in n)]
    wrong += [n for n, p in transformer.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if wrong:
        raise TrainingError(f"unexpected trainable/frozen parameters after adding the adapter: {wrong[:5]}")
    if params.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer, pipe


def _decode_cached(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    from pickstyle.latents import decode_latents

    return decode_latents(raw)


def _encode_on_the_fly(pipe, raw: dict[str, Any], params: Params) -> dict[str, torch.Tensor]:
    """Decode a clip sample's videos and encode them like the reference does every step (VAE + text)."""
    from pickstyle.data.video import read_video
    from pickstyle.latents import encode_clip

    meta = _meta_of(raw)
    src, _ = read_video(raw["src.mp4"])
    style, _ = read_video(raw["style.mp4"])
    with torch.no_grad():
        enc = encode_clip(pipe, src, style, meta["caption"], params=params)
    return {k: v.detach().to("cpu", torch.float32) for k, v in enc.items() if torch.is_tensor(v)}


# --- the loop ----------------------------------------------------------------------------------------------------


def _write_loss_outputs(history: list[dict[str, float]], out: Path) -> None:
    """``loss.csv`` (DVC plots: x=step, y=loss) and ``loss.png`` (raw loss and its 20-step moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(out / "loss.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "samples_per_s"])
        writer.writeheader()
        writer.writerows(history)
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
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


def mlflow_setup(params: Params, experiment: str | None = None) -> str:
    """Point MLflow at the project's tracking store and make sure the experiment exists; returns its id.

    The store is ``sqlite:///<absolute paths.mlflow_db>`` and a new experiment gets the absolute artifact root
    ``paths.mlflow_artifacts`` (MLflow 3 rejects the file store; relative paths would follow the working
    directory, DESIGN §3). ``pickstyle.registry`` owns that logic; this names the training experiment.
    """
    from pickstyle.registry import ensure_experiment

    return ensure_experiment(params, experiment or params.train.experiment)


def _flat_params(params: Params) -> dict[str, Any]:
    out = {f"train.{k}": v for k, v in params.train.model_dump(mode="json").items()}
    out.update(
        {
            "profile": params.profile,
            "seed": params.seed,
            "backbone": params.active.backbone,
            "frames": params.active.frames,
            "height": params.active.height,
            "width": params.active.width,
            "lora_rank": params.lora_rank,
            "lora_alpha": params.lora_alpha,
        }
    )
    return out


def train(
    params: Params, fresh: bool = False, *, on_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Train the context-style LoRA adapter; writes ``<models>/adapter/`` and an MLflow run.

    Runs as one process or under ``accelerate launch`` / ``torchrun`` (DDP: every process draws its own
    samples, noise and timesteps; gradients are averaged, so all processes hold the same adapter).

    Args:
        params: The pipeline params (``train``, ``paths``, the active profile's LoRA defaults, ``seed``).
        fresh: Start from step 0 and delete the old checkpoints. Otherwise the run continues from the newest
            checkpoint in ``<models>/.checkpoints/adapter`` made with the same settings and data (a killed
            ``dvc repro`` picks up where it stopped); one made with other settings is replaced, and the log
            says which settings differ.
        on_step: Called with the step number after each optimizer step (progress reporting; an exception it
            raises stops the run the way a kill would, after the last checkpoint).

    Returns:
        The summary also written to ``train_summary.json``: losses, steps, samples/s, LoRA size, MLflow run id.

    Raises:
        TrainingError: A non-finite loss or gradient (the message names the step; the last good checkpoint
            stays), an incompatible checkpoint, or data with no usable sample.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    from pickstyle.model.components import ensure_backbone, resolve_dtype
    from pickstyle.progress import progress

    t = params.train
    # Before CUDA starts: growable segments instead of fixed blocks, so the allocator does not fragment on
    # the varying activation sizes of checkpointed blocks (the user's own setting wins).
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    accelerator = Accelerator(cpu=resolve_device(t.device) == "cpu")
    device = accelerator.device
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out = Path(params.paths.models) / "adapter"
    ckpt_root = checkpoint_dir(params)
    data_dir = Path(params.paths.data)
    shards = (
        list_shards(data_dir / "latents", "latents")
        if t.mode == "cached"
        else list_shards(data_dir / "clips", "clips")
    )
    if main:
        (out / "train_summary.json").unlink(missing_ok=True)  # present = the adapter in ``out`` is complete
        ensure_backbone(params)
    lora_cfg = _lora_config(params)
    key = run_key(params, shards, lora_cfg, world)
    ckpt, why = (None, "train: fresh start requested") if fresh else find_resumable(ckpt_root, key, t.steps)
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
    transformer, pipe = _build_model(params, str(device), t.mode, empty=empty)
    if ram_efficient:
        # accelerate's broadcast (fsdp2_load_full_state_dict) looks tensors up with transformers'
        # ``get_parameter_or_buffer``, which diffusers models lack.
        transformer.get_parameter_or_buffer = functools.partial(_parameter_or_buffer, transformer)
    state: dict[str, Any] = {}
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        _check_compatible(state, lora_cfg, world, ckpt)
        saved = load_file(str(ckpt / "lora.safetensors"))
        named = dict(transformer.named_parameters())
        if set(saved) != {n for n, p in named.items() if p.requires_grad}:
            raise TrainingError(f"{ckpt}: its LoRA tensors do not match the adapter built from the params")
        if not empty:  # an empty model receives the main process's (resumed) LoRA with the rest
            with torch.no_grad():
                for name, value in saved.items():
                    named[name].copy_(value)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    if fsdp:
        # accelerate swaps the optimizer's parameters for the sharded ones by data_ptr, which is 0 for every meta
        # parameter of an empty model: point it at the sharded trainable parameters (same order, no state yet).
        optimizer.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_constant(s, t.warmup_steps))
    start_step, history, position = 0, [], None
    if ckpt is not None:
        if (ckpt / "optimizer.pt").is_file():
            optimizer.load_state_dict(
                torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
            )
        else:  # FSDP: this rank's shard of the optimizer state
            saved_optim = torch.load(
                ckpt / f"optimizer-rank-{rank}.pt", weights_only=True, map_location="cpu"
            )
            optimizer.load_state_dict(_sharded_optimizer_state(optimizer, saved_optim))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True, map_location="cpu"))
        rank_state = torch.load(ckpt / f"rank-{rank}.pt", weights_only=True, map_location="cpu")
        _set_rng_state(rank_state["rng"], generator)
        position = rank_state["position"]
        start_step, history = int(state["step"]), list(state["history"])

    stream = MixedStream(
        shards, seed=params.seed, rank=rank, world_size=world, recon_ratio=t.recon_ratio, position=position
    )

    def next_batch() -> dict[str, Any]:
        samples = []
        for _ in range(t.batch_size):
            raw = next(stream)
            sample = _decode_cached(raw) if pipe is None else _encode_on_the_fly(pipe, raw, params)
            samples.append({**sample, "__key__": raw["__key__"]})
        return collate(samples)

    run_id = _start_mlflow(params, state.get("mlflow_run_id")) if main and t.mlflow else None
    scale = torch.ones(len(accelerator.unwrap_model(model).config.vace_layers), device=device)
    # Autocast by device type and the base weights' dtype: bf16 compute wherever the frozen base is bf16 (CUDA or
    # CPU), none for an fp32 base. LoRA master weights stay fp32 either way.
    compute_dtype = resolve_dtype(params.model.dtype, str(device))
    autocast = compute_dtype != torch.float32
    pbar = progress(total=t.steps, initial=start_step, disable=not main, desc="train", unit="step")
    run_samples, run_seconds, window = 0, 0.0, []
    grad_norm: float | None = None
    step, status = start_step, "FAILED"
    try:
        for step in range(start_step + 1, t.steps + 1):
            tic = time.perf_counter()
            loss_value, samples, grad_norm = 0.0, 0, None
            for micro in range(t.grad_accum):
                batch = next_batch()
                # Only the last micro-batch all-reduces the summed gradients across processes.
                sync = micro == t.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss = _micro_step(
                        model, batch, params, scale, generator, device, compute_dtype, autocast
                    )
                    # Gradients of a mean over grad_accum x batch_size clips: each micro-batch's mean loss / grad_accum.
                    accelerator.backward(loss / t.grad_accum)
                loss_value += accelerator.reduce(loss.detach(), reduction="mean").item() / t.grad_accum
                samples += batch["latents"].shape[0] * world
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"step {step}: the loss is {loss_value}; stopped. Last good checkpoint: "
                    f"{_last_checkpoint(ckpt_root)} (lower train.lr, then resume or restart)"
                )
            if t.grad_clip > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), t.grad_clip))
                if not math.isfinite(grad_norm):
                    raise TrainingError(
                        f"step {step}: the gradient norm is {grad_norm}; stopped. Last good checkpoint: "
                        f"{_last_checkpoint(ckpt_root)}"
                    )
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            seconds = time.perf_counter() - tic
            run_samples, run_seconds = run_samples + samples, run_seconds + seconds
            history.append(
                {"step": step, "loss": loss_value, "lr": lr, "samples_per_s": round(samples / seconds, 3)}
            )
            window.append(loss_value)
            pbar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                sps = run_samples / run_seconds
                pbar.set_postfix(loss=f"{np.mean(window):.4f}", samples_s=f"{sps:.2f}")
                if run_id is not None:
                    import mlflow

                    mlflow.log_metrics(
                        {"loss": float(np.mean(window)), "lr": lr, "samples_per_s": sps}, step=step
                    )
                window = []
            if t.checkpoint_every > 0 and step % t.checkpoint_every == 0:
                _save_checkpoint(
                    ckpt_root,
                    step,
                    accelerator=accelerator,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    generator=generator,
                    position=stream.position,
                    state={
                        "step": step,
                        "loss": loss_value,
                        "history": history,
                        "lora": lora_cfg,
                        "world_size": world,
                        "mlflow_run_id": run_id,
                        "seed": params.seed,
                        "key": key,
                    },
                    keep=t.keep_checkpoints,
                )
            if on_step is not None:
                on_step(step)
        status = "FINISHED"
    finally:
        pbar.close()
        if run_id is not None and status != "FINISHED":
            import mlflow

            mlflow.end_run(status=status)

    summary: dict[str, Any] = {
        "steps": step,
        "start_step": start_step,
        "world_size": world,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "mode": t.mode,
        "device": str(device),
        "lora_params": lora_params,
        **_motion_report(data_dir / "latents", t.steps * t.batch_size * t.grad_accum * world),
        "lora": lora_cfg,
        "first_loss": float(np.mean([h["loss"] for h in history[:20]])) if history else None,
        "final_loss": float(np.mean([h["loss"] for h in history[-20:]])) if history else None,
        # the last step's gradient norm before clipping (None with grad_clip 0)
        "grad_norm": grad_norm,
        "samples_per_s": run_samples / run_seconds if run_seconds else None,
        "seconds": run_seconds,
        "adapter_dir": str(out),
        "mlflow_run_id": run_id,
    }
    # Gathered on every process (a collective under FSDP), written by the main one: whole tensors, never shards.
    lora = _lora_state(accelerator, model)
    if main:
        try:
            _write_final(accelerator.unwrap_model(model), lora, out, history, summary, run_id)
        except BaseException:
            # Never leave the MLflow run RUNNING (and active in this process) when the final write fails.
            if run_id is not None:
                import mlflow

                mlflow.end_run(status="FAILED")
            raise
    accelerator.wait_for_everyone()
    return summary


def _micro_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    params: Params,
    scale: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
    compute_dtype: torch.dtype,
    autocast: bool,
) -> torch.Tensor:
    """One micro-batch's weighted flow-matching loss (forward only; the caller runs the backward pass).

    With ``train.activation_offload`` the tensors autograd saves for the backward pass go to CPU memory as they
    are made (``save_on_cpu``, pinned on CUDA) and come back one block at a time during backward.
    """
    t = params.train
    latents = batch["latents"].to(device, torch.float32)  # [b, 16, f, h, w]
    context = batch["context"].to(device, torch.float32)  # [b, 96, f, h, w]
    prompt_embeds = batch["prompt_embeds"].to(device, torch.float32)  # [b, L, D]
    if t.fixed_noise:
        sigmas, noise = fixed_noise(batch["keys"], latents.shape[1:], t.shift, params.seed)
    else:
        sigmas = sample_sigmas(latents.shape[0], t.shift, generator)  # [b]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device)
    weights = bell_weights(sigmas, t.shift) if t.weighting == "bell" else torch.ones_like(sigmas)
    sigmas, weights = sigmas.to(device), weights.to(device)
    noisy = add_noise(latents, noise, sigmas)
    offload = (
        torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
        if t.activation_offload
        else contextlib.nullcontext()
    )
    with offload, torch.autocast(device_type=device.type, dtype=compute_dtype, enabled=autocast):
        pred = model(
            hidden_states=noisy,
            timestep=sigmas * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=prompt_embeds,
            control_hidden_states=context,
            control_hidden_states_scale=scale,
            return_dict=False,
        )[0]
    return flow_matching_loss(pred, latents, noise, weights)


def _start_mlflow(params: Params, run_id: str | None) -> str:
    """Start (or, when resuming, re-open) the training run; returns its id. Main process only."""
    import mlflow

    experiment_id = mlflow_setup(params)
    if run_id is not None:
        try:
            mlflow.start_run(run_id=run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # the checkpoint came from another tracking store: start a new run
    from pickstyle.registry import provenance_tags, run_name, style_of

    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name("train", params))
    mlflow.log_params({**_flat_params(params), "style": style_of(params)})
    mlflow.set_tags({"stage": "train", "style": style_of(params), **provenance_tags(params)})
    return run.info.run_id


def _write_final(
    transformer,
    lora: dict[str, torch.Tensor],
    out: Path,
    history: list[dict],
    summary: dict[str, Any],
    run_id: str | None,
) -> None:
    """Write the adapter (diffusers LoRA + metadata), loss curve and summary into ``out``; log them to MLflow.

    ``lora`` is :func:`_lora_state` (whole tensors even under FSDP, where ``transformer`` holds only shards);
    ``transformer`` supplies the peft config.

    ``save_adapter`` replaces the folder it writes as a whole, so it writes a staging folder whose files then
    replace ``out``'s one by one: ``out/checkpoints`` stays; ``train_summary.json`` goes last (the run is
    complete when it is there).
    """
    from pickstyle.model.adapters import save_adapter

    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    extra = {
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "mode": summary["mode"],
        "mlflow_run_id": run_id,
    }
    save_adapter(transformer, staging, extra_metadata=extra, state_dict=lora)
    _write_loss_outputs(history, staging)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_summary.json").unlink(missing_ok=True)
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)
    shutil.rmtree(staging, ignore_errors=True)
    write_json(out / "train_summary.json", summary)
    if run_id is not None:
        import mlflow

        for f in sorted(out.iterdir()):
            if f.is_file():
                mlflow.log_artifact(str(f), artifact_path="adapter")
        mlflow.log_artifact(str(out / "loss.png"))
        mlflow.log_metrics(
            {"final_loss": summary["final_loss"], "train_samples_per_s": summary["samples_per_s"] or 0.0},
            step=summary["steps"],
        )
        mlflow.end_run(status="FINISHED")
