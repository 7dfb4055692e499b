"""Shared fixtures: the pretrained tiny Wan2.1-VACE backbone (committed in ``models/backbone``), copied once per
test session into a temporary ``models`` folder."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from pickstyle.flow_matching import sample_sigmas

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


#: Frames and size of the metric tests' source clip.
T, H, W = 6, 64, 96


@pytest.fixture(scope="module")
def source():
    """A camera pan over a real photo: 3 px per frame to the right, 1 px down."""
    import cv2
    import numpy as np
    from skimage import data as skdata

    photo = cv2.resize(skdata.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    return np.stack([photo[40 + t : 40 + t + H, 60 + 3 * t : 60 + 3 * t + W] for t in range(T)])


@pytest.fixture(scope="module")
def flows(source):
    """The source clip's DIS flows (forward, backward), computed once per module."""
    from pickstyle.metrics import source_flows

    return source_flows(source)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer CLIP with a BPE tokenizer trained in-process, saved like a downloaded CLIP folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    out = tmp_path_factory.mktemp("clip")
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok.train_from_iterator(
        ["sepia style an astronaut anime noise"], trainers.BpeTrainer(vocab_size=60, special_tokens=specials)
    )
    fast = CLIPTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials[0],
        eos_token=specials[1],
        unk_token=specials[1],
        pad_token=specials[1],
    )
    layer = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {
        **layer,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 16,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    config = CLIPConfig(
        text_config=text, vision_config={**layer, "image_size": 32, "patch_size": 8}, projection_dim=8
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=fast).save_pretrained(out)
    return out


def fixed_noise(
    keys: list[str], shape: tuple[int, ...], shift: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """σ and ε drawn once per clip key (the same at every visit): the "overfit one batch" sanity check.

    With the noise and timestep fixed, a handful of clips is a finite set of (input, target) pairs that the
    adapter can memorise, so the loss must fall; with fresh noise its floor is the irreducible noise term.
    """
    sigmas, noises = [], []
    for key in keys:
        g = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8])
        )
        sigmas.append(sample_sigmas(1, shift, g))
        noises.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    return torch.cat(sigmas), torch.stack(noises)


@pytest.fixture
def noise_per_clip(monkeypatch):
    """Training draws each clip's noise and timestep from its key (:func:`fixed_noise`), not the run's stream."""
    from pickstyle import train as tr

    monkeypatch.setattr(
        tr, "draw_noise", lambda keys, shape, shift, generator: fixed_noise(keys, shape[1:], shift)
    )


@pytest.fixture(scope="session")
def real_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real video: ``../shared/videos/wolf.mp4`` where the developers' machine has it, else one the project makes
    that looks real: a slow camera pan over a photograph no stage trains on (matplotlib's portrait of Grace
    Hopper), 40 frames of 256x256 at 20 fps in H.264 (as wolf.mp4), so the tests run the same in CI."""
    wolf = Path(__file__).resolve().parents[1].parent / "shared" / "videos" / "wolf.mp4"
    if wolf.is_file():
        return wolf
    from pickstyle.data.footage import heldout_images, pan_clip
    from pickstyle.data.video import write_video

    image = dict(heldout_images())["grace_hopper"]
    out = tmp_path_factory.mktemp("video") / "pan.mp4"
    return write_video(out, pan_clip(image, 40, 256, 256), 20.0)
