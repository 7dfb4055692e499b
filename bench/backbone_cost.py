"""What a sharper tiny backbone would cost: one adapter training step and one sampling forward, side by side.

The tiny backbone renders fine detail (1-pixel outlines, 3-pixel blocks) soft: a token is a 4x4 patch of the 2x
latent, 8x8 pixels, and one linear layer decodes its 96 values (README: what is still short of issue 18). This
benchmark times, in one run and on the same inputs, the committed transformer's sizes against candidates with
finer patches or more width/depth (randomly initialised: only the cost is measured, not the quality):

* ``train step``: forward + backward of a batch of one 3-latent-frame window (the tiny profile's
  ``train_frame_window``) at the profile's 64x96 frames, the VACE context attached, LoRA-style (weights frozen,
  the loss's gradient flows through every block, as adapter training does);
* ``sample forward``: one forward of the whole 9-frame clip without gradients (a sampling step's unit);

and prints each candidate's parameter count, fp32 size (the committed backbone must stay <= 10 MB), the ratio to
the committed sizes, and what the train stage (5 adapters x 650 steps) would then take at most (its measured time
scaled by the train-step ratio).

    python bench/backbone_cost.py [--params params.yaml] [--repeats 5] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from diffusers import WanVACETransformer3DModel
from results import write_section  # bench/results.py (bench/ is on sys.path when run as a script)

from pickstyle.config import load_params
from pickstyle.model.components import tiny_transformer_config

#: Candidate sizes: (name, changes to ``model.tiny``).
CANDIDATES: list[tuple[str, dict]] = [
    ("committed (patch 4x4, width 128, 4 layers)", {}),
    ("patch 2x2", {"patch_size": [1, 2, 2]}),
    ("patch 2x4", {"patch_size": [1, 2, 4]}),
    ("width 256 (4 heads), ffn 512", {"num_attention_heads": 4, "ffn_dim": 512}),
    ("8 layers (8 VACE)", {"num_layers": 8, "vace_layers": list(range(8))}),
]

#: The train stage's time with the committed sizes (5 adapters x 650 windowed steps, README's demo timing).
TRAIN_STAGE_MIN = 6.1


def _inputs(tiny, cfg: dict, frames: int, height: int, width: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    lat_h, lat_w = height // tiny.vae_scale_spatial, width // tiny.vae_scale_spatial
    return {
        "hidden_states": torch.randn(1, cfg["in_channels"], frames, lat_h, lat_w, generator=gen),
        "timestep": torch.tensor([900.0]),
        "encoder_hidden_states": torch.randn(1, tiny.max_text_tokens, tiny.text_dim, generator=gen),
        "control_hidden_states": torch.randn(1, cfg["vace_in_channels"], frames, lat_h, lat_w, generator=gen),
    }


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def measure(tiny, changes: dict, window: int, clip_frames: int, size: tuple[int, int], repeats: int) -> dict:
    sizes = tiny.model_copy(update=changes)
    cfg = tiny_transformer_config(sizes)
    torch.manual_seed(0)
    model = WanVACETransformer3DModel(**cfg).eval()
    model.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    train_in = _inputs(sizes, cfg, window, *size)
    train_in["hidden_states"].requires_grad_(True)  # gradients flow through every block, weights frozen
    sample_in = _inputs(sizes, cfg, clip_frames, *size)

    def train_step() -> None:
        out = model(**train_in, return_dict=False)[0]
        out.square().mean().backward()

    def sample_forward() -> None:
        with torch.no_grad():
            model(**sample_in, return_dict=False)

    tokens = (
        clip_frames
        * (size[0] // sizes.vae_scale_spatial // sizes.patch_size[1])
        * (size[1] // sizes.vae_scale_spatial // sizes.patch_size[2])
    )
    return {
        "params": params,
        "mb": params * 4 / 2**20,
        "tokens": tokens,
        "train": _time(train_step, repeats),
        "sample": _time(sample_forward, repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    params = load_params(args.params)
    profile, tiny = params.profiles["tiny"], params.model.tiny
    lat_frames = profile.frames  # frame-wise VAE: one latent frame per frame
    window = profile.train_frame_window or lat_frames
    size = (profile.height, profile.width)

    rows = [(name, measure(tiny, ch, window, lat_frames, size, args.repeats)) for name, ch in CANDIDATES]
    base = rows[0][1]
    lines = [
        "| transformer | parameters | fp32 MB | tokens / clip | train step s | × | sample forward s | × "
        "| train stage ~min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        ratio_t, ratio_s = r["train"] / base["train"], r["sample"] / base["sample"]
        lines.append(
            f"| {name} | {r['params'] / 1e6:.2f} M | {r['mb']:.1f} | {r['tokens']} | {r['train']:.3f} | "
            f"{ratio_t:.1f}x | {r['sample']:.3f} | {ratio_s:.1f}x | {TRAIN_STAGE_MIN * ratio_t:.0f} |"
        )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    text = "\n".join(
        [
            f"`python bench/backbone_cost.py` — what a sharper tiny transformer would cost (random weights: cost only). "
            f"Train step: forward + backward of one {window}-latent-frame window at {size[0]}x{size[1]} "
            f"with the VACE context, weights frozen (as adapter training); sample forward: one no-grad forward of "
            f"the {lat_frames}-frame clip. Best of {args.repeats}. The train stage column scales the committed "
            f"sizes' {TRAIN_STAGE_MIN} min (5 adapters x 650 steps) by the train-step ratio: an upper bound, as data "
            f"loading and the optimizer step do not grow with the transformer; the committed backbone must stay "
            f"<= 10 MB and `dvc repro` of the later stages <= 10 min (issue 18).",
            "",
            *lines,
            "",
            f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
            f"load average {load}.",
        ]
    )
    print(text)
    if not args.no_write:
        write_section("backbone_cost", text)


if __name__ == "__main__":
    main()
