"""The real DVC pipeline file: stages are wired to existing files, and a repeated ``dvc repro`` is a no-op."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["pairs", "clips", "backbone", "latents", "train", "evaluate", "register"]


def test_dvc_yaml_stages_deps_and_params_exist():
    from pickstyle.config import parse_params

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(spec["stages"]) == STAGES
    outs = set()
    defaults = parse_params({}).model_dump(mode="json")
    for name, stage in spec["stages"].items():
        assert stage["cmd"] == f"python -m flows.{name}"
        assert (ROOT / "flows" / f"{name}.py").is_file()
        for dep in stage["deps"]:
            assert (ROOT / dep).exists() or dep in outs, (
                f"{name}: dep {dep} is neither a file nor an earlier out"
            )
        for key in stage.get("params", []):
            node = defaults
            for part in key.split("."):
                assert part in node, f"{name}: param {key} is not in params.yaml"
                node = node[part]
        for out in stage.get("outs", []) + stage.get("metrics", []):
            outs.add(out if isinstance(out, str) else next(iter(out)))


@pytest.mark.slow
def test_second_repro_is_a_no_op(tmp_path: Path):
    """``dvc repro pairs`` in a fresh git + DVC copy runs the flow once, then skips it."""
    work = tmp_path / "repo"
    work.mkdir()
    for item in ("dvc.yaml", "flows", "pickstyle"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, work / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, work / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pairs"].update({"per_style": 2, "styles": ["sepia", "pixel"], "size": 64})
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)  # the flow process starts its own temporary server, as under `make demo`
    dvc = [sys.executable, "-m", "dvc"]

    def run(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "config", "core.analytics", "false")
    run(*dvc, "config", "core.check_update", "false")
    first = run(*dvc, "repro", "pairs")
    assert "Running stage 'pairs'" in first
    assert len(list((work / "data" / "pairs").glob("pairs-*.tar"))) == 1
    lock = (work / "dvc.lock").read_text()
    second = run(*dvc, "repro", "pairs")
    assert "Running stage" not in second and "didn't change" in second
    assert (work / "dvc.lock").read_text() == lock
