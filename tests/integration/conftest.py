"""Servers a team runs, each a real process on 127.0.0.1 started and stopped by the tests.

``mlflow_server`` (a tracking server with proxied artifacts) and ``prefect_server`` (a Prefect API with its own
``PREFECT_HOME``) are started once for this folder's tests and stopped after its last one, on free ports, in their
own process groups (``tests.procs``), killed however the tests end. Their logs are files; a server that dies or
does not answer fails with its log."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flows import ui
from tests.procs import free_port, group, kill_group

BIN = Path(sys.executable).parent
#: The environment every child process gets: offline, no telemetry, this venv first on PATH.
QUIET = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}
#: Variables of the parent that would point a child at another store or API than the test's.
FOREIGN = (
    "MLFLOW_TRACKING_URI",
    "PICKSTYLE_MLFLOW_URI",
    "PICKSTYLE_MLFLOW_ARTIFACTS",
    "PREFECT_API_URL",
    "DVC_EXP_NAME",
    "DVC_ROOT",
)


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without :data:`FOREIGN`, plus :data:`QUIET`, this venv on PATH and ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update(QUIET)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else f"(no {path})"


def wait_for(
    ready: Callable[[], bool], what: str, timeout: float, procs: dict[str, tuple] = (), every: float = 0.5
) -> None:
    """Poll ``ready()`` until true; fail with the logs of ``procs`` (name -> (Popen, log)) when one dies or time
    runs out."""
    procs = dict(procs)
    deadline = time.monotonic() + timeout
    while not ready():
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({proc.returncode}) while waiting for {what}:\n{tail(log)}"
                )
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}:\n{tail(log)}" for n, (_, log) in procs.items())
            raise AssertionError(f"{what}: not ready after {timeout:.0f} s\n{logs}")
        time.sleep(every)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def tree(cmd: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """:func:`tests.procs.group`, and at the end also every descendant that left the group.

    Prefect's process worker starts each flow run in a session of its own (so a group-wide signal cannot beat it
    to the child): killing the worker's group alone would leave the flow run, its ``dvc exp run`` and its stages.
    """
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        kill_tree(proc)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s group, then the groups and processes of all its descendants (found before the kill)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    groups = set()
    for kid in kids:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(kid.pid))
    kill_group(proc)
    for pgid in groups - {os.getpgid(0)}:  # never this test's own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    for kid in kids:
        with contextlib.suppress(psutil.NoSuchProcess):
            kid.kill()


@dataclass
class Server:
    """A started server: its URL, the process, its log and (for MLflow) where it keeps its data."""

    url: str
    proc: subprocess.Popen
    log: Path
    root: Path
    extra: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def started(
    name: str, cmd: list[str], log: Path, env: dict[str, str], health: str, cwd: Path, timeout: float
) -> Iterator[subprocess.Popen]:
    """``cmd`` in its own process group (killed when the block ends), logging to ``log``, once ``health``
    answers 200."""
    with log.open("w") as sink, group(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT) as proc:
        wait_for(lambda: answers(health), f"{name} at {health}", timeout, {name: (proc, log)})
        yield proc


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mlflow server`` as ``make server`` starts it: sqlite backend, artifacts proxied (``--serve-artifacts``)
    from a folder only it knows.

    Clients get ``mlflow-artifacts:/`` locations and move every file over HTTP.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    # the command `make server` runs (flows/ui.py), on this test's store and port
    # PICKSTYLE_TEST_MLFLOW_BACKEND=postgresql://… runs the same tests on a PostgreSQL store (psycopg2-binary)
    backend = os.environ.get("PICKSTYLE_TEST_MLFLOW_BACKEND") or f"sqlite:///{root / 'mlflow.db'}"
    cmd = ui.commands(backend, root / "artifacts", 0, port, tracking_server=True)["mlflow"]
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    with started("mlflow server", cmd, log, child_env(), f"{url}/health", root, 120) as proc:
        yield Server(url, proc, log, root)


@pytest.fixture(scope="package")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``prefect server start`` with its own ``PREFECT_HOME`` (its sqlite database), no UI.

    ``extra`` holds the environment a client needs (``PREFECT_API_URL``, ``PREFECT_HOME``).
    """
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    # the scheduler's main loop every 5 s instead of 60 (a schedule added to a deployment waits for it)
    env = child_env(PREFECT_HOME=str(root / "home"), PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    log = root / "server.log"
    with started("prefect server", cmd, log, env, f"{url}/health", root, 180) as proc:
        yield Server(url, proc, log, root, {"PREFECT_API_URL": url, "PREFECT_HOME": str(root / "client")})


@pytest.fixture
def prefect_api(prefect_server: Server) -> Iterator[str]:
    """This process's flows report to :func:`prefect_server` (not an ephemeral or harness API)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        try:
            yield prefect_server.url
        finally:
            _drain_prefect()


def _drain_prefect() -> None:
    """Send this process's queued Prefect logs and events while the server still runs (as
    ``prefect_test_harness`` does): otherwise they are retried against a dead server at exit, for minutes."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for result in (APILogWorker.drain_all(), EventsWorker.drain_all()):
            if inspect.isawaitable(result):
                await result

    run_coro_as_sync(drain())
