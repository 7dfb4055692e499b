"""A training run killed with ``kill -9`` under ``dvc repro`` continues where it stopped on the next ``dvc repro``.

DVC deletes a stage's outputs before it reruns it; the checkpoints live outside ``models/adapter`` so they survive,
and the stage resumes by itself because its settings and data are unchanged. The adapter equals, bit for bit, the
one of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.procs import group, kill_group
from tests.test_train import _params, _random_latents, _threads

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"steps": 14, "checkpoint_every": 4, "keep_checkpoints": 2, "log_every": 4, "lora_dropout": 0.1}

DVC_YAML = """\
stages:
  train:
    cmd: python -m flows.train
    deps:
      - data/latents
      - models/backbone
    params:
      - train
    outs:
      - models/adapter
"""


def _dvc(cwd: Path, env: dict[str, str], *args: str):
    """``dvc *args`` in its own process group (kill -9 of the whole group: dvc and the training process), killed
    when the ``with`` block ends, whatever happens in it."""
    dvc = Path(sys.executable).with_name("dvc")
    return group(
        [str(dvc), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_kill_9_then_dvc_repro_resumes_bit_identical(tiny_backbone: Path, tmp_path: Path) -> None:
    # The uninterrupted reference run, in-process.
    ref = tmp_path / "ref"
    shutil.copytree(tiny_backbone, ref / "models" / "backbone")
    _random_latents(ref / "data", n=6, shard_size=3)
    with _threads(1):
        from pickstyle.train import train

        train(_params(ref, ref / "models", **TRAIN))
    want = load_file(ref / "models" / "adapter" / "pytorch_lora_weights.safetensors")

    # The same run as a DVC stage in a fresh project.
    proj = tmp_path / "proj"
    shutil.copytree(tiny_backbone, proj / "models" / "backbone")
    _random_latents(proj / "data", n=6, shard_size=3)
    params = _params(proj, proj / "models", **TRAIN).model_dump(mode="json")
    params["paths"] = {
        "data": "data",
        "models": "models",
        "mlflow_db": "mlflow.db",
        "mlflow_artifacts": "mla",
    }
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / "dvc.yaml").write_text(DVC_YAML)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "OMP_NUM_THREADS": "1",
    }
    # the session's test Prefect API (tests/flows/conftest.py): the stage's flow need not start its own server
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    else:
        env.pop("PREFECT_API_URL", None)
    subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"], cwd=proj, check=True
    )

    ckpts = proj / "models" / ".checkpoints" / "adapter"
    with _dvc(proj, env, "repro") as run:
        deadline = time.time() + 300
        while not (ckpts / "step-8").is_dir():  # killed mid-run, after at least two checkpoints
            assert run.poll() is None, run.communicate()[0][-3000:]
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.2)
        kill_group(run)
    assert not (proj / "models" / "adapter" / "train_summary.json").exists()

    with _dvc(proj, env, "repro") as again:
        log = again.communicate(timeout=600)[0]
    assert again.returncode == 0, log[-3000:]
    assert "resuming from" in log, log[-3000:]
    got = load_file(proj / "models" / "adapter" / "pytorch_lora_weights.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # nothing else says the run was resumed: the folder DVC hashes is an uninterrupted run's
    ref_adapter, got_adapter = ref / "models" / "adapter", proj / "models" / "adapter"
    summaries = [json.loads((a / "train_summary.json").read_text()) for a in (ref_adapter, got_adapter)]
    for summary in summaries:
        assert summary.pop("adapter_dir") and "start_step" not in summary
    assert summaries[0] == summaries[1]
    assert (got_adapter / "loss.csv").read_bytes() == (ref_adapter / "loss.csv").read_bytes()
    status = subprocess.run(
        [str(Path(sys.executable).with_name("dvc")), "status", "-q"], cwd=proj, env=env, check=False
    )
    assert status.returncode == 0  # the resumed run is recorded in dvc.lock: the stage is up to date
