"""``pickstyle plan``: what a training run will need, before any weight is loaded.

For the active profile and a clip geometry: parameter counts (main blocks, VACE blocks, the rest, LoRA), the
training memory per GPU (weights, LoRA + AdamW state, activations with and without gradient checkpointing or
activation offload) and the size of one clip in the latent cache. Everything comes from the transformer's config
(the published Wan2.1-VACE 1.3B/14B configs, or the tiny one), so it runs on a laptop with no weights.

The parameter counts are exact (``tests/test_plan.py`` checks them against instantiated models). The activation
figures are estimates: bytes saved for the backward pass per video token per block, measured with
``torch.autograd.graph.saved_tensors_hooks`` on Wan blocks under bf16 autocast (frozen bf16 base, fp32 LoRA) at
several widths and fitted as ``58.5·dim + 4·ffn_dim`` per main block, ``+ 8·dim`` per VACE block (an
attention kernel that keeps only q, k, v, output and log-sum-exp: no N² term). Allocator slack, the attention
kernel's workspace and fragmentation come on top; the GPU check (``bench/``) is the measurement that counts.
"""

from __future__ import annotations

import math
from typing import Any

from pickstyle.config import Params
from pickstyle.model.components import (
    REAL_TEXT_TOKENS,
    real_config,
    tiny_latent_geometry,
    tiny_transformer_config,
)

GIB = 1024**3
MIB = 1024**2

#: Saved activation bytes per token per main block: ``A·dim + B·ffn_dim`` (see the module docstring).
_MAIN_PER_DIM = 58.5
_MAIN_PER_FFN = 4.0
#: A VACE block saves this much more per token per dim (its input/output projections and the hint it returns).
_VACE_EXTRA_PER_DIM = 8.0
#: With checkpointing each block keeps only its bf16 input (2 bytes per dim per token), plus the VACE hints
#: waiting for their main block and the embeddings outside the blocks (about 5 bytes per dim per token).
_CKPT_PER_BLOCK_PER_DIM = 2.0
_CKPT_OUTER_PER_DIM = 5.0


def transformer_parameters(config: dict[str, Any]) -> dict[str, int]:
    """Exact parameter counts of a ``WanVACETransformer3DModel`` built from ``config`` (diffusers 0.42 layout).

    A main block: self- and cross-attention (q, k, v, out with biases; RMS q/k norms), an affine cross-attention
    LayerNorm, the GELU feed-forward and a 6·dim modulation table: ``8d² + 2d·ffn + 21d + ffn``. A VACE block adds
    its output projection (and block 0 its input projection), ``d² + d`` each.

    Returns:
        ``main`` (the main blocks), ``vace`` (the VACE blocks and the context patch embedding), ``other``
        (patch embedding, time/text embedders, output head) and ``total``.
    """
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    d, ffn = heads * head_dim, config["ffn_dim"]
    patch = math.prod(config["patch_size"])
    n_vace = len(config["vace_layers"])
    block = 8 * d * d + 2 * d * ffn + 21 * d + ffn
    if not config.get("cross_attn_norm", True):
        block -= 2 * d
    main = config["num_layers"] * block
    vace = n_vace * (block + d * d + d) + (d * d + d)  # every block's proj_out, block 0's proj_in
    vace += config["vace_in_channels"] * patch * d + d  # the context's patch embedding
    out_channels = config.get("out_channels") or config["in_channels"]
    other = config["in_channels"] * patch * d + d  # patch embedding
    other += config["freq_dim"] * d + d + d * d + d  # time embedder (2 linears)
    other += d * 6 * d + 6 * d  # time projection to the 6 modulation vectors
    other += config["text_dim"] * d + d + d * d + d  # text embedder (2 linears)
    other += d * out_channels * patch + out_channels * patch + 2 * d  # output head + its modulation table
    return {"main": main, "vace": vace, "other": other, "total": main + vace + other}


def lora_parameters(config: dict[str, Any], rank: int, targets_per_block: int = 3) -> int:
    """LoRA parameters on the VACE blocks' self-attention q/k/v: ``A`` (r x dim) and ``B`` (dim x r) each."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    return len(config["vace_layers"]) * targets_per_block * 2 * rank * d


def _geometry(params: Params, frames: int, height: int, width: int) -> dict[str, int]:
    """Latent frames/height/width, context channels and text tokens of a clip on the active backbone."""

    if params.active.backbone == "tiny":
        tiny = params.model.tiny
        channels, f, h, w = tiny_latent_geometry(tiny, frames, height, width)
        return {
            "frames": f,
            "height": h,
            "width": w,
            "context_channels": channels,
            "text_tokens": tiny.max_text_tokens,
        }
    # Wan's VAE: 8x spatial, 4x temporal plus the first frame; 96 context channels; prompts padded to 512
    return {
        "frames": (frames - 1) // 4 + 1,
        "height": height // 8,
        "width": width // 8,
        "context_channels": 96,
        "text_tokens": REAL_TEXT_TOKENS,
    }


def transformer_config(params: Params) -> dict[str, Any]:
    """The active profile's transformer config: the tiny one, or the published 1.3B/14B one."""

    if params.active.backbone == "tiny":
        return tiny_transformer_config(params.model.tiny)
    return real_config(params.active.backbone)


