"""Shared fixtures: the pretrained tiny Wan2.1-VACE backbone (committed in ``models/backbone``), copied once per
test session into a temporary ``models`` folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Nothing may be fetched from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The repository's committed, pretrained tiny backbone (the ``pretrain`` stage's output).
COMMITTED_BACKBONE = Path(__file__).resolve().parents[1] / "models" / "backbone"


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained tiny backbone's diffusers folder, at ``<tmp>/models/backbone``.

    A test whose params set ``paths.models`` to ``tiny_backbone.parent`` (and keep the default tiny sizes) uses it.
    """
    from pickstyle.config import TinyBackbone
    from pickstyle.model.components import check_tiny_backbone

    check_tiny_backbone(COMMITTED_BACKBONE, TinyBackbone())
    models = tmp_path_factory.mktemp("tiny") / "models"
    shutil.copytree(COMMITTED_BACKBONE, models / "backbone")
    return models / "backbone"


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


@pytest.fixture(scope="session")
def real_layout_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Wan2.1-VACE folder in the exact layout of the public ``Wan2.1-VACE-1.3B-diffusers`` repository
    (sharded bf16 safetensors, published class names and scheduler config, a T5 tokenizer without
    ``model_max_length``): see ``tests/real_layout.py``."""
    from tests.real_layout import write_real_layout

    return write_real_layout(tmp_path_factory.mktemp("real") / "Wan2.1-VACE-1.3B-diffusers", "wan-1.3b")
