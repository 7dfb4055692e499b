"""The ``pickstyle`` command: one sub-command per stage, plus ``stylize`` and ``import-adapter``.

Heavy libraries (torch, diffusers, mlflow) are imported inside each command, so ``pickstyle --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import ValidationError

from pickstyle.config import ParamsError, Sample, error_lines, load_params, parse_overrides
from pickstyle.errors import PickstyleError


def _params(args: argparse.Namespace):
    return load_params(args.params, parse_overrides(args.set))


def _add_params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. -S train.steps=50 (repeatable)",
    )


def _print(result: Any) -> None:
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))


# --- stage commands: each calls one library function -------------------------------------------------------------


def cmd_pairs(args: argparse.Namespace) -> None:
    from pickstyle.data.pairs import build_pairs

    _print(build_pairs(_params(args)))


def cmd_clips(args: argparse.Namespace) -> None:
    from pickstyle.data.clips import build_clips

    _print(build_clips(_params(args)))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from pickstyle.pretrain import pretrain

    _print(pretrain(_params(args)))


def cmd_latents(args: argparse.Namespace) -> None:
    from pickstyle.latents import build_latents

    _print(build_latents(_params(args)))


def cmd_train(args: argparse.Namespace) -> None:
    from pickstyle.train import train

    _print(train(_params(args), fresh=args.fresh))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pickstyle.evaluate import evaluate

    _print(evaluate(_params(args)))


def cmd_register(args: argparse.Namespace) -> None:
    from pickstyle.register import register

    _print(register(_params(args)))


def cmd_params(args: argparse.Namespace) -> None:
    print(yaml.safe_dump(_params(args).model_dump(mode="json"), sort_keys=False, allow_unicode=True), end="")


def cmd_import_adapter(args: argparse.Namespace) -> None:
    from pickstyle.model.adapters import import_official_adapter

    _print(import_official_adapter(args.checkpoint, args.output, alpha=args.alpha))


def cmd_export_adapter(args: argparse.Namespace) -> None:
    from pickstyle.model.adapters import export_adapter

    _print(export_adapter(args.adapter, args.output, fmt=args.format))


def cmd_plan(args: argparse.Namespace) -> None:
    from pickstyle.plan import format_plan, plan

    result = plan(_params(args), frames=args.frames, height=args.height, width=args.width, gpus=args.gpus)
    if args.json:
        _print(result)
    else:
        print(format_plan(result))


def cmd_exps(args: argparse.Namespace) -> None:
    from pickstyle.experiments import show

    print(show(num=args.num))


def cmd_app(args: argparse.Namespace) -> None:
    from pickstyle.app import launch

    launch(_params(args), host=args.host, port=args.port, share=args.share)


def sample_with(sample: Sample, overrides: dict[str, Any]) -> Sample:
    """``sample`` with the command-line overrides, validated together (``--steps 4 --skip 2`` is checked as one).

    Raises:
        ParamsError: one line naming each bad flag, e.g. ``--c-guide: must be finite``.
    """
    try:
        return Sample.model_validate({**sample.model_dump(), **overrides})
    except ValidationError as err:
        lines = [line.partition(": ") for line in error_lines(err)]
        raise ParamsError(
            "; ".join(f"--{field.replace('_', '-')}: {msg}" for field, _, msg in lines)
        ) from None


def cmd_stylize(args: argparse.Namespace) -> None:
    from pickstyle.stylize import stylize_file

    params = _params(args)
    overrides = {name: getattr(args, name) for name in Sample.model_fields}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    sample = sample_with(params.sample, overrides)
    adapter, backbone = args.adapter, None
    if args.model:  # the registered model gives the adapter and the backbone
        from pickstyle.register import load_registered

        info = load_registered(args.model, params=params)
        adapter, backbone = info["adapter_dir"], info["backbone_dir"]
    out = stylize_file(
        args.input,
        args.output,
        args.prompt,
        params=params,
        sample=sample,
        adapter=adapter,
        backbone=backbone,
        side_by_side=args.side_by_side,
        fit=args.fit,
        seed=args.seed,
        max_frames=args.max_frames,
        orientation=args.orientation,
        fps=args.fps,
        on_long=args.long,
        preview=args.preview,
        style=args.style,
    )
    print(out)
    if args.preview:
        print(args.preview)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "pretrain": (
        cmd_pretrain,
        "stage 0 (tiny profile): pretrain the tiny Wan2.1-VACE from scratch into models/backbone (~2 h on 2 CPU cores)",
    ),
    "pairs": (cmd_pairs, "stage 1: build paired (source, style, caption) WebDataset shards in data/pairs"),
    "clips": (
        cmd_clips,
        "stage 2: render synthetic camera-motion clips (data/clips), test and validation clips (data/testclips, "
        "data/valclips)",
    ),
    "latents": (cmd_latents, "stage 3: encode clips once: target latents, 96-ch context, prompt embeddings"),
    "train": (cmd_train, "stage 4: train the context-style LoRA adapters (models/adapter)"),
    "evaluate": (
        cmd_evaluate,
        "stage 5: stylize the held-out test (or -S evaluate.split=val) clips, score (eval/)",
    ),
    "register": (cmd_register, "stage 6: register the adapter in MLflow (@challenger, gated @champion)"),
    "stylize": (cmd_stylize, "re-render any video in a style (CS-CFG)"),
    "app": (
        cmd_app,
        "web demo (Gradio): upload a video, pick a registered model or adapter, stylize it in the browser",
    ),
    "import-adapter": (
        cmd_import_adapter,
        "convert an official PickStyle .pth checkpoint to a diffusers LoRA folder",
    ),
    "export-adapter": (
        cmd_export_adapter,
        "write an adapter with the original Wan/PickStyle key names (.pth) or ComfyUI's (.safetensors)",
    ),
    "plan": (
        cmd_plan,
        "parameter counts, training memory per GPU and latent cache size of the profile (no weights needed)",
    ),
    "params": (cmd_params, "print the resolved params (defaults + params.yaml + -S overrides)"),
    "exps": (
        cmd_exps,
        "DVC experiments side by side: the params that differ, the split, base / adapter style PSNR, the worst style",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pickstyle",
        description="PickStyle video-to-video style transfer: data, training, evaluation, registry, serving.",
        epilog="The stages run in order pretrain -> pairs -> clips -> latents -> train -> evaluate -> register; "
        "`dvc repro` runs them all through their Prefect flows.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=fn)
        if name != "exps":  # it reads DVC's experiments, not params
            _add_params_args(p)
        if name == "train":
            p.add_argument(
                "--fresh",
                action="store_true",
                help="start from step 0 (default: continue from the last checkpoint made with the same settings)",
            )
        elif name == "import-adapter":
            p.add_argument("checkpoint", help="official PickStyle checkpoint (.pth)")
            p.add_argument("-o", "--output", required=True, help="output folder (diffusers LoRA format)")
            p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
        elif name == "stylize":
            _add_stylize_args(p)
        elif name == "app":
            _add_app_args(p)
        elif name == "export-adapter":
            p.add_argument("adapter", help="adapter folder (diffusers LoRA format), e.g. models/adapter")
            p.add_argument(
                "-o", "--output", required=True, help="output file (.pth: torch.save, else safetensors)"
            )
            p.add_argument(
                "--format", choices=["wan", "comfyui"], default="wan", help="key naming (default: wan)"
            )
        elif name == "exps":
            p.add_argument(
                "-n",
                "--num",
                type=int,
                default=1,
                help="experiments of the last N commits (default: %(default)s, HEAD's; -1: all)",
            )
        elif name == "plan":
            p.add_argument("--frames", type=int, help="clip frames (default: the profile's)")
            p.add_argument("--height", type=int, help="clip height (default: the profile's)")
            p.add_argument("--width", type=int, help="clip width (default: the profile's)")
            p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (default: %(default)s)")
            p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return parser


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`~pickstyle.config.Sample` field, typed, with its choices and description.

    Every flag defaults to ``None`` (= the params' ``sample`` value); the values are validated together by
    :func:`sample_with`.
    """
    group = p.add_argument_group("sampling (default: params.yaml `sample`)")
    for name, field in Sample.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if get_origin(kind) in (Union, UnionType):  # ``str | None``: the flag takes a str
            kind = next(a for a in get_args(kind) if a is not type(None))
        if get_origin(kind) is Literal:
            group.add_argument(flag, choices=get_args(kind), default=None, help=field.description)
        elif kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
        else:
            group.add_argument(flag, type=kind, default=None, help=field.description)