def plan(
    params: Params,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    gpus: int = 1,
) -> dict[str, Any]:
    """Parameter counts, per-GPU training memory and latent cache size for the active profile.

    Args:
        params: The params (profile, LoRA rank, ``train.batch_size``/``grad_accum``, ``model.dtype``).
        frames, height, width: Clip geometry (default: the profile's).
        gpus: Data-parallel processes (the effective batch and the cache per process).

    Returns:
        A dict of plain numbers; :func:`format_plan` prints it.
    """
    profile = params.active
    frames, height, width = frames or profile.frames, height or profile.height, width or profile.width
    config = transformer_config(params)
    counts = transformer_parameters(config)
    lora = lora_parameters(config, params.lora_rank)
    geo = _geometry(params, frames, height, width)
    pt, ph, pw = config["patch_size"]
    tokens = (geo["frames"] // pt) * (geo["height"] // ph) * (geo["width"] // pw)
    d, ffn = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    n_main, n_vace = config["num_layers"], len(config["vace_layers"])
    batch = params.train.batch_size

    base_bytes = 4 if params.model.dtype == "float32" else 2  # "auto" is bf16 on a GPU
    weights = counts["total"] * base_bytes
    lora_state = lora * (4 + 4 + 8)  # fp32 weights, gradients, AdamW's two moments
    main_block = _MAIN_PER_DIM * d + _MAIN_PER_FFN * ffn  # bytes per token
    vace_block = main_block + _VACE_EXTRA_PER_DIM * d
    full = batch * tokens * (n_main * main_block + n_vace * vace_block)
    # Checkpointing keeps each block's input; the backward pass recomputes one block at a time.
    kept = batch * tokens * d * (_CKPT_PER_BLOCK_PER_DIM * (n_main + n_vace) + _CKPT_OUTER_PER_DIM)
    checkpointed = kept + batch * tokens * vace_block
    # Offload moves whatever autograd saves to host memory; one block's working set stays on the GPU.
    activations = {
        "none": {"gpu": full, "host": 0},
        "checkpointing": {"gpu": checkpointed, "host": 0},
        "offload": {"gpu": batch * tokens * vace_block, "host": full},
        "checkpointing+offload": {"gpu": batch * tokens * vace_block, "host": kept},
    }
    f, h, w = geo["frames"], geo["height"], geo["width"]
    text_dim = config["text_dim"]
    cache = {
        "target": 16 * f * h * w * 4,  # fp32
        "source": 16 * f * h * w * 4,  # fp32
        "context": geo["context_channels"] * f * h * w * base_bytes,  # the transformer's dtype
        "prompt_embeds": geo["text_tokens"] * text_dim * base_bytes,
    }
    return {
        "profile": params.profile,
        "backbone": profile.backbone,
        "geometry": {
            "frames": frames,
            "height": height,
            "width": width,
            "tokens": tokens,
            "latent": [f, h, w],
        },
        "config": {
            "dim": d,
            "ffn_dim": ffn,
            "layers": n_main,
            "vace_layers": n_vace,
            "heads": config["num_attention_heads"],
        },
        "parameters": {**counts, "lora": lora, "lora_rank": params.lora_rank},
        "memory": {
            "weights": weights,
            "lora_state": lora_state,
            "activations": activations,
            "batch_size": batch,
            "gpus": gpus,
            "effective_batch": batch * params.train.grad_accum * gpus,
        },
        "latent_cache_per_clip": {**cache, "total": sum(cache.values())},
    }


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(p: dict[str, Any]) -> str:
    """The plan as a short text table."""
    g, c, n, m = p["geometry"], p["config"], p["parameters"], p["memory"]
    lines = [
        f"profile {p['profile']} ({p['backbone']}): dim {c['dim']}, {c['layers']} layers, {c['heads']} heads, "
        f"ffn {c['ffn_dim']}, {c['vace_layers']} VACE blocks",
        f"clip {g['frames']}x{g['height']}x{g['width']} -> latent {g['latent']} -> {g['tokens']:,} tokens",
        "parameters:",
        f"  main blocks  {n['main']:>15,}",
        f"  VACE         {n['vace']:>15,}",
        f"  other        {n['other']:>15,}",
        f"  total        {n['total']:>15,}",
        f"  LoRA r={n['lora_rank']:<4} {n['lora']:>15,}  (trainable)",
        f"memory per GPU (batch {m['batch_size']}/GPU, {m['gpus']} GPU(s), effective batch {m['effective_batch']}):",
        f"  frozen weights       {_gib(m['weights'])}",
        f"  LoRA + grads + AdamW {_gib(m['lora_state'])}",
        "  activations (estimate, see pickstyle/plan.py):",
    ]
    for name, act in m["activations"].items():
        host = f"   (+{_gib(act['host']).strip()} host RAM)" if act["host"] else ""
        total = act["gpu"] + m["weights"] + m["lora_state"]
        lines.append(f"    {name:<22} {_gib(act['gpu'])}   total {_gib(total).strip()}{host}")
    cache = p["latent_cache_per_clip"]
    parts = ", ".join(f"{k} {v / MIB:.2f}" for k, v in cache.items() if k != "total")
    lines.append(f"latent cache per clip: {cache['total'] / MIB:.2f} MiB ({parts} MiB)")
    return "\n".join(lines)
