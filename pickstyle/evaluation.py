"""Evaluation that needs no downloaded weights (DESIGN §5), and the ``evaluate`` stage.

Metrics are small pure functions on ``uint8`` videos shaped ``[T, H, W, 3]`` (RGB) that return floats:

* temporal consistency — :func:`warp_error` (Lai et al., "Learning Blind Video Temporal Consistency",
  https://arxiv.org/abs/1808.00449): optical flow (OpenCV DIS) is computed on the *source* video, output frame
  t+1 is warped back to t and compared where a forward–backward check (Sundaram et al. 2010; Ruder et al.,
  https://arxiv.org/abs/1604.08610) says the pixel is visible in both frames;
* content/structure — :func:`structure_ssim` (SSIM on luminance) and :func:`edge_f1` (Canny edges) vs the source;
* style — the built-in styles are deterministic filters, so every test clip has an exact ground truth:
  :func:`psnr` / :func:`style_ssim` to it, plus :func:`color_distance` and :func:`texture_distance`;
* optional :class:`ClipScorer` (text–frame cosine) when ``evaluate.clip_model_path`` is a local CLIP folder.

:func:`evaluate` stylizes the held-out test clips with each variant and writes ``eval/``.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from skimage.metrics import structural_similarity

from pickstyle.config import Params, Sample
from pickstyle.errors import PickstyleError
from pickstyle.files import atomic_dir, resolve_device, write_json

#: Forward–backward consistency constants of Sundaram et al. / Ruder et al.: a pixel is visible in both frames
#: when |F_f + F_b∘F_f|² ≤ α·(|F_f|² + |F_b∘F_f|²) + β (flows in pixels).
OCCLUSION_ALPHA = 0.01
OCCLUSION_BETA = 0.5
#: PSNR of two identical videos (MSE 0) is reported as this instead of +inf, so metrics.json stays valid JSON.
PSNR_MAX_DB = 100.0
#: Reference rows written next to the variants: the source's and the ground truth's own warp error.
#: Row order of tables and charts: references first, then the variants from weakest to strongest.
_ORDER = ("source", "ground_truth", "vae", "reconstruct", "identity", "base", "cfg", "cfg_joint", "cs_cfg")
#: Variants that reproduce the *source* (backbone checks), scored by PSNR to it rather than by style metrics.
SOURCE_VARIANTS = ("vae", "reconstruct")
#: Variants shown in the preview, left to right, between the source and the ground truth.
PREVIEW_VARIANTS = ("base", "cfg", "cs_cfg")


class EvaluationError(PickstyleError):
    """The evaluate stage cannot run (no test clips, no adapter, mismatched videos, ...)."""


# --- helpers ---------------------------------------------------------------------------------------------------


def _check_video(video: np.ndarray, name: str = "video") -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise EvaluationError(f"{name}: expected uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}")
    return video


def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("output", "reference")) -> None:
    _check_video(a, names[0])
    _check_video(b, names[1])
    if a.shape != b.shape:
        raise EvaluationError(f"{names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} differ in shape")


def luminance(video: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma in [0, 1]: Y = 0.299 R + 0.587 G + 0.114 B, shape ``[T, H, W]`` float32."""
    rgb = video.astype(np.float32) / 255.0
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --- temporal consistency --------------------------------------------------------------------------------------


