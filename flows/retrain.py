"""The ``retrain-style`` deployment: retrain the adapter for one style with ``dvc exp run -S …`` and register it.

The whole pipeline runs as a DVC experiment (``--temp`` by default: in a temporary copy, so the workspace is
untouched and the result is an experiment ref, ``dvc exp show`` / ``dvc exp apply <name>``). Its ``register``
stage registers the adapter as ``<register.model_name>-<style>`` — one registered model per style, so styles do
not compete for ``@champion`` — in the workspace's MLflow (the tracking URI is passed down absolute).

Run it::

    python -m flows.retrain run --style sketch --steps 100 -S train.lr=3e-4   # once, now
    python -m flows.retrain serve       # deployment "retrain-style/served", cron schedules from params.retrain.schedules
    prefect deploy --name retrain-style # or: "retrain-style/retrain-style" of prefect.yaml, for a work pool + worker

The two ways of serving use two deployment names, so neither overwrites the other's schedules and parameters.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.schedules import Cron

from pickstyle.config import Params, load_params, parse_overrides
from pickstyle.register import find_versions
from pickstyle.tracking import STYLE_ENV, artifact_root, tracking_uri

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The flow's name, and the deployment of ``prefect.yaml`` (``prefect deploy --name retrain-style``, a work pool).
DEPLOYMENT = "retrain-style"
#: The deployment ``python -m flows.retrain serve`` makes (schedules from ``params.yaml``, served by that process).
SERVED_DEPLOYMENT = "served"


def slug(text: str) -> str:
    """Lower-case letters, digits and dashes (DVC experiment names and MLflow model names accept these)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "style"


