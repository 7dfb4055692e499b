"""The clips stage on a Dask cluster of separate processes: ``dask scheduler`` + two ``dask worker`` commands.

The flow connects to the scheduler's address (``clips.dask_address``), the two workers render the chunks, and
the shards are byte-identical to the thread runner's.
"""

from __future__ import annotations

import socket
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from pickstyle.config import Params
from tests.data.test_clips import make_pairs, make_params
from tests.integration.conftest import BIN, Server, child_env, free_port, tail, wait_for
from tests.procs import group


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _shards(data: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(data.glob("*clips/*.tar"))}


def _with_data(params: Params, data: Path) -> Params:
    return params.model_copy(update={"paths": params.paths.model_copy(update={"data": str(data)})})


@pytest.mark.slow
def test_clips_on_a_scheduler_and_two_worker_processes(
    tmp_path: Path, prefect_server: Server, prefect_api: str
) -> None:
    from distributed import Client

    from flows.clips import clips_flow

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # the workers' task runs report to the same Prefect API as the flow
    env = child_env(**prefect_server.extra)
    with ExitStack() as stack:
        procs = {}
        log = tmp_path / "scheduler.log"
        cmd = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
        sink = stack.enter_context(log.open("w"))
        procs["scheduler"] = (
            stack.enter_context(group(cmd, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)),
            log,
        )
        wait_for(lambda: _listening(port), "dask scheduler", 90, procs)
        for name in ("worker-a", "worker-b"):
            log = tmp_path / f"{name}.log"
            cmd = [str(BIN / "dask"), "worker", address, "--name", name, "--nthreads", "1", "--no-dashboard"]
            cmd += ["--local-directory", str(tmp_path / name)]
            sink = stack.enter_context(log.open("w"))
            procs[name] = (
                stack.enter_context(group(cmd, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT)),
                log,
            )
        client = stack.enter_context(Client(address, timeout=60))
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, "two dask workers", 120, procs)

        cluster_data, thread_data = tmp_path / "cluster", tmp_path / "thread"
        for data in (cluster_data, thread_data):
            make_pairs(data, n=3)
        # 3 pairs x 2 variants in shards of 2 + 2 test clips in shards of 2 + 1 val clip: 5 chunks for 2 workers
        params = make_params(cluster_data, variants=2, shard_size=2, task_runner="dask", dask_address=address)
        summary = clips_flow(params)

        def finished(dask_worker) -> list[str]:  # runs on each worker (a closure: pickled by value)
            return sorted({str(entry[0]) for entry in dask_worker.state.log if entry[2] == "memory"})

        rendered = client.run(finished)
        logs = "\n".join(f"--- {n}:\n{tail(log)}" for n, (_, log) in procs.items())

    assert summary["clips"] == 6 and summary["test_clips"] == 2 and summary["val_clips"] == 1, summary
    # both worker processes rendered chunks, and nothing else did (5 chunks in all)
    chunks = {
        addr: [k for k in keys if "render-chunk" in k or "render_chunk" in k]
        for addr, keys in rendered.items()
    }
    assert len(chunks) == 2 and all(chunks.values()), (rendered, logs)
    assert sum(len(keys) for keys in chunks.values()) == 5, (rendered, logs)

    thread = _with_data(params, thread_data).model_copy(
        update={"clips": params.clips.model_copy(update={"task_runner": "thread", "dask_address": None})}
    )
    clips_flow(thread)
    got, expected = _shards(cluster_data), _shards(thread_data)
    assert sorted(got) == sorted(expected) and len(got) == 5, sorted(got)
    for name, data in expected.items():
        assert got[name] == data, f"{name}: the cluster's shard differs from the thread runner's"
