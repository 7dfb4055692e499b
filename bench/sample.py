"""Sampling speed: CS-CFG (batched, sequential, with the step cache) vs diffusers' stock WanVACEPipeline CFG.

Same random-weight model, same video, same seed and scheduler (the backbone's UniPC) for every variant;
one timed run each after one short warm-up run.

* **stock cfg**: ``diffusers.WanVACEPipeline`` with ``guidance_scale=5`` (two sequential forwards per step).
* **cfg (ours)**: ``PickStylePipeline`` mode ``cfg``, the two predictions as one batch-2 forward.
* **cs_cfg batched / sequential**: mode ``cs_cfg`` (three predictions: one batch-3 forward, or three).
* **cs_cfg + cache τ**: batched, with the VACE step cache at threshold τ; "diff" is the decoded output's
  max |Δ| and PSNR against ``cs_cfg batched`` without the cache, "reused" the steps served from the cache.

Per-step time = (end of the last scheduler step − start of the first transformer forward) / steps; "s/video"
is the whole call (VAE encode + denoising + decode; no text encoder: prompt embeddings are given).

On CPU one thread by default (``--threads``) and times are the process's CPU seconds: on a shared
machine wall time measures the neighbours (extra threads mostly spin-wait); on CUDA times are wall time.

Model: on CPU a small-but-not-tiny random config (8 layers, dim 256, 4 VACE blocks) at 17 x 128 x 192
(480 tokens); on CUDA the Wan2.1-VACE 1.3B transformer config and Wan's VAE config, random weights, at
81 x 480 x 832 (32,760 tokens), bf16 transformer / fp32 VAE, 20 steps, plus the peak GPU memory.

    python bench/sample.py [--device auto] [--steps N] [--thresholds 0.1,0.2,0.3] [--threads 1] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results import RESULTS, write_section  # bench/results.py (bench/ is on sys.path when run as a script)

from pickstyle.config import TinyBackbone
from pickstyle.model.pipeline import PickStylePipeline


def build_cpu_pipeline(folder: Path) -> PickStylePipeline:
    """A small random Wan2.1-VACE (via the tiny builder with bigger sizes), fp32 on CPU."""
    from pickstyle.model.components import build_tiny_backbone, load_pipeline

    sizes = TinyBackbone(
        num_layers=8,
        vace_layers=[0, 2, 4, 6],
        num_attention_heads=4,
        attention_head_dim=64,
        ffn_dim=1024,
        text_dim=64,
        freq_dim=64,
        vae_base_dim=8,
        text_layers=1,
        text_heads=2,
        text_ffn_dim=64,
        max_text_tokens=32,
    )
    build_tiny_backbone(folder, sizes, seed=0)
    return load_pipeline(folder, "cpu", pipeline_cls=PickStylePipeline)


def build_cuda_pipeline() -> PickStylePipeline:
    """The 1.3B transformer config and Wan's VAE config with random weights; no text encoder (embeddings given)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACETransformer3DModel

    from pickstyle.model.components import real_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = WanVACETransformer3DModel(**real_config("wan-1.3b")).to(torch.bfloat16)
        vae = AutoencoderKLWan().to(torch.float32)  # the defaults are Wan2.1's VAE config
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = PickStylePipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clock(cuda: bool):
    """Wall time on CUDA; on CPU the process's CPU time (one thread: the work done, whatever else runs)."""
    return time.perf_counter if cuda else time.process_time


