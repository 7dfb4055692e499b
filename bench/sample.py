"""Sampling speed and quality: stock CFG vs exact CS-CFG vs the fast CS-CFG modes (guidance reuse, step cache).

Two models, the same variants, the same seed per clip:

* **tiny pretrained** (models/backbone, no adapter: the base model follows the style prompts it was pretrained
  on) on held-out procedural test clips built in-process (pickstyle.data.scenes: the evaluate stage's kind),
  whose exact ground truth (the built-in style filter per frame) gives the **style PSNR**; sampling as the
  tiny profile's evaluate defaults (steps, DPM++ shift 16, t_g, c_g).
* **wider random** (8 layers, dim 256, 4 VACE blocks, Wan's 8x/4x VAE, 2x2 patch; random weights, random
  prompt embeddings) at 17 x 128 x 192 (480 tokens), 10 steps: speed, and PSNR against exact cs_cfg only (no ground truth means anything here).

Variants: **stock cfg** = mode ``cfg`` with two sequential forwards, bit-identical to diffusers'
``WanVACEPipeline`` (tests/model/test_pipeline.py; diffusers' own pipeline cannot run the tiny backbone's 1x
temporal VAE); ``cfg`` batch 2; exact ``cs_cfg`` batch 3; ``cs_cfg k=K`` (all guidance predictions every K-th
step, the directions reused in between: ``guidance_every``), ``ctx k=K`` (only ε_t − ε_0 reused); ``cache τ``
(the calibrated step cache, ``cache_warmup`` retention steps) and both combined.

Times are the process's CPU seconds at one torch thread per video (VAE encode + denoising + decode; prompt
embeddings precomputed), the mean over clips, after one warm-up call per model. ``--calibrate`` fits the step cache's TeaCache polynomial on
uncached tiny runs and prints it (paste into ``pickstyle.model.cache.CALIBRATIONS``).

    python bench/sample.py [--clips 3] [--thresholds 0.1,0.2] [--calibrate] [--no-write]
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
from pickstyle.evaluation import psnr
from results import write_section  # bench/results.py (bench/ is on sys.path when run as a script)

from pickstyle.config import WAN_NEGATIVE_PROMPT, TinyBackbone, parse_params
from pickstyle.model.pipeline import PickStylePipeline

ROOT = Path(__file__).resolve().parents[1]
TARGET_SPEED, TARGET_LOSS = 1.15, 0.3


def build_wide_pipeline(folder: Path) -> PickStylePipeline:
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
        patch_size=[1, 2, 2],
        vae_base_dim=8,
        vae_dim_mult=[1, 2, 4, 4],  # Wan's 8x spatial, 4x temporal: 17 x 128 x 192 is 5 x 8 x 12 = 480 tokens
        vae_temporal_downsample=[False, True, True],
        vae_framewise=False,  # Wan's VAE compresses time: clip-wise
        text_layers=1,
        text_heads=2,
        text_ffn_dim=64,
        max_text_tokens=32,
    )
    build_tiny_backbone(folder, sizes, seed=0)
    return load_pipeline(folder, "cpu", pipeline_cls=PickStylePipeline)


def test_clips(count: int, frames: int, height: int, width: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """``(source, exact ground truth, caption)`` of held-out test scenes in styles the backbone was pretrained on."""
    from pickstyle.data.clips import _settings
    from pickstyle.data.scenes import _photos, draw_scene, render_scene
    from pickstyle.data.styles import apply_style, style_caption_name

    params = parse_params({})
    s = _settings(params)
    descriptions = {pid: d for pid, d, _ in _photos()}
    known = [x for x in params.pairs.styles if x not in params.pretrain.holdout_styles]
    clips = []
    for index in range(count):
        spec = draw_scene(index, s)
        spec["style"] = known[index % len(known)]
        src = render_scene(spec, frames, height, width)
        target = np.stack([apply_style(spec["style"], f) for f in src])
        caption = f"{style_caption_name(spec['style'])} style. {descriptions[spec['background']]}"
        clips.append((src, target, caption))
    return clips


def variants(thresholds: list[float], warmup: int) -> list[tuple[str, dict]]:
    rows = [
        ("stock cfg (2 sequential)", {"guidance": "cfg", "batched": False}),
        ("cfg (batch 2)", {"guidance": "cfg"}),
        ("cs_cfg exact (batch 3)", {"guidance": "cs_cfg"}),
        ("cs_cfg k=2", {"guidance": "cs_cfg", "guidance_every": 2}),
        ("cs_cfg k=3", {"guidance": "cs_cfg", "guidance_every": 3}),
        ("cs_cfg ctx k=2", {"guidance": "cs_cfg", "guidance_every": 2, "guidance_reuse": "context"}),
    ]
    for tau in thresholds:
        cache = {"cache_threshold": tau, "cache_warmup": warmup}
        rows.append((f"cs_cfg cache {tau:g}", {"guidance": "cs_cfg", **cache}))
        rows.append((f"cs_cfg k=2 + cache {tau:g}", {"guidance": "cs_cfg", "guidance_every": 2, **cache}))
    return rows


def run_model(pipe, clips, embeds, settings: dict, rows: list[tuple[str, dict]]) -> dict[str, dict]:
    """Per variant: mean s/video, mean style PSNR (when ground truth), mean PSNR vs exact cs_cfg, reuse counts."""
    results: dict[str, dict] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    src, _, _ = clips[0]
    pos, neg = embeds[0]
    # warm-up (oneDNN primitives, allocator), so the first variant timed is not charged for it
    pipe(
        src,
        None,
        None,
        height=src.shape[1],
        width=src.shape[2],
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        num_inference_steps=2,
        output_type="np",
    )
    for name, kw in rows:
        times, outs, reused = [], [], []
        for (src, _, _), (pos, neg) in zip(clips, embeds, strict=True):
            t0 = time.process_time()
            out = _sample(pipe, src, pos, neg, output_type="np", **settings, **kw).frames[0]
            times.append(time.process_time() - t0)
            outs.append((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))
            stats = pipe.cache_stats if "cache_threshold" in kw else {}
            reused.append(sum(s["reused"] for s in stats.values()))
            calls = sum(s["reused"] + s["computed"] for s in stats.values())
        outputs[name] = outs
        results[name] = {
            "s": float(np.mean(times)),
            "reused": f"{np.mean(reused):.1f}/{calls}" if calls else "",
        }
        if clips[0][1] is not None:
            results[name]["style"] = float(np.mean([psnr(o, c[1]) for o, c in zip(outs, clips, strict=True)]))
        print(
            f"  {name:28s} {results[name]['s']:7.2f} s/video  {results[name].get('style', float('nan')):6.2f} dB"
        )
    exact = outputs["cs_cfg exact (batch 3)"]
    for name in results:
        results[name]["vs_exact"] = float(
            np.mean([psnr(a, b) for a, b in zip(outputs[name], exact, strict=True)])
        )
    return results


def _sample(pipe, src: np.ndarray, pos: torch.Tensor, neg: torch.Tensor, **kw):
    """One seeded pipeline call on a clip with precomputed prompt embeddings."""
    return pipe(
        src,
        None,
        None,
        height=src.shape[1],
        width=src.shape[2],
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )


def calibrate(pipe, clips, embeds, settings: dict) -> list[float]:
    """Fit TeaCache's rescaling polynomial: input change → residual change, on uncached runs (threshold 0)."""
    pairs: list[tuple[float, float]] = []
    for steps in (settings["num_inference_steps"], 20):
        for (src, _, _), (pos, neg) in zip(clips, embeds, strict=True):
            _sample(
                pipe,
                src,
                pos,
                neg,
                output_type="latent",
                guidance="cs_cfg",
                cache_threshold=0.0,
                **{**settings, "num_inference_steps": steps},
            )
            pairs += pipe.cache_pairs
    x, y = np.array(pairs).T
    # degree 1: TeaCache fits degree 4, but a quartic fitted on ~80 points turns negative just outside their
    # range (a huge input change would then look like none); a line stays monotone
    coefficients = np.polyfit(x, y, 1)
    fit = np.polyval(coefficients, x)
    r2 = 1 - np.sum((y - fit) ** 2) / np.sum((y - y.mean()) ** 2)
    print(
        f"calibration: {len(x)} step pairs, x in [{x.min():.4f}, {x.max():.4f}], y in [{y.min():.4f}, {y.max():.4f}]"
    )
    print(f"  polynomial (degree 1, R^2 {r2:.3f}): {[float(f'{c:.6e}') for c in coefficients]}")
    return [float(c) for c in coefficients]


