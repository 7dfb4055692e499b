"""The ``retrain-style`` deployment on a process work pool: ``prefect deploy``, a ``prefect worker``, schedules.

In a git + DVC copy of the project (tiny settings, the committed backbone), against a real Prefect server and an
MLflow tracking server: ``prefect work-pool create --type process`` and ``prefect deploy --name retrain-style`` (the
project's ``prefect.yaml``). Then a run scheduled a few seconds ahead (``prefect deployment run --start-in``) is
picked up when due by ``prefect worker start --pool pickstyle``, runs the whole pipeline as ``dvc exp run --temp``
and registers ``pickstyle-sepia`` in MLflow; and the server's scheduler turns a deployment schedule into runs.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, Server, child_env, tree, wait_for
from tests.procs import run_group
from tests.projects import small_project

POOL = "pickstyle"  # prefect.yaml's work pool
DEPLOYMENT = "retrain-style/retrain-style"
MODEL = "pickstyle-sepia"  # what the scheduled run retrains

pytestmark = pytest.mark.slow  # servers, a deployment, a retrain


def _prefect(*args: str, cwd: Path, env: dict[str, str]) -> str:
    done = run_group([str(BIN / "prefect"), "--no-prompt", *args], timeout=180, cwd=cwd, env=env)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def deployed(
    tmp_path_factory: pytest.TempPathFactory, prefect_server: Server, mlflow_server: Server
) -> Iterator[dict]:
    """The project copy, its work pool and ``prefect deploy --name retrain-style``: the deployment, the copy and
    the environment the worker and the CLI get (the Prefect and MLflow servers)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("worker")
    work = small_project(root / "repo", child_env(), train={"steps": 3})
    env = child_env(**prefect_server.extra, MLFLOW_TRACKING_URI=mlflow_server.url)
    _prefect("work-pool", "create", POOL, "--type", "process", cwd=work, env=env)
    _prefect("deploy", "--name", "retrain-style", cwd=work, env=env)
    with (
        temporary_settings(updates={PREFECT_API_URL: prefect_server.url}),
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    yield {"root": root, "work": work, "env": env, "deployment": deployment}


def _runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def test_prefect_deploy_makes_the_deployment_of_prefect_yaml(deployed: dict) -> None:
    deployment = deployed["deployment"]
    assert deployment.work_pool_name == POOL and deployment.entrypoint == "flows/retrain.py:retrain_style"
    assert deployment.parameters["style"] == "anime" and deployment.parameters["steps"] is None
    # prefect.yaml's two weekly crons arrive paused, with their own parameters
    crons = {s.schedule.cron: (s.active, s.parameters) for s in deployment.schedules}
    assert crons == {"0 3 * * 1": (False, {"style": "anime"}), "0 3 * * 4": (False, {"style": "sketch"})}
    assert deployment.global_concurrency_limit.limit == 1


def test_a_run_scheduled_ahead_is_retrained_by_the_worker_and_registered(
    deployed: dict, prefect_server: Server, prefect_api: str, mlflow_server: Server
) -> None:
    from mlflow import MlflowClient

    root, work, deployment = deployed["root"], deployed["work"], deployed["deployment"]
    # the worker polls every 2 s and takes a run only once it is due (no prefetch)
    env = {**deployed["env"], "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
    out = _prefect(
        "deployment", "run", DEPLOYMENT, "--start-in", "in 10 seconds", "-p", "style=sepia", "-p", "steps=2",
        cwd=work, env=env,
    )  # fmt: skip
    log = root / "worker.log"
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--limit", "1"]
    with log.open("w") as sink, tree(cmd, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT) as worker:
        procs = {"worker": (worker, log), "prefect server": (prefect_server.proc, prefect_server.log)}

        def finished() -> bool:
            return any(r.state is not None and r.state.is_final() for r in _runs(deployment.id))

        started = time.monotonic()
        wait_for(finished, "the scheduled retrain", 420, procs, every=2)
        elapsed = time.monotonic() - started
        worker_log = log.read_text(errors="replace")
    (run,) = [r for r in _runs(deployment.id) if r.state.is_final()]
    assert run.state.is_completed(), f"{run.state}\n{out}\n{worker_log[-12000:]}"
    # the worker of the pool ran it, not before it was due
    assert run.work_pool_name == POOL and f"submitting flow run '{run.id}'" in worker_log, worker_log[:2000]
    assert run.start_time >= run.expected_start_time, (run.start_time, run.expected_start_time)
    assert run.parameters == {**deployment.parameters, "style": "sepia", "steps": 2}

    # the retrain registered its adapter in the tracking server, tagged with this flow run
    client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.tags["prefect_parent_flow_run_id"] == str(run.id), version.tags
    assert version.tags["dvc_exp_name"].startswith("retrain-sepia-")
    assert version.source.startswith("mlflow-artifacts:/"), version.source
    (train,) = client.search_runs(
        [client.get_experiment_by_name("pickstyle-train").experiment_id],
        f"tags.dvc_exp_name = '{version.tags['dvc_exp_name']}'",
    )
    assert train.data.params["train.steps"] == "2" and train.data.params["style"] == "sepia"
    assert not (work / "mlflow.db").exists() and not (work / "models" / "adapter").exists()
    print(f"scheduled retrain: {elapsed:.0f} s from the worker's start")


def test_the_server_scheduler_turns_a_schedule_into_runs(deployed: dict, prefect_api: str) -> None:
    """An interval schedule added to the deployment: the server's scheduler service makes its runs (due from
    tomorrow, so no worker takes them)."""
    deployment = deployed["deployment"]
    anchor = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    _prefect(
        "deployment", "schedule", "create", DEPLOYMENT, "--interval", "86400", "--anchor-date", anchor.isoformat(),
        cwd=deployed["work"], env=deployed["env"],
    )  # fmt: skip

    def made() -> list:
        return [r for r in _runs(deployment.id) if r.auto_scheduled]

    deadline = time.monotonic() + 10  # the test server's scheduler loops every 5 s
    while not made() and time.monotonic() < deadline:
        time.sleep(1)
    runs = made()
    assert runs, "the scheduler made no run from the schedule (see the Prefect server's log)"
    assert min(r.expected_start_time for r in runs) == anchor
    assert all(r.state.is_scheduled() for r in runs)