def hydra_value(value: Any) -> str:
    """A value in Hydra's override grammar (what ``dvc exp run -S`` parses); strings are always quoted.

    Quoting matters: an unquoted ``a,b`` would be a *sweep* (several experiments), and paths may hold spaces.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def model_name_for(base: str, style: str) -> str:
    return f"{base}-{slug(style)}"


def build_exp_command(
    style: str,
    *,
    pairs_source: str = "builtin",
    pairs_root: str | None = None,
    steps: int | None = None,
    model_name: str,
    exp_name: str,
    overrides: Sequence[str] = (),
    temp: bool = True,
    dvc: Sequence[str] = ("dvc",),
) -> list[str]:
    """The ``dvc exp run`` command that retrains ``style`` (a pure function: nothing runs).

    Args:
        style: the style to train; for the built-in source it selects ``pairs.styles``, for the importers (which
            read every pair under ``pairs_root``) it only names the experiment and the registered model.
        pairs_source: ``pairs.source`` (builtin, omniconsistency, pickstyle_v1, manifest).
        pairs_root: ``pairs.root``: the folder/manifest of an importer.
        steps: ``train.steps`` (``None`` = params.yaml's).
        model_name: ``register.model_name`` of the result.
        exp_name: the DVC experiment name (``-n``).
        overrides: extra ``key=value`` params (``train.lr=3e-4``); values are passed through as written.
        temp: run in a temporary copy (``--temp``) instead of the workspace.
        dvc: how to call DVC (the flow uses ``python -m dvc`` of its own interpreter).

    Returns:
        The argv list.
    """
    sets: dict[str, str] = {"pairs.source": hydra_value(pairs_source)}
    if pairs_source == "builtin":
        sets["pairs.styles"] = hydra_value([style])
    if pairs_root is not None:
        sets["pairs.root"] = hydra_value(pairs_root)
    if steps is not None:
        sets["train.steps"] = hydra_value(int(steps))
    sets["register.model_name"] = hydra_value(model_name)
    cmd = [*dvc, "exp", "run", "-n", exp_name]
    if temp:
        cmd.append("--temp")
    # "++" = set, or add when params.yaml lacks the key (Hydra's force-add).
    for key, value in sets.items():
        cmd += ["-S", f"++{key}={value}"]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        cmd += ["-S", item if key.startswith("+") else f"++{key}={value}"]
    return cmd


def exp_name_for(style: str, now: float | None = None) -> str:
    """``retrain-<style>-<UTC yyyymmdd-hhmmss>`` (unique per run, sortable)."""
    return f"retrain-{slug(style)}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def params_at(params: Params, root: Path) -> Params:
    """``params`` with the MLflow paths made absolute against ``root`` (the flow may run from anywhere)."""
    paths = params.paths.model_copy(
        update={
            "mlflow_db": str((root / params.paths.mlflow_db).resolve()),
            "mlflow_artifacts": str((root / params.paths.mlflow_artifacts).resolve()),
        }
    )
    return params.model_copy(update={"paths": paths})


def child_env(params: Params, base: dict[str, str] | None = None) -> dict[str, str]:
    """The experiment's environment: the workspace's absolute MLflow location, and this interpreter first on PATH.

    ``dvc exp run --temp`` runs the stages in a temporary copy; pinning the tracking URI and artifact root makes
    their runs and the registered version land in the workspace's MLflow.
    """
    env = dict(os.environ if base is None else base)
    env["PICKSTYLE_MLFLOW_URI"] = tracking_uri(params)
    env["PICKSTYLE_MLFLOW_ARTIFACTS"] = str(artifact_root(params))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@task(cache_policy=NO_CACHE)
def run_experiment(cmd: list[str], cwd: str, env: dict[str, str]) -> str:
    """Run ``dvc exp run`` and stream its output to the flow log; returns the last lines."""
    logger = get_run_logger()
    logger.info("running: %s", " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-40:]
            logger.info(line)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"dvc exp run failed (exit {code}):\n" + "\n".join(tail))
    return "\n".join(tail)


@task(retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def registered_version(params: Params, model_name: str, exp_name: str) -> dict[str, Any] | None:
    """The version the experiment registered (tag ``dvc_exp_name``), or ``None`` if the adapter was known."""
    hits = find_versions(params, model_name, dvc_exp_name=exp_name)
    return hits[0] if hits else None


@flow(name=DEPLOYMENT, log_prints=True)
def retrain_style(
    style: str,
    pairs_source: str = "builtin",
    pairs_root: str | None = None,
    steps: int | None = None,
    overrides: list[str] | None = None,
    model_name: str | None = None,
    temp: bool = True,
    repo: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Retrain the context-style adapter for ``style`` as a DVC experiment and register the result.

    Args:
        style: style name (a built-in style, or the name for an imported pairs folder).
        pairs_source: ``builtin`` or an importer (``omniconsistency``, ``pickstyle_v1``, ``manifest``).
        pairs_root: folder or manifest of the pairs for an importer.
        steps: training steps (default: params.yaml's ``train.steps``).
        overrides: extra ``key=value`` params, e.g. ``["train.lr=3e-4", "clips.variants=2"]``.
        model_name: registered model name (default ``<register.model_name>-<style>``).
        temp: run in a temporary copy of the repo (``--temp``); False runs in the workspace.
        repo: the pickstyle repository (default: the one this file is in).
        dry_run: only build and return the command.
    """
    root = Path(repo) if repo else REPO_ROOT
    params = load_params(root / "params.yaml")
    name = model_name or model_name_for(params.register.model_name, style)
    exp = exp_name_for(style)
    cmd = build_exp_command(
        style,
        pairs_source=pairs_source,
        pairs_root=pairs_root,
        steps=steps,
        model_name=name,
        exp_name=exp,
        overrides=overrides or [],
        temp=temp,
        dvc=(sys.executable, "-m", "dvc"),
    )
    result: dict[str, Any] = {"style": style, "experiment": exp, "model_name": name, "command": cmd}
    if dry_run:
        return result
    env = child_env(params_at(params, root))
    # The stage flows run in their own processes; this tags the registered version with the retrain run too.
    env["PICKSTYLE_PARENT_FLOW_RUN_ID"] = str(runtime.flow_run.id or "")
    env[STYLE_ENV] = style  # names the training run "train-<style>-<experiment>" and logs the style
    run_experiment(cmd, str(root), env)
    version = registered_version(params_at(params, root), name, exp)
    result["registered"] = version
    result["tracking_uri"] = env["PICKSTYLE_MLFLOW_URI"]
    split = str(parse_overrides(overrides or []).get("evaluate.split", params.evaluate.split))
    if version is None and split != "test":
        note = f"not registered: evaluated on the {split} clips (only a test-split evaluation is registered)"
    elif version is None:
        note = "no new version: this adapter was registered before (same sha256)"
    else:
        note = f"version {version['version']} (aliases: {', '.join(version['aliases']) or 'none'})"
    md = (
        f"# Retrained `{style}`\n\n| key | value |\n|---|---|\n| DVC experiment | `{exp}` |\n"
        f"| registered model | `{name}` |\n| result | {note} |\n\n"
        f"Command: `{' '.join(cmd[1:])}`\n\nApply it to the workspace: `dvc exp apply {exp}`; serve the champion: "
        f"`models:/{name}@champion`.\n"
    )
    create_markdown_artifact(key=f"retrain-{slug(style)}", markdown=md, description=f"retrain {style}")
    print(f"experiment {exp}: {name} {note}")
    return result


def schedules_from_params(params: Params) -> list[Any]:
    """One cron schedule per style in ``retrain.schedules`` (``{style: "0 3 * * 1"}``), with that style as parameter."""

    return [
        Cron(cron, timezone="UTC", parameters={"style": style}, slug=f"retrain-{slug(style)}")
        for style, cron in sorted(params.retrain.schedules.items())
    ]


def serve(params: Params) -> None:
    """Serve ``retrain-style/served`` from this process (schedules from ``retrain.schedules``, one run at a time)."""
    retrain_style.serve(
        name=SERVED_DEPLOYMENT,
        schedules=schedules_from_params(params),
        global_limit=1,  # retraining runs are heavy and share the workspace's MLflow: never two at once
        limit=1,
        tags=["pickstyle", "retrain"],
        description="Retrain the context-style adapter for one style (dvc exp run) and register it in MLflow.",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve", help="serve the retrain-style/served deployment with the cron schedules of retrain.schedules"
    )
    run = sub.add_parser("run", help="retrain one style now")
    run.add_argument("--style", required=True)
    run.add_argument("--pairs-source", default="builtin")
    run.add_argument("--pairs-root", default=None)
    run.add_argument("--steps", type=int, default=None)
    run.add_argument("--model-name", default=None)
    run.add_argument(
        "--no-temp", action="store_true", help="run in the workspace instead of a temporary copy"
    )
    run.add_argument("--dry-run", action="store_true", help="print the dvc command only")
    run.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(load_params(args.params))
        return
    kwargs = {
        "style": args.style,
        "pairs_source": args.pairs_source,
        "pairs_root": args.pairs_root,
        "steps": args.steps,
        "overrides": args.set,
        "model_name": args.model_name,
        "temp": not args.no_temp,
        "repo": str(Path(args.params).resolve().parent),
        "dry_run": args.dry_run,
    }
    if args.dry_run:
        print(" ".join(retrain_style.fn(**kwargs)["command"]))
        return
    print(retrain_style(**kwargs))


if __name__ == "__main__":
    main()
