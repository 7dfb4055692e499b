"""GPU check: Wan2.1-VACE-1.3B (random weights, bf16) at 81 x 480 x 832 on one GPU, in a few minutes.

    python bench/gpu.py              # one H100/H200: ~3-5 min, writes the `## gpu` section of bench/RESULTS.md
    python bench/gpu.py --smoke      # CPU, tiny sizes, < 60 s: checks the script itself (writes nothing)

Nothing is downloaded: the transformer is built from the published 1.3B config (``real_config("wan-1.3b")``)
and the VAE from Wan2.1's VAE config (``AutoencoderKLWan()`` defaults), both randomly initialised. Prompt
embeddings are random tensors of UMT5's shape (512 x 4096): the text encoder is not part of the check.

It measures, at 81 x 480 x 832 (21 x 60 x 104 latents, 32,760 video tokens):

* **training**: the step of ``pickstyle.train`` (``_micro_step``: shifted-σ flow matching, bell weights, bf16
  autocast over a bf16 base with fp32 LoRA r = α = 128 on the VACE q/k/v; then backward, grad-clip 1.0, AdamW),
  batch 1, with gradient checkpointing, and with checkpointing + activation offload (``save_on_cpu``): s/step,
  peak GPU memory, MFU (model FLOPs of ``bench/train.py``: forward + activation backward, recomputation not
  counted, against the GPU's dense bf16 peak). Offload without checkpointing would pin ~105 GiB of host memory
  (``pickstyle plan``) and is not run.
* **sampling** (``output_type="latent"``, prompt embeddings given): s/step of diffusers' stock
  ``WanVACEPipeline`` CFG (2 sequential forwards), ``PickStylePipeline`` ``cs_cfg`` batched (one forward of
  batch 3) and ``cs_cfg`` with the VACE step cache (threshold 0.2; with random weights the reuse pattern says
  little about trained ones).
* **VAE**: encode and decode of one 81-frame clip (fp32, as the pipelines run it).

Published anchors are printed beside the numbers (docs/method.md §4); they are other models/setups, for scale only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: results.py, train.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import write_section  # noqa: E402
from train import PEAK_BF16, train_step_flops, wan_forward_flops  # noqa: E402

#: Published numbers for scale (docs/method.md §4): (what, value, unit, source).
ANCHORS = [
    ("Wan 1.3B LoRA training", "8.3", "s/it", "A100, DiffSynth-Studio users"),
    ("Wan2.1 T2V-1.3B 480p inference", "261", "s/video", "RTX 4090"),
    ("Wan2.1 T2V-1.3B 480p inference", "175", "s/video", "A800"),
    ("Wan2.1 T2V-1.3B 480p inference, TeaCache 0.08", "88", "s/video", "A800"),
]
CACHE_THRESHOLD = 0.2


@dataclass
class Setup:
    """Sizes and devices of one run: the 1.3B at 81 x 480 x 832 on CUDA, or tiny sizes on CPU (``--smoke``)."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    frames: int
    height: int
    width: int
    text_len: int
    device: torch.device
    dtype: torch.dtype
    train_steps: int
    sample_steps: int
    lora_rank: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def make_setup(smoke: bool, train_steps: int, sample_steps: int) -> Setup:
    from pickstyle.config import TinyBackbone
    from pickstyle.model.components import real_config, tiny_transformer_config, tiny_vae_config

    if smoke:
        tiny = TinyBackbone(num_layers=2, vace_layers=[0, 1], ffn_dim=128)
        return Setup(
            "smoke (tiny random config, CPU fp32)",
            tiny_transformer_config(tiny),
            tiny_vae_config(tiny),
            frames=5,
            height=32,
            width=48,
            text_len=8,
            device=torch.device("cpu"),
            dtype=torch.float32,
            train_steps=2,
            sample_steps=2,
            lora_rank=8,
        )
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU (or --smoke for the CPU check of the script)")
    return Setup(
        "Wan2.1-VACE-1.3B config, random weights, bf16",
        real_config("wan-1.3b"),
        {},  # AutoencoderKLWan's defaults are Wan2.1's VAE
        frames=81,
        height=480,
        width=832,
        text_len=512,
        device=torch.device("cuda"),
        dtype=torch.bfloat16,
        train_steps=train_steps,
        sample_steps=sample_steps,
        lora_rank=128,
    )


