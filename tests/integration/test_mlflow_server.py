"""A shared MLflow tracking server: the stages log and register through it, another folder pulls the model.

One project folder runs ``train``, ``evaluate`` and ``register`` (their Prefect flows) with
``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``; a second, empty folder then runs ``pickstyle stylize --model
models:/…@champion`` and ``mlflow models serve -m models:/…@champion`` as their own processes. Nothing is shared on
disk: runs and versions point at ``mlflow-artifacts:/``, neither folder gets an ``mlflow.db`` or an artifact
folder, the client's copy of the model comes from the server's HTTP artifact API (its access log), and only the
server's own ``--artifacts-destination`` holds the files.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pickstyle.config import load_params
from tests.integration.conftest import BIN, Server, answers, child_env, free_port, tail, wait_for
from tests.procs import group, run_group

ROOT = Path(__file__).resolve().parents[2]
MODEL = "pickstyle-team"
#: A small tiny-profile run: 2 pairs of one style, 3 training steps, one test clip, 2 sampling steps.
SMALL = {
    "pairs.styles": ["sepia"],
    "pairs.per_style": 2,
    "pairs.size": 64,
    "clips.test_clips": 1,
    "clips.variants": 1,
    "clips.preview_clips": 1,
    "train.steps": 3,
    "train.checkpoint_every": 0,
    "train.log_every": 1,
    "evaluate.max_clips": 1,
    "evaluate.variants": ["identity", "base", "cs_cfg"],
    "evaluate.preview_clips": 1,
    "evaluate.sample.steps": 2,
    "register.model_name": MODEL,
}
#: An artifact download through the server (``mlflow-artifacts`` proxy), as its access log shows it.
DOWNLOAD = re.compile(r"GET /api/2\.0/mlflow-artifacts/artifacts/\S+ HTTP")


def _downloads(server: Server) -> int:
    return len(DOWNLOAD.findall(server.log.read_text(errors="replace")))


def _clip(path: Path, frames: int = 5) -> Path:
    from pickstyle.data.video import encode_video

    clip = np.random.default_rng(0).integers(0, 255, (frames, 40, 72, 3), dtype=np.uint8)
    path.write_bytes(encode_video(clip, fps=8.0))
    return path


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _run_stages(project: Path, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """pairs, clips, latents (no MLflow) then the train, evaluate and register flows, in ``project``."""
    from flows.evaluate import evaluate_flow
    from flows.register import register_flow
    from flows.train import train_flow
    from pickstyle.data.clips import build_clips
    from pickstyle.data.pairs import build_pairs
    from pickstyle.latents import build_latents

    monkeypatch.chdir(project)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    shutil.copytree(tiny_backbone, project / "models" / "backbone")
    params = load_params("params.yaml", SMALL)
    build_pairs(params)
    build_clips(params)
    build_latents(params)
    trained = train_flow(params)
    evaluated = evaluate_flow(params)
    registered = register_flow(params)
    return {"train": trained, "evaluate": evaluated, "register": registered}


@pytest.mark.slow
def test_stages_log_to_a_tracking_server_and_another_folder_pulls_the_model(
    tmp_path: Path,
    tiny_backbone: Path,
    mlflow_server: Server,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow import MlflowClient

    for key in ("PICKSTYLE_MLFLOW_URI", "PICKSTYLE_MLFLOW_ARTIFACTS", "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    project, client_dir = tmp_path / "project", tmp_path / "client"
    project.mkdir()
    client_dir.mkdir()
    out = _run_stages(project, tiny_backbone, monkeypatch)

    # --- the three stages wrote through the server, nothing beside the project
    client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
    assert out["register"]["tracking_uri"] == mlflow_server.url and out["register"]["created"]
    for name in ("mlflow.db", "mlartifacts", "mlruns"):
        assert not (project / name).exists(), name
    # the tiny profile trains one adapter per style: this run's is sepia's
    train_run = client.get_run(out["train"]["styles"]["sepia"]["mlflow_run_id"])
    eval_run = client.get_run(out["evaluate"]["mlflow_run_id"])
    for run in (train_run, eval_run):
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:/"), (
            run.info
        )
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) == 3
    assert "adapter" in {f.path for f in client.list_artifacts(train_run.info.run_id)}
    assert np.isfinite(eval_run.data.metrics["cs_cfg/style_psnr"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.source.startswith("mlflow-artifacts:/"), version.source
    stored = sorted((mlflow_server.root / "artifacts").rglob("pytorch_lora_weights.safetensors"))
    assert stored, "the server's artifacts destination holds no adapter"

    # --- another working folder, the server's URL only: pickstyle stylize --model models:/…@champion
    monkeypatch.chdir(client_dir)
    env = child_env(MLFLOW_TRACKING_URI=mlflow_server.url, TMPDIR=str(client_dir / "tmp"))
    (client_dir / "tmp").mkdir()
    src = _clip(client_dir / "in.mp4")
    before = _downloads(mlflow_server)
    cmd = [str(BIN / "pickstyle"), "stylize", str(src), "-o", "out.mp4", "--prompt", "sepia style. noise"]
    cmd += ["--model", f"models:/{MODEL}@champion", "--steps", "2"]
    done = run_group(cmd, timeout=240, cwd=client_dir, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    from pickstyle.data.video import read_video

    frames, _ = read_video(client_dir / "out.mp4")
    assert frames.shape == (5, 64, 96, 3)
    assert _downloads(mlflow_server) > before, tail(mlflow_server.log)
    # the model it used is a downloaded copy in the client's temporary folder, the same bytes as the server's
    pulled = sorted((client_dir / "tmp").rglob("pytorch_lora_weights.safetensors"))
    assert pulled and pulled[0].read_bytes() in {p.read_bytes() for p in stored}
    assert not any((client_dir / n).exists() for n in ("mlflow.db", "mlartifacts", "mlruns"))

    # --- mlflow models serve -m models:/…@champion from that folder: a clip in, a stylized mp4 out
    port = free_port()
    before = _downloads(mlflow_server)
    cmd = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{MODEL}@champion",
        "--env-manager",
        "local",
    ]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = client_dir / "serve.log"
    with (
        log.open("w") as sink,
        group(cmd, cwd=client_dir, env=env, stdout=sink, stderr=subprocess.STDOUT) as proc,
    ):
        wait_for(
            lambda: answers(f"http://127.0.0.1:{port}/ping"),
            "mlflow models serve",
            240,
            {"serve": (proc, log)},
        )
        row = {"video_b64": base64.b64encode(src.read_bytes()).decode(), "prompt": "sepia style. noise"}
        status, body = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_records": [{**row, "steps": 2, "return_bytes": True}]},
        )
    assert status == 200, (body, tail(log))
    served, _ = read_video(base64.b64decode(body["predictions"][0]))
    assert served.shape == (5, 64, 96, 3)
    assert _downloads(mlflow_server) > before, tail(mlflow_server.log)
