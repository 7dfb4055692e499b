"""The retrain-style deployment: the dvc command it builds, its environment, prefect.yaml, schedules, a dry run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from flows import retrain
from pickstyle.config import parse_params
from tests.projects import small_project

ROOT = Path(__file__).resolve().parents[2]


def test_exp_command_for_a_builtin_style() -> None:
    cmd = retrain.build_exp_command(
        "sketch",
        steps=50,
        model_name="pickstyle-sketch",
        exp_name="retrain-sketch-1",
        overrides=["train.lr=3e-4"],
    )
    assert cmd == [
        "dvc", "exp", "run", "-n", "retrain-sketch-1", "--temp",
        "-S", "++pairs.source='builtin'",
        "-S", "++pairs.styles=['sketch']",
        "-S", "++train.steps=50",
        "-S", "++register.model_name='pickstyle-sketch'",
        "-S", "++train.lr=3e-4",
    ]  # fmt: skip


def test_exp_command_for_an_imported_folder() -> None:
    cmd = retrain.build_exp_command(
        "LEGO",
        pairs_source="omniconsistency",
        pairs_root="/data/omni/LEGO pairs, v2",
        model_name="pickstyle-lego",
        exp_name="e",
        overrides=["+new.key=1"],
        temp=False,
        dvc=(sys.executable, "-m", "dvc"),
    )
    assert cmd[:3] == [sys.executable, "-m", "dvc"] and "--temp" not in cmd
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]
    # an importer reads every pair under its root: no style filter; the comma and space stay inside quotes
    assert not any(s.startswith("++pairs.styles") for s in sets)
    assert "++pairs.root='/data/omni/LEGO pairs, v2'" in sets
    assert "++train.steps" not in " ".join(sets)
    assert sets[-1] == "+new.key=1"  # explicit Hydra prefixes pass through
    with pytest.raises(ValueError, match="key=value"):
        retrain.build_exp_command("a", model_name="m", exp_name="e", overrides=["train.lr"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "null"),
        (True, "true"),
        (5, "5"),
        (0.5, "0.5"),
        ("it's", "'it\\'s'"),
        (["a", 1], "['a',1]"),
    ],
)
def test_hydra_value(value, expected) -> None:
    assert retrain.hydra_value(value) == expected


def test_names() -> None:
    assert retrain.model_name_for("pickstyle", "3D Chibi") == "pickstyle-3d-chibi"
    assert retrain.exp_name_for("Rick & Morty", now=0) == "retrain-rick-morty-19700101-000000"


def test_child_env_pins_the_workspace_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("PICKSTYLE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "PICKSTYLE_MLFLOW_ARTIFACTS"):
        monkeypatch.delenv(key, raising=False)
    params = retrain.params_at(parse_params({}), tmp_path)
    env = retrain.child_env(params, base={"PATH": "/usr/bin"})
    assert env["PICKSTYLE_MLFLOW_URI"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert env["PICKSTYLE_MLFLOW_ARTIFACTS"] == str(tmp_path.resolve() / "mlartifacts")
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_prefect_yaml_declares_the_deployment() -> None:
    data = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in data["deployments"] if d["name"] == retrain.DEPLOYMENT]
    assert dep["entrypoint"] == "flows/retrain.py:retrain_style"
    assert dep["concurrency_limit"]["limit"] == 1
    assert set(dep["parameters"]) <= set(retrain.retrain_style.parameters.properties)
    assert all(s["cron"] and s["parameters"]["style"] for s in dep["schedules"])
    # the entrypoint resolves to the flow of that name
    path, _, attr = dep["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and getattr(retrain, attr).name == retrain.DEPLOYMENT
    # and Prefect's own model of prefect.yaml accepts it
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(data)
    assert model.deployments[0].concurrency_limit.limit == 1


def test_schedules_from_params() -> None:
    params = parse_params({"retrain": {"schedules": {"sketch": "0 4 * * 2", "anime": "0 3 * * 1"}}})
    schedules = retrain.schedules_from_params(params)
    assert [s.parameters for s in schedules] == [{"style": "anime"}, {"style": "sketch"}]
    assert [s.cron for s in schedules] == ["0 3 * * 1", "0 4 * * 2"]
    assert retrain.schedules_from_params(parse_params({"retrain": {"schedules": {}}})) == []


def test_serve_uses_the_params_schedules_under_its_own_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` and ``prefect deploy`` make two deployments (neither overwrites the other); the shipped
    params.yaml schedules are the ones prefect.yaml declares (and the README shows)."""
    from pickstyle.config import load_params

    served = {}
    monkeypatch.setattr(retrain.retrain_style, "serve", lambda **kwargs: served.update(kwargs))
    params = load_params(ROOT / "params.yaml")
    retrain.serve(params)
    assert served["name"] == retrain.SERVED_DEPLOYMENT
    got = {s.parameters["style"]: s.cron for s in served["schedules"]}
    assert got == params.retrain.schedules and got

    data = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert retrain.SERVED_DEPLOYMENT not in [d["name"] for d in data["deployments"]]
    (dep,) = [d for d in data["deployments"] if d["name"] == retrain.DEPLOYMENT]
    assert {s["parameters"]["style"]: s["cron"] for s in dep["schedules"]} == params.retrain.schedules
    for style, cron in params.retrain.schedules.items():
        assert f'{style}: "{cron}"' in (ROOT / "README.md").read_text()


def test_run_experiment_streams_and_fails_loudly(tmp_path: Path) -> None:
    from prefect import flow

    @flow
    def run(code: str) -> str:
        return retrain.run_experiment([sys.executable, "-c", code], str(tmp_path), {})

    assert run("print('one'); print('two')").splitlines() == ["one", "two"]
    with pytest.raises(RuntimeError, match="exit 3"):
        run("import sys; print('boom'); sys.exit(3)")


def test_flow_dry_run(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("register: {model_name: ps}\n")
    out = retrain.retrain_style(style="watercolor", steps=7, repo=str(tmp_path), dry_run=True)
    assert out["model_name"] == "ps-watercolor" and out["experiment"].startswith("retrain-watercolor-")
    assert "++train.steps=7" in out["command"] and "--temp" in out["command"]


@pytest.mark.slow
def test_retrain_runs_a_real_dvc_experiment_and_registers(tmp_path: Path) -> None:
    """The deployment's flow end to end: a real ``dvc exp run --temp`` in a git + DVC copy of the project (tiny
    settings; the committed backbone, so ``pretrain`` is up to date), then the registered version it made."""
    import os
    import subprocess

    from mlflow.tracking import MlflowClient

    from pickstyle import tracking
    from pickstyle.config import load_params

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    work = small_project(tmp_path / "repo", env, variants=("identity", "base", "cs_cfg"))

    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    dvc = (sys.executable, "-m", "dvc")
    result = retrain.retrain_style(style="sepia", steps=3, repo=str(work))
    assert result["registered"] is not None, result
    assert str(result["registered"]["version"]) == "1" and "champion" in result["registered"]["aliases"]
    assert run(*dvc, "exp", "list", "--name-only").split() == [result["experiment"]]
    # the experiment left the workspace as it was, and registered into the workspace's MLflow store
    assert not (work / "models" / "adapter").exists()
    uri = tracking.tracking_uri(retrain.params_at(load_params(work / "params.yaml"), work))
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("pickstyle-sepia", "champion")
    assert version.tags["adapter_sha256"]
