"""The ``evaluate`` stage: stylize the held-out test clips with each variant and score them (:mod:`pickstyle.metrics`).

:func:`evaluate` stylizes the held-out test clips with each variant and writes ``eval/``: ``metrics.json`` (each
metric's mean over clips and its standard error), per-clip tables, figures and a labelled preview.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import torch
from PIL import Image

from pickstyle import tracking
from pickstyle.config import Params, Sample
from pickstyle.data.clip_reader import SPLIT_PREFIX, iter_clips
from pickstyle.data.images import text_strip, write_gif
from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_dir, resolve_device, write_json
from pickstyle.metrics import (
    ClipScorer,
    check_pair,
    check_video,
    psnr,
    score_clip,
    source_flows,
    structure_ssim,
    warp_error_per_frame,
)
from pickstyle.model import latent_space
from pickstyle.model.adapters import AdapterError, AdapterSet
from pickstyle.model.components import backbone_path, ensure_backbone, load_pipeline, missing_files
from pickstyle.model.guiders import effective_mode
from pickstyle.model.pipeline import PickStylePipeline
from pickstyle.stylize import stylize_frames

#: Reference rows written next to the variants: the source's and the ground truth's own warp error.
#: Row order of tables and charts: references first, then the variants from weakest to strongest.
_ORDER = (
    "source",
    "ground_truth",
    "vae",
    "reconstruct",
    "identity",
    "base_noguide",
    "base",
    "noguide",
    "cfg",
    "cfg_joint",
    "cs_cfg",
)
#: Variants that reproduce the *source* (backbone checks), scored by PSNR to it rather than by style metrics.
SOURCE_VARIANTS = ("vae", "reconstruct")
#: Variants shown in the preview, left to right, between the source and the ground truth.
PREVIEW_VARIANTS = ("base", "cfg", "cs_cfg")


class EvaluationError(PickstyleError):
    """The evaluate stage cannot run (no adapter, an unknown variant, no test clips)."""


# --- the evaluate stage ----------------------------------------------------------------------------------------


def variant_sample(sample: Sample, variant: str) -> Sample:
    """The sampling settings of one variant (``identity`` needs none).

    * ``base``   — no adapter (scale 0), plain text CFG: what the frozen backbone does on its own;
    * ``base_noguide`` / ``noguide`` — no adapter / the adapter, no guidance at all: the conditional
      prediction alone (has the adapter learned the styles, or does only guidance push them);
    * ``reconstruct`` — no adapter, no guidance, the caption ``"reconstruct. <description>"``: does the backbone
      follow its context (scored against the source);
    * ``cfg``    — the adapter, plain text CFG;
    * ``cfg_joint`` — the adapter, one CFG against (∅ text, permuted context): text and context not separated;
    * ``cs_cfg`` — the adapter, Context-Style CFG (``evaluate.sample.guidance`` if it is a CS-CFG mode).
    """
    if variant == "base":
        return sample.model_copy(update={"guidance": "cfg", "adapter_scale": 0.0})
    if variant == "base_noguide":
        return sample.model_copy(update={"guidance": "none", "adapter_scale": 0.0})
    if variant == "noguide":
        return sample.model_copy(update={"guidance": "none"})
    if variant == "reconstruct":
        # the backbone's own prediction: guidance would measure the null-text branch too, not the context
        return sample.model_copy(update={"guidance": "none", "adapter_scale": 0.0})
    if variant == "cfg":
        return sample.model_copy(update={"guidance": "cfg"})
    if variant == "cfg_joint":
        return sample.model_copy(update={"guidance": "cfg_joint"})
    if variant == "cs_cfg":
        guidance = sample.guidance if sample.guidance in ("cs_cfg", "cs_cfg_apg") else "cs_cfg"
        return sample.model_copy(update={"guidance": guidance})
    raise EvaluationError(f"unknown variant {variant!r}")


#: Sample fields that do not change a run without guidance (one prediction a step, no null text).
_GUIDANCE_ONLY = ("t_guide", "c_guide", "negative_prompt", "guidance_every", "guidance_reuse", "batched")


def sampling_key(sample: Sample, variant: str, prompt: str) -> tuple:
    """What decides a variant's output for one clip (and seed): variants with equal keys run the same
    computation, so the evaluation runs it once and scores it under each name — at the tiny profile's t_g 1,
    c_g 0, ``cfg``, ``cfg_joint`` and ``cs_cfg`` are ``noguide``, and ``base`` is ``base_noguide``."""
    if variant in ("identity", "vae"):
        return (variant,)
    vs = variant_sample(sample, variant)
    mode = effective_mode(vs.guidance, vs.t_guide, vs.c_guide)
    fields = vs.model_dump(exclude=set(_GUIDANCE_ONLY) if mode == "none" else set())
    fields["guidance"] = mode
    return (variant == "reconstruct", prompt, tuple(sorted(fields.items())))


def _load_pipeline(params: Params, device: str) -> tuple[Any, AdapterSet]:
    """The backbone + the trained adapter(s), loaded once; returns (pipeline, its adapters)."""

    adapter_dir = Path(params.paths.models) / "adapter"
    if not adapter_dir.is_dir():
        raise EvaluationError(f"{adapter_dir}: no trained adapter (run the train stage first)")
    # The stage depends on the backbone stage's output; build/check it only when it is not there, so evaluate
    # never rewrites another stage's output.
    backbone = backbone_path(params)
    if missing_files(backbone):
        backbone = ensure_backbone(params)
    pipe = load_pipeline(backbone, device=device, dtype=params.model.dtype, pipeline_cls=PickStylePipeline)
    try:
        adapters = AdapterSet.open(adapter_dir).load(pipe, scale=params.evaluate.sample.adapter_scale)
    except AdapterError as err:
        raise EvaluationError(f"{err} (run the train stage first)") from None
    return pipe, adapters


def _stylize(
    model: tuple[Any, AdapterSet] | None, variant: str, clip: dict[str, Any], sample: Sample, seed: int
) -> np.ndarray:
    """One variant's output for one clip; the variants share the pipeline and toggle the adapter's scale (of
    per-style adapters, the clip's style's)."""

    src = clip["src"]
    if variant == "identity":
        return src
    assert model is not None
    pipe, adapters = model
    if variant == "vae":
        return vae_roundtrip(pipe, src)
    vs = variant_sample(sample, variant)
    prompt = clip["meta"].get("caption", "")
    style = clip["meta"].get("style") if adapters.per_style else None
    try:
        # scale 0 for ``base``: the LoRA adds exactly nothing
        adapters.activate(pipe, prompt, vs.adapter_scale, style=style or None)
    except AdapterError as err:
        raise EvaluationError(f"test clip {clip['key']}: {err}") from None
    if variant == "reconstruct":
        prompt = "reconstruct. " + prompt.split("style. ", 1)[-1]
    out = np.asarray(stylize_frames(pipe, src, prompt, vs, seed, height=src.shape[1], width=src.shape[2]))
    if out.shape != src.shape:
        raise EvaluationError(
            f"{variant}: stylized clip {list(out.shape)} does not match the source {list(src.shape)}"
        )
    return out


@torch.no_grad()
def vae_roundtrip(pipe: Any, video: np.ndarray) -> np.ndarray:
    """The backbone VAE's reconstruction (encode mode, decode) of a uint8 ``[T, H, W, 3]`` video."""
    x = torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    x = x.to(pipe.vae.device, pipe.vae.dtype)
    y = latent_space.roundtrip(pipe.vae, x)[0]  # [3, T, H, W]
    y = ((y.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(1, 2, 3, 0).cpu().numpy()


#: Beside ``metrics.json``: what the metrics were measured on (``split``, ``clips``, ``variants``).
EVALUATION_FILE = "evaluation.json"


def _iter_test_clips(params: Params) -> Iterable[dict[str, Any]]:

    prefix = SPLIT_PREFIX[params.evaluate.split]
    clips = iter_clips(Path(params.paths.data) / prefix, prefix=prefix)
    return islice(clips, params.evaluate.max_clips) if params.evaluate.max_clips > 0 else clips


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(params: Params) -> dict[str, Any]:
    """Stylize the held-out test clips with every variant, score them and write ``eval/``; log to MLflow.

    Writes (atomically, the whole folder): ``metrics.json`` (flat ``<variant>/<metric>`` means over clips, DVC
    metrics), ``evaluation.json`` (the split, the clip count, the variants), ``plots/per_clip.csv`` and ``plots/warp_error_per_frame.csv`` (DVC plots), ``figures/*.png`` and
    ``preview.gif`` (source | no adapter | cfg | cs_cfg | ground truth).

    Returns:
        A summary: clips, variants, metrics, seconds per variant, the MLflow run id and the output folder.
    """
    cfg = params.evaluate
    variants = list(dict.fromkeys(cfg.variants))
    device = resolve_device(cfg.sample.device)
    needs_model = any(v != "identity" for v in variants)
    model = _load_pipeline(params, device) if needs_model else None
    scorer = ClipScorer(cfg.clip_model_path, device) if cfg.clip_model_path else None

    rows: list[dict[str, Any]] = []  # one per (clip, variant or reference)
    curves: dict[str, list[np.ndarray]] = {}  # variant -> per-clip per-frame warp errors
    seconds: dict[str, float] = dict.fromkeys(variants, 0.0)
    previews: list[dict[str, np.ndarray]] = []
    n_clips, fps = 0, 8.0
    for index, clip in enumerate(_iter_test_clips(params)):
        src, gt = check_video(clip["src"], "source"), check_video(clip["style"], "ground truth")
        check_pair(src, gt, ("source", "ground truth"))
        key, prompt = clip["key"], clip["meta"].get("caption", "")
        style = str(clip["meta"].get("style", ""))
        flows = source_flows(src)
        for ref, video in (("source", src), ("ground_truth", gt)):
            per_frame = warp_error_per_frame(video, flows=flows)
            curves.setdefault(ref, []).append(per_frame)
            rows.append({"clip": key, "variant": ref, "style": style, "warp_error": _mean(list(per_frame))})
        outputs: dict[str, np.ndarray] = {"source": src, "ground_truth": gt}
        runs: dict[tuple, tuple[np.ndarray, float]] = {}  # sampling_key -> (output, seconds): run once
        for variant in variants:
            key_v = sampling_key(cfg.sample, variant, prompt)
            if key_v not in runs:
                start = time.perf_counter()
                runs[key_v] = (
                    _stylize(model, variant, clip, cfg.sample, params.seed + index),
                    time.perf_counter() - start,
                )
            out, took = runs[key_v]
            seconds[variant] += took  # what the variant costs on its own
            if variant in SOURCE_VARIANTS:
                scores = {"source_psnr": psnr(out, src), "structure_ssim": structure_ssim(out, src)}
            else:
                scores = score_clip(out, src, gt, flows)
                if scorer is not None:
                    scores["clip_score"] = scorer(out, prompt)
                curves.setdefault(variant, []).append(warp_error_per_frame(out, flows=flows))
            rows.append({"clip": key, "variant": variant, "style": style, **scores})
            outputs[variant] = out
        if len(previews) < cfg.preview_clips:
            previews.append(outputs)
        fps = float(clip["meta"].get("fps") or fps)
        n_clips += 1
    if n_clips == 0:
        raise EvaluationError(
            f"{Path(params.paths.data) / SPLIT_PREFIX[cfg.split]}: no {cfg.split} clips (run the clips stage, "
            f"clips.{cfg.split}_clips > 0)"
        )

    metrics = aggregate(rows)
    out_dir = Path(params.paths.eval)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        # what was measured: the register stage promotes only versions scored on the test split
        write_json(tmp / EVALUATION_FILE, {"split": cfg.split, "clips": n_clips, "variants": variants})
        write_per_clip_csv(tmp / "plots" / "per_clip.csv", rows)
        write_curve_csv(tmp / "plots" / "warp_error_per_frame.csv", curves)
        plot_figures(tmp / "figures", metrics, curves)
        write_preview(tmp / "preview.gif", previews, fps=fps)
    summary = {
        "clips": n_clips,
        "variants": variants,
        "metrics": metrics,
        "seconds_per_clip": {v: round(s / n_clips, 3) for v, s in seconds.items()},
        "eval_dir": str(out_dir),
    }
    summary["mlflow_run_id"] = _log_to_mlflow(params, summary, out_dir)
    return summary


def _se(values: list[float]) -> float:
    """Standard error of the mean over clips (sample std / sqrt(n)); NaN below two finite values."""
    finite = [v for v in values if not math.isnan(v)]
    return float(np.std(finite, ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else float("nan")


#: Metrics also reported per style (``style/<style>/<variant>/<metric>``).
PER_STYLE_METRICS = ("style_psnr",)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Flat ``<variant>/<metric>`` means over clips and their standard errors ``<variant>/<metric>_se`` (NaNs
    skipped), plus ``style/<style>/<variant>/style_psnr`` per style; key-sorted."""
    values: dict[str, list[float]] = {}
    per_style: dict[str, list[float]] = {}
    for row in rows:
        for metric, value in row.items():
            if metric in ("clip", "variant", "style"):
                continue
            values.setdefault(f"{row['variant']}/{metric}", []).append(float(value))
            if metric in PER_STYLE_METRICS and row.get("style"):
                per_style.setdefault(f"style/{row['style']}/{row['variant']}/{metric}", []).append(
                    float(value)
                )
    out: dict[str, float] = {}
    for k, v in values.items():
        out[k] = round(_mean(v), 6)
        se = _se(v)
        if not math.isnan(se):
            out[f"{k}_se"] = round(se, 6)
    out.update({k: round(_mean(v), 6) for k, v in per_style.items() if not math.isnan(_mean(v))})
    return dict(sorted(out.items()))


def write_per_clip_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per (clip, variant); columns clip, variant, then every metric (blank when not computed)."""
    metrics = sorted({k for r in rows for k in r} - {"clip", "variant", "style"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["clip", "variant", "style", *metrics], restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_curve_csv(path: Path, curves: dict[str, list[np.ndarray]]) -> None:
    """Warp error per frame pair, averaged over clips: columns frame, then one column per variant (DVC plots)."""
    names = list(curves)
    means = {}
    for name in names:
        length = max(len(c) for c in curves[name])
        stacked = np.full((len(curves[name]), length), np.nan)
        for i, c in enumerate(curves[name]):
            stacked[i, : len(c)] = c
        with np.errstate(all="ignore"):
            means[name] = np.nanmean(stacked, axis=0)
    length = max((len(m) for m in means.values()), default=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", *names])
        for t in range(length):
            writer.writerow([t, *(f"{means[n][t]:.6g}" if t < len(means[n]) else "" for n in names)])


def plot_figures(folder: Path, metrics: dict[str, float], curves: dict[str, list[np.ndarray]]) -> list[Path]:
    """Bar charts of every metric per variant (± one standard error over clips) and the warp-error curve, as
    PNGs (matplotlib Agg, offline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    means = {k: v for k, v in metrics.items() if not k.startswith("style/") and not k.endswith("_se")}
    names = sorted({k.split("/", 1)[1] for k in means})
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        items = [(k.split("/", 1)[0], v) for k, v in means.items() if k.split("/", 1)[1] == name]
        items.sort(key=lambda item: _ORDER.index(item[0]) if item[0] in _ORDER else len(_ORDER))
        errors = [metrics.get(f"{v}/{name}_se", 0.0) for v, _ in items]
        ax.bar(
            [v for v, _ in items],
            [0 if math.isnan(x) else x for _, x in items],
            yerr=[0 if math.isnan(e) else e for e in errors],
            color="tab:blue",
            capsize=2,
        )
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "metrics.png", dpi=100)
    plt.close(fig)
    written.append(folder / "metrics.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, per_clip in curves.items():
        with np.errstate(all="ignore"):
            ax.plot(np.nanmean(np.stack(per_clip), axis=0), marker="o", label=name)
    ax.set_xlabel("frame pair t → t+1")
    ax.set_ylabel("masked warp error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "warp_error_per_frame.png", dpi=100)
    plt.close(fig)
    written.append(folder / "warp_error_per_frame.png")
    return written


def preview_grid(previews: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Frames of a labelled grid: one row per clip, columns source | base | cfg | cs_cfg | ground truth."""
    columns = ["source", *(v for v in PREVIEW_VARIANTS if v in previews[0]), "ground_truth"]
    titles = {
        "source": "source",
        "base": "no adapter",
        "cfg": "cfg",
        "cs_cfg": "cs_cfg",
        "cfg_joint": "cfg_joint",
        "ground_truth": "ground truth",
    }
    length = min(len(p["source"]) for p in previews)
    height, width = previews[0]["source"].shape[1:3]

    def tile(frame: np.ndarray) -> np.ndarray:
        # Test clips share the profile's size; resize anything else so the grid stays rectangular.
        return frame if frame.shape[:2] == (height, width) else cv2.resize(frame, (width, height))

    header = np.concatenate([text_strip(width, titles[c], height=14) for c in columns], axis=1)
    frames = []
    for t in range(length):
        rows = [np.concatenate([tile(p[c][t]) for c in columns], axis=1) for p in previews]
        frames.append(np.concatenate([header, *rows], axis=0))
    return np.stack(frames)


def write_preview(path: Path, previews: list[dict[str, np.ndarray]], fps: float) -> None:
    """An animated GIF of :func:`preview_grid` (Pillow; loops forever), and its first, middle and last frames
    side by side, enlarged 2x, as a PNG next to it (``preview.png``: a still to look at or put in a README)."""

    grid = preview_grid(previews)
    write_gif(path, grid, fps)
    picks = sorted({0, len(grid) // 2, len(grid) - 1})
    gap = np.full((grid.shape[1], 6, 3), 255, np.uint8)
    still = np.concatenate([x for t in picks for x in (grid[t], gap)][:-1], axis=1)
    still = cv2.resize(still, (still.shape[1] * 2, still.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    Image.fromarray(still).save(path.with_suffix(".png"))


def _log_to_mlflow(params: Params, summary: dict[str, Any], out_dir: Path) -> str:
    """One MLflow run in ``evaluate.experiment`` with the sampling params, the metrics and ``eval/`` as artifacts."""

    experiment_id = tracking.ensure_experiment(params, params.evaluate.experiment)
    adapter_dir = Path(params.paths.models) / "adapter"
    tags = tracking.provenance_tags(params)
    with contextlib.suppress(AdapterError):
        tags["adapter_sha256"] = AdapterSet.open(adapter_dir).sha256()
    with mlflow.start_run(experiment_id=experiment_id, run_name="evaluate", tags=tags) as run:
        sample = params.evaluate.sample.model_dump(mode="json")
        mlflow.log_params({f"sample.{k}": v for k, v in sample.items()})
        mlflow.log_params(
            {
                "variants": ",".join(summary["variants"]),
                "clips": summary["clips"],
                "split": params.evaluate.split,
                "profile": params.profile,
            }
        )
        mlflow.log_metrics({k: v for k, v in summary["metrics"].items() if math.isfinite(v)})
        mlflow.log_metrics({f"seconds_per_clip/{k}": v for k, v in summary["seconds_per_clip"].items()})
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
        return run.info.run_id


__all__ = ["EVALUATION_FILE", "EvaluationError", "aggregate", "evaluate", "variant_sample"]