def table(results: dict[str, dict], ground_truth: bool) -> list[str]:
    stock = results["stock cfg (2 sequential)"]["s"]
    exact = results["cs_cfg exact (batch 3)"]
    head = "| variant | s/video | × stock cfg | reused steps |"
    head += " style PSNR dB | Δ vs exact cs_cfg |" if ground_truth else ""
    head += " PSNR vs exact cs_cfg dB |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        row = f"| {name} | {r['s']:.2f} | {r['s'] / stock:.2f} | {r['reused']} |"
        if ground_truth:
            row += f" {r['style']:.2f} | {r['style'] - exact['style']:+.2f} |"
        row += f" {r['vs_exact']:.1f} |"
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=3, help="tiny test clips (one seed each)")
    parser.add_argument("--thresholds", default="1.0,2.0", help="step-cache thresholds (calibrated distance)")
    parser.add_argument("--warmup", type=int, default=2, help="step-cache retention steps")
    parser.add_argument(
        "--calibrate", action="store_true", help="fit the tiny backbone's cache polynomial and stop"
    )
    parser.add_argument("--no-wide", action="store_true", help="skip the wider random config")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from pickstyle.model.components import load_pipeline, prompt_length

    params = parse_params({})
    profile, sample = params.active, params.evaluate.sample
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    settings = {
        "num_inference_steps": sample.steps,
        "t_guide": sample.t_guide,
        "c_guide": sample.c_guide,
        "scheduler": sample.scheduler,
        "shift": sample.shift,
    }
    pipe = load_pipeline(ROOT / "models" / "backbone", "cpu", pipeline_cls=PickStylePipeline)
    pipe.set_progress_bar_config(disable=True)
    clips = test_clips(args.clips, profile.frames, profile.height, profile.width)
    negative = WAN_NEGATIVE_PROMPT if sample.negative_prompt is None else sample.negative_prompt
    length = prompt_length(pipe)
    embeds = [pipe.encode_prompt(c, negative, max_sequence_length=length, device="cpu") for *_, c in clips]
    if args.calibrate:
        calibrate(pipe, clips, embeds, settings)
        return

    print(f"tiny pretrained, {len(clips)} clips {profile.frames} x {profile.height} x {profile.width}:")
    tiny = run_model(pipe, clips, embeds, settings, variants(thresholds, args.warmup))
    wide = None
    if not args.no_wide:
        with tempfile.TemporaryDirectory() as tmp:
            wpipe = build_wide_pipeline(Path(tmp) / "backbone")
            wpipe.set_progress_bar_config(disable=True)
            g = torch.Generator().manual_seed(0)
            video = (np.random.default_rng(0).random((17, 128, 192, 3)) * 255).astype(np.uint8)
            wembeds = [(torch.randn(1, 32, 64, generator=g), torch.randn(1, 32, 64, generator=g))]
            wsettings = {**settings, "num_inference_steps": 10}
            print("wider random config, 17 x 128 x 192:")
            wide = run_model(
                wpipe, [(video, None, "")], wembeds, wsettings, variants(thresholds, args.warmup)
            )

    # The fast mode: the fastest guidance-reuse variant that loses at most TARGET_LOSS dB of style PSNR on the
    # tiny pretrained backbone (when none does, the one that loses least). The step cache is left out of the
    # choice: its calibration exists for the tiny backbone only, so it cannot be a default for every profile.
    stock, exact = tiny["stock cfg (2 sequential)"], tiny["cs_cfg exact (batch 3)"]
    fast_names = [n for n in tiny if n.startswith("cs_cfg") and "exact" not in n and "cache" not in n]
    ok = [n for n in fast_names if exact["style"] - tiny[n]["style"] <= TARGET_LOSS]
    best = min(ok, key=lambda n: tiny[n]["s"]) if ok else max(fast_names, key=lambda n: tiny[n]["style"])
    speed, change = tiny[best]["s"] / stock["s"], tiny[best]["style"] - exact["style"]
    meets = speed <= TARGET_SPEED and -change <= TARGET_LOSS

    lines = [
        f"`python bench/sample.py` — CPU seconds per video at 1 torch thread (VAE encode + denoising + decode; "
        f"prompt embeddings precomputed), mean over clips, seed 0. Sampling: {sample.scheduler} shift "
        f"{sample.shift:g}, t_g {sample.t_guide:g}, c_g {sample.c_guide:g} (the tiny profile's evaluate "
        f"defaults; c_g = t_g − 1 makes exact cs_cfg equal cfg_joint); cache retention {args.warmup} steps. "
        f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"**Tiny pretrained backbone** (models/backbone, no adapter), {len(clips)} held-out procedural test clips "
        f"{profile.frames} x {profile.height} x {profile.width}, {sample.steps} steps; style PSNR to the exact "
        "ground truth:",
        "",
        *table(tiny, True),
    ]
    if wide is not None:
        lines += [
            "",
            "**Wider random config** (8 layers, dim 256, 4 VACE blocks, 8x/4x VAE, 2x2 patch: 480 tokens; random weights), 17 x 128 x 192, 10 steps:",
            "",
            *table(wide, False),
        ]
    lines += [
        "",
        f"Fast mode: **{best}** — {speed:.2f}x stock CFG per video, style PSNR {change:+.2f} dB vs exact cs_cfg "
        f"(target <= {TARGET_SPEED}x and >= -{TARGET_LOSS} dB: {'met' if meets else 'not met'}).",
    ]
    lines += [
        "",
        "Step cache: thresholds are on the calibrated distance (`bench/sample.py --calibrate`, stored in "
        "`pickstyle.model.cache.CALIBRATIONS`). On the tiny backbone reusing a residual costs 52–92% of the block "
        "output whatever the input change (R² 0.24 for a line; a quartic turns negative outside the data), so each "
        "step adds ~0.6–0.8 and threshold 1 reuses about every other step. The real backbones have no calibration "
        "yet (raw distance), so the cache is not a default anywhere. Reused steps: mean per clip / calls.",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        write_section("sample", text)
    print(f"fast cs_cfg: {speed:.2f}x stock CFG per video, style PSNR change {change:+.2f} dB")


if __name__ == "__main__":
    main()
