"""Shared fixtures: the tiny Wan2.1-VACE backbone, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may be fetched from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny backbone's diffusers folder (default ``params.model.tiny`` sizes, seed 0); ~5 s to build.

    Built by ``ensure_backbone`` into ``<tmp>/models/backbone`` (with its marker), so a test whose params set
    ``paths.models`` to ``tiny_backbone.parent`` (and keeps the default tiny sizes) reuses it without rebuilding.
    """
    from pickstyle.config import parse_params
    from pickstyle.model.components import ensure_backbone

    models = tmp_path_factory.mktemp("tiny") / "models"
    return ensure_backbone(parse_params({"paths": {"models": str(models)}}))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Pin torch to one intra-op thread for a module (``pytestmark = pytest.mark.usefixtures(...)``).

    The tiny model gains nothing from threads; on a busy 2-core machine they only spin-wait.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
