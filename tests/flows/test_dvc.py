"""The real DVC pipeline file: stages are wired to existing files, and a repeated ``dvc repro`` is a no-op."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["pretrain", "pairs", "clips", "latents", "train", "evaluate", "register"]


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
            key = key.replace("${profile}", defaults["profile"])
            node = defaults
            for part in key.split("."):
                assert part in node, f"{name}: param {key} is not in params.yaml"
                node = node[part]
        for out in stage.get("outs", []) + stage.get("metrics", []):
            outs.add(out if isinstance(out, str) else next(iter(out)))


def _module_file(module: str) -> Path | None:
    for candidate in (
        ROOT / f"{module.replace('.', '/')}.py",
        ROOT / module.replace(".", "/") / "__init__.py",
    ):
        if candidate.is_file():
            return candidate
    return None


def _project_imports(path: Path) -> set[str]:
    """Project modules (``pickstyle.*``, ``flows.*``) a file imports, at any depth of its code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {n for n in names if n.split(".")[0] in ("pickstyle", "flows")}


def _closure(start: Path) -> set[str]:
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(_module_file, _project_imports(path)) if f is not None]
    return {str(p.relative_to(ROOT)) for p in seen}


def test_stage_code_deps_are_exactly_what_the_flow_imports():
    """Each stage depends on every project module its flow imports, transitively, and on no other."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        listed = {d for d in stage["deps"] if d.endswith(".py")}
        assert listed == _closure(ROOT / "flows" / f"{name}.py"), name


def test_stages_read_only_the_selected_profile():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        assert "profiles" not in stage["params"], f"{name} depends on every profile"


#: The sections whose null keys a stage resolves from the profile (the rest of a stage's params are its own).
_PROFILE_SECTIONS = {"train", "clips", "sample"}


def test_stages_list_exactly_the_profile_fields_they_read():
    """Each stage lists the geometry and the profile defaults of the sections it lists, one by one: tuning
    ``sample_steps`` must not re-run the training, nor ``train_steps`` the clips."""
    from pickstyle.config import profile_fields

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    prefix = "profiles.${profile}"
    for name, stage in spec["stages"].items():
        params = stage.get("params", [])
        assert prefix not in params, f"{name} lists the whole profile"
        listed = [p.removeprefix(prefix + ".") for p in params if p.startswith(prefix + ".")]
        if not listed:
            continue
        sections = [p for p in params if p in _PROFILE_SECTIONS]
        assert listed == profile_fields(*sections), name


def test_every_profile_field_is_geometry_a_default_or_a_property():
    """A new ``Profile`` field must be placed in one of the three (and so in dvc.yaml's lists)."""
    from pickstyle.config import PROFILE_DEFAULTS, PROFILE_GEOMETRY, PROFILE_PROPERTIES, Profile

    placed = [
        *PROFILE_GEOMETRY,
        *PROFILE_DEFAULTS.values(),
        *(f for v in PROFILE_PROPERTIES.values() for f in v),
    ]
    assert sorted(placed) == sorted(Profile.model_fields)


def test_code_reads_only_geometry_from_the_profile_directly():
    """Outside config.py, code reads the active profile's geometry only; everything else goes through the
    resolved sections (or the train properties), which is what dvc.yaml's per-stage lists assume."""
    import re

    from pickstyle.config import PROFILE_GEOMETRY

    reads = set()
    for path in [*(ROOT / "pickstyle").rglob("*.py"), *(ROOT / "flows").glob("*.py")]:
        if path.name != "config.py":
            reads |= set(re.findall(r"\.active\.(\w+)", path.read_text()))
    assert reads - {"model_dump"} <= set(PROFILE_GEOMETRY), reads


def test_every_shipped_profile_sets_every_field():
    """DVC fails a stage whose listed param is missing from params.yaml: each profile spells out every field."""
    from pickstyle.config import Profile

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, profile in data["profiles"].items():
        assert sorted(profile) == sorted(Profile.model_fields), name


@pytest.mark.parametrize(
    ("field", "value", "stages"),
    [
        ("sample_steps", 4, {"evaluate", "register"}),
        ("train_steps", 7, {"train"}),
        ("clip_variants", 3, {"clips"}),
        ("height", 48, {"pretrain", "clips", "latents", "train", "evaluate", "register"}),
    ],
)
def test_dvc_status_reruns_only_the_stages_that_read_a_field(tmp_path: Path, field, value, stages):
    """DVC itself, against the committed dvc.lock: which stages a one-field change of the tiny profile marks."""
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    data = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert data["profile"] == "tiny" and data["profiles"]["tiny"][field] != value
    data["profiles"]["tiny"][field] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run([*dvc, "status", "--json"], cwd=tmp_path, capture_output=True, text=True, check=True)
    changed = {
        name
        for name, entries in json.loads(out.stdout).items()
        for entry in entries
        if isinstance(entry, dict)
        and isinstance(params := entry.get("changed deps", {}).get("params.yaml"), dict)
        and params.get(f"profiles.tiny.{field}") == "modified"
    }
    assert changed == stages


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


def test_plots_are_images_that_render_offline(tmp_path: Path):
    """`dvc plots show` draws vega charts with scripts from a CDN (blank offline): only PNGs are declared as plots,
    and the page it writes loads no script at all."""
    from PIL import Image

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    plots = [p if isinstance(p, str) else next(iter(p)) for p in spec["plots"]]
    assert plots and all(p.endswith(".png") for p in plots)
    assert not [name for name, stage in spec["stages"].items() if "plots" in stage]
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().splitlines()

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for plot in plots:
        (tmp_path / plot).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / plot)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", "dvc_plots"],
        cwd=tmp_path,
        env={**env, "DVC_NO_ANALYTICS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    html = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "<script" not in html and html.count("<img") == len(plots)