def optical_flow(frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
    """DIS optical flow from ``frame_a`` to ``frame_b`` (uint8 RGB ``[H, W, 3]``): ``[H, W, 2]`` (dx, dy) pixels.

    ``frame_a[y, x]`` corresponds to ``frame_b[y + dy, x + dx]``.
    """
    dis = cv2.DISOpticalFlow_create(cv2.DISOpticalFlow_PRESET_MEDIUM)
    gray_a = cv2.cvtColor(np.ascontiguousarray(frame_a), cv2.COLOR_RGB2GRAY)
    gray_b = cv2.cvtColor(np.ascontiguousarray(frame_b), cv2.COLOR_RGB2GRAY)
    return dis.calc(gray_a, gray_b, None)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward-warp ``image`` (``[H, W]`` or ``[H, W, C]``) by ``flow``: out[y, x] = image[y + dy, x + dx].

    Bilinear; samples outside the image are 0 (they are masked out by :func:`occlusion_mask`).
    """
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = grid_x + flow[..., 0]
    map_y = grid_y + flow[..., 1]
    return cv2.remap(
        np.ascontiguousarray(image),
        map_x,
        map_y,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def occlusion_mask(
    flow_fwd: np.ndarray, flow_bwd: np.ndarray, alpha: float = OCCLUSION_ALPHA, beta: float = OCCLUSION_BETA
) -> np.ndarray:
    """1 where a pixel of frame t is visible in frame t+1 (forward–backward consistent and inside), else 0.

    With F_f the flow t→t+1 and F_b the flow t+1→t sampled at x + F_f(x), a visible pixel goes there and back:
    |F_f + F_b|² ≤ α·(|F_f|² + |F_b|²) + β (Sundaram et al. 2010, as in Ruder et al. 2016).

    Args:
        flow_fwd: ``[H, W, 2]`` flow from frame t to t+1.
        flow_bwd: ``[H, W, 2]`` flow from frame t+1 to t.

    Returns:
        ``[H, W]`` float32 mask with values in {0, 1}.
    """
    h, w = flow_fwd.shape[:2]
    bwd_at_fwd = warp(flow_bwd, flow_fwd)  # F_b(x + F_f(x)), [H, W, 2]
    round_trip = np.sum((flow_fwd + bwd_at_fwd) ** 2, axis=-1)
    bound = alpha * (np.sum(flow_fwd**2, axis=-1) + np.sum(bwd_at_fwd**2, axis=-1)) + beta
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    target_x = grid_x + flow_fwd[..., 0]
    target_y = grid_y + flow_fwd[..., 1]
    inside = (target_x >= 0) & (target_x <= w - 1) & (target_y >= 0) & (target_y <= h - 1)
    return ((round_trip <= bound) & inside).astype(np.float32)


def source_flows(source: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Forward and backward DIS flows between consecutive source frames: ``T-1`` pairs of ``[H, W, 2]``."""
    source = _check_video(source, "source")
    return [
        (optical_flow(source[t], source[t + 1]), optical_flow(source[t + 1], source[t]))
        for t in range(len(source) - 1)
    ]


def warp_error_per_frame(
    video: np.ndarray,
    source: np.ndarray | None = None,
    flows: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """Masked warp error per frame pair, E_t = Σ M·‖V_t − W(V_{t+1})‖² / Σ M (Lai et al. 2018, Eq. 9).

    Pixel values are in [0, 1]; ‖·‖² is the mean over the three channels. The flow (and the occlusion mask M)
    comes from the *source* video so every output is judged against the same motion.

    Args:
        video: the video to score, uint8 ``[T, H, W, 3]``.
        source: the source video the flow is computed on (needed unless ``flows`` is given).
        flows: precomputed :func:`source_flows` (computed once per clip, shared by the variants).

    Returns:
        ``[T-1]`` float64; NaN where the mask is empty (everything occluded).
    """
    video = _check_video(video)
    if flows is None:
        if source is None:
            raise EvaluationError("warp_error needs the source video or its flows")
        _check_pair(video, source, ("video", "source"))
        flows = source_flows(source)
    if len(flows) != len(video) - 1:
        raise EvaluationError(f"{len(flows)} flows for a video of {len(video)} frames (need T-1)")
    frames = video.astype(np.float32) / 255.0
    errors = np.full(len(flows), np.nan)
    for t, (fwd, bwd) in enumerate(flows):
        mask = occlusion_mask(fwd, bwd)
        warped = warp(frames[t + 1], fwd)
        sq = np.mean((frames[t] - warped) ** 2, axis=-1)
        if mask.sum() > 0:
            errors[t] = float(np.sum(mask * sq) / np.sum(mask))
    return errors


def warp_error(
    video: np.ndarray,
    source: np.ndarray | None = None,
    flows: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> float:
    """Mean of :func:`warp_error_per_frame` over frame pairs (lower = temporally more consistent)."""
    per_frame = warp_error_per_frame(video, source, flows)
    if len(per_frame) == 0 or np.all(np.isnan(per_frame)):
        return 0.0 if len(per_frame) == 0 else float("nan")
    return float(np.nanmean(per_frame))


# --- content / structure ---------------------------------------------------------------------------------------


def structure_ssim(output: np.ndarray, source: np.ndarray) -> float:
    """Mean per-frame SSIM on luminance between output and source (Wang et al. 2004; 1 = same structure)."""
    _check_pair(output, source, ("output", "source"))
    ya, yb = luminance(output), luminance(source)
    return float(np.mean([structural_similarity(a, b, data_range=1.0) for a, b in zip(ya, yb, strict=True)]))


def canny_edges(video: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edge maps of every frame: bool ``[T, H, W]``."""
    video = _check_video(video)
    return np.stack(
        [cv2.Canny(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY), low, high) > 0 for f in video]
    )


def edge_f1(output: np.ndarray, source: np.ndarray, tolerance: int = 1) -> float:
    """F1 of the output's Canny edges against the source's, matching edges up to ``tolerance`` pixels.

    precision = |E_out ∩ dilate(E_src)| / |E_out|, recall = |E_src ∩ dilate(E_out)| / |E_src|, counted over
    the whole video; F1 = 2PR / (P + R). Two edgeless videos score 1, one edgeless video scores 0.
    """
    _check_pair(output, source, ("output", "source"))
    e_out, e_src = canny_edges(output), canny_edges(source)
    n_out, n_src = int(e_out.sum()), int(e_src.sum())
    if n_out == 0 and n_src == 0:
        return 1.0
    if n_out == 0 or n_src == 0:
        return 0.0
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)

    def dilate(edges: np.ndarray) -> np.ndarray:
        return np.stack([cv2.dilate(e.astype(np.uint8), kernel) > 0 for e in edges])

    precision = float((e_out & dilate(e_src)).sum()) / n_out
    recall = float((e_src & dilate(e_out)).sum()) / n_src
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# --- style -----------------------------------------------------------------------------------------------------


def psnr(output: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB over the whole video, 10·log10(1 / MSE) on [0, 1] pixels; identical videos give ``PSNR_MAX_DB``."""
    _check_pair(output, target, ("output", "target"))
    mse = float(np.mean((output.astype(np.float64) / 255.0 - target.astype(np.float64) / 255.0) ** 2))
    if mse <= 10 ** (-PSNR_MAX_DB / 10):
        return PSNR_MAX_DB
    return 10.0 * math.log10(1.0 / mse)


def style_ssim(output: np.ndarray, target: np.ndarray) -> float:
    """Mean per-frame colour SSIM (per channel, averaged) between output and the ground-truth style clip."""
    _check_pair(output, target, ("output", "target"))
    return float(
        np.mean(
            [
                structural_similarity(a, b, data_range=255, channel_axis=-1)
                for a, b in zip(output, target, strict=True)
            ]
        )
    )


def lab_statistics(video: np.ndarray) -> np.ndarray:
    """Per-channel mean and std of CIE Lab over the video: ``[6]`` = (μ_L, μ_a, μ_b, σ_L, σ_a, σ_b)."""
    video = _check_video(video)
    rgb = video.reshape(-1, video.shape[2], 3).astype(np.float32) / 255.0
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).reshape(-1, 3)  # L in [0, 100], a/b in about [-127, 127]
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)]).astype(np.float64)


