"""The ``register`` stage and the model registry: registering adapters, ``@challenger`` / ``@champion``, loading.

The serving contract is ``models:/<name>@champion``: an MLflow pyfunc model (:mod:`pickstyle.serving`) whose
artifacts are the adapter, the resolved params and, for the tiny profile, the whole backbone folder (real
profiles record the backbone's path and fingerprint instead of copying tens of GB). Every new version gets
``@challenger``; ``@champion`` moves only when the evaluation gate passes (``register.gate_metric`` compared
with the current champion's value, ``register.gate_margin``). The same adapter (same sha256) is registered once,
and only from an evaluation of the test clips (``<eval>/evaluation.json``; validation runs are for tuning).

Where MLflow lives (the sqlite store, experiments, provenance tags) is :mod:`pickstyle.tracking`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import diffusers
import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import pickstyle
from pickstyle.config import Params, parse_params
from pickstyle.errors import PickstyleError
from pickstyle.files import write_json
from pickstyle.model.adapters import STYLES_NAME, WEIGHT_NAME, AdapterError, AdapterSet, adapter_sha256
from pickstyle.model.components import backbone_fingerprint, backbone_path, ensure_backbone, missing_files
from pickstyle.serving import input_example, model_signature
from pickstyle.tracking import ensure_experiment, provenance_tags, tracking_uri, use_tracking

CHALLENGER = "challenger"
CHAMPION = "champion"
#: Files of an adapter folder that make up the registered adapter (checkpoints and logs stay behind).
ADAPTER_FILES = (WEIGHT_NAME, "pickstyle_adapter.json")


class RegistryError(PickstyleError):
    """Registering or loading a model failed for a reason the user can fix (no adapter, unknown alias, ...)."""


def stage_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy the files that define an adapter (:data:`ADAPTER_FILES`) into ``out_dir``; of a per-style folder,
    its index and each style's adapter files, in the same layout."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    try:
        adapters = AdapterSet.open(adapter_dir)
    except AdapterError as err:
        raise RegistryError(f"no trained adapter: {err} (run the train stage)") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    if adapters.per_style:
        shutil.copy2(adapter_dir / STYLES_NAME, out_dir / STYLES_NAME)
    for folder in adapters.folders.values():
        dest = out_dir / folder.relative_to(adapter_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, dest / name)
    return out_dir


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def gate_passes(
    value: float | None, champion_value: float | None, higher_is_better: bool = True, margin: float = 0.0
) -> bool:
    """Does a challenger with ``value`` replace a champion with ``champion_value``?

    No (or NaN) challenger value -> no, whatever the champion: an unevaluated adapter never takes over;
    no champion value (it was never measured) -> yes; otherwise the challenger must be better by at least
    ``margin``. (With no champion at all the caller promotes the first version without asking.)
    """
    if value is None or not math.isfinite(value):
        return False
    if champion_value is None or not math.isfinite(champion_value):
        return True
    gain = value - champion_value if higher_is_better else champion_value - value
    return gain >= margin


def _read_metrics(params: Params) -> dict[str, float]:
    path = Path(params.paths.eval) / "metrics.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}


def _read_split(params: Params) -> str:
    """The split ``<eval>/metrics.json`` was measured on, from ``evaluation.json`` beside it (written by
    :func:`pickstyle.evaluate.evaluate`, a DVC output of the evaluate stage); ``test`` where there is none
    (metrics written by hand, or by a pickstyle older than the file)."""
    path = Path(params.paths.eval) / "evaluation.json"
    if not path.is_file():
        return "test"
    try:
        split = json.loads(path.read_text())["split"]
    except (ValueError, KeyError, TypeError) as err:
        raise RegistryError(f"{path}: not an evaluation record ({type(err).__name__}: {err})") from None
    return str(split)


def metrics_table(metrics: dict[str, float]) -> dict[str, list[Any]]:
    """``eval/metrics.json`` as one table: a row per ``<group>/<metric>`` with its value and standard error.

    ``cs_cfg/style_psnr`` and ``cs_cfg/style_psnr_se`` become the row (``cs_cfg``, ``style_psnr``, value, se);
    the columns are ``group``, ``metric``, ``value``, ``se`` (``None`` where no standard error was measured).
    """
    table: dict[str, list[Any]] = {"group": [], "metric": [], "value": [], "se": []}
    for key in sorted(metrics):
        if key.endswith("_se") and key.removesuffix("_se") in metrics:
            continue
        group, _, metric = key.rpartition("/")
        se = metrics.get(f"{key}_se")
        table["group"].append(group)
        table["metric"].append(metric)
        table["value"].append(metrics[key] if math.isfinite(metrics[key]) else None)
        table["se"].append(se if se is not None and math.isfinite(se) else None)
    return table


def metrics_markdown(table: dict[str, list[Any]], gate_metric: str) -> str:
    """The metrics table in markdown (the model version's description); the gate metric's row in bold."""
    lines = ["| group | metric | value | se |", "|---|---|---|---|"]
    for group, metric, value, se in zip(*table.values(), strict=True):
        cells = [group, metric, "" if value is None else f"{value:.4g}", "" if se is None else f"{se:.2g}"]
        if f"{group}/{metric}" == gate_metric:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow does not load the model in a subprocess to infer them.

    return [
        f"pickstyle=={pickstyle.__version__}",
        f"mlflow=={mlflow.__version__}",
        f"diffusers=={diffusers.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
    ]


def register(params: Params, flow_run_id: str | None = None) -> dict[str, Any]:
    """Register ``<models>/adapter`` as a new version of ``register.model_name`` (unless already registered).

    Sets ``@challenger`` on the new version and moves ``@champion`` when :func:`gate_passes` on
    ``register.gate_metric`` from ``<eval>/metrics.json`` (the first version always becomes champion). An
    adapter evaluated on another split than ``test`` (``evaluate.split: val``, for tuning) is not registered:
    its numbers are on other clips than every version's, and registering it would make the same adapter, once
    evaluated on the test clips, "registered before".

    Args:
        params: the project params.
        flow_run_id: the Prefect flow run that registers (a tag), if any.

    Returns:
        name, version, created (False when the adapter was registered before), promoted, champion, challenger,
        gate (metric, value, champion value, margin), adapter_sha256, run_id, model_uri; also written to
        ``<models>/registered.json``. Not registered (another split): name, version ``None``, created and
        promoted ``False``, split, adapter_sha256, reason.
    """
    cfg = params.register
    name = cfg.model_name
    adapter_dir = Path(params.paths.models) / "adapter"
    with tempfile.TemporaryDirectory(prefix="pickstyle-register-") as tmp:
        staged = stage_adapter(adapter_dir, Path(tmp) / "adapter")  # fails before MLflow is touched
        sha = AdapterSet.open(staged).sha256()
        split = _read_split(params)
        if split != "test":
            summary = {
                "name": name,
                "version": None,
                "created": False,
                "promoted": False,
                "split": split,
                "adapter_sha256": sha,
                "reason": f"evaluated on the {split} clips: only a test-split evaluation is registered",
            }
            write_json(Path(params.paths.models) / "registered.json", summary)
            return summary
        use_tracking(params)
        client = MlflowClient()
        try:
            client.create_registered_model(name, description="PickStyle context-style adapters (pickstyle)")
        except MlflowException as err:
            if "already exists" not in str(err).lower():
                raise
        known = client.search_model_versions(f"name='{name}' and tags.adapter_sha256='{sha}'")
        if known:
            version = min(known, key=lambda v: int(v.version))
            summary = _summary(client, name, version.version, created=False, promoted=False, sha=sha, gate={})
            write_json(Path(params.paths.models) / "registered.json", summary)
            return summary

        metrics = _read_metrics(params)
        value = metrics.get(cfg.gate_metric)
        champion = _alias_version(client, name, CHAMPION)
        champion_value = None
        if champion is not None:
            raw = champion.tags.get(f"eval.{cfg.gate_metric}")
            champion_value = float(raw) if raw not in (None, "") else None
        se = metrics.get(f"{cfg.gate_metric}_se")
        margin = max(
            cfg.gate_margin, cfg.gate_se_multiple * se if se is not None and math.isfinite(se) else 0.0
        )
        passed = champion is None or gate_passes(value, champion_value, cfg.higher_is_better, margin)
        gate = {
            "metric": cfg.gate_metric,
            "value": value,
            "champion_version": champion.version if champion is not None else None,
            "champion_value": champion_value,
            "higher_is_better": cfg.higher_is_better,
            "margin": margin,
            "standard_error": se,
            "passed": passed,
        }

        tags = provenance_tags(params, flow_run_id)
        tags["adapter_sha256"] = sha
        # Only the gate metric and its spread as tags: every metric is in the version's table artifact
        # (model/eval_metrics.json), its description (markdown) and the registration run's metrics.
        tags.update(
            {
                f"eval.{k}": repr(metrics[k])
                for k in (cfg.gate_metric, f"{cfg.gate_metric}_se")
                if k in metrics
            }
        )
        tags["gate_metric"] = cfg.gate_metric
        tags["gate_passed"] = str(passed).lower()
        artifacts = {"adapter": str(staged), "params": str(Path(tmp) / "params.json")}
        recorded = params
        if params.active.backbone == "tiny":
            # The register stage depends on models/backbone, so it is normally there; build it only if not.
            backbone = backbone_path(params)
            if missing_files(backbone):
                backbone = ensure_backbone(params)
            artifacts["backbone"] = str(backbone)
            tags["backbone_fingerprint"] = backbone_fingerprint(backbone)
        else:
            backbone = backbone_path(params).resolve()
            tags["backbone_path"] = str(backbone)
            tags["backbone_fingerprint"] = backbone_fingerprint(backbone)
            # the model must find the backbone from any working directory
            recorded = params.model_copy(
                update={"model": params.model.model_copy(update={"path": str(backbone)})}
            )
        write_json(Path(tmp) / "params.json", recorded.model_dump(mode="json"))

        experiment_id = ensure_experiment(params, cfg.experiment)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"register-{sha[:12]}", tags=tags) as run:
            mlflow.log_params(
                {
                    "profile": params.profile,
                    "backbone": params.active.backbone,
                    "frames": params.active.frames,
                    "height": params.active.height,
                    "width": params.active.width,
                    **{f"sample.{k}": v for k, v in params.sample.model_dump(mode="json").items()},
                }
            )
            mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
            table = metrics_table(metrics)
            if metrics:  # beside the MLmodel file, so the version's own artifacts carry it
                mlflow.log_table(table, artifact_file="model/eval_metrics.json")
            model_dir = Path(tmp) / "model"
            code = Path(tmp) / "pickstyle_model.py"
            code.write_text(
                '"""MLflow models-from-code entry: the PickStyle pyfunc."""\n'
                "import mlflow\n\nfrom pickstyle.serving import PickStyleModel\n\n"
                "mlflow.models.set_model(PickStyleModel())\n"
            )
            mlflow.pyfunc.save_model(
                model_dir,
                python_model=str(code),
                artifacts=artifacts,
                signature=model_signature(),
                input_example=input_example(),
                pip_requirements=_pip_requirements(),
                metadata={"adapter_sha256": sha, "profile": params.profile},
            )
            # save_model + log_artifacts (not log_model): log_model would load the pipeline and stylize the
            # input example to "validate" it (minutes on a real backbone, at every registration).
            mlflow.log_artifacts(str(model_dir), artifact_path="model")
            run_id = run.info.run_id
        description = (
            f"Evaluation on the test clips (`{params.paths.eval}/metrics.json`, gate `{cfg.gate_metric}` in "
            "bold):\n\n"
        )
        version = client.create_model_version(
            name,
            source=f"{client.get_run(run_id).info.artifact_uri}/model",
            run_id=run_id,
            tags=tags,
            description=description + metrics_markdown(table, cfg.gate_metric) if metrics else None,
        )
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        if passed:
            client.set_registered_model_alias(name, CHAMPION, version.version)
        summary = _summary(
            client, name, version.version, created=True, promoted=passed, sha=sha, gate=gate, run_id=run_id
        )
    # The register stage's DVC output: what was registered (the retrain flow and users read it).
    write_json(Path(params.paths.models) / "registered.json", summary)
    return summary


def _summary(
    client: MlflowClient,
    name: str,
    version: str | int,
    *,
    created: bool,
    promoted: bool,
    sha: str,
    gate: dict[str, Any],
    run_id: str | None = None,
) -> dict[str, Any]:
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    champion = aliases.get(CHAMPION)
    return {
        "name": name,
        "version": int(version),
        "created": created,
        "promoted": promoted,
        "champion": int(champion) if champion is not None else None,
        "challenger": int(aliases[CHALLENGER]) if CHALLENGER in aliases else None,
        "aliases": sorted(a for a, v in aliases.items() if int(v) == int(version)),
        "adapter_sha256": sha,
        "gate": gate,
        "run_id": run_id,
        "model_uri": f"models:/{name}/{version}",
        "tracking_uri": mlflow.get_tracking_uri(),
    }


def find_versions(params: Params | None, name: str, **tags: str) -> list[dict[str, Any]]:
    """Versions of ``name`` whose tags equal ``tags`` (e.g. ``dvc_exp_name=...``), newest first, with aliases."""
    use_tracking(params)
    client = MlflowClient()
    query = " and ".join([f"name='{name}'", *(f"tags.{k}='{v}'" for k, v in tags.items())])
    try:
        versions = client.search_model_versions(query)
    except MlflowException:
        return []
    aliases = client.get_registered_model(name).aliases if versions else {}
    out = []
    for v in sorted(versions, key=lambda v: -int(v.version)):
        out.append(
            {
                "name": name,
                "version": int(v.version),
                "aliases": sorted(a for a, n in aliases.items() if int(n) == int(v.version)),
                "tags": dict(v.tags),
            }
        )
    return out


# --- load ------------------------------------------------------------------------------------------------------


def load_registered(
    model_uri: str, params: Params | None = None, dst_path: str | Path | None = None
) -> dict[str, Any]:
    """Download a registered PickStyle model and say where its parts are.

    Args:
        model_uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or any MLflow model URI / local model folder.
        params: only for the tracking URI (default: ``PICKSTYLE_MLFLOW_URI``/``MLFLOW_TRACKING_URI`` or
            ``./mlflow.db``).
        dst_path: download here (default: MLflow's choice; a local artifact store is read in place).

    Returns:
        adapter_dir, backbone_dir (the copied tiny backbone, or the recorded path for real profiles), params (the
        registered params as a dict), sample (their sampling settings), model_dir, model_uri.
    """
    local = Path(model_uri)
    uri = tracking_uri(params)
    if (
        not local.is_dir()
        and uri.startswith("sqlite:///")
        and not Path(uri.removeprefix("sqlite:///")).is_file()
    ):
        raise RegistryError(
            f"{model_uri}: no MLflow database at {uri.removeprefix('sqlite:///')} (run from the project folder, "
            "or set PICKSTYLE_MLFLOW_URI)"
        )
    use_tracking(params)
    try:
        model_dir = (
            local
            if local.is_dir()
            else Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=str(dst_path) if dst_path else None
                )
            )
        )
    except MlflowException as err:
        raise RegistryError(f"{model_uri}: cannot load the registered model ({err.message})") from None
    conf = mlflow.models.Model.load(model_dir / "MLmodel").flavors.get("python_function", {})
    artifacts = {k: model_dir / v["path"] for k, v in (conf.get("artifacts") or {}).items()}
    if "adapter" not in artifacts or "params" not in artifacts:
        raise RegistryError(f"{model_uri}: not a PickStyle model (no adapter/params artifacts)")
    registered = json.loads(artifacts["params"].read_text())
    backbone = artifacts.get("backbone")
    if backbone is None:
        backbone = backbone_path(parse_params(registered, "registered params"))
    return {
        "adapter_dir": str(artifacts["adapter"]),
        "backbone_dir": str(backbone),
        "params": registered,
        "sample": registered.get("sample", {}),
        "model_dir": str(model_dir),
        "model_uri": model_uri,
    }


__all__ = [
    "RegistryError",
    "adapter_sha256",
    "find_versions",
    "gate_passes",
    "load_registered",
    "metrics_markdown",
    "metrics_table",
    "register",
]
