"""Projects the tests build: a small git + DVC copy of this one, a random adapter, a project-local registry.

:func:`small_project` is for the tests that run the pipeline as a DVC experiment (retrain-style): its params make a
retrain take about a minute (2-photo styles, one test clip, two sampling steps), and the committed backbone is
recorded in its ``dvc.lock`` as this code's (``dvc commit -f pretrain``), so ``pretrain`` never reruns there.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from tests.procs import run_group

ROOT = Path(__file__).resolve().parents[1]

#: What a DVC experiment of the project needs (``prefect.yaml``: the deployment's definition).
ITEMS = ("dvc.yaml", "dvc.lock", ".dvcignore", "prefect.yaml", "flows", "pickstyle", "models/backbone")


def small_project(
    work: Path,
    env: Mapping[str, str],
    variants: Sequence[str] = ("cs_cfg",),
    train: Mapping[str, object] | None = None,
) -> Path:
    """Copy the project to ``work`` (a new folder) with tiny settings, and make it a git + DVC repository.

    Args:
        work: The folder to create.
        env: The environment of the git and dvc commands.
        variants: ``evaluate.variants``.
        train: ``train`` params over the small ones (no checkpoints, a log line per step).
    """
    work.mkdir()
    for item in ITEMS:
        src, dst = ROOT / item, work / item
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pairs"].update({"per_style": 2, "size": 64})
    params["clips"].update({"test_clips": 1, "val_clips": 1, "variants": 1, "preview_clips": 1})
    params["train"].update({"checkpoint_every": 0, "log_every": 1, **(train or {})})
    params["evaluate"].update(
        {"max_clips": 1, "variants": list(variants), "preview_clips": 1, "sample": {"steps": 2}}
    )
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = (sys.executable, "-m", "dvc")
    for cmd in (
        ("git", "init", "-q"),
        (*dvc, "init", "-q"),
        (*dvc, "config", "core.analytics", "false"),
        (
            *dvc,
            "commit",
            "-f",
            "-q",
            "pretrain",
        ),  # the committed backbone is this code's: pretrain never reruns
        ("git", "add", "-A"),
        ("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project"),
    ):
        done = run_group(cmd, timeout=120, cwd=work, env=dict(env))
        assert done.returncode == 0, done.stdout + done.stderr
    return work


def random_adapter(backbone: Path, out: Path, rank: int = 4, seed: int = 0) -> Path:
    """A small adapter with random (non-zero) LoRA weights: it changes the output, as a trained one would."""
    import torch

    from pickstyle.model.adapters import add_context_style_adapter, save_adapter
    from pickstyle.model.components import load_pipeline

    pipe = load_pipeline(backbone)
    add_context_style_adapter(pipe.transformer, rank=rank, alpha=float(rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(pipe, out)
    return out


def random_style_adapters(backbone: Path, out: Path, styles: Sequence[str] = ("anime", "sepia")) -> Path:
    """A per-style adapter folder (``train.adapters: per_style``'s layout): a different random adapter per style."""
    from pickstyle.model.adapters import write_styles_index

    for i, style in enumerate(styles):
        random_adapter(backbone, out / style, seed=i + 1)
    write_styles_index(out, {style: [style.capitalize()] for style in styles})
    return out


def without_outside_tracking(mp) -> None:
    """Unset (on ``mp``, a ``pytest.MonkeyPatch``) what would point MLflow or DVC elsewhere than the project."""
    from pickstyle import tracking

    for key in (*tracking.URI_ENV, tracking.ARTIFACTS_ENV, "DVC_EXP_NAME", "DVC_ROOT"):
        mp.delenv(key, raising=False)
