"""Memory and precision options of ``train``: gradient accumulation, bf16 autocast on CPU, checkpointing and
activation offload, the allocator setting, and the per-profile defaults (the paper's for the real profiles)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pickstyle import train as tr
from pickstyle.config import load_params
from pickstyle.model.trainable import build_trainable
from tests.test_train import _params, _random_latents, _threads

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = Path("adapter") / "pytorch_lora_weights.safetensors"


@pytest.fixture
def data_root(tmp_path: Path, tiny_backbone: Path) -> Path:
    _random_latents(tmp_path / "data", n=4, shard_size=4)
    return tmp_path


def _models(root: Path, tiny_backbone: Path, name: str) -> Path:
    models = root / name
    shutil.copytree(tiny_backbone.parent, models)
    return models


def test_grad_accum_equals_the_larger_batch(
    data_root: Path, tiny_backbone: Path, monkeypatch, noise_per_clip
) -> None:
    """2 micro-batches of 1 clip give the optimizer step of 1 batch of 2 clips: the same loss, gradient norm and
    adapter (fixed noise per clip, so both runs see identical inputs; whole clips, since a batch shares one
    random frame window and two micro-batches draw two)."""
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    kw = {"steps": 2, "warmup_steps": 0, "frame_window": 0}
    with _threads(1):
        batch = tr.train(_params(data_root, _models(data_root, tiny_backbone, "m1"), batch_size=2, **kw))
        accum = tr.train(
            _params(data_root, _models(data_root, tiny_backbone, "m2"), batch_size=1, grad_accum=2, **kw)
        )
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert accum["grad_accum"] == 2 and batch["grad_accum"] == 1
    assert accum["first_loss"] == pytest.approx(batch["first_loss"], rel=1e-5)
    assert accum["grad_norm"] == pytest.approx(batch["grad_norm"], rel=1e-4)
    w_batch, w_accum = load_file(data_root / "m1" / ADAPTER), load_file(data_root / "m2" / ADAPTER)
    assert any(w.abs().sum() > 0 for k, w in w_batch.items() if ".lora_B." in k)
    for k in w_batch:
        # Adam takes lr-sized steps (2e-3 here), so a wrong accumulation moves weights by ~1e-3; float reordering
        # moves an entry whose gradient is near zero by a fraction of that (1.2e-5 measured on 1 of 4,096)
        torch.testing.assert_close(w_accum[k], w_batch[k], rtol=1e-4, atol=5e-5)


def test_user_allocator_setting_wins(data_root: Path, tiny_backbone: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    with _threads(1):
        tr.train(_params(data_root, _models(data_root, tiny_backbone, "m"), steps=1))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:64"


def test_checkpointing_and_offload_change_memory_not_results(
    data_root: Path, tiny_backbone: Path, noise_per_clip
) -> None:
    """Recomputing blocks and parking saved tensors on the CPU must give the same adapter as neither."""
    kw = {"steps": 2}
    with _threads(1):
        plain = tr.train(_params(data_root, _models(data_root, tiny_backbone, "m1"), **kw))
        lean = tr.train(
            _params(
                data_root,
                _models(data_root, tiny_backbone, "m2"),
                gradient_checkpointing=True,
                activation_offload=True,
                **kw,
            )
        )
    assert lean["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)
    w_plain, w_lean = load_file(data_root / "m1" / ADAPTER), load_file(data_root / "m2" / ADAPTER)
    for k in w_plain:
        torch.testing.assert_close(w_lean[k], w_plain[k], rtol=1e-4, atol=1e-6)


def test_bf16_base_trains_on_cpu_with_fp32_lora(data_root: Path, tiny_backbone: Path) -> None:
    """``model.dtype: bfloat16`` on CPU: bf16 frozen base under CPU autocast, fp32 LoRA master weights."""
    models = _models(data_root, tiny_backbone, "m")
    params = _params(data_root, models, steps=3, gradient_checkpointing=True)
    params.model.dtype = "bfloat16"
    transformer, _ = build_trainable(params, "cpu", "cached")
    base = {p.dtype for n, p in transformer.named_parameters() if not p.requires_grad}
    lora = {p.dtype for n, p in transformer.named_parameters() if p.requires_grad}
    assert torch.bfloat16 in base and lora == {torch.float32}
    assert transformer.gradient_checkpointing
    with _threads(1):
        summary = tr.train(params)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    saved = load_file(models / ADAPTER)
    assert {w.dtype for w in saved.values()} == {torch.float32}
    assert any(w.abs().sum() > 0 for k, w in saved.items() if ".lora_B." in k)


def test_profile_defaults() -> None:
    """Real profiles get the paper's defaults; the tiny profile keeps its own (the default run is unchanged)."""
    tiny = load_params(ROOT / "params.yaml")
    assert (tiny.train.steps, tiny.train.gradient_checkpointing, tiny.lora_rank, tiny.lora_alpha) == (
        650,
        False,
        32,
        32.0,
    )
    # stylize, the served model and the evaluation sample alike: the profile's evaluated best
    tp = tiny.active
    for sample in (tiny.sample, tiny.evaluate.sample):
        assert (sample.steps, sample.t_guide, sample.c_guide) == (
            tp.sample_steps,
            tp.sample_t_guide,
            tp.sample_c_guide,
        )
    assert tiny.train.lora_targets == tp.lora_targets and "attn2" in tp.lora_targets
    # the tiny profile's built-in pairs are styled frame by frame, at the frame's scale, in full chroma
    assert (tiny.clips.style_render, tiny.clips.chroma) == ("per_frame", "444")
    for name in ("wan-1.3b", "wan-14b"):
        real = load_params(ROOT / "params.yaml", {"profile": name})
        assert (real.train.steps, real.train.gradient_checkpointing, real.lora_rank, real.lora_alpha) == (
            3000,
            True,
            128,
            128.0,
        )
        assert real.train.lora_targets == r"vace_blocks\.\d+\.attn1\.to_(?:q|k|v)"  # the paper's
        assert (real.clips.style_render, real.clips.chroma) == ("motion", "444")  # the paper's recipe
        for ev in (real.evaluate.sample, real.sample):
            assert (ev.steps, ev.t_guide, ev.c_guide, ev.shift) == (20, 5.0, 4.0, 16.0)
    # an explicit value beats the profile's
    pinned = load_params(
        ROOT / "params.yaml", {"profile": "wan-1.3b", "train.steps": 50, "evaluate.sample.steps": 4}
    )
    assert (
        pinned.train.steps == 50
        and pinned.evaluate.sample.steps == 4
        and pinned.evaluate.sample.t_guide == 5.0
    )
    # the same holds without a params.yaml (code defaults)
    assert load_params(ROOT / "no-such-params.yaml", {"profile": "wan-14b"}).train.steps == 3000


def test_cached_training_loads_neither_vae_nor_text_encoder(
    data_root: Path, tiny_backbone: Path, monkeypatch
) -> None:
    from diffusers import AutoencoderKLWan
    from transformers import UMT5EncoderModel

    def refuse(*args, **kwargs):
        raise AssertionError("cached training loaded the VAE or the text encoder")

    for cls in (AutoencoderKLWan, UMT5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
        monkeypatch.setattr(cls, "__init__", refuse)
    with _threads(1):
        summary = tr.train(_params(data_root, _models(data_root, tiny_backbone, "m"), steps=1))
    assert summary["mode"] == "cached" and summary["steps"] == 1
