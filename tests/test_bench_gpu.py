"""``bench/gpu.py --smoke``: the GPU check runs end to end on CPU at tiny sizes (and writes nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_on_cpu() -> None:
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for row in (
        "train: gradient checkpointing",
        "train: checkpointing + activation offload",
        "sample: stock cfg (diffusers, 2 sequential forwards)",
        "sample: cs_cfg batched (1 forward of batch 3)",
        "sample: cs_cfg batched + step cache 0.2",
        "VAE encode, 5 frames",
        "VAE decode, 5 frames",
    ):
        assert f"| {row} | " in out, row
    assert "8.3 s/it" in out and "261 s/video" in out and "175 s/video" in out and "88 s/video" in out
    assert (results.read_text() if results.exists() else None) == before  # --smoke writes nothing
