"""Benchmark of the ``train`` stage. ``python bench/train.py [--steps 30] [--cuda-steps 10]``.

CPU (always): the tiny profile, the same backbone, clips and number of steps, trained twice with
``pickstyle.train.train``: from the ``latents`` stage's cached latents, and encoding VAE + text every step from
the clip shards (``train.mode=on_the_fly``, what the reference does). Prints steps/s of both and the ratio.

CUDA (when available): the Wan2.1-VACE-1.3B transformer config with random weights (bf16 base, fp32 LoRA r=128
on the VACE self-attention q/k/v, gradient checkpointing) at 81 x 480 x 832 (32,760 tokens, 512 text tokens),
the training step of ``pickstyle.train`` on random inputs: steps/s, peak memory and MFU (model FLOPs counted
below, against the GPU's dense bf16 peak; frozen weights need no weight gradients, so a step is forward +
activation backward, recomputation by checkpointing not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pickstyle import flow_matching as fm  # noqa: E402
from pickstyle import train as tr  # noqa: E402
from pickstyle.config import parse_params  # noqa: E402

#: Dense bf16 peak FLOP/s by GPU name (no sparsity), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


# --- CPU: cached latents vs on-the-fly encoding ------------------------------------------------------------------


def _clips(n: int, frames: int, height: int, width: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Procedural (source, styled, caption) clips: a textured image slid across the frame, styled per frame."""
    from pickstyle.data.styles import apply_style

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        yy, xx = np.mgrid[0 : height + 16, 0 : width + 2 * frames]
        img = np.stack([(xx * (3 + i) + yy) % 256, (yy * (2 + i)) % 256, ((xx - yy) * (i + 1)) % 256], -1)
        img = img.astype(np.uint8)
        for _ in range(6):
            y0, x0 = rng.integers(0, height - 4), rng.integers(0, width - 4)
            img[y0 : y0 + 20, x0 : x0 + 20] = rng.integers(0, 256, 3)
        src = np.stack([img[t : t + height, 2 * t : 2 * t + width] for t in range(frames)])
        style = ["anime", "sepia", "pixel", "sketch", "watercolor"][i % 5]
        out.append(
            (src, np.stack([apply_style(style, f) for f in src]), f"{style} style. a colourful pattern")
        )
    return out