class StepTimer:
    """Times the denoising loop through a transformer pre-hook and a wrapper around ``scheduler.step``."""

    def __init__(self, pipe, cuda: bool) -> None:
        self.cuda, self.start, self.ends = cuda, None, []
        self.clock = clock(cuda)
        self._hook = pipe.transformer.register_forward_pre_hook(self._pre)
        original = pipe.scheduler.step

        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            self._sync()
            self.ends.append(self.clock())
            return out

        pipe.scheduler.step = step

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _pre(self, *_):
        if self.start is None:
            self._sync()
            self.start = self.clock()

    def reset(self) -> None:
        self.start, self.ends = None, []

    def per_step(self) -> float:
        return (self.ends[-1] - self.start) / len(self.ends)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: CPU 10, CUDA 20)")
    parser.add_argument("--thresholds", default="0.1,0.2,0.3", help="step-cache thresholds to measure")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1: stable timings on a shared machine)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if not cuda:
        torch.set_num_threads(args.threads)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            pipe = build_cuda_pipeline()
            frames, height, width, steps, text_len, text_dim = 81, 480, 832, args.steps or 20, 512, 4096
            what = "Wan2.1-VACE 1.3B config, random weights, bf16 transformer / fp32 VAE"
        else:
            pipe = build_cpu_pipeline(Path(tmp) / "backbone")
            frames, height, width, steps, text_len, text_dim = 17, 128, 192, args.steps or 10, 32, 64
            what = "small random config: 8 layers, dim 256, 4 VACE blocks, fp32"
        dtype = pipe.transformer.dtype
        gen = torch.Generator().manual_seed(0)
        embeds = torch.randn(1, text_len, text_dim, generator=gen).to(device, dtype)
        negative = torch.randn(1, text_len, text_dim, generator=gen).to(device, dtype)
        video = (np.random.default_rng(0).random((frames, height, width, 3)) * 255).astype(np.uint8)
        stock = __import__("diffusers").WanVACEPipeline(**pipe.components)
        stock.set_progress_bar_config(disable=True)
        timer = StepTimer(pipe, cuda)  # both pipelines share the transformer and the scheduler

        def call_stock(n: int):
            from PIL import Image

            return stock(
                video=[Image.fromarray(f) for f in video],
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                height=height,
                width=width,
                num_frames=frames,
                num_inference_steps=n,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).frames[0]

        def call_ours(n: int, **kw):
            return pipe(
                video,
                None,
                None,
                height=height,
                width=width,
                num_inference_steps=n,
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
                **kw,
            ).frames[0]

        variants: list[tuple[str, object]] = [
            ("stock cfg (diffusers, 2 sequential)", lambda n: call_stock(n)),
            ("cfg (ours, batch 2)", lambda n: call_ours(n, guidance="cfg")),
            ("cs_cfg batched (batch 3)", lambda n: call_ours(n, guidance="cs_cfg")),
            ("cs_cfg sequential (3 forwards)", lambda n: call_ours(n, guidance="cs_cfg", batched=False)),
        ]
        for tau in thresholds:
            variants.append(
                (
                    f"cs_cfg batched + cache {tau:g}",
                    lambda n, tau=tau: call_ours(n, guidance="cs_cfg", cache_threshold=tau),
                )
            )

        call_ours(2, guidance="cs_cfg")  # warm-up (kernels, allocator, oneDNN primitives)
        call_stock(2)
        rows, outputs = [], {}
        for name, fn in variants:
            timer.reset()
            pipe.cache_stats = {}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = timer.clock()
            out = fn(steps)
            if cuda:
                torch.cuda.synchronize()
            total = timer.clock() - t0
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            stats = next(iter(pipe.cache_stats.values()), None) if "cache" in name else None
            outputs[name] = out
            rows.append((name, timer.per_step(), total, peak, stats))
            print(f"{name:38s} {timer.per_step():8.3f} s/step {total:8.2f} s/video", flush=True)

    base_step = rows[0][1]
    base_total = rows[0][2]
    reference = outputs["cs_cfg batched (batch 3)"]
    lines = [
        f"`python bench/sample.py{' --device cuda' if cuda else ''}` — {what}; {frames} x {height} x {width}, "
        f"{steps} steps, UniPC, one run per variant after a warm-up; "
        f"{'wall' if cuda else 'CPU (process, 1 thread)'} seconds. "
        f"Device: {torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
        + (
            ""
            if cuda
            else f", threads: {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} at the end"
        )
        + ".",
        "",
        "| variant | s/step | × stock | s/video | × stock | peak GiB | reused steps | max abs diff | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_step, total, peak, stats in rows:
        diff = psnr_s = reused = ""
        if "cache" in name:
            d = np.abs(outputs[name] - reference)
            diff, psnr_s = f"{float(d.max()):.4f}", f"{psnr(outputs[name], reference):.1f}"
            reused = f"{stats['reused']}/{stats['reused'] + stats['computed']}" if stats else "0"
        if name.startswith("cfg (ours"):
            diff = f"{float(np.abs(outputs[name] - outputs[rows[0][0]]).max()):.2e} vs stock"
        lines.append(
            f"| {name} | {per_step:.3f} | {per_step / base_step:.2f} | {total:.2f} | {total / base_total:.2f} | "
            f"{'' if np.isnan(peak) else f'{peak:.1f}'} | {reused} | {diff} | {psnr_s} |"
        )
    lines += [
        "",
        "Frames are in [0, 1]; diffs compare decoded frames with `cs_cfg batched` without the cache. Random",
        "weights: the cache's reuse pattern (and so its speed-up) depends on how the trained model's modulated",
        "input moves between steps, so re-measure thresholds on real weights before choosing one.",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        write_section("sample", text)
        print(f"\nwrote the '## sample' section of {RESULTS}")


if __name__ == "__main__":
    main()
