"""Where MLflow lives and what every run carries: the tracking store, experiments, provenance, run names.

MLflow 3 rejects the file store, and a relative sqlite path would follow the working directory, so the tracking
URI is always ``sqlite:///<absolute path>`` and experiments get an absolute artifact location (docs/method.md §3).
Registering and loading models is :mod:`pickstyle.register`; serving is :mod:`pickstyle.serving`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

import pickstyle
from pickstyle.config import Params, Paths

#: Environment overrides of the tracking URI, first match wins.
URI_ENV = ("PICKSTYLE_MLFLOW_URI", "MLFLOW_TRACKING_URI")
#: Environment override of the artifact root used when an experiment is created.
ARTIFACTS_ENV = "PICKSTYLE_MLFLOW_ARTIFACTS"
#: Set by the retrain-style flow for its stages: the style being retrained (names and labels the training run).
STYLE_ENV = "PICKSTYLE_STYLE"


# --- where MLflow lives ----------------------------------------------------------------------------------------


def _anchor() -> Path:
    """Folder that relative MLflow paths resolve against.

    The working directory, except inside a DVC experiment executor (``dvc exp run --temp``/``--queue``, which
    sets ``DVC_EXP_NAME`` and points ``DVC_ROOT`` at the parent repository): its working directory is a temporary
    copy that is deleted afterwards, so runs and registered versions would vanish with it.
    """
    root = os.environ.get("DVC_ROOT")
    if os.environ.get("DVC_EXP_NAME") and root and Path(root).is_dir():
        return Path(root).resolve()
    return Path.cwd()


def tracking_uri(params: Params | None = None) -> str:
    """The MLflow tracking (and registry) URI: ``sqlite:///<absolute path of paths.mlflow_db>``.

    ``PICKSTYLE_MLFLOW_URI`` or ``MLFLOW_TRACKING_URI`` (e.g. ``http://mlflow:5000``) win when set.
    """
    for key in URI_ENV:
        if os.environ.get(key):
            return os.environ[key]
    paths = params.paths if params is not None else Paths()
    db = Path(paths.mlflow_db)
    db = db if db.is_absolute() else _anchor() / db
    return f"sqlite:///{db.resolve()}"


def artifact_root(params: Params | None = None) -> Path:
    """Absolute artifact root for new experiments (``PICKSTYLE_MLFLOW_ARTIFACTS``, else ``paths.mlflow_artifacts``).

    With a sqlite URI from the environment, a relative ``mlflow_artifacts`` sits beside that database, so
    artifacts and runs stay together.
    """
    if os.environ.get(ARTIFACTS_ENV):
        return Path(os.environ[ARTIFACTS_ENV]).resolve()
    paths = params.paths if params is not None else Paths()
    root = Path(paths.mlflow_artifacts)
    if root.is_absolute():
        return root
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///") and any(os.environ.get(k) for k in URI_ENV):
        return (Path(uri.removeprefix("sqlite:///")).parent / root).resolve()
    return (_anchor() / root).resolve()


def use_tracking(params: Params | None = None) -> str:
    """Point the MLflow fluent API (tracking and registry) at :func:`tracking_uri`; returns the URI."""
    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which tracking_uri() would then read back as a
    # user override (a later call with other params, child processes): put the environment back as it was.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


def ensure_experiment(params: Params | None, name: str) -> str:
    """The id of experiment ``name``, created with an absolute artifact location if missing."""
    use_tracking(params)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = tracking_uri(params)
    if uri.startswith(("http://", "https://")):
        return mlflow.create_experiment(name)  # a tracking server decides where artifacts go
    root = artifact_root(params)
    root.mkdir(parents=True, exist_ok=True)
    try:
        return mlflow.create_experiment(name, artifact_location=root.as_uri())
    except MlflowException:  # created concurrently by another stage
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# --- provenance ------------------------------------------------------------------------------------------------


def git_revision(cwd: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` (``None`` outside a repository, without git, or before the first commit)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def provenance_tags(params: Params, flow_run_id: str | None = None) -> dict[str, str]:
    """Tags every run and version carries: git revision, DVC experiment, params hash, Prefect flow run."""
    tags = {
        "git_revision": git_revision() or "unknown",
        "params_hash": params.section_hash(),
        "profile": params.profile,
        "pickstyle_version": pickstyle.__version__,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if flow_run_id:
        tags["prefect_flow_run_id"] = str(flow_run_id)
    if os.environ.get("PICKSTYLE_PARENT_FLOW_RUN_ID"):  # set by the retrain-style flow for its stages
        tags["prefect_parent_flow_run_id"] = os.environ["PICKSTYLE_PARENT_FLOW_RUN_ID"]
    return tags


def style_of(params: Params) -> str:
    """The style an adapter learns: the retrain flow's ``style``, else ``pairs.styles`` joined by ``+`` (built-in
    pairs), else the pairs source (an importer reads every style under its folder)."""
    if os.environ.get(STYLE_ENV):
        return os.environ[STYLE_ENV]
    if params.pairs.source == "builtin":
        return "+".join(params.pairs.styles)
    return params.pairs.source


def run_name(stage: str, params: Params, style: str | None = None) -> str:
    """``<stage>-<style>-<experiment>``: the DVC experiment (``DVC_EXP_NAME``), or ``workspace`` outside one.

    Many styles at once read ``<n>-styles`` (the full list is the run's ``style`` parameter). ``style`` names
    the one style of a per-style adapter's run.
    """
    if style is not None:
        return f"{stage}-{style}-{os.environ.get('DVC_EXP_NAME') or 'workspace'}"
    style = style_of(params)
    if len(style) > 40 and not os.environ.get(STYLE_ENV):
        style = f"{len(params.pairs.styles)}-styles"
    return f"{stage}-{style}-{os.environ.get('DVC_EXP_NAME') or 'workspace'}"


# --- the training run ------------------------------------------------------------------------------------------


def mlflow_setup(params: Params, experiment: str | None = None) -> str:
    """Point MLflow at the project's tracking store and make sure the experiment exists; returns its id.

    The store is ``sqlite:///<absolute paths.mlflow_db>`` and a new experiment gets the absolute artifact root
    ``paths.mlflow_artifacts`` (MLflow 3 rejects the file store; relative paths would follow the working
    directory, docs/method.md §3).
    """
    return ensure_experiment(params, experiment or params.train.experiment)


def flat_params(params: Params) -> dict[str, Any]:
    out = {f"train.{k}": v for k, v in params.train.model_dump(mode="json").items()}
    out.update(
        {
            "profile": params.profile,
            "seed": params.seed,
            "backbone": params.active.backbone,
            "frames": params.active.frames,
            "height": params.active.height,
            "width": params.active.width,
            "lora_rank": params.lora_rank,
            "lora_alpha": params.lora_alpha,
        }
    )
    return out


@contextlib.contextmanager
def train_run(
    params: Params, run_id: str | None, enabled: bool = True, style: str | None = None
) -> Iterator[str | None]:
    """The training run, started (or, when resuming, re-opened), yielding its id (``None`` when not
    ``enabled``: MLflow off, or not the main process). It ends ``FINISHED`` when the block completes and
    ``FAILED`` when it raises (a kill ends it never; the resumed run re-opens it). ``style``: the one style of
    a per-style adapter (its run's name and ``style`` tag)."""
    if not enabled:
        yield None
        return
    experiment_id = mlflow_setup(params)
    run = None
    if run_id is not None:
        try:
            run = mlflow.start_run(run_id=run_id)
        except MlflowException:
            run = None  # the checkpoint came from another tracking store: start a new run
    if run is None:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name("train", params, style))
        mlflow.log_params({**flat_params(params), "style": style or style_of(params)})
        mlflow.set_tags({"stage": "train", "style": style or style_of(params), **provenance_tags(params)})
    try:
        yield run.info.run_id
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")
