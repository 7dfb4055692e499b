"""Invariants of the weight-free metrics (warp error, SSIM, edge F1, PSNR, colour/texture distances)."""

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from pickstyle import evaluation as ev

T, H, W = 6, 64, 96


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    """A camera pan over a real photo: 3 px per frame to the right, 1 px down."""
    photo = cv2.resize(skdata.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    return np.stack([photo[40 + t : 40 + t + H, 60 + 3 * t : 60 + 3 * t + W] for t in range(T)])


@pytest.fixture(scope="module")
def flows(source):
    return ev.source_flows(source)


def _noised(video: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, video.shape)
    return np.clip(video.astype(np.float64) + noise, 0, 255).astype(np.uint8)


def test_flow_recovers_the_pan(source, flows):
    fwd, bwd = flows[0]
    inner = (slice(8, -8), slice(8, -8))
    # frame t+1 = frame t moved by (-3, -1): the content at (x, y) in t is at (x-3, y-1) in t+1.
    assert np.median(fwd[inner][..., 0]) == pytest.approx(-3, abs=0.3)
    assert np.median(fwd[inner][..., 1]) == pytest.approx(-1, abs=0.3)
    assert np.median(bwd[inner][..., 0]) == pytest.approx(3, abs=0.3)


def test_occlusion_mask_shape_and_range(flows):
    fwd, bwd = flows[0]
    mask = ev.occlusion_mask(fwd, bwd)
    assert mask.shape == (H, W) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    # The pan moves content left: the pixels of the left border leave the frame and must be masked out.
    assert mask[:, :2].mean() < 0.5
    assert 0.5 < mask.mean() < 1.0


def test_occlusion_mask_flags_inconsistent_flow():
    fwd = np.zeros((8, 8, 2), np.float32)
    bwd = np.zeros((8, 8, 2), np.float32)
    bwd[2:4, 2:4] = 5.0  # the way back disagrees here
    mask = ev.occlusion_mask(fwd, bwd)
    assert mask[2:4, 2:4].sum() == 0 and mask.sum() == 64 - 4


def test_identical_video_scores_like_the_source(source, flows):
    scores = ev.score_clip(source.copy(), source, source, flows)
    assert scores["warp_error"] == pytest.approx(ev.warp_error(source, flows=flows))
    assert scores["warp_error"] == pytest.approx(ev.warp_error(source, source))
    assert scores["structure_ssim"] == pytest.approx(1.0)
    assert scores["edge_f1"] == pytest.approx(1.0)
    assert scores["style_psnr"] == ev.PSNR_MAX_DB
    assert scores["style_ssim"] == pytest.approx(1.0)
    assert scores["color_dist"] == pytest.approx(0.0, abs=1e-6)
    assert scores["texture_dist"] == pytest.approx(0.0)


def test_source_warp_error_is_small(source, flows):
    # A pure pan warps almost exactly; per-frame noise does not.
    assert ev.warp_error(source, flows=flows) < 2e-3
    per_frame = ev.warp_error_per_frame(_noised(source, 20), flows=flows)
    assert per_frame.shape == (T - 1,)
    assert np.all(per_frame > 0.005)


def test_degraded_videos_score_worse(source, flows):
    ident = ev.score_clip(source, source, source, flows)
    noised = ev.score_clip(_noised(source, 20), source, source, flows)
    # a video whose content does not follow the source's motion: every frame is the first one
    frozen = np.repeat(source[:1], T, axis=0)
    assert noised["warp_error"] > 5 * ident["warp_error"]
    assert ev.warp_error(frozen, flows=flows) > 5 * ident["warp_error"]
    assert noised["structure_ssim"] < 0.9
    assert noised["edge_f1"] < 0.9
    assert 10 < noised["style_psnr"] < 40
    assert noised["style_ssim"] < 0.9
    assert noised["texture_dist"] > 0.05
    shifted = np.roll(source, 4, axis=2)
    assert ev.structure_ssim(shifted, source) < 0.9
    assert ev.edge_f1(shifted, source) < ev.edge_f1(source, source)


def test_more_noise_is_worse(source, flows):
    light, heavy = _noised(source, 5), _noised(source, 30)
    assert ev.warp_error(light, flows=flows) < ev.warp_error(heavy, flows=flows)
    assert ev.psnr(light, source) > ev.psnr(heavy, source)
    assert ev.structure_ssim(light, source) > ev.structure_ssim(heavy, source)


def test_psnr_formula():
    a = np.zeros((1, 4, 4, 3), np.uint8)
    b = np.full((1, 4, 4, 3), 255, np.uint8)
    assert ev.psnr(a, b) == pytest.approx(0.0)
    c = np.full((1, 4, 4, 3), 51, np.uint8)  # MSE = 0.2² = 0.04 -> 13.98 dB
    assert ev.psnr(a, c) == pytest.approx(10 * math.log10(1 / 0.04))


def test_color_distance_sees_a_tint(source):
    tinted = source.copy()
    tinted[..., 0] = np.clip(tinted[..., 0].astype(int) + 60, 0, 255)
    assert ev.color_distance(tinted, source) > 3.0
    assert ev.color_distance(source, source) == pytest.approx(0.0, abs=1e-6)


def test_edge_f1_edge_cases():
    flat = np.full((2, 16, 16, 3), 128, np.uint8)
    assert ev.edge_f1(flat, flat) == 1.0
    square = flat.copy()
    square[:, 4:12, 4:12] = 255
    assert ev.edge_f1(square, flat) == 0.0


def test_shape_mismatch_is_a_clear_error(source):
    with pytest.raises(ev.EvaluationError, match="differ in shape"):
        ev.structure_ssim(source[:3], source)
    with pytest.raises(ev.EvaluationError, match="uint8"):
        ev.psnr(source.astype(np.float32), source)


def test_aggregate_and_tables(tmp_path, source, flows):
    rows = [
        {"clip": "a", "variant": "identity", "style": "sepia", "warp_error": 1.0, "style_psnr": 10.0},
        {"clip": "b", "variant": "identity", "style": "anime", "warp_error": 3.0, "style_psnr": float("nan")},
        {"clip": "c", "variant": "identity", "style": "sepia", "warp_error": 2.0, "style_psnr": 14.0},
        {"clip": "a", "variant": "source", "style": "sepia", "warp_error": 0.5},
    ]
    metrics = ev.aggregate(rows)
    assert metrics == {
        "identity/style_psnr": 12.0,
        "identity/style_psnr_se": 2.0,  # std 2.83 (n - 1) / sqrt(2)
        "identity/warp_error": 2.0,
        "identity/warp_error_se": round(1 / 3**0.5, 6),
        "source/warp_error": 0.5,
        "style/sepia/identity/style_psnr": 12.0,
    }
    ev.write_per_clip_csv(tmp_path / "per_clip.csv", rows)
    lines = (tmp_path / "per_clip.csv").read_text().splitlines()
    assert lines[0] == "clip,variant,style,style_psnr,warp_error" and len(lines) == 5
    curves = {"source": [ev.warp_error_per_frame(source, flows=flows)] * 2}
    ev.write_curve_csv(tmp_path / "curve.csv", curves)
    assert (tmp_path / "curve.csv").read_text().splitlines()[0] == "frame,source"
    figs = ev.plot_figures(tmp_path / "figures", metrics, curves)
    assert all(f.stat().st_size > 1000 for f in figs)
    previews = [{"source": source, "base": source, "cs_cfg": source, "ground_truth": source}]
    grid = ev.preview_grid(previews)
    assert grid.shape == (T, 14 + H, 4 * W, 3)
    ev.write_preview(tmp_path / "p.gif", previews, fps=8)
    assert (tmp_path / "p.gif").read_bytes()[:3] == b"GIF"


def test_variant_samples():
    from pickstyle.config import Sample

    s = Sample(guidance="cs_cfg_apg", adapter_scale=0.8)
    assert ev.variant_sample(s, "base").adapter_scale == 0.0
    assert ev.variant_sample(s, "base").guidance == "cfg"
    assert ev.variant_sample(s, "cfg").adapter_scale == 0.8
    assert ev.variant_sample(s, "cs_cfg").guidance == "cs_cfg_apg"
    assert ev.variant_sample(s, "cfg_joint").guidance == "cfg_joint"
    assert ev.variant_sample(s, "reconstruct").adapter_scale == 0.0
    assert ev.variant_sample(Sample(guidance="none"), "cs_cfg").guidance == "cs_cfg"


# --- the evaluate stage on the tiny backbone ---------------------------------------------------------------------


def _write_test_clips(data: Path, n: int = 2, frames: int = 5) -> None:
    """``n`` panning test clips (64x96) with their exact sepia ground truth, as the clips stage writes them."""
    from pickstyle.data.shards import write_shards
    from pickstyle.data.styles import apply_style
    from pickstyle.data.video import encode_video

    photo = cv2.resize(skdata.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    samples = []
    for i in range(n):
        src = np.stack([photo[20 * i + t : 20 * i + t + H, 2 * t : 2 * t + W] for t in range(frames)])
        gt = np.stack([apply_style("sepia", f) for f in src])
        meta = {
            "caption": "Sepia style. an astronaut",
            "style": "sepia",
            "fps": 8,
            "frames": 9,
            "kind": "test",
        }
        samples.append(
            {
                "__key__": f"test_{i:04d}",
                "src.mp4": encode_video(src, 8, lossless=True),
                "style.mp4": encode_video(gt, 8, lossless=True),
                "json": json.dumps(meta),
            }
        )
    write_shards(samples, data / "testclips", "testclips", 64)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random 1-layer CLIP with a BPE tokenizer trained in-process, saved like a downloaded CLIP folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    out = tmp_path_factory.mktemp("clip")
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok.train_from_iterator(
        ["sepia style an astronaut anime noise"], trainers.BpeTrainer(vocab_size=60, special_tokens=specials)
    )
    fast = CLIPTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials[0],
        eos_token=specials[1],
        unk_token=specials[1],
        pad_token=specials[1],
    )
    layer = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {
        **layer,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    config = CLIPConfig(
        text_config=text, vision_config={**layer, "image_size": 32, "patch_size": 8}, projection_dim=8
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=fast).save_pretrained(out)
    return out


def test_clip_score_from_a_local_folder(tiny_clip, source, tmp_path):
    scorer = ev.ClipScorer(tiny_clip)
    a = scorer(source, "sepia style. an astronaut")
    assert -1.0 <= a <= 1.0 and a == pytest.approx(scorer(source, "sepia style. an astronaut"))
    assert a != pytest.approx(scorer(source, "anime noise"))
    with pytest.raises(ev.EvaluationError, match="not a folder"):
        ev.ClipScorer(tmp_path / "missing")


def test_evaluate_stage_writes_metrics_plots_preview_and_mlflow(
    tmp_path, tiny_backbone, tiny_clip, monkeypatch
):
    import mlflow
    import torch

    from pickstyle import tracking
    from pickstyle.config import parse_params
    from pickstyle.model.adapters import add_context_style_adapter, save_adapter
    from pickstyle.model.components import load_pipeline

    for key in (*tracking.URI_ENV, tracking.ARTIFACTS_ENV, "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_backbone, tmp_path / "models" / "backbone")
    pipe = load_pipeline(tiny_backbone)
    add_context_style_adapter(pipe.transformer, rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" adapter: B != 0, so the adapter changes the output
        for name, p in pipe.transformer.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(pipe, tmp_path / "models" / "adapter")
    _write_test_clips(tmp_path / "data")
    # max_clips=1 of 2: the VAE dominates the time (~3 s per stylized clip on a busy 2-core CPU)
    params = parse_params(
        {"evaluate": {"sample": {"steps": 2}, "max_clips": 1, "clip_model_path": str(tiny_clip)}}
    )

    summary = ev.evaluate(params)

    assert summary["clips"] == 1
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for variant in ("identity", "base", "cfg", "cs_cfg"):
        for metric in ("warp_error", "structure_ssim", "edge_f1", "style_psnr", "style_ssim", "color_dist"):
            assert math.isfinite(metrics[f"{variant}/{metric}"]), f"{variant}/{metric}"
    assert {"source/warp_error", "ground_truth/warp_error", params.register.gate_metric} <= set(metrics)
    assert -1 <= metrics["cs_cfg/clip_score"] <= 1
    assert metrics["identity/structure_ssim"] == 1.0 and metrics["identity/edge_f1"] == 1.0
    assert metrics["identity/warp_error"] == metrics["source/warp_error"]
    assert metrics["base/style_psnr"] != metrics["cfg/style_psnr"]  # the adapter scale really toggles
    assert metrics["cfg/style_psnr"] != metrics["cs_cfg/style_psnr"]
    assert metrics["vae/source_psnr"] > 20 and math.isfinite(metrics["reconstruct/source_psnr"])
    assert "vae/style_psnr" not in metrics  # the backbone checks are scored against the source only
    per_clip = (tmp_path / "eval" / "plots" / "per_clip.csv").read_text().splitlines()
    assert len(per_clip) == 1 + 9  # header + 1 clip x (source, ground truth, 7 variants)
    curve = (tmp_path / "eval" / "plots" / "warp_error_per_frame.csv").read_text().splitlines()
    assert curve[0].split(",")[0] == "frame" and len(curve) == 1 + 4
    assert (tmp_path / "eval" / "figures" / "metrics.png").stat().st_size > 1000
    assert (tmp_path / "eval" / "preview.gif").read_bytes()[:3] == b"GIF"
    assert (tmp_path / "eval" / "preview.png").read_bytes()[:4] == b"\x89PNG"

    from flows.evaluate import metrics_markdown, metrics_table

    table = metrics_table(metrics)
    assert [r["variant"] for r in table][:1] and {r["variant"] for r in table} >= {
        "identity",
        "cs_cfg",
        "source",
    }
    assert next(r for r in table if r["variant"] == "source")["edge_f1"] == ""
    assert "| variant |" in metrics_markdown(summary)

    run = mlflow.MlflowClient(tracking.tracking_uri(params)).get_run(summary["mlflow_run_id"])
    assert run.data.metrics["cs_cfg/style_psnr"] == pytest.approx(metrics["cs_cfg/style_psnr"])
    assert run.data.params["sample.steps"] == "2"
    assert "adapter_sha256" in run.data.tags


def test_evaluate_without_test_clips_is_a_clear_error(tmp_path, monkeypatch):
    from pickstyle.config import parse_params

    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="testclips"):
        ev.evaluate(parse_params({"evaluate": {"variants": ["identity"]}}))
