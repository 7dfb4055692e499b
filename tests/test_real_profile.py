"""``profile: wan-1.3b`` end to end on CPU, on a folder in the public ``Wan2.1-VACE-1.3B-diffusers`` layout.

latents -> train -> evaluate -> register -> ``pickstyle stylize --model models:/pickstyle@champion``, through the
library functions and the CLI, with ``model.path`` set and only the geometry, data sizes and step counts made small.
Every real-profile branch runs: sharded bf16 weights, Wan's 8x/4x VAE and 96-channel context, a T5 tokenizer with
no recorded length (prompts padded to Wan's 512 tokens), the backbone recorded by path in the registry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pickstyle.config import load_params

ROOT = Path(__file__).resolve().parents[1]

#: Only geometry, data sizes and step counts differ from params.yaml (and the profile and model.path).
SMALL = {
    "pairs.styles": ["sepia"],
    "pairs.per_style": 2,
    "pairs.size": 64,
    "clips.test_clips": 1,
    "clips.val_clips": 1,
    "clips.preview_clips": 1,
    "clips.workers": 1,
    "train.steps": 3,
    "train.warmup_steps": 1,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
    "evaluate.sample.steps": 2,
    "evaluate.max_clips": 1,
    "evaluate.preview_clips": 1,
}


def _write_params(tmp_path: Path, backbone: Path) -> Path:
    """params.yaml of the repository with ``profile: wan-1.3b``, ``model.path`` and a small clip geometry.

    The geometry is set on the profile itself (``profiles.wan-1.3b``: a dotted ``-S`` key cannot name it).
    """
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["profile"] = "wan-1.3b"
    data["model"]["path"] = str(backbone)
    data["profiles"]["wan-1.3b"].update({"frames": 5, "height": 32, "width": 48, "fps": 8})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.mark.slow
def test_real_layout_every_stage(
    real_layout_backbone: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pickstyle.cli import main
    from pickstyle.data.clips import build_clips
    from pickstyle.data.pairs import build_pairs
    from pickstyle.data.video import read_video, write_video
    from pickstyle.evaluate import evaluate
    from pickstyle.latents import build_latents, iter_latents
    from pickstyle.register import register
    from pickstyle.train import train

    for var in ("MLFLOW_TRACKING_URI", "PICKSTYLE_MLFLOW_URI", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    params = load_params(_write_params(tmp_path, real_layout_backbone), SMALL)
    assert params.active.backbone == "wan-1.3b" and params.lora_rank == 128
    assert params.train.gradient_checkpointing  # the real profiles' default (VACE blocks included)

    build_pairs(params)
    build_clips(params)
    latents = build_latents(params)
    # Wan's VAE: 8x spatial, 4x temporal (5 frames -> 2), 96-channel context; prompts padded to 512 tokens
    assert latents["shapes"]["target"] == [16, 2, 4, 6]
    assert latents["shapes"]["context"] == [96, 2, 4, 6]
    assert latents["shapes"]["prompt_embeds"] == [512, 32]
    first = next(iter_latents("data/latents"))
    assert first["meta"]["latents"]["prompt_length"] == 512

    trained = train(params)
    assert trained["steps"] == 3 and np.isfinite(trained["final_loss"])
    # r = 128 on q, k, v of the 2 VACE blocks (dim 24): 2 * 3 * 128 * (24 + 24)
    assert trained["lora_params"] == 2 * 3 * 128 * 48
    assert Path("models/adapter/pytorch_lora_weights.safetensors").is_file()

    evaluate(params)
    metrics = json.loads(Path("eval/metrics.json").read_text())
    assert np.isfinite(metrics["cs_cfg/style_psnr"]) and np.isfinite(metrics["vae/source_psnr"])

    summary = register(params)
    assert summary["created"] and "champion" in summary["aliases"]

    rng = np.random.default_rng(0)
    video = write_video(tmp_path / "clip.mp4", rng.integers(0, 255, (7, 40, 60, 3), dtype=np.uint8), 8)
    out = tmp_path / "stylized.mp4"
    argv = ["stylize", str(video), "-o", str(out), "--prompt", "sepia style. a photo"]
    argv += ["--model", "models:/pickstyle@champion", "--steps", "2"]
    assert main(argv) == 0
    frames, _ = read_video(out)
    assert frames.shape[1:] == (32, 48, 3) and len(frames) == 7
    # the registered version points at the folder, it does not copy tens of GB
    assert not list(Path("mlartifacts").rglob("transformer"))
    shutil.rmtree("data")