def _add_stylize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="input video (anything PyAV reads: mp4, mov, webm, gif, ...)")
    p.add_argument("-o", "--output", required=True, help="output .mp4 (written at the source fps)")
    p.add_argument("--prompt", required=True, help='e.g. "anime style. a wolf walking in the snow"')
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--adapter",
        help="adapter folder (diffusers LoRA format, or one adapter per style), e.g. models/adapter",
    )
    src.add_argument("--model", help="registered model, e.g. models:/pickstyle@champion")
    p.add_argument(
        "--style",
        help="of per-style adapters (the tiny profile's), use this style's (default: the style the prompt names)",
    )
    add_sample_flags(p)
    p.add_argument("--seed", type=int, default=0, help="noise and null-context seed (default: %(default)s)")
    p.add_argument(
        "--fit", choices=["crop", "pad"], default="crop", help="resize-to-cover + centre crop, or pad"
    )
    p.add_argument("--max-frames", type=int, default=None, help="use at most this many input frames")
    p.add_argument(
        "--orientation",
        choices=["auto", "profile"],
        default="auto",
        help="auto: a portrait input gets the profile's size turned to portrait; profile: always the profile's",
    )
    p.add_argument(
        "--fps", type=float, default=None, help="output frame rate (default: the source's; duration is kept)"
    )
    p.add_argument(
        "--long",
        choices=["windows", "cut"],
        default="windows",
        help="videos longer than one clip: process in windows, or cut to one clip with a warning",
    )
    p.add_argument("--side-by-side", action="store_true", help="write source | result")
    p.add_argument(
        "--preview", metavar="PNG", help="also write a still: 4 source frames above the same 4 results"
    )


def _add_app_args(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "The model list: every alias in the MLflow registry the params point to (./mlflow.db, or "
        "PICKSTYLE_MLFLOW_URI / MLFLOW_TRACKING_URI), the adapter folders under paths.models, the base model; "
        "any models:/ URI or folder can be typed in. Sampling defaults: params.yaml `sample` and the profile."
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0: all)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument(
        "--share",
        action="store_true",
        help="also make a public *.gradio.live link through Gradio's tunnel (needs the internet; default: off)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (PickstyleError, FileNotFoundError) as err:
        print(f"pickstyle {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
