"""The method works: on the committed backbone, a context-style adapter trained on paired stills (made into
camera-motion clips) re-renders held-out clips in a style the backbone has never seen, better than the backbone
alone, and CS-CFG adds to it. The real pipeline in a temporary folder: pairs -> clips -> latents -> train ->
evaluate, one style (sepia, held out of pretraining), a short training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pickstyle.config import parse_params

# Measured with this test's settings on the committed backbone (style PSNR to the exact ground truth, dB):
# MEASURED. The thresholds are half of each measured gain.
MIN_GAIN_OVER_BASE = GAIN_BASE
MIN_GAIN_OVER_IDENTITY = GAIN_IDENTITY


@pytest.mark.slow
def test_an_adapter_learns_a_style_the_backbone_never_saw(tiny_backbone: Path, tmp_path: Path, monkeypatch) -> None:
    import torch

    from pickstyle.data.clips import build_clips
    from pickstyle.data.pairs import build_pairs
    from pickstyle.evaluate import evaluate
    from pickstyle.latents import build_latents
    from pickstyle.train import train

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_backbone, tmp_path / "models" / "backbone")
    params = parse_params(
        {
            "pairs": {"styles": ["sepia"], "per_style": 24},
            "clips": {"test_clips": 2, "preview_clips": 1},
            "train": {"steps": 300, "mlflow": False, "checkpoint_every": 0},
            "evaluate": {"variants": ["identity", "base", "noguide", "cs_cfg"], "preview_clips": 1},
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_pairs(params)
        build_clips(params)
        build_latents(params)
        train(params)
        evaluate(params)
    finally:
        torch.set_num_threads(threads)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    base, identity, cs_cfg = m["base/style_psnr"], m["identity/style_psnr"], m["cs_cfg/style_psnr"]
    print(f"sepia: identity {identity:.2f}, base {base:.2f}, noguide {m['noguide/style_psnr']:.2f}, cs_cfg {cs_cfg:.2f}")
    assert cs_cfg >= base + MIN_GAIN_OVER_BASE, m
    assert cs_cfg >= identity + MIN_GAIN_OVER_IDENTITY, m
    assert m["noguide/style_psnr"] > base, m  # the conditional prediction itself learned the style
