"""The model adapter training optimises: the frozen backbone transformer with the context-style LoRA added.

Setup apart from the loop (torchtune's recipes): :func:`build_trainable` loads (or, for FSDP's RAM-efficient
loading, only shapes) the transformer, freezes it, adds the adapter (fp32 LoRA master weights over a base in the
profile's dtype) and checks that exactly the LoRA matrices train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import WanVACETransformer3DModel

from pickstyle.config import Params
from pickstyle.model.adapters import AdapterError, add_context_style_adapter
from pickstyle.model.components import ensure_backbone, load_pipeline, resolve_dtype


def lora_config(params: Params) -> dict[str, Any]:
    """The adapter's LoRA settings: rank and alpha (the profile's unless set), dropout, init and targets."""
    t = params.train
    return {
        "rank": params.lora_rank,
        "alpha": params.lora_alpha,
        "dropout": t.lora_dropout,
        "init": t.lora_init,
        "targets": t.lora_targets,
    }


def empty_transformer(path: Path, dtype: torch.dtype):
    """The backbone transformer's structure with its parameters on the meta device: no weight is read.

    Dtypes as ``from_pretrained(dtype=...)`` gives them (its ``_keep_in_fp32_modules`` stay fp32); buffers (the
    RoPE tables, not in the checkpoint) are real. For FSDP's RAM-efficient loading, where the main process's weights
    are broadcast into every rank's shards.
    """

    with init_empty_weights():  # parameters on meta, buffers real
        transformer = WanVACETransformer3DModel.from_config(
            WanVACETransformer3DModel.load_config(path / "transformer")
        )
    keep_fp32 = transformer._keep_in_fp32_modules or []
    for name, param in transformer.named_parameters():
        if not any(m in name.split(".") for m in keep_fp32):
            param.data = param.data.to(dtype)
    return transformer


def parameter_or_buffer(module: torch.nn.Module, name: str) -> torch.Tensor:
    """transformers' ``get_parameter_or_buffer``, which accelerate's FSDP2 loading calls and diffusers lacks."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return module.get_buffer(name)


def build_trainable(params: Params, device: str, mode: str, empty: bool = False):
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

    path = ensure_backbone(params)
    dtype = resolve_dtype(params.model.dtype, device)
    pipe = None
    if mode == "on_the_fly":
        pipe = load_pipeline(path, device=device, dtype=dtype)
        transformer = pipe.transformer
        for module in (pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
    elif empty:
        transformer = empty_transformer(path, dtype)
    else:
        # Cached latents need only the transformer: the text encoder (UMT5-XXL, 11 GB) stays on disk.
        transformer = WanVACETransformer3DModel.from_pretrained(path / "transformer", dtype=dtype).to(device)
    transformer.requires_grad_(False)
    cfg = lora_config(params)
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
        raise AdapterError(f"unexpected trainable/frozen parameters after adding the adapter: {wrong[:5]}")
    if params.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return transformer, pipe
