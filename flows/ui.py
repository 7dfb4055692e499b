"""``make ui``: start the Prefect server and the MLflow UI on 127.0.0.1 in the background and print both URLs.

    python -m flows.ui            # start both (logs and pids in .ui/), print the URLs, return
    python -m flows.ui stop       # stop the two processes started here

With the Prefect server running, point flows at it (``export PREFECT_API_URL=http://127.0.0.1:4200/api``): runs
show in the UI and start in ~1.5 s instead of each process starting its own temporary server.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pickstyle.config import load_params
from pickstyle.tracking import artifact_root, tracking_uri

STATE = Path(".ui")


def commands(mlflow_uri: str, artifacts: Path, prefect_port: int, mlflow_port: int) -> dict[str, list[str]]:
    """The two server commands (this interpreter's ``prefect`` and ``mlflow`` entry points)."""
    bindir = Path(sys.executable).parent
    return {
        "prefect": [
            str(bindir / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(prefect_port),
        ],
        "mlflow": [
            str(bindir / "mlflow"),
            "ui",
            "--backend-store-uri",
            mlflow_uri,
            "--default-artifact-root",
            artifacts.as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",  # the default 4 workers is a lot for a laptop UI
        ],
    }


def _wait(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def start(params_path: str, prefect_port: int, mlflow_port: int, timeout: float) -> dict[str, str]:
    """Start both servers (unless the ones started here before are still running); returns name -> URL."""
    params = load_params(params_path)
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    artifacts = artifact_root(params)
    artifacts.mkdir(parents=True, exist_ok=True)
    STATE.mkdir(exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    urls = {
        "prefect": f"http://127.0.0.1:{prefect_port}",
        "mlflow": f"http://127.0.0.1:{mlflow_port}",
    }
    health = {"prefect": f"{urls['prefect']}/api/health", "mlflow": f"{urls['mlflow']}/health"}
    for name, cmd in commands(uri, artifacts, prefect_port, mlflow_port).items():
        pidfile = STATE / f"{name}.pid"
        if pidfile.is_file() and _alive(int(pidfile.read_text())):
            continue
        log = open(STATE / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it open)
        # A new session: the servers outlive this command (and `make`), and stop together with `stop`.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        pidfile.write_text(str(proc.pid))
    for name, url in health.items():
        if not _wait(url, timeout):
            print(
                f"{name} did not answer at {url} within {timeout:.0f} s; see {STATE / (name + '.log')}",
                file=sys.stderr,
            )
    return urls


def stop() -> None:
    """Stop the servers started by :func:`start` (their whole process groups), by the pids it recorded."""
    for pidfile in sorted(STATE.glob("*.pid")):
        pid = int(pidfile.read_text())
        if _alive(pid):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            if _alive(pid):  # did not shut down gracefully
                os.killpg(pid, signal.SIGKILL)
            print(f"stopped {pidfile.stem} (pid {pid})")
        pidfile.unlink()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.ui", description=__doc__.split("\n")[0])
    parser.add_argument("action", nargs="?", choices=["start", "stop"], default="start")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each server")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop()
        return
    urls = start(args.params, args.prefect_port, args.mlflow_port, args.timeout)
    print(f"Prefect UI: {urls['prefect']}")
    print(f"MLflow UI:  {urls['mlflow']}")
    print(f"Flows report to the Prefect server with: export PREFECT_API_URL={urls['prefect']}/api")
    print("Stop both with: python -m flows.ui stop")


if __name__ == "__main__":
    main()
