"""The registered pyfunc: base64 in and out, its serving example, readable errors, and ``mlflow models serve``."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pickstyle import register, tracking
from pickstyle.config import parse_params
from tests.procs import free_port
from tests.projects import random_style_adapters, without_outside_tracking

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pickstyle-serve-test"


@pytest.fixture(scope="module")
def registered(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A project folder (tiny backbone, small per-style adapters as the tiny profile trains, eval metrics)
    registered as ``MODEL`` version 1."""
    root = tmp_path_factory.mktemp("serve-project")
    shutil.copytree(tiny_backbone, root / "models" / "backbone")
    random_style_adapters(tiny_backbone, root / "models" / "adapter", ("anime", "sepia"))
    (root / "eval").mkdir()
    metrics = {"cs_cfg/style_psnr": 20.0, "cs_cfg/style_psnr_se": 0.5, "base/warp_error": 0.01}
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    params = parse_params({"register": {"model_name": MODEL}, "sample": {"steps": 2}})
    with pytest.MonkeyPatch.context() as mp:
        without_outside_tracking(mp)
        mp.chdir(root)
        summary = register.register(params)
        yield {"root": root, "params": params, "summary": summary, "uri": tracking.tracking_uri(params)}


def _clip_b64(frames: int = 5) -> str:
    from pickstyle.data.video import encode_video

    clip = np.random.default_rng(0).integers(0, 255, (frames, 40, 72, 3), dtype=np.uint8)
    return base64.b64encode(encode_video(clip, fps=8.0)).decode("ascii")


def _decode(b64: str) -> tuple[np.ndarray, float]:
    from pickstyle.data.video import read_video

    return read_video(base64.b64decode(b64))


def test_pyfunc_takes_and_returns_base64(registered, tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    out = model.predict(
        pd.DataFrame({"video_b64": [_clip_b64()], "prompt": ["anime style. noise"], "return_bytes": [True]})
    )
    frames, fps = _decode(out[0])
    assert frames.shape == (5, 64, 96, 3) and fps == pytest.approx(8)

    # a path in, a path out (the server's disk), as before
    (tmp_path / "in.mp4").write_bytes(base64.b64decode(_clip_b64()))
    out = model.predict(pd.DataFrame({"video": [str(tmp_path / "in.mp4")], "prompt": ["anime style. noise"]}))
    assert out[0].endswith("in.pickstyle.mp4") and Path(out[0]).is_file()
    shutil.rmtree(Path(out[0]).parent)  # the server's output folder (a path for the client to fetch)


def test_served_model_equals_the_cli_for_the_same_seed(registered, tmp_path: Path, monkeypatch) -> None:
    """The registered model through MLflow and `pickstyle stylize --model` give the same frames."""
    import mlflow
    import pandas as pd

    from pickstyle.cli import main
    from pickstyle.data.video import read_video

    monkeypatch.chdir(
        registered["root"]
    )  # its mlflow.db; no params.yaml there: the code defaults, as registered
    src = tmp_path / "in.mp4"
    src.write_bytes(base64.b64decode(_clip_b64(9)))
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    row = {
        "video": str(src),
        "prompt": "anime style. noise",
        "output": str(tmp_path / "served.mp4"),
        "seed": 3,
    }
    model.predict(pd.DataFrame([row]))
    argv = ["stylize", str(src), "-o", str(tmp_path / "cli.mp4"), "--prompt", "anime style. noise"]
    assert main([*argv, "--model", f"models:/{MODEL}@champion", "--seed", "3", "--steps", "2"]) == 0
    served, _ = read_video((tmp_path / "served.mp4").read_bytes())
    cli, _ = read_video((tmp_path / "cli.mp4").read_bytes())
    assert served.shape == cli.shape == (9, 64, 96, 3)
    np.testing.assert_array_equal(served, cli)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "anime style. x"}, "row 0: needs a video"),
        ({"video_b64": "not base64!", "prompt": "anime style. x"}, "row 0: video_b64 is not valid base64"),
        (
            {"video_b64": base64.b64encode(b"junk").decode(), "prompt": "x"},
            "row 0: video_b64: not a readable",
        ),
        ({"video": "/nowhere/in.mp4", "prompt": "x"}, "/nowhere/in.mp4: no such file"),
        ({"video_b64": "AAAA", "prompt": "x", "c_guide": float("inf")}, "c_guide: must be finite"),
        ({"video_b64": "AAAA", "prompt": "x", "steps": 0}, "steps: must be >= 1"),
        (
            {"video_b64": _clip_b64(), "prompt": "Oil style. x"},
            "row 0: prompt 'Oil style. x' names none of the styles",
        ),
    ],
)
def test_pyfunc_input_errors_are_one_readable_line(registered, row, message) -> None:
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    with pytest.raises(MlflowException, match=message) as err:
        model.predict(pd.DataFrame([row]))
    assert err.value.get_http_status_code() == 400 and "\n" not in err.value.message


def test_serving_example_works_and_metrics_are_one_table(registered) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion"))
    example = (model_dir / "serving_input_example.json").read_text()
    assert "video_b64" in example and "input.mp4" not in example
    out = mlflow.models.validate_serving_input(f"models:/{MODEL}@champion", example)
    frames, _ = _decode(out[0])
    assert frames.shape[1:] == (64, 96, 3)

    # every metric in one table beside the model; tags only for the gate metric and provenance
    table = json.loads((model_dir / "eval_metrics.json").read_text())
    assert table["columns"] == ["group", "metric", "value", "se"]
    assert ["cs_cfg", "style_psnr", 20.0, 0.5] in table["data"]
    assert ["base", "warp_error", 0.01, None] in table["data"]
    uri = registered["uri"]
    version = MlflowClient(uri, registry_uri=uri).get_model_version(MODEL, "1")
    assert sorted(k for k in version.tags if k.startswith("eval.")) == [
        "eval.cs_cfg/style_psnr",
        "eval.cs_cfg/style_psnr_se",
    ]
    assert "| **cs_cfg** | **style_psnr** | **20** | **0.5** |" in version.description


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_posted_clip(registered, tmp_path: Path) -> None:
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` on 127.0.0.1: base64 in, mp4 out."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registered["uri"],  # the project's database, from another working directory
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the scoring server did not start:\n" + log.read_text()
            time.sleep(1)

        url = f"http://127.0.0.1:{port}/invocations"
        row = {"video_b64": _clip_b64(), "prompt": "anime style. noise", "return_bytes": True, "steps": 2}
        status, body = _post(url, {"dataframe_records": [row]})
        assert status == 200, body
        frames, fps = _decode(body["predictions"][0])
        assert frames.shape == (5, 64, 96, 3) and fps == pytest.approx(8)

        # a client's mistake: HTTP 400 whose message says what was wrong
        status, body = _post(url, {"dataframe_records": [{"video_b64": "AAAA", "prompt": "x", "steps": 0}]})
        assert status == 400 and "steps: must be >= 1" in body["message"], body
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