def color_distance(output: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute difference of :func:`lab_statistics` (Lab units; 0 = same colour statistics)."""
    _check_pair(output, target, ("output", "target"))
    return float(np.mean(np.abs(lab_statistics(output) - lab_statistics(target))))


def gradient_histogram(video: np.ndarray, bins: int = 32, max_magnitude: float = 2.0) -> np.ndarray:
    """Normalised histogram of Sobel gradient magnitudes of the luminance (a simple texture descriptor)."""
    luma = luminance(video)
    mags = []
    for y in luma:
        gx = cv2.Sobel(y, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(y, cv2.CV_32F, 0, 1, ksize=3)
        mags.append(np.sqrt(gx**2 + gy**2))
    mag = np.clip(np.stack(mags), 0, max_magnitude)
    hist, _ = np.histogram(mag, bins=bins, range=(0.0, max_magnitude))
    return hist / max(hist.sum(), 1)


def texture_distance(output: np.ndarray, target: np.ndarray) -> float:
    """Total-variation distance ½·Σ|h_out − h_gt| of :func:`gradient_histogram` (0 = same, 1 = disjoint)."""
    _check_pair(output, target, ("output", "target"))
    return float(0.5 * np.abs(gradient_histogram(output) - gradient_histogram(target)).sum())


class ClipScorer:
    """CLIP text–frame score: mean cosine similarity of the prompt and each frame (Radford et al. 2021).

    Loads a *local* transformers CLIP folder only (``local_files_only=True``); nothing is downloaded.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        path = Path(model_path)
        if not path.is_dir():
            raise EvaluationError(f"evaluate.clip_model_path: {path} is not a folder")
        self.device = device
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)

    def __call__(self, video: np.ndarray, text: str) -> float:
        import torch

        video = _check_video(video)
        inputs = self.processor(
            text=[text], images=list(video), return_tensors="pt", padding=True, truncation=True
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)  # [T, d]
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)  # [1, d]
        return float((img @ txt.T).mean())


