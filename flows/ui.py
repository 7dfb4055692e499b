"""``make ui`` / ``make server``: start the Prefect server and MLflow on 127.0.0.1 in the background, print the URLs.

    python -m flows.ui            # Prefect server + the MLflow UI on the project's mlflow.db (logs and pids in .ui/)
    python -m flows.ui --tracking-server [--host 0.0.0.0] [--backend-store-uri URI] [--artifacts-destination D]
                                  # Prefect server + an MLflow *tracking server* a team shares (make server)
    python -m flows.ui stop       # stop the two processes started here

With the Prefect server running, point flows at it (``export PREFECT_API_URL=http://127.0.0.1:4200/api``): runs
show in the UI and start in ~1.5 s instead of each process starting its own temporary server.

The tracking server (``mlflow server --serve-artifacts``) keeps runs and the registry in ``--backend-store-uri``
(default ``sqlite:///<abs>/.ui/tracking/mlflow.db``; ``postgresql://…`` works the same) and artifacts in
``--artifacts-destination`` (default ``.ui/tracking/artifacts``; or ``s3://…``), and proxies every artifact upload
and download: clients (``export MLFLOW_TRACKING_URI=http://<host>:5000``) need no shared disk. It starts on its
own store, not on the project's ``mlflow.db``, whose experiments record local ``file://`` artifact locations that
other machines cannot reach.
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


def commands(
    mlflow_uri: str,
    artifacts: Path | str,
    prefect_port: int,
    mlflow_port: int,
    *,
    host: str = "127.0.0.1",
    tracking_server: bool = False,
) -> dict[str, list[str]]:
    """The two server commands (this interpreter's ``prefect`` and ``mlflow`` entry points).

    ``tracking_server``: ``mlflow server`` with proxied artifacts (``artifacts`` is the destination: a folder or
    an object-store URI) instead of the UI on a local store (``artifacts`` is then the default artifact root).
    """
    bindir = Path(sys.executable).parent
    prefect = [str(bindir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)]
    mlflow = [str(bindir / "mlflow")]
    if tracking_server:
        mlflow += ["server", "--backend-store-uri", mlflow_uri, "--serve-artifacts"]
        mlflow += ["--artifacts-destination", str(artifacts)]
    else:
        mlflow += [
            "ui",
            "--backend-store-uri",
            mlflow_uri,
            "--default-artifact-root",
            Path(artifacts).as_uri(),
        ]
    # the default 4 workers is a lot for a laptop; a team server takes more with MLFLOW_WORKERS
    mlflow += ["--host", host, "--port", str(mlflow_port), "--workers", os.environ.get("MLFLOW_WORKERS", "1")]
    return {"prefect": prefect, "mlflow": mlflow}


def server_store(backend: str | None, artifacts: str | None) -> tuple[str, str]:
    """The tracking server's backend store URI and artifacts destination (defaults under ``.ui/tracking``)."""
    root = (STATE / "tracking").resolve()
    if backend is None:
        root.mkdir(parents=True, exist_ok=True)
        backend = f"sqlite:///{root / 'mlflow.db'}"
    if artifacts is None:
        artifacts = str(root / "artifacts")
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = str(Path(artifacts).resolve())
    return backend, artifacts


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


def start(
    params_path: str,
    prefect_port: int,
    mlflow_port: int,
    timeout: float,
    *,
    host: str = "127.0.0.1",
    tracking_server: bool = False,
    backend: str | None = None,
    artifacts: str | None = None,
) -> dict[str, str]:
    """Start both servers (unless the ones started here before are still running); returns name -> URL.

    Raises:
        SystemExit: the MLflow UI was asked for while ``MLFLOW_TRACKING_URI`` points at a server already.
    """
    if tracking_server:
        uri, artifacts = server_store(backend, artifacts)
    else:
        params = load_params(params_path)
        uri = tracking_uri(params)
        if uri.startswith(("http://", "https://")):
            raise SystemExit(
                f"MLFLOW_TRACKING_URI is the server {uri}: open it in a browser (no UI to start)"
            )
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        artifacts = artifact_root(params)
        artifacts.mkdir(parents=True, exist_ok=True)
    STATE.mkdir(exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"}
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # where this machine reaches them
    urls = {"prefect": f"http://{shown}:{prefect_port}", "mlflow": f"http://{shown}:{mlflow_port}"}
    health = {"prefect": f"{urls['prefect']}/api/health", "mlflow": f"{urls['mlflow']}/health"}
    for name, cmd in commands(
        uri, artifacts, prefect_port, mlflow_port, host=host, tracking_server=tracking_server
    ).items():
        pidfile = STATE / f"{name}.pid"
        if pidfile.is_file() and _alive(int(pidfile.read_text())):
            print(
                f"{name}: already running (pid {pidfile.read_text()}); `python -m flows.ui stop` to restart it"
            )
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
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind both servers to (0.0.0.0: all)"
    )
    parser.add_argument(
        "--tracking-server",
        action="store_true",
        help="an MLflow tracking server with proxied artifacts (a team's) instead of the UI on ./mlflow.db",
    )
    parser.add_argument(
        "--backend-store-uri",
        default=None,
        help="tracking server: sqlite:///… or postgresql://… (runs, registry)",
    )
    parser.add_argument(
        "--artifacts-destination", default=None, help="tracking server: a folder or s3://… for the artifacts"
    )
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for each server")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop()
        return
    if not args.tracking_server and (args.backend_store_uri or args.artifacts_destination):
        parser.error("--backend-store-uri and --artifacts-destination need --tracking-server")
    urls = start(
        args.params,
        args.prefect_port,
        args.mlflow_port,
        args.timeout,
        host=args.host,
        tracking_server=args.tracking_server,
        backend=args.backend_store_uri,
        artifacts=args.artifacts_destination,
    )
    print(f"Prefect UI: {urls['prefect']}")
    print(f"MLflow UI:  {urls['mlflow']}")
    print(f"Flows report to the Prefect server with: export PREFECT_API_URL={urls['prefect']}/api")
    if args.tracking_server:
        print(
            f"Stages log and register through the tracking server with: export MLFLOW_TRACKING_URI={urls['mlflow']}"
        )
    print("Stop both with: python -m flows.ui stop")


if __name__ == "__main__":
    main()
