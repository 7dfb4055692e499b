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


def test_adapter_beats_the_backbone_alone(metrics: dict[str, float]) -> None:
    gain = metrics["cs_cfg/style_psnr"] - metrics["base/style_psnr"]
    # measured: +0.34 dB with CS-CFG (10 test clips). Without guidance the 5-style adapter is 0.28 dB *below* the
    # backbone on this backbone (README: the adapters), so that gain is not asserted.
    assert gain >= 0.34 / 2, gain


def test_adapter_learns_the_style_the_backbone_never_saw(metrics: dict[str, float]) -> None:
    # sepia is held out of pretraining: only the adapter can have learned it (measured +0.72 dB)
    gain = metrics["style/sepia/cs_cfg/style_psnr"] - metrics["style/sepia/base/style_psnr"]
    assert gain >= 0.72 / 2, gain


def test_backbone_reconstructs_and_follows_its_context(metrics: dict[str, float]) -> None:
    assert metrics["vae/source_psnr"] >= 25.0  # measured 25.26
    # measured 24.06 (the backbone pretrained 4,000 steps: 19.37)
    assert metrics["reconstruct/source_psnr"] >= 23.0
