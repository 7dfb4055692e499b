"""The default run's committed results: ``eval/metrics.json`` as ``dvc repro`` wrote it (its md5 is in ``dvc.lock``).

The thresholds are half of what the run measured (README: Two commands), so a change that loses the adapter's
gain over the backbone, or the backbone's fidelity, fails here once its ``dvc repro`` is committed.
"""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
METRICS = ROOT / "eval" / "metrics.json"


@pytest.fixture(scope="module")
def metrics() -> dict[str, float]:
    return json.loads(METRICS.read_text())


def test_committed_metrics_are_the_pipelines() -> None:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for o in lock["stages"]["evaluate"]["outs"]}
    assert hashlib.md5(METRICS.read_bytes()).hexdigest() == outs["eval/metrics.json"]


#: Style PSNR gain (dB) of each style's adapter over the backbone alone, measured by this round's ``dvc repro``
#: (10 test clips, 2 per style; built-in pairs styled per frame in full chroma, lr 2e-3, 650 steps on 3-frame
#: windows, 3 sampling steps; the backbone's VAE frame-wise, its transformer pretrained in two cosine cycles).
MEASURED_GAIN_OVER_BASE = {"anime": 1.12, "pixel": 2.01, "sepia": 6.89, "sketch": 2.25, "watercolor": 2.77}


def test_adapter_beats_the_backbone_alone(metrics: dict[str, float]) -> None:
    # measured: +3.01 dB on average (the tiny profile samples with t_g 1, c_g 0, so CS-CFG is the adapter's own
    # conditional prediction and equals ``noguide``)
    gain = metrics["cs_cfg/style_psnr"] - metrics["base/style_psnr"]
    assert gain >= 3.01 / 2, gain
    gain = metrics["noguide/style_psnr"] - metrics["base_noguide/style_psnr"]
    assert gain >= 3.01 / 2, gain  # without guidance too (issue 18)


@pytest.mark.parametrize("style", sorted(MEASURED_GAIN_OVER_BASE))
def test_every_styles_adapter_beats_the_backbone(metrics: dict[str, float], style: str) -> None:
    gain = metrics[f"style/{style}/cs_cfg/style_psnr"] - metrics[f"style/{style}/base/style_psnr"]
    assert gain >= MEASURED_GAIN_OVER_BASE[style] / 2, gain


def test_adapter_learns_the_style_the_backbone_never_saw(metrics: dict[str, float]) -> None:
    # sepia is held out of pretraining: only the adapter can have learned it (measured +6.89 dB over the base,
    # +5.90 over the unchanged input)
    gain = metrics["style/sepia/cs_cfg/style_psnr"] - metrics["style/sepia/identity/style_psnr"]
    assert gain >= 5.90 / 2, gain


def test_backbone_reconstructs_and_follows_its_context(metrics: dict[str, float]) -> None:
    assert metrics["vae/source_psnr"] >= 26.0  # measured 26.66 frame-wise (25.26 clip-wise)
    # measured 24.89 at the tiny profile's 3 sampling steps (one cosine cycle: 24.01; clip-wise VAE: 23.89;
    # pretrained 4,000 steps: 19.37); issue 18 asks for 24
    assert metrics["reconstruct/source_psnr"] >= 24.0
