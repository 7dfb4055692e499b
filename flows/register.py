"""Stage ``register``: register the adapter in MLflow (``@challenger``, gated ``@champion``). ``python -m flows.register``."""

from __future__ import annotations

import sys

from prefect import flow, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import stage_params
from pickstyle.config import Params
from pickstyle.register import register


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_task(params: Params, flow_run_id: str | None) -> dict:
    # MLflow I/O (sqlite or a tracking server): retried. A retry never duplicates a version (adapter sha256).
    return register(params, flow_run_id=flow_run_id)


def registration_markdown(summary: dict) -> str:
    gate = summary.get("gate") or {}
    if summary.get("version") is None:
        return f"# Not registered: `{summary['name']}`\n\n{summary['reason']}."
    lines = [
        f"# Registered `{summary['name']}` version {summary['version']}",
        "",
        "| key | value |",
        "|---|---|",
        f"| new version | {summary['created']} |",
        f"| aliases of this version | {', '.join(summary['aliases']) or '-'} |",
        f"| @champion | {summary['champion']} |",
        f"| @challenger | {summary['challenger']} |",
        f"| adapter sha256 | `{summary['adapter_sha256'][:16]}…` |",
    ]
    if gate:
        lines += [
            f"| gate metric | {gate['metric']} ({'higher' if gate['higher_is_better'] else 'lower'} is better) |",
            f"| this version | {gate['value']} |",
            f"| champion before | {gate['champion_value']} (version {gate['champion_version']}) |",
            f"| margin | {gate['margin']} |",
            f"| promoted | {gate['passed']} |",
        ]
    else:
        lines += ["", "The same adapter was registered before: no new version."]
    lines += ["", f'Load it: `mlflow.pyfunc.load_model("models:/{summary["name"]}@champion")`']
    return "\n".join(lines)


@flow(name="register", log_prints=True)
def register_flow(params: Params) -> dict:
    summary = register_task(params, runtime.flow_run.id)
    create_markdown_artifact(
        key="register-summary", markdown=registration_markdown(summary), description="MLflow registration"
    )
    if summary["version"] is None:
        print(f"{summary['name']}: not registered ({summary['reason']})")
    else:
        print(f"{summary['name']} version {summary['version']}: aliases {summary['aliases']}")
    return summary


if __name__ == "__main__":
    params, _ = stage_params(sys.argv[1:], __doc__)
    register_flow(params)
