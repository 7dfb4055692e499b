"""The backbone: tiny init (deterministic, loadable), the pretrained folder check, real-folder checks, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pickstyle.config import WAN_NEGATIVE_PROMPT, TinyBackbone, parse_params
from pickstyle.files import sha256_file, sha256_tree
from pickstyle.model.components import (
    MARKER,
    BackboneError,
    build_tiny_backbone,
    build_tokenizer,
    ensure_backbone,
    load_pipeline,
    missing_files,
    offload_text_encoder,
    real_config,
    resolve_dtype,
)


def _weights_hash(folder: Path) -> str:
    """sha256 of every file but the marker."""
    copy = {
        p.relative_to(folder): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    return json.dumps({str(k): v for k, v in copy.items()})


def test_tiny_init_is_deterministic(tmp_path: Path) -> None:
    first = build_tiny_backbone(tmp_path / "first", TinyBackbone())
    again = build_tiny_backbone(tmp_path / "again", TinyBackbone())
    assert _weights_hash(again) == _weights_hash(first)
    assert sha256_tree(again) == sha256_tree(first)
    other = build_tiny_backbone(tmp_path / "other", TinyBackbone(), seed=1)
    assert _weights_hash(other) != _weights_hash(first)


def test_tiny_backbone_loads_with_from_pretrained(tiny_backbone: Path) -> None:
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline.from_pretrained(tiny_backbone)
    assert not missing_files(tiny_backbone)
    cfg = pipe.transformer.config
    tiny = parse_params({}).model.tiny
    assert (cfg.num_layers, list(cfg.vace_layers), cfg.in_channels, cfg.vace_in_channels) == (
        tiny.num_layers,
        tiny.vace_layers,
        tiny.vae_z_dim,
        2 * tiny.vae_z_dim + tiny.vae_scale_spatial**2,  # inactive + reactive latents + the folded mask
    )
    assert len(pipe.vae.config.latents_mean) == len(pipe.vae.config.latents_std) == tiny.vae_z_dim
    assert (
        pipe.scheduler.config.prediction_type == "flow_prediction" and pipe.scheduler.config.use_flow_sigmas
    )
    video = torch.zeros(1, 3, 9, 64, 96)  # [b, c, f, h, w]
    with torch.no_grad():
        z = pipe.vae.encode(video).latent_dist.mode()
    f = (9 - 1) // tiny.vae_scale_temporal + 1
    assert tuple(z.shape) == (
        1,
        tiny.vae_z_dim,
        f,
        64 // tiny.vae_scale_spatial,
        96 // tiny.vae_scale_spatial,
    )


def test_load_pipeline_runs_a_short_sample(tiny_backbone: Path) -> None:
    from pickstyle.model.pipeline import PickStylePipeline

    pipe = load_pipeline(tiny_backbone, pipeline_cls=PickStylePipeline)
    assert pipe.transformer.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    video = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    frames = pipe(
        video,
        "anime style. a wolf in the snow",
        negative_prompt=WAN_NEGATIVE_PROMPT,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance="cfg",
        t_guide=2.0,
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert frames.shape == (1, 5, 32, 32, 3)
    assert np.isfinite(frames).all()


def test_tokenizer_handles_any_text() -> None:
    tok = build_tokenizer(32)
    ids = tok("Anime style. A wolf walking").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert len(ids) == 7  # anime style . a wolf walking </s>: known words are single tokens
    zh = tok(WAN_NEGATIVE_PROMPT, max_length=32, truncation=True, padding="max_length").input_ids
    assert len(zh) == 32 and tok.unk_token_id not in zh
    assert tok("anime style").input_ids != tok("sketch style").input_ids


def test_ensure_backbone_tiny_needs_the_pretrained_folder(tiny_backbone: Path, tmp_path: Path) -> None:
    assert ensure_backbone(parse_params({"paths": {"models": str(tiny_backbone.parent)}})) == tiny_backbone
    with pytest.raises(BackboneError, match="no such folder.*dvc repro pretrain"):
        ensure_backbone(parse_params({"paths": {"models": str(tmp_path / "empty")}}))
    (tmp_path / "half" / "backbone" / "vae").mkdir(parents=True)
    with pytest.raises(BackboneError, match=r"no pretrained tiny backbone \(missing: model_index.json"):
        ensure_backbone(parse_params({"paths": {"models": str(tmp_path / "half")}}))

    other_sizes = parse_params(
        {"paths": {"models": str(tiny_backbone.parent)}, "model": {"tiny": {"num_layers": 5}}}
    )
    with pytest.raises(BackboneError, match="num_layers"):
        ensure_backbone(other_sizes)


def test_a_relative_backbone_path_names_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--params elsewhere/params.yaml`` from another folder: paths resolve against the working directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackboneError, match=f"relative to the working directory, {tmp_path}"):
        ensure_backbone(parse_params({}))


def test_real_profile_lists_every_missing_file(tiny_backbone: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "wan"
    shutil.copytree(tiny_backbone, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "scheduler" / "scheduler_config.json").unlink()
    params = parse_params(
        {"profile": "wan-1.3b", "paths": {"models": str(tmp_path / "models")}, "model": {"path": str(folder)}}
    )
    with pytest.raises(BackboneError) as err:
        ensure_backbone(params)
    assert "vae/diffusion_pytorch_model.safetensors" in str(err.value)
    assert "scheduler/scheduler_config.json" in str(err.value)

    # a sharded checkpoint whose index names a shard that is not there
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "text_encoder" / "model.safetensors").unlink()
    (folder / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "text_encoder" / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(BackboneError, match="text_encoder/model-00002-of-00002.safetensors"):
        ensure_backbone(params)

    shutil.rmtree(folder)
    shutil.copytree(tiny_backbone, folder)
    assert ensure_backbone(params) == folder

    with pytest.raises(BackboneError, match="not a folder"):
        ensure_backbone(parse_params({"profile": "wan-14b", "model": {"path": str(tmp_path / "nope")}}))
    with pytest.raises(BackboneError, match="model.path"):
        ensure_backbone(parse_params({"profile": "wan-14b"}))


def test_real_configs_match_design() -> None:
    small, big = real_config("wan-1.3b"), real_config("wan-14b")
    assert small["num_attention_heads"] * small["attention_head_dim"] == 1536 and small["num_layers"] == 30
    assert small["vace_layers"] == list(range(0, 29, 2)) and small["ffn_dim"] == 8960
    assert big["num_attention_heads"] * big["attention_head_dim"] == 5120 and big["vace_layers"][-1] == 35
    with pytest.raises(ValueError):
        real_config("wan-7b")


def test_resolve_dtype() -> None:
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_pipeline_without_transformer_and_text_encoder_offload(tiny_backbone: Path, monkeypatch) -> None:
    from diffusers import WanVACETransformer3DModel

    monkeypatch.setattr(WanVACETransformer3DModel, "from_pretrained", _refuse)
    pipe = load_pipeline(tiny_backbone, transformer=False)
    monkeypatch.undo()
    config = json.loads((tiny_backbone / "transformer" / "config.json").read_text())
    assert (
        pipe.transformer.config.patch_size == config["patch_size"] and pipe.transformer.dtype == torch.float32
    )
    assert pipe.config.transformer == (None, None)  # the pipeline knows it has no transformer

    # Prompts are encoded once; with offload the encoder goes to the execution device to encode, then to the CPU.
    reference = pipe.encode_prompt("anime style. a cat", do_classifier_free_guidance=False, device="cpu")[0]
    moves, forwards = [], []
    encoder = pipe.text_encoder
    monkeypatch.setattr(encoder, "to", lambda *a, **k: moves.append(str(a[0])) or encoder)
    encoder.register_forward_hook(lambda *_: forwards.append(1))
    offload_text_encoder(pipe, offload=True)
    for _ in range(3):  # three windows of one video
        embeds = pipe.encode_prompt("anime style. a cat", do_classifier_free_guidance=False, device="cpu")[0]
        assert torch.equal(embeds, reference)
    assert len(forwards) == 1 and moves == ["cpu", "cpu"]
    pipe.encode_prompt("clay style. a dog", do_classifier_free_guidance=False, device="cpu")
    assert len(forwards) == 2 and moves == ["cpu"] * 4
    # Given embeddings pass through, uncached.
    given = pipe.encode_prompt(
        None, prompt_embeds=reference, do_classifier_free_guidance=False, device="cpu"
    )[0]
    assert torch.equal(given, reference) and len(forwards) == 2
    # On the CPU (the default decides by the encoder's device) nothing moves.
    other = load_pipeline(tiny_backbone, transformer=False)
    monkeypatch.setattr(other.text_encoder, "to", lambda *a, **k: moves.append("moved"))
    offload_text_encoder(other)
    other.encode_prompt("anime style. a cat", do_classifier_free_guidance=False, device="cpu")
    assert "moved" not in moves


def _refuse(*args, **kwargs):
    raise AssertionError("the transformer was loaded")
