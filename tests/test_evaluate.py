"""The ``evaluate`` stage: variants, aggregation with standard errors, tables, figures, preview, MLflow."""

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from pickstyle import evaluate as ev
from pickstyle import metrics
from pickstyle.data.shards import ShardError

T, H, W = 6, 64, 96


def _write_test_clips(data: Path, n: int = 2, frames: int = 5, split: str = "test") -> None:
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
            "kind": split,
        }
        samples.append(
            {
                "__key__": f"{split}_{i:04d}",
                "src.mp4": encode_video(src, 8, lossless=True),
                "style.mp4": encode_video(gt, 8, lossless=True),
                "json": json.dumps(meta),
            }
        )
    write_shards(samples, data / f"{split}clips", f"{split}clips", 64)


def test_aggregate_and_tables(tmp_path, source, flows):
    rows = [
        {"clip": "a", "variant": "identity", "style": "sepia", "warp_error": 1.0, "style_psnr": 10.0},
        {"clip": "b", "variant": "identity", "style": "anime", "warp_error": 3.0, "style_psnr": float("nan")},
        {"clip": "c", "variant": "identity", "style": "sepia", "warp_error": 2.0, "style_psnr": 14.0},
        {"clip": "a", "variant": "source", "style": "sepia", "warp_error": 0.5},
    ]
    agg = ev.aggregate(rows)
    assert agg == {
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
    curves = {"source": [metrics.warp_error_per_frame(source, flows=flows)] * 2}
    ev.write_curve_csv(tmp_path / "curve.csv", curves)
    assert (tmp_path / "curve.csv").read_text().splitlines()[0] == "frame,source"
    figs = ev.plot_figures(tmp_path / "figures", agg, curves)
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
    # the conditional prediction alone, with and without the adapter
    assert (ev.variant_sample(s, "noguide").guidance, ev.variant_sample(s, "noguide").adapter_scale) == (
        "none",
        0.8,
    )
    assert (
        ev.variant_sample(s, "base_noguide").guidance,
        ev.variant_sample(s, "base_noguide").adapter_scale,
    ) == (
        "none",
        0.0,
    )
    assert ev.variant_sample(s, "reconstruct").adapter_scale == 0.0
    assert ev.variant_sample(Sample(guidance="none"), "cs_cfg").guidance == "cs_cfg"


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
    # max_clips=1 of 2: the VAE dominates the time (~3 s per stylized clip on a busy 2-core CPU). Guidance set:
    # the tiny profile's own (t_g 1, c_g 0) makes cfg and cs_cfg the same prediction.
    sample = {"steps": 2, "t_guide": 2.0, "c_guide": 0.5}
    params = parse_params({"evaluate": {"sample": sample, "max_clips": 1, "clip_model_path": str(tiny_clip)}})

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
    assert len(per_clip) == 1 + 2 + len(
        params.evaluate.variants
    )  # header + 1 clip x (source, ground truth, variants)
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
    from pickstyle.data.shards import ShardError

    with pytest.raises(ShardError, match=r"data/testclips: no testclips-\*\.tar shards \(run the stage"):
        ev.evaluate(parse_params({"evaluate": {"variants": ["identity"]}}))


def test_evaluate_split_val_scores_the_val_clips(tmp_path, monkeypatch):
    """``evaluate.split: val`` reads ``data/valclips`` (for tuning) and says so when there are none."""
    from pickstyle import tracking
    from pickstyle.config import parse_params

    for key in (*tracking.URI_ENV, tracking.ARTIFACTS_ENV, "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    _write_test_clips(tmp_path / "data", n=1)
    params = parse_params({"evaluate": {"variants": ["identity"], "split": "val"}})
    with pytest.raises(ShardError, match=r"data/valclips: no valclips-\*\.tar shards"):
        ev.evaluate(params)
    _write_test_clips(tmp_path / "data", n=2, split="val")
    val = ev.evaluate(params)
    info = json.loads((tmp_path / "eval" / ev.EVALUATION_FILE).read_text())
    assert info == {"split": "val", "clips": 2, "variants": ["identity"]}  # what register reads
    test = ev.evaluate(parse_params({"evaluate": {"variants": ["identity"]}}))
    assert json.loads((tmp_path / "eval" / ev.EVALUATION_FILE).read_text())["split"] == "test"
    assert (val["clips"], test["clips"]) == (2, 1)
    rows = (tmp_path / "eval" / "plots" / "per_clip.csv").read_text()  # the last run's: the test split
    assert "test_0000" in rows and "val_0000" not in rows


def test_evaluate_uses_each_clips_style_adapter(tmp_path, tiny_backbone, monkeypatch):
    """Per-style adapters: a sepia clip is stylized with the sepia adapter, the same bits as that adapter alone;
    a clip whose style has no adapter is a clear error."""
    from pickstyle import tracking
    from pickstyle.config import parse_params
    from tests.projects import random_adapter, random_style_adapters

    for key in (*tracking.URI_ENV, tracking.ARTIFACTS_ENV, "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_backbone, tmp_path / "models" / "backbone")
    _write_test_clips(tmp_path / "data")
    params = parse_params({"evaluate": {"sample": {"steps": 2}, "max_clips": 1, "variants": ["cs_cfg"]}})
    adapter = tmp_path / "models" / "adapter"

    def style_psnr() -> float:
        ev.evaluate(params)
        return json.loads((tmp_path / "eval" / "metrics.json").read_text())["cs_cfg/style_psnr"]

    random_style_adapters(tiny_backbone, adapter, ("anime", "sepia"))  # sepia: seed 2
    per_style = style_psnr()
    shutil.rmtree(adapter)
    random_adapter(tiny_backbone, adapter, seed=2)
    assert style_psnr() == per_style  # the sepia adapter, and only it
    shutil.rmtree(adapter)
    random_adapter(tiny_backbone, adapter, seed=1)
    assert style_psnr() != per_style  # (the anime one gives another clip)
    shutil.rmtree(adapter)
    random_style_adapters(tiny_backbone, adapter, ("anime", "pixel"))
    with pytest.raises(ev.EvaluationError, match="no 'sepia' adapter"):
        ev.evaluate(params)


def test_sampling_keys_share_only_identical_runs():
    """At t_g 1, c_g 0 (the tiny profile's) every guided mode is the conditional prediction: cfg, cfg_joint and
    cs_cfg share noguide's run, base shares base_noguide's; the paper's scales keep them all apart."""
    from pickstyle.config import Sample

    prompt = "Sepia style. an astronaut"
    variants = ("reconstruct", "base_noguide", "base", "noguide", "cfg", "cfg_joint", "cs_cfg")

    def groups(sample: Sample) -> list[set[str]]:
        keys: dict[tuple, set[str]] = {}
        for v in variants:
            keys.setdefault(ev.sampling_key(sample, v, prompt), set()).add(v)
        return sorted(keys.values(), key=sorted)

    assert groups(Sample(steps=3, t_guide=1.0, c_guide=0.0)) == [
        {"base", "base_noguide"},
        {"cfg", "cfg_joint", "cs_cfg", "noguide"},
        {"reconstruct"},
    ]
    assert groups(Sample(steps=3, t_guide=5.0, c_guide=4.0)) == [{v} for v in sorted(variants)]
    assert groups(Sample(steps=3, t_guide=1.0, c_guide=4.0)) == [
        {"base", "base_noguide"},
        {"cfg", "cfg_joint", "noguide"},
        {"cs_cfg"},
        {"reconstruct"},
    ]
    one = Sample(steps=3, t_guide=1.0, c_guide=0.0)
    assert ev.sampling_key(one, "cs_cfg", prompt) != ev.sampling_key(one, "cs_cfg", "Anime style. x")
    assert ev.sampling_key(one, "cs_cfg", prompt) != ev.sampling_key(
        one.model_copy(update={"steps": 2}), "cs_cfg", prompt
    )


def test_shared_runs_are_the_same_bits(tmp_path, tiny_backbone, monkeypatch):
    """Sharing is exact: each variant run on its own gives the shared output bit for bit, and the evaluation
    runs one sampling per group."""
    from pickstyle import tracking
    from pickstyle.config import parse_params
    from tests.projects import random_adapter

    for key in (*tracking.URI_ENV, tracking.ARTIFACTS_ENV, "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_backbone, tmp_path / "models" / "backbone")
    _write_test_clips(tmp_path / "data", n=1)
    random_adapter(tiny_backbone, tmp_path / "models" / "adapter", seed=1)
    variants = ["base_noguide", "base", "noguide", "cfg", "cfg_joint", "cs_cfg"]
    params = parse_params(
        {"evaluate": {"sample": {"steps": 2, "t_guide": 1.0, "c_guide": 0.0}, "variants": variants}}
    )
    model = ev._load_pipeline(params, "cpu")
    clip = next(iter(ev._iter_test_clips(params)))
    alone = {v: ev._stylize(model, v, clip, params.evaluate.sample, params.seed) for v in variants}
    for group in (("base", "base_noguide"), ("cfg", "cfg_joint", "cs_cfg", "noguide")):
        assert all(np.array_equal(alone[v], alone[group[0]]) for v in group)
    assert not np.array_equal(alone["base"], alone["cs_cfg"])  # the adapter does change the output

    calls = []
    stylize = ev._stylize
    monkeypatch.setattr(ev, "_stylize", lambda *a: calls.append(a[1]) or stylize(*a))
    ev.evaluate(params)
    assert sorted(calls) == ["base_noguide", "noguide"]  # the first variant of each group runs
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["cs_cfg/style_psnr"] == metrics["noguide/style_psnr"] != metrics["base/style_psnr"]