# --- models --------------------------------------------------------------------------------------------------------


def build_transformer(setup: Setup):
    """Random-init ``WanVACETransformer3DModel`` on the device; dtypes as ``from_pretrained(dtype=...)`` gives them
    (its fp32-kept modules stay fp32), with the context-style LoRA (fp32) added."""
    from diffusers import WanVACETransformer3DModel

    from pickstyle.model.adapters import add_context_style_adapter

    torch.manual_seed(0)
    with setup.device:
        model = WanVACETransformer3DModel(**setup.transformer)
    keep = model._keep_in_fp32_modules or []
    for name, param in model.named_parameters():
        if not any(m in name.split(".") for m in keep):
            param.data = param.data.to(setup.dtype)
    model.requires_grad_(False)
    add_context_style_adapter(model, setup.lora_rank, float(setup.lora_rank))
    return model


def build_vae(setup: Setup):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1)
    with setup.device:
        return AutoencoderKLWan(**setup.vae).eval()  # fp32


def latent_shape(setup: Setup, vae) -> tuple[int, int, int]:
    s, t = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    return (setup.frames - 1) // t + 1, setup.height // s, setup.width // s


def _sync(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.synchronize()


def _reset_peak(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(setup: Setup) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if setup.cuda else None


# --- training ------------------------------------------------------------------------------------------------------


def bench_training(setup: Setup, model, latents_fhw: tuple[int, int, int], offload: bool) -> dict[str, Any]:
    """Timed steps of ``pickstyle.train._micro_step`` + backward + clip + AdamW, after one warm-up step."""
    from pickstyle import train as tr
    from pickstyle.config import parse_params

    params = parse_params({"train": {"activation_offload": offload, "gradient_checkpointing": True}})
    f, h, w = latents_fhw
    cfg = setup.transformer
    batch = {
        "keys": ["bench"],
        "latents": torch.randn(1, cfg["in_channels"], f, h, w),
        "context": torch.randn(1, cfg["vace_in_channels"], f, h, w),
        "prompt_embeds": torch.randn(1, setup.text_len, cfg["text_dim"]),
    }
    model.enable_gradient_checkpointing()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5.6e-4)
    scale = torch.ones(len(cfg["vace_layers"]), device=setup.device)
    generator = torch.Generator().manual_seed(0)
    autocast = setup.dtype != torch.float32

    def step() -> None:
        loss = tr._micro_step(model, batch, params, scale, generator, setup.device, setup.dtype, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, allocator, AdamW state
    _sync(setup)
    _reset_peak(setup)
    tic = time.perf_counter()
    for _ in range(setup.train_steps):
        step()
    _sync(setup)
    seconds = (time.perf_counter() - tic) / setup.train_steps
    fwd = wan_forward_flops(cfg, f, h, w, setup.text_len)
    flops = train_step_flops(fwd)
    peak = _gpu_peak_flops(setup)
    model.disable_gradient_checkpointing()
    return {
        "s_per_step": seconds,
        "peak_gib": _peak_gib(setup),
        "mfu": flops / seconds / peak if peak else None,
        "tflop_per_step": flops / 1e12,
        "tokens": fwd["tokens"],
    }


def _gpu_peak_flops(setup: Setup) -> float | None:
    if not setup.cuda:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# --- sampling ------------------------------------------------------------------------------------------------------


class StepTimer:
    """Seconds per denoising step: from the first transformer forward to the last ``scheduler.step``."""

    def __init__(self, pipe, setup: Setup) -> None:
        self.setup, self.start, self.ends = setup, None, []
        self._hook = pipe.transformer.register_forward_pre_hook(self._pre)
        original = pipe.scheduler.step

        def timed_step(*args, **kwargs):
            out = original(*args, **kwargs)
            _sync(setup)
            self.ends.append(time.perf_counter())
            return out

        pipe.scheduler.step = timed_step

    def _pre(self, *_) -> None:
        if self.start is None:
            _sync(self.setup)
            self.start = time.perf_counter()

    def measure(self, call) -> float:
        self.start, self.ends = None, []
        call()
        return (self.ends[-1] - self.start) / len(self.ends)

    def remove(self) -> None:
        self._hook.remove()


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )


def bench_sampling(setup: Setup, model, vae) -> dict[str, dict[str, Any]]:
    """s/step of stock CFG (diffusers), batched cs_cfg and cs_cfg with the step cache; one warm-up call first."""
    import PIL.Image
    from diffusers import WanVACEPipeline

    from pickstyle.model.pipeline import PickStylePipeline

    model.eval()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(setup.frames, setup.height, setup.width, 3), dtype=np.uint8)
    text_dim = setup.transformer["text_dim"]
    prompt = torch.randn(1, setup.text_len, text_dim, device=setup.device, dtype=setup.dtype)
    negative = torch.randn(1, setup.text_len, text_dim, device=setup.device, dtype=setup.dtype)
    common = {
        "height": setup.height,
        "width": setup.width,
        "num_frames": setup.frames,
        "output_type": "latent",
    }
    parts = {"tokenizer": None, "text_encoder": None, "vae": vae, "transformer": model}
    ours = PickStylePipeline(scheduler=_scheduler(), **parts)
    stock = WanVACEPipeline(scheduler=_scheduler(), **parts)
    for pipe in (ours, stock):
        pipe.set_progress_bar_config(disable=True)

    def run_ours(steps: int, cache: float | None = None) -> None:
        ours(
            frames,
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            num_inference_steps=steps,
            guidance="cs_cfg",
            batched=True,
            cache_threshold=cache,
            generator=torch.Generator().manual_seed(0),
            **common,
        )

    def run_stock(steps: int) -> None:
        stock(
            video=[PIL.Image.fromarray(f) for f in frames],
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            num_inference_steps=steps,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            **common,
        )

    out: dict[str, dict[str, Any]] = {}
    n = setup.sample_steps
    with torch.no_grad():
        run_ours(2)  # warm-up: kernels for batch 3 and the VAE encode
        timer = StepTimer(stock, setup)
        _reset_peak(setup)
        out["stock cfg (diffusers, 2 sequential forwards)"] = {
            "s_per_step": timer.measure(lambda: run_stock(n)),
            "peak_gib": _peak_gib(setup),
        }
        timer.remove()
        timer = StepTimer(ours, setup)
        _reset_peak(setup)
        out["cs_cfg batched (1 forward of batch 3)"] = {
            "s_per_step": timer.measure(lambda: run_ours(n)),
            "peak_gib": _peak_gib(setup),
        }
        _reset_peak(setup)
        cached = timer.measure(lambda: run_ours(n, CACHE_THRESHOLD))
        stats = getattr(ours, "cache_stats", {}) or {}
        out[f"cs_cfg batched + step cache {CACHE_THRESHOLD}"] = {
            "s_per_step": cached,
            "peak_gib": _peak_gib(setup),
            "note": json.dumps(stats, sort_keys=True) if stats else "",
        }
        timer.remove()
    return out


