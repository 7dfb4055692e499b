"""Training checkpoints: where they live, which one may resume a run, and saving / loading one (load mirrors save).

A checkpoint (``<models>/.checkpoints/adapter/step-N/``) holds the LoRA weights, the optimizer (whole, or one file
per rank under FSDP), the lr scheduler, every process's RNG states and data position, and ``state.json`` with the
*run key*: everything that decides the adapter (the train params but the step count and bookkeeping, the LoRA, the
seed, the data and the backbone). It lives outside the stage's DVC output (``dvc repro`` deletes
``models/adapter`` before rerunning the stage); a run resumes from the newest checkpoint of the same key.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from pickstyle.config import Params
from pickstyle.data.shards import files_fingerprint
from pickstyle.errors import PickstyleError
from pickstyle.model.components import backbone_fingerprint, backbone_path

CHECKPOINT_PREFIX = "step-"


class CheckpointError(PickstyleError):
    """A checkpoint cannot resume this run (another LoRA, another process count, mismatched tensors)."""


def checkpoint_dir(params: Params) -> Path:
    """``<models>/.checkpoints/adapter``: beside, not inside, the stage's output (DVC deletes outputs on rerun)."""
    return Path(params.paths.models) / ".checkpoints" / "adapter"


#: Train fields that do not change the adapter a step produces: a checkpoint made under other values resumes
#: (``steps`` only under a constant lr: a cosine schedule depends on it).
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
    t = params.train.model_dump(mode="json")
    # A cosine schedule decays to its last step: more steps is another schedule, not a continuation.
    bookkeeping = _BOOKKEEPING - {"steps"} if t["lr_schedule"] == "cosine" else _BOOKKEEPING
    return {
        "train": {k: v for k, v in sorted(t.items()) if k not in bookkeeping},
        "lora": lora,
        "seed": params.seed,
        "world_size": world_size,
        "dtype": params.model.dtype,
        "data": files_fingerprint(shards),
        "backbone": backbone_fingerprint(backbone_path(params)),
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


def last_checkpoint(folder: Path) -> str:
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


def gather_lora(accelerator, model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) tensors by parameter name, whole, fp32, as CPU copies; the same on every process.

    Under FSDP2 each parameter is a DTensor holding this rank's shard: only the trainable ones are gathered
    (``full_tensor()``, a collective every rank joins, in the same order), never the frozen backbone: ~70 MB for the
    14B's LoRA instead of its ~34 GB state dict (``accelerator.get_state_dict`` would gather the whole model).
    """
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


def save_checkpoint(
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
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".{final.name}.tmp"
    main = accelerator.is_main_process
    lora = gather_lora(accelerator, model)  # collective under FSDP: every rank takes part
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


def check_compatible(state: dict[str, Any], lora: dict[str, Any], world_size: int, path: Path) -> None:
    if state.get("lora") != lora:
        raise CheckpointError(f"{path}: checkpoint LoRA {state.get('lora')} differs from the params' {lora}")
    if state.get("world_size") != world_size:
        raise CheckpointError(
            f"{path}: checkpoint written by {state.get('world_size')} process(es), resumed with {world_size}: "
            "exact resume needs the same number (the data order depends on it)"
        )


def load_lora(
    path: Path, transformer: torch.nn.Module, *, lora: dict[str, Any], world_size: int, empty: bool
) -> dict[str, Any]:
    """The first half of resuming, before ``accelerator.prepare``: check the checkpoint and put its LoRA
    tensors into ``transformer``; returns its ``state.json``.

    Mirrors :func:`save_checkpoint`'s ``lora.safetensors`` and ``state.json``. An ``empty`` (meta) model of a
    non-main FSDP process receives the main process's resumed LoRA with the rest of the weights.
    """
    state = json.loads((path / "state.json").read_text())
    check_compatible(state, lora, world_size, path)
    saved = load_file(str(path / "lora.safetensors"))
    named = dict(transformer.named_parameters())
    if set(saved) != {n for n, p in named.items() if p.requires_grad}:
        raise CheckpointError(f"{path}: its LoRA tensors do not match the adapter built from the params")
    if not empty:
        with torch.no_grad():
            for name, value in saved.items():
                named[name].copy_(value)
    return state


def restore_training_state(
    path: Path, *, optimizer, scheduler, generator: torch.Generator, rank: int
) -> dict[str, int]:
    """The second half of resuming, after ``accelerator.prepare``: optimizer (whole, or this rank's shard),
    lr scheduler and this process's RNG states; returns its data position. Mirrors :func:`save_checkpoint`."""
    if (path / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    else:  # FSDP: this rank's shard of the optimizer state
        saved = torch.load(path / f"optimizer-rank-{rank}.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(_sharded_optimizer_state(optimizer, saved))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
    rank_state = torch.load(path / f"rank-{rank}.pt", weights_only=True, map_location="cpu")
    _set_rng_state(rank_state["rng"], generator)
    return rank_state["position"]
