"""``pickstyle exps``: DVC experiments in a table that fits a terminal, read from a real DVC project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pickstyle.experiments import changed_params, format_table, summarize

#: A one-stage project whose "evaluation" is a formula of its params: the table must show exactly these numbers.
SCORE = """
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
steps = p["train"]["steps"]
m = {"base/style_psnr": 18.0, "cs_cfg/style_psnr": 18.0 + steps / 100, "cs_cfg/style_psnr_se": 0.5,
     "reconstruct/source_psnr": 24.5}
for style, gain in (("anime", steps / 200), ("sepia", steps / 50)):
    m[f"style/{style}/base/style_psnr"] = 18.0
    m[f"style/{style}/cs_cfg/style_psnr"] = 18.0 + gain
pathlib.Path("eval").mkdir(exist_ok=True)
pathlib.Path("eval/metrics.json").write_text(json.dumps(m))
"""


def test_exps_shows_what_differs_and_the_gains(tmp_path: Path) -> None:
    from pickstyle.experiments import show

    (tmp_path / "score.py").write_text(SCORE)
    (tmp_path / "params.yaml").write_text("train:\n  steps: 100\n  lr: 0.002\nevaluate:\n  split: test\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: python score.py\n    deps: [score.py]\n    params: [train, evaluate]\n"
        "    metrics:\n      - eval/metrics.json:\n          cache: false\n"
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(*cmd: str) -> None:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run("git", "config", "user.email", "t@example.com")
    run("git", "config", "user.name", "t")
    run(*dvc, "init", "-q")
    run(*dvc, "config", "core.analytics", "false")
    run(*dvc, "repro")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run(*dvc, "exp", "run", "-n", "longer", "-S", "train.steps=300", "-S", "evaluate.split=val")

    table = show(repo=str(tmp_path))
    lines = table.splitlines()
    assert lines[0].split() == [
        "experiment", "split", "train.steps", "base", "adapter", "gain", "se", "worst", "style", "reconstruct"
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[2 : lines.index("")]}  # then the legend
    # the baseline (its branch name) and the experiment; lr is the same everywhere: not a column
    longer = next(r for name, r in rows.items() if name == "longer")
    assert longer[2:] == ["val", "300", "18.00", "21.00", "+3.00", "0.50", "anime", "+1.50", "24.50"]
    baseline = [r for name, r in rows.items() if name not in ("longer", "workspace")]
    expected = ["test", "100", "18.00", "19.00", "+1.00", "0.50", "anime", "+0.50", "24.50"]
    assert [r[1:] for r in baseline] == [expected]
    assert rows["workspace"][1:] == longer[2:]  # `dvc exp run` leaves its result in the workspace


def test_rows_without_metrics_hashes_and_failed_experiments() -> None:
    row = {"Experiment": None, "rev": "workspace", "train.steps": 5, "evaluate.split": "test"}
    assert summarize(row)["worst"] == "-"
    assert format_table([row]).splitlines()[2].split() == ["workspace", "test", "-", "-", "-", "-", "-", "-"]
    # dependency hashes (a top-level file, a folder) are not params; a failed experiment's row (all None) and
    # a column DVC prefixed with its file change nothing
    other = {**row, "train.steps": 6, "score.py": "a" * 32, "data/pairs": "0" * 32 + ".dir"}
    failed = {"Experiment": "broken", "rev": "abc1234def", "State": "Failed", "train.steps": None, "lr": None}
    assert changed_params([{**row, "score.py": "b" * 32}, other, failed]) == ["train.steps"]
    table = format_table([row, {**row, "params.yaml:train.steps": 6, "rev": "main"}, failed])
    assert [line.split()[:3] for line in table.splitlines()[2:5]] == [
        ["workspace", "test", "5"], ["main", "test", "6"], ["broken", "(abc1234)", "[failed]"]
    ]  # fmt: skip


def test_exps_outside_a_dvc_project_is_a_clear_error(tmp_path: Path) -> None:
    from pickstyle.experiments import ExperimentsError, show

    with pytest.raises(ExperimentsError, match=str(tmp_path)):
        show(repo=str(tmp_path))
