"""Every stage, through its real Prefect flow, on a smaller tiny config in a temporary folder.

pairs -> clips -> latents -> train -> evaluate -> register (on the committed pretrained backbone), with MLflow
(sqlite) in ``tmp_path``;
then the registered model is loaded by alias and stylizes a real video (``../shared/videos/wolf.mp4`` when
present, else a pan over a real photograph: the ``real_video`` fixture).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pickstyle.config import load_params

ROOT = Path(__file__).resolve().parents[2]

SMALL = {
    "pairs.styles": ["anime", "sepia"],
    "pairs.per_style": 4,
    "pairs.size": 96,
    "clips.test_clips": 2,
    "clips.val_clips": 1,
    "clips.preview_clips": 2,
    "train.steps": 12,
    "train.warmup_steps": 2,
    "train.checkpoint_every": 6,
    "train.log_every": 3,
    "evaluate.sample.steps": 2,
    "evaluate.max_clips": 1,
    "evaluate.preview_clips": 1,
}


@pytest.mark.slow
def test_every_stage_end_to_end(
    tiny_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_video: Path
) -> None:
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from flows.clips import clips_flow
    from flows.evaluate import evaluate_flow
    from flows.latents import latents_flow
    from flows.pairs import pairs_flow
    from flows.register import register_flow
    from flows.train import train_flow
    from pickstyle.data.video import read_video
    from pickstyle.tracking import tracking_uri

    for var in ("MLFLOW_TRACKING_URI", "PICKSTYLE_MLFLOW_URI", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    params = load_params("params.yaml", SMALL)

    pairs = pairs_flow(params)
    assert pairs["total"] == 8 and sorted(pairs["styles"]) == ["anime", "sepia"]
    clips_flow(params)
    assert list(Path("data/clips").glob("clips-*.tar")) and Path("data/clips/preview.gif").is_file()
    assert list(Path("data/testclips").glob("testclips-*.tar")) and list(
        Path("data/valclips").glob("valclips-*.tar")
    )
    shutil.copytree(tiny_backbone, "models/backbone")  # the pretrain stage's committed output
    latents_flow(params)
    assert list(Path("data/latents").glob("latents-*.tar"))
    trained = train_flow(params)
    assert trained["steps"] == 12 and trained["adapters"] == "per_style"  # the tiny profile: one per style
    for style in ("anime", "sepia"):
        assert Path(f"models/adapter/{style}/pytorch_lora_weights.safetensors").is_file()

    evaluate_flow(params)
    metrics = json.loads(Path("eval/metrics.json").read_text())
    for variant in ("identity", "base", "cfg", "cfg_joint", "cs_cfg"):
        for metric in ("warp_error", "structure_ssim", "edge_f1", "style_psnr", "style_ssim"):
            key = f"{variant}/{metric}"
            assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["vae/source_psnr"] > 20 and np.isfinite(metrics["reconstruct/source_psnr"])
    assert Path("eval/preview.gif").is_file() and list(Path("eval/figures").glob("*.png"))
    assert Path("eval/plots/per_clip.csv").is_file()

    summary = register_flow(params)
    assert summary["created"] and "champion" in summary["aliases"]
    assert json.loads(Path("eval/evaluation.json").read_text())["split"] == "test"  # what register read
    uri = tracking_uri(params)
    assert uri.startswith("sqlite:////") and str(tmp_path) in uri
    client = MlflowClient(uri, registry_uri=uri)
    name = params.register.model_name
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == client.get_model_version_by_alias(name, "challenger").version
    assert champion.tags["adapter_sha256"] == summary["adapter_sha256"]
    # registering the same adapter again makes no new version
    again = register_flow(params)
    assert not again["created"] and again["version"] == summary["version"]

    video = real_video
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = tmp_path / "stylized.mp4"
    [written] = model.predict(
        pd.DataFrame(
            [
                {
                    "video": str(video),
                    "prompt": "Anime style. a wolf",
                    "output": str(out),
                    "steps": 2,
                    "max_frames": 9,
                }
            ]
        )
    )
    frames, fps = read_video(written)
    _, src_fps = read_video(video, max_frames=1)
    assert frames.shape == (9, params.active.height, params.active.width, 3)
    assert fps == pytest.approx(src_fps, rel=0.01)
