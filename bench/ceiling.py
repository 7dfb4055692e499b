"""What the frozen backbone can render from each kind of VACE context: the ceiling of a context-style adapter.

A context-style adapter changes only what the VACE blocks make of the context; the main blocks, which turn a style
prompt into appearance, stay frozen. So the adapter's best case is roughly the backbone given a *structure* control
it was pretrained on (grey, edges, blur, downscaled: :mod:`pickstyle.data.controls`) with the same style prompt:
if the backbone cannot render a style there, no adapter can teach it through the context. This benchmark scores,
on the evaluate stage's held-out test clips (``<data>/testclips``, exact ground truth), the style PSNR of

* ``rgb``: the RGB source as context (what the base variants of the evaluate stage do),
* ``grey`` / ``edges`` / ``blur`` / ``downscaled``: the control of the source as context,
* ``adapter``: the RGB source with the trained adapter (``<models>/adapter``, when there),

each without guidance (the conditional prediction alone) and with the configured guidance (``sample.guidance`` at
the profile's scales; the base rows use text CFG, as the evaluate stage's ``base``), the identity (the source
itself) as the floor. Same seed per clip for every row.

    python bench/ceiling.py [--params params.yaml] [--clips 10] [--controls grey,edges,blur,downscaled] [--no-write]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from pathlib import Path

import numpy as np
import torch
from results import write_section  # bench/results.py (bench/ is on sys.path when run as a script)

from pickstyle.config import load_params
from pickstyle.data.clip_reader import iter_clips
from pickstyle.data.controls import CONTROLS, apply_control
from pickstyle.evaluate import variant_sample
from pickstyle.metrics import psnr
from pickstyle.model.adapters import load_adapter
from pickstyle.model.components import backbone_path, load_pipeline
from pickstyle.model.pipeline import PickStylePipeline
from pickstyle.stylize import stylize_frames


def _table(scores: dict[str, dict[str, list[float]]], styles: list[str]) -> str:
    lines = [
        "| context / sampling | " + " | ".join(styles) + " | mean |",
        "|---|" + "---|" * (len(styles) + 1),
    ]
    for row, per_style in scores.items():
        cells = [f"{np.mean(per_style[s]):.2f}" if per_style.get(s) else "-" for s in styles]
        every = [v for s in styles for v in per_style.get(s, [])]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | **{np.mean(every):.2f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument(
        "--clips", type=int, default=10, help="test clips to score (default 10: the evaluate stage's)"
    )
    ap.add_argument("--controls", default=",".join(CONTROLS), help="comma-separated control names")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    folder = Path(params.paths.data) / "testclips"
    clips = list(itertools.islice(iter_clips(folder, prefix="testclips"), args.clips))
    if not clips:
        raise SystemExit(f"{folder}: no test clips (run `dvc repro clips` first)")
    pipe = load_pipeline(
        backbone_path(params), device="cpu", dtype=params.model.dtype, pipeline_cls=PickStylePipeline
    )
    adapter_dir = Path(params.paths.models) / "adapter"
    adapter = load_adapter(pipe, adapter_dir, scale=0.0) if adapter_dir.is_dir() else None
    sample = params.evaluate.sample
    contexts = ["rgb", *[c for c in args.controls.split(",") if c]]
    rows: dict[str, dict[str, list[float]]] = {"identity (the source)": {}}
    start = time.perf_counter()
    for index, clip in enumerate(clips):
        style, prompt = str(clip["meta"]["style"]), clip["meta"]["caption"]
        rows["identity (the source)"].setdefault(style, []).append(psnr(clip["src"], clip["style"]))
        runs = [
            (f"{c} / {g}", c, v, 0.0)
            for c in contexts
            for g, v in (("none", "base_noguide"), ("cfg", "base"))
        ]
        if adapter is not None:
            runs += [
                ("adapter / none", "rgb", "noguide", 1.0),
                (f"adapter / {sample.guidance}", "rgb", "cs_cfg", 1.0),
            ]
        for row, context, variant, scale in runs:
            if adapter is not None:
                pipe.set_adapters([adapter], [scale])
            video = clip["src"] if context == "rgb" else apply_control(context, clip["src"])
            out = stylize_frames(pipe, video, prompt, variant_sample(sample, variant), params.seed + index)
            rows.setdefault(row, {}).setdefault(style, []).append(psnr(out, clip["style"]))
        print(
            f"clip {index + 1}/{len(clips)} ({style}) done, {time.perf_counter() - start:.0f} s", flush=True
        )
    styles = sorted({str(c["meta"]["style"]) for c in clips})
    table = _table(rows, styles)
    print(table)
    if not args.no_write:
        text = (
            f"`python bench/ceiling.py` — style PSNR (dB) to the exact ground truth on {len(clips)} held-out test "
            f"clips, the committed backbone, sampling {sample.steps} steps {sample.scheduler} shift {sample.shift}, "
            f"t_g {sample.t_guide}, c_g {sample.c_guide}, seed {params.seed} + clip index. `<context> / none`: "
            "no guidance; `/ cfg`: text CFG, no adapter. The adapter's ceiling is roughly the best control row: "
            "it can only change what the VACE blocks make of the context.\n\n"
            f"{table}\n\nMachine: {platform.machine()}, torch {torch.__version__}."
        )
        write_section("ceiling", text)


if __name__ == "__main__":
    main()
