"""Weight-free video metrics (docs/method.md §5).

Metrics are small pure functions on ``uint8`` videos shaped ``[T, H, W, 3]`` (RGB) that return floats:

* temporal consistency — :func:`warp_error` (Lai et al., "Learning Blind Video Temporal Consistency",
  https://arxiv.org/abs/1808.00449): optical flow (OpenCV DIS) is computed on the *source* video, output frame
  t+1 is warped back to t and compared where a forward–backward check (Sundaram et al. 2010; Ruder et al.,
  https://arxiv.org/abs/1604.08610) says the pixel is visible in both frames;
* content/structure — :func:`structure_ssim` (SSIM on luminance) and :func:`edge_f1` (Canny edges) vs the source;
* style — the built-in styles are deterministic filters, so every test clip has an exact ground truth:
  :func:`psnr` / :func:`style_ssim` to it, plus :func:`color_distance` and :func:`texture_distance`;
* optional :class:`ClipScorer` (text–frame cosine) when ``evaluate.clip_model_path`` is a local CLIP folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage.metrics import structural_similarity
from transformers import CLIPModel, CLIPProcessor

from pickstyle.errors import PickstyleError

#: Forward–backward consistency constants of Sundaram et al. / Ruder et al.: a pixel is visible in both frames
#: when |F_f + F_b∘F_f|² ≤ α·(|F_f|² + |F_b∘F_f|²) + β (flows in pixels).
OCCLUSION_ALPHA = 0.01
OCCLUSION_BETA = 0.5
#: PSNR of two identical videos (MSE 0) is reported as this instead of +inf, so metrics.json stays valid JSON.
PSNR_MAX_DB = 100.0


class MetricsError(PickstyleError):
    """The evaluate stage cannot run (no test clips, no adapter, mismatched videos, ...)."""


# --- helpers ---------------------------------------------------------------------------------------------------


def check_video(video: np.ndarray, name: str = "video") -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise MetricsError(f"{name}: expected uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}")
    return video


def check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("output", "reference")) -> None:
    check_video(a, names[0])
    check_video(b, names[1])
    if a.shape != b.shape:
        raise MetricsError(f"{names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} differ in shape")


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
    source = check_video(source, "source")
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
    video = check_video(video)
    if flows is None:
        if source is None:
            raise MetricsError("warp_error needs the source video or its flows")
        check_pair(video, source, ("video", "source"))
        flows = source_flows(source)
    if len(flows) != len(video) - 1:
        raise MetricsError(f"{len(flows)} flows for a video of {len(video)} frames (need T-1)")
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
    check_pair(output, source, ("output", "source"))
    ya, yb = luminance(output), luminance(source)
    return float(np.mean([structural_similarity(a, b, data_range=1.0) for a, b in zip(ya, yb, strict=True)]))


def canny_edges(video: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edge maps of every frame: bool ``[T, H, W]``."""
    video = check_video(video)
    return np.stack(
        [cv2.Canny(cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY), low, high) > 0 for f in video]
    )


def edge_f1(output: np.ndarray, source: np.ndarray, tolerance: int = 1) -> float:
    """F1 of the output's Canny edges against the source's, matching edges up to ``tolerance`` pixels.

    precision = |E_out ∩ dilate(E_src)| / |E_out|, recall = |E_src ∩ dilate(E_out)| / |E_src|, counted over
    the whole video; F1 = 2PR / (P + R). Two edgeless videos score 1, one edgeless video scores 0.
    """
    check_pair(output, source, ("output", "source"))
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
    check_pair(output, target, ("output", "target"))
    mse = float(np.mean((output.astype(np.float64) / 255.0 - target.astype(np.float64) / 255.0) ** 2))
    if mse <= 10 ** (-PSNR_MAX_DB / 10):
        return PSNR_MAX_DB
    return 10.0 * math.log10(1.0 / mse)


def style_ssim(output: np.ndarray, target: np.ndarray) -> float:
    """Mean per-frame colour SSIM (per channel, averaged) between output and the ground-truth style clip."""
    check_pair(output, target, ("output", "target"))
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
    video = check_video(video)
    rgb = video.reshape(-1, video.shape[2], 3).astype(np.float32) / 255.0
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).reshape(-1, 3)  # L in [0, 100], a/b in about [-127, 127]
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)]).astype(np.float64)


def color_distance(output: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute difference of :func:`lab_statistics` (Lab units; 0 = same colour statistics)."""
    check_pair(output, target, ("output", "target"))
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
    check_pair(output, target, ("output", "target"))
    return float(0.5 * np.abs(gradient_histogram(output) - gradient_histogram(target)).sum())


class ClipScorer:
    """CLIP text–frame score: mean cosine similarity of the prompt and each frame (Radford et al. 2021).

    Loads a *local* transformers CLIP folder only (``local_files_only=True``); nothing is downloaded.
    """

    def __init__(self, model_path: str | Path, device: str = "cpu") -> None:

        path = Path(model_path)
        if not path.is_dir():
            raise MetricsError(f"evaluate.clip_model_path: {path} is not a folder")
        self.device = device
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)

    def __call__(self, video: np.ndarray, text: str) -> float:

        video = check_video(video)
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
    check_pair(output, source, ("output", "source"))
    check_pair(output, target, ("output", "ground truth"))
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