def score_clip(
    output: np.ndarray,
    source: np.ndarray,
    target: np.ndarray,
    flows: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Every weight-free metric of one output clip: structure vs ``source``, style vs ``target`` (ground truth)."""
    _check_pair(output, source, ("output", "source"))
    _check_pair(output, target, ("output", "ground truth"))
    flows = source_flows(source) if flows is None else flows
    return {
        "warp_error": warp_error(output, flows=flows),
        "structure_ssim": structure_ssim(output, source),
        "edge_f1": edge_f1(output, source),
        "style_psnr": psnr(output, target),
        "style_ssim": style_ssim(output, target),
        "color_dist": color_distance(output, target),
        "texture_dist": texture_distance(output, target),
    }


# --- the evaluate stage ----------------------------------------------------------------------------------------


def variant_sample(sample: Sample, variant: str) -> Sample:
    """The sampling settings of one variant (``identity`` needs none).

    * ``base``   — no adapter (scale 0), plain text CFG: what the frozen backbone does on its own;
    * ``reconstruct`` — no adapter, no guidance, the caption ``"reconstruct. <description>"``: does the backbone
      follow its context (scored against the source);
    * ``cfg``    — the adapter, plain text CFG;
    * ``cfg_joint`` — the adapter, one CFG against (∅ text, permuted context): text and context not separated;
    * ``cs_cfg`` — the adapter, Context-Style CFG (``evaluate.sample.guidance`` if it is a CS-CFG mode).
    """
    if variant == "base":
        return sample.model_copy(update={"guidance": "cfg", "adapter_scale": 0.0})
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


def _load_pipeline(params: Params, device: str) -> tuple[Any, str]:
    """The backbone + the trained adapter, loaded once; returns (pipeline, adapter name)."""
    from pickstyle.model.adapters import load_adapter
    from pickstyle.model.components import backbone_path, ensure_backbone, load_pipeline, missing_files
    from pickstyle.model.pipeline import PickStylePipeline

    adapter_dir = Path(params.paths.models) / "adapter"
    if not adapter_dir.is_dir():
        raise EvaluationError(f"{adapter_dir}: no trained adapter (run the train stage first)")
    # The stage depends on the backbone stage's output; build/check it only when it is not there, so evaluate
    # never rewrites another stage's output.
    backbone = backbone_path(params)
    if missing_files(backbone):
        backbone = ensure_backbone(params)
    pipe = load_pipeline(backbone, device=device, dtype=params.model.dtype, pipeline_cls=PickStylePipeline)
    name = load_adapter(pipe, adapter_dir, scale=params.evaluate.sample.adapter_scale)
    return pipe, name


def _stylize(
    model: tuple[Any, str] | None, variant: str, clip: dict[str, Any], sample: Sample, seed: int
) -> np.ndarray:
    """One variant's output for one clip; the variants share the pipeline and toggle the adapter's scale."""
    from pickstyle.stylize import stylize_frames

    src = clip["src"]
    if variant == "identity":
        return src
    assert model is not None
    pipe, adapter_name = model
    if variant == "vae":
        return vae_roundtrip(pipe, src)
    vs = variant_sample(sample, variant)
    pipe.set_adapters([adapter_name], [vs.adapter_scale])  # 0 for ``base``: the LoRA adds exactly nothing
    prompt = clip["meta"].get("caption", "")
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
    y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample[0]  # [3, T, H, W]
    y = ((y.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(1, 2, 3, 0).cpu().numpy()


def _iter_test_clips(params: Params) -> Iterable[dict[str, Any]]:
    from pickstyle.data.clips import iter_clips

    folder = Path(params.paths.data) / "testclips"
    clips = iter_clips(folder, prefix="testclips")
    return islice(clips, params.evaluate.max_clips) if params.evaluate.max_clips > 0 else clips


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate(params: Params) -> dict[str, Any]:
    """Stylize the held-out test clips with every variant, score them and write ``eval/``; log to MLflow.

    Writes (atomically, the whole folder): ``metrics.json`` (flat ``<variant>/<metric>`` means over clips, DVC
    metrics), ``plots/per_clip.csv`` and ``plots/warp_error_per_frame.csv`` (DVC plots), ``figures/*.png`` and
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
        src, gt = _check_video(clip["src"], "source"), _check_video(clip["style"], "ground truth")
        _check_pair(src, gt, ("source", "ground truth"))
        key, prompt = clip["key"], clip["meta"].get("caption", "")
        style = str(clip["meta"].get("style", ""))
        flows = source_flows(src)
        for ref, video in (("source", src), ("ground_truth", gt)):
            per_frame = warp_error_per_frame(video, flows=flows)
            curves.setdefault(ref, []).append(per_frame)
            rows.append({"clip": key, "variant": ref, "style": style, "warp_error": _mean(list(per_frame))})
        outputs: dict[str, np.ndarray] = {"source": src, "ground_truth": gt}
        for variant in variants:
            start = time.perf_counter()
            out = _stylize(model, variant, clip, cfg.sample, params.seed + index)
            seconds[variant] += time.perf_counter() - start
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
            f"{Path(params.paths.data) / 'testclips'}: no test clips (run the clips stage, clips.test_clips > 0)"
        )

    metrics = aggregate(rows)
    out_dir = Path(params.paths.eval)
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
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


def _label(tile_width: int, text: str) -> np.ndarray:
    strip = np.full((14, tile_width, 3), 255, np.uint8)
    cv2.putText(strip, text, (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


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

    header = np.concatenate([_label(width, titles[c]) for c in columns], axis=1)
    frames = []
    for t in range(length):
        rows = [np.concatenate([tile(p[c][t]) for c in columns], axis=1) for p in previews]
        frames.append(np.concatenate([header, *rows], axis=0))
    return np.stack(frames)


def write_preview(path: Path, previews: list[dict[str, np.ndarray]], fps: float) -> None:
    """An animated GIF of :func:`preview_grid` (Pillow; loops forever), and its first, middle and last frames
    side by side, enlarged 2x, as a PNG next to it (``preview.png``: a still to look at or put in a README)."""
    from PIL import Image

    grid = preview_grid(previews)
    images = [Image.fromarray(f) for f in grid]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / max(fps, 1)), loop=0)
    picks = sorted({0, len(grid) // 2, len(grid) - 1})
    gap = np.full((grid.shape[1], 6, 3), 255, np.uint8)
    still = np.concatenate([x for t in picks for x in (grid[t], gap)][:-1], axis=1)
    still = cv2.resize(still, (still.shape[1] * 2, still.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    Image.fromarray(still).save(path.with_suffix(".png"))


def _log_to_mlflow(params: Params, summary: dict[str, Any], out_dir: Path) -> str:
    """One MLflow run in ``evaluate.experiment`` with the sampling params, the metrics and ``eval/`` as artifacts."""
    import mlflow

    from pickstyle import register, tracking

    experiment_id = tracking.ensure_experiment(params, params.evaluate.experiment)
    adapter_dir = Path(params.paths.models) / "adapter"
    tags = tracking.provenance_tags(params)
    if (adapter_dir / register.ADAPTER_FILES[0]).is_file():
        tags["adapter_sha256"] = register.adapter_sha256(adapter_dir)
    with mlflow.start_run(experiment_id=experiment_id, run_name="evaluate", tags=tags) as run:
        sample = params.evaluate.sample.model_dump(mode="json")
        mlflow.log_params({f"sample.{k}": v for k, v in sample.items()})
        mlflow.log_params(
            {"variants": ",".join(summary["variants"]), "clips": summary["clips"], "profile": params.profile}
        )
        mlflow.log_metrics({k: v for k, v in summary["metrics"].items() if math.isfinite(v)})
        mlflow.log_metrics({f"seconds_per_clip/{k}": v for k, v in summary["seconds_per_clip"].items()})
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
        return run.info.run_id


__all__ = [
    "ClipScorer",
    "EvaluationError",
    "aggregate",
    "color_distance",
    "edge_f1",
    "evaluate",
    "occlusion_mask",
    "optical_flow",
    "psnr",
    "score_clip",
    "source_flows",
    "structure_ssim",
    "style_ssim",
    "texture_distance",
    "warp",
    "warp_error",
    "warp_error_per_frame",
]