def bench_cpu(steps: int, n_clips: int) -> dict:
    from pickstyle.data.shards import write_shards
    from pickstyle.data.video import encode_video
    from pickstyle.latents import build_latents

    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base = {
        "paths": {"data": str(root / "data"), "models": str(root / "models")},
        "train": {
            "steps": steps,
            "checkpoint_every": 0,
            "log_every": steps,
            "mlflow": False,
            "device": "cpu",
        },
        "latents": {"device": "cpu"},
    }
    params = parse_params(base)
    p = params.active
    samples = [
        {
            "__key__": f"clip{i:04d}",
            "src.mp4": encode_video(src, p.fps, crf=12),
            "style.mp4": encode_video(style, p.fps, crf=12),
            "json": json.dumps({"caption": caption, "kind": "pair", "style": caption.split()[0]}),
        }
        for i, (src, style, caption) in enumerate(_clips(n_clips, p.frames, p.height, p.width))
    ]
    write_shards(samples, root / "data" / "clips", "clips")
    build_latents(params)  # also builds the tiny backbone once
    out = {}
    for mode in ("cached", "on_the_fly"):
        mp = parse_params(base, overrides={"train.mode": mode})
        summary = tr.train(mp)
        out[mode] = summary["samples_per_s"] / summary["batch_size"]
        print(f"{mode:>10}: {out[mode]:.2f} steps/s ({steps} steps, {summary['seconds']:.1f} s)", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    out["ratio"] = out["cached"] / out["on_the_fly"]
    out["geometry"] = f"{p.frames} x {p.height} x {p.width}"
    print(f"cached / on-the-fly: {out['ratio']:.2f}x", flush=True)
    return out


# --- CUDA: Wan2.1-VACE-1.3B at 81 x 480 x 832 --------------------------------------------------------------------


def wan_forward_flops(cfg: dict, f: int, h: int, w: int, text_len: int) -> dict[str, float]:
    """Matmul FLOPs of one WanVACETransformer3DModel forward (2·m·n·k per product), split linear / attention.

    Per block (main and VACE alike): self-attention q/k/v/o, cross-attention q/o on the video tokens and k/v on the
    text, the FFN, and the two attention products (QKᵀ and AV) of each attention. VACE blocks add proj_out (and
    block 0 proj_in); embeddings and the output head are included, norms and elementwise ops are not.
    """
    pt, ph, pw = cfg["patch_size"]
    n = (f // pt) * (h // ph) * (w // pw)  # video tokens
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ffn, tl = cfg["ffn_dim"], text_len
    block_linear = 2 * n * d * d * 4 + 2 * n * d * d * 2 + 2 * tl * d * d * 2 + 2 * n * d * ffn * 2
    block_attn = 4 * n * n * d + 4 * n * tl * d
    n_main, n_vace = cfg["num_layers"], len(cfg["vace_layers"])
    linear = (n_main + n_vace) * block_linear + n_vace * 2 * n * d * d + 2 * n * d * d  # + proj_out / proj_in
    linear += (
        2 * n * d * cfg["in_channels"] * pt * ph * pw + 2 * n * d * cfg["vace_in_channels"] * pt * ph * pw
    )
    linear += 2 * tl * cfg["text_dim"] * d + 2 * tl * d * d  # text embedder
    linear += 2 * n * d * cfg["out_channels"] * pt * ph * pw  # output head
    return {"linear": float(linear), "attention": float((n_main + n_vace) * block_attn), "tokens": n}


def train_step_flops(fwd: dict[str, float]) -> float:
    """Forward + backward to the activations: frozen linears cost 2x their forward (no weight gradients),
    attention products 3x (their backward needs both operands' gradients). LoRA's own FLOPs are negligible."""
    return 2 * fwd["linear"] + 3 * fwd["attention"]


def bench_cuda(steps: int, warmup: int = 2, peak_tflops: float | None = None) -> dict:
    from diffusers import WanVACETransformer3DModel

    from pickstyle.model.adapters import add_context_style_adapter
    from pickstyle.model.components import real_config

    device = torch.device("cuda")
    cfg = real_config("wan-1.3b")
    frames, height, width, text_len, shift = 81, 480, 832, 512, 5.0
    f, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    torch.manual_seed(0)
    with device:
        model = WanVACETransformer3DModel(**cfg)
    model.to(torch.bfloat16).requires_grad_(False)
    add_context_style_adapter(model, 128, 128.0)  # LoRA params stay fp32
    model.enable_gradient_checkpointing()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5.6e-4)
    latents = torch.randn(1, 16, f, h, w, device=device)
    context = torch.randn(1, 96, f, h, w, device=device, dtype=torch.bfloat16)
    prompt = torch.randn(1, text_len, cfg["text_dim"], device=device, dtype=torch.bfloat16)
    scale = torch.ones(len(cfg["vace_layers"]), device=device)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        sigmas = fm.sample_sigmas(1, shift, gen)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        weights = tr.bell_weights(sigmas, shift).to(device)
        sigmas = sigmas.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(
                hidden_states=fm.add_noise(latents, noise, sigmas),
                timestep=sigmas * fm.NUM_TRAIN_TIMESTEPS,
                encoder_hidden_states=prompt,
                control_hidden_states=context,
                control_hidden_states_scale=scale,
                return_dict=False,
            )[0]
        loss = tr.flow_matching_loss(pred, latents, noise, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    fwd = wan_forward_flops(cfg, f, h, w, text_len)
    flops = train_step_flops(fwd)
    name = torch.cuda.get_device_name()
    peak = peak_tflops * 1e12 if peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    out = {
        "gpu": name,
        "tokens": fwd["tokens"],
        "lora_params": sum(p.numel() for p in trainable),
        "steps_per_s": steps / seconds,
        "s_per_step": seconds / steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "tflop_per_step": flops / 1e12,
        "mfu": (flops * steps / seconds) / peak if peak else None,
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="CPU steps per mode (default: %(default)s)")
    parser.add_argument("--clips", type=int, default=4, help="CPU clips (default: %(default)s)")
    parser.add_argument("--cuda-steps", type=int, default=10, help="timed CUDA steps (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, for MFU")
    parser.add_argument("--threads", type=int, default=1, help="CPU torch threads (default: %(default)s)")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One thread by default: on a shared small machine oversubscribed intra-op threads dominate tiny ops.
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if not args.skip_cpu:
        bench_cpu(args.steps, args.clips)
    if torch.cuda.is_available():
        bench_cuda(args.cuda_steps, peak_tflops=args.peak_tflops)
    else:
        print("no CUDA device: the 1.3B benchmark was skipped", flush=True)


if __name__ == "__main__":
    main()
