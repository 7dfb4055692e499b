"""Stage ``clips``: synthetic camera-motion clips + held-out test clips. ``python -m flows.clips``.

Rendering is spread with Prefect task mapping: one task per shard-sized chunk, on a ``ThreadPoolTaskRunner``
(``clips.task_runner: thread``, ``clips.workers`` threads) or a ``DaskTaskRunner`` (``dask``: a local cluster of
``clips.workers`` single-threaded worker processes, or the cluster at ``clips.dask_address``; its workers must
see the same filesystem, since each chunk writes its own shard).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import gif_artifact, stage_params, summary_artifact
from pickstyle.config import Clips, Params
from pickstyle.data.clips import build_clips
from pickstyle.progress import progress


def make_task_runner(cfg: Clips):
    """The task runner ``clips.task_runner`` asks for."""
    if cfg.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        # one thread per worker process: rendering is CPU-bound and x264 is pinned to one thread
        kwargs = {
            "n_workers": cfg.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
        return DaskTaskRunner(cluster_kwargs=kwargs)
    return ThreadPoolTaskRunner(max_workers=cfg.workers)


@flow(name="clips-render", log_prints=True, validate_parameters=False)
def render_flow(fn: Callable[[dict], dict], jobs: list[dict]) -> list[dict]:
    """Map ``fn`` over ``jobs`` on this flow's task runner; results in job order."""
    render = task(fn, name="render-chunk", cache_policy=NO_CACHE)
    futures = render.map(jobs)
    for _ in progress(as_completed(list(futures)), total=len(jobs), desc="clips", unit="shard"):
        pass
    return futures.result()


def prefect_map(cfg: Clips) -> Callable[[Callable[[dict], dict], list[dict]], list[dict]]:
    """A ``map_fn`` for :func:`build_clips` that runs the chunks as mapped Prefect tasks."""

    def map_fn(fn: Callable[[dict], dict], jobs: list[dict]) -> list[dict]:
        return render_flow.with_options(task_runner=make_task_runner(cfg))(fn, jobs)

    return map_fn


@flow(name="clips", log_prints=True)
def clips_flow(params: Params) -> dict:
    summary = build_clips(params, map_fn=prefect_map(params.clips))
    summary_artifact("clips-summary", "Camera-motion clips and test clips", summary)
    if summary.get("preview"):
        gif_artifact(
            "clips-preview",
            "Clips preview",
            "Each row: source | style clip (same camera motion).",
            Path(summary["out_dir"]) / summary["preview"],
        )
    return summary


if __name__ == "__main__":
    params, _ = stage_params(sys.argv[1:], __doc__)
    clips_flow(params)