# --- VAE -----------------------------------------------------------------------------------------------------------


def bench_vae(setup: Setup, vae) -> dict[str, dict[str, Any]]:
    """Encode and decode of one clip, fp32, after a short warm-up at 5 frames."""
    video = torch.rand(1, 3, setup.frames, setup.height, setup.width, device=setup.device) * 2 - 1
    out = {}
    with torch.no_grad():
        vae.decode(vae.encode(video[:, :, :5]).latent_dist.mode())  # warm-up
        _sync(setup)
        _reset_peak(setup)
        tic = time.perf_counter()
        z = vae.encode(video).latent_dist.mode()
        _sync(setup)
        out[f"VAE encode, {setup.frames} frames"] = {
            "s": time.perf_counter() - tic,
            "peak_gib": _peak_gib(setup),
        }
        _reset_peak(setup)
        tic = time.perf_counter()
        vae.decode(z)
        _sync(setup)
        out[f"VAE decode, {setup.frames} frames"] = {
            "s": time.perf_counter() - tic,
            "peak_gib": _peak_gib(setup),
        }
    return out


# --- report --------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def report(setup: Setup, results: dict[str, Any], elapsed: float) -> str:
    """The markdown section: machine line, the results table, the anchors."""
    device = (
        torch.cuda.get_device_name() if setup.cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    f, h, w = results["latents"]
    lines = [
        f"`python bench/gpu.py{' --smoke' if not setup.cuda else ''}` — {setup.name}; {setup.frames} x "
        f"{setup.height} x {setup.width} ({f} x {h} x {w} latents, {results['tokens']:,} tokens, "
        f"{setup.text_len} text tokens), LoRA r = α = {setup.lora_rank}, batch 1. Device: {device}; torch "
        f"{torch.__version__}. Training: {setup.train_steps} timed steps after 1 warm-up; sampling: "
        f"{setup.sample_steps} steps per variant after a warm-up call. Whole run {elapsed:.0f} s.",
        "",
        "| what | seconds (per step; VAE: per clip) | peak GiB | MFU | note |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["train"].items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        note = f"{r['tflop_per_step']:.1f} TFLOP/step (model FLOPs)"
        lines.append(
            f"| train: {name} | {_fmt(r['s_per_step'])} | {_fmt(r['peak_gib'], 1)} | {mfu} | {note} |"
        )
    for name, r in results["sample"].items():
        note = r.get("note", "")
        lines.append(f"| sample: {name} | {_fmt(r['s_per_step'])} | {_fmt(r['peak_gib'], 1)} |  | {note} |")
    for name, r in results["vae"].items():
        lines.append(f"| {name} | {_fmt(r['s'])} | {_fmt(r['peak_gib'], 1)} |  |  |")
    steps20 = results["sample"]["cs_cfg batched (1 forward of batch 3)"]["s_per_step"] * 20
    lines += [
        "",
        f"A 20-step cs_cfg video ≈ {steps20:.0f} s of denoising plus the VAE encode and decode above.",
        "",
        "Published anchors (other setups, for scale):",
        "",
        "| anchor | value | device |",
        "|---|---|---|",
    ]
    lines += [f"| {what} | {value} {unit} | {where} |" for what, value, unit, where in ANCHORS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (< 60 s); writes nothing")
    parser.add_argument(
        "--train-steps", type=int, default=3, help="timed training steps (default: %(default)s)"
    )
    parser.add_argument(
        "--sample-steps", type=int, default=5, help="steps per sampling variant (default: %(default)s)"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    setup = make_setup(args.smoke, args.train_steps, args.sample_steps)
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    model = build_transformer(setup)
    vae = build_vae(setup)
    fhw = latent_shape(setup, vae)
    results: dict[str, Any] = {"latents": fhw, "train": {}}
    for name, offload in (("gradient checkpointing", False), ("checkpointing + activation offload", True)):
        results["train"][name] = r = bench_training(setup, model, fhw, offload)
        results["tokens"] = r["tokens"]
        print(f"train, {name}: {r['s_per_step']:.3f} s/step, peak {_fmt(r['peak_gib'], 1)} GiB", flush=True)
    results["sample"] = bench_sampling(setup, model, vae)
    print("sampling:", {k: round(v["s_per_step"], 3) for k, v in results["sample"].items()}, flush=True)
    results["vae"] = bench_vae(setup, vae)
    text = report(setup, results, time.perf_counter() - start)
    print("\n" + text, flush=True)
    if not args.smoke and not args.no_write:
        write_section("gpu", text)
    return results


if __name__ == "__main__":
    main()
