"""The pretrain stage: the committed backbone has learned; a short run is deterministic and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pickstyle.config import parse_params
from pickstyle.data.scenes import draw_scene, render_scene
from pickstyle.evaluate import vae_roundtrip
from pickstyle.files import sha256_file
from pickstyle.metrics import psnr
from pickstyle.model import latent_space
from pickstyle.model.components import load_pipeline
from pickstyle.model.pipeline import PickStylePipeline
from pickstyle.pretrain import (
    _PHASE_FIELDS,
    PretrainError,
    _settings_key,
    footage_check,
    pretrain,
    pretrain_styles,
    work_dir,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _test_scene(index: int = 0) -> np.ndarray:
    """Held-out test scene ``index``, exactly as the clips stage renders it for the evaluation."""
    params = parse_params({})
    p = params.active
    settings = {
        "seed": params.seed,
        "height": p.height,
        "width": p.width,
        "test_objects": params.clips.test_objects,
        "styles": list(params.pairs.styles),
    }
    return render_scene(draw_scene(index, settings), p.frames, p.height, p.width)


def test_committed_vae_reconstructs_a_test_clip(tiny_backbone: Path) -> None:
    pipe = load_pipeline(tiny_backbone)
    src = _test_scene(0)
    # measured 26.6 dB on this clip with the committed backbone (frame-wise; 25.2 clip-wise)
    assert psnr(vae_roundtrip(pipe, src), src) >= 26.0


def test_committed_backbone_follows_its_context(tiny_backbone: Path) -> None:
    """ "reconstruct." + the source as VACE context gives the source back (the base model, no adapter)."""
    pipe = load_pipeline(tiny_backbone, pipeline_cls=PickStylePipeline)
    src = _test_scene(1)
    out = pipe(
        src,
        "reconstruct. A rocket on its launch pad",
        height=src.shape[1],
        width=src.shape[2],
        num_inference_steps=3,  # the tiny profile's
        guidance="none",  # the backbone's own prediction, as the evaluation's `reconstruct` variant
        generator=torch.Generator().manual_seed(0),
    ).frames[0]
    out = (np.asarray(out) * 255).round().astype(np.uint8)
    # measured 18.9 dB on this clip and seed with the committed backbone (19.4 with seed 1; the 10 test clips
    # average 24.0, eval/metrics.json: reconstruct/source_psnr)
    assert psnr(out, src) >= 18.0


def test_holdout_style_is_never_pretrained() -> None:
    params = parse_params({"pretrain": {"holdout_styles": ["sepia", "pixel"]}})
    assert sorted(pretrain_styles(params.pretrain)) == ["anime", "sketch", "watercolor"]
    with pytest.raises(PretrainError, match="unknown style"):
        pretrain_styles(parse_params({"pretrain": {"holdout_styles": ["cubism"]}}).pretrain)
    with pytest.raises(PretrainError, match="pretrain.controls"):
        pretrain_styles(parse_params({"pretrain": {"controls": ["depth"]}}).pretrain)


def test_pretraining_never_reads_the_adapters_clip_settings() -> None:
    """Tuning the adapter's motions (clips.*) or sampling keeps every pretraining checkpoint valid."""
    base = parse_params({})
    other = parse_params(
        {
            "clips": {"motion_mix": {"rotate": 5.0}, "static_prob": 0.9, "test_objects": 1},
            "sample": {"t_guide": 7.0},
            "train": {"lr": 1e-2},
        }
    )
    for phase in _PHASE_FIELDS:
        assert _settings_key(base, phase) == _settings_key(other, phase)
    # a later phase's setting leaves the earlier phases' checkpoints valid, and invalidates its own
    steps = parse_params({"pretrain": {"steps": 7}})
    assert _settings_key(steps, "vae") == _settings_key(base, "vae")
    assert _settings_key(steps, "latents") == _settings_key(base, "latents")
    assert _settings_key(steps, "transformer") != _settings_key(base, "transformer")
    # a longer second cycle resumes the finished first one (and redoes the decoder, trained after it)
    refine = parse_params({"pretrain": {"refine_steps": 7}})
    for phase in ("vae", "latents", "transformer"):
        assert _settings_key(refine, phase) == _settings_key(base, phase)
    for phase in ("refine", "decoder"):
        assert _settings_key(refine, phase) != _settings_key(base, phase)
    # the decoder's width is the decoder phase's alone
    wider = parse_params({"model": {"tiny": {"vae_decoder_base_dim": 40}}})
    for phase in ("vae", "latents", "transformer"):
        assert _settings_key(wider, phase) == _settings_key(base, phase)
    assert _settings_key(wider, "decoder") != _settings_key(base, "decoder")
    # the VAE phase trains clip-wise either way; frame-wise use changes the latent set and everything after it
    clipwise = parse_params({"model": {"tiny": {"vae_framewise": not base.model.tiny.vae_framewise}}})
    assert _settings_key(clipwise, "vae") == _settings_key(base, "vae")
    for phase in ("latents", "transformer", "decoder"):
        assert _settings_key(clipwise, phase) != _settings_key(base, phase)


def _small(models: Path) -> dict:
    return {
        "paths": {"models": str(models)},
        "model": {"tiny": {"vae_decoder_base_dim": 12}},  # the decoder phase widens the decoder (8 -> 12)
        "pretrain": {
            "vae_frame_steps": 2,
            "vae_clip_steps": 1,
            "vae_batch": 4,
            "clips": 8,
            "steps": 3,
            "refine_steps": 2,
            "warmup_steps": 1,
            "decoder_steps": 2,
            "log_every": 1,
        },
    }


def _weights(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def test_short_pretrain_is_deterministic_and_resumes_exactly(tmp_path: Path) -> None:
    straight = parse_params(_small(tmp_path / "a"))
    summary = pretrain(straight, log=lambda _: None)
    out = Path(summary["backbone"])
    assert (out / "model_index.json").is_file() and (out / "pretrain_loss.png").is_file()
    assert summary["holdout_styles"] == ["sepia"]
    assert summary["final_loss"]["refine"] is not None  # the transformer's second cycle ran

    # the same run in pieces: stop after the VAE, then after the latent set, then finish
    pieces = parse_params(_small(tmp_path / "b"))
    pretrain(pieces, log=lambda _: None, until="vae")
    assert (work_dir(pieces) / "vae.pt").is_file() and not (tmp_path / "b" / "backbone").exists()
    pretrain(pieces, log=lambda _: None, until="latents")
    data = torch.load(work_dir(pieces) / "latents.pt", weights_only=False)
    assert not any(c.startswith("Sepia") for c in data["captions"])  # the held-out style never appears
    pretrain(pieces, log=lambda _: None, until="transformer")
    lines: list[str] = []
    pretrain(pieces, log=lines.append)
    assert any("resumed" in line for line in lines)
    assert _weights(tmp_path / "b" / "backbone") == _weights(out)

    # the decoder phase trains a decoder wider than the encoder (model.tiny.vae_decoder_base_dim); the encoder,
    # and so the latent space the transformer learned, is the VAE phase's
    wide = load_pipeline(out).vae
    assert wide.config.decoder_base_dim == straight.model.tiny.vae_decoder_base_dim > wide.config.base_dim
    assert latent_space.framewise(wide) == straight.model.tiny.vae_framewise  # saved in vae/config.json
    phase1 = torch.load(work_dir(pieces) / "vae.pt", weights_only=False)["model"]
    for name, tensor in wide.encoder.state_dict().items():
        torch.testing.assert_close(tensor, phase1[f"encoder.{name}"], rtol=0, atol=0)

    # other settings: the checkpoints are not reused
    changed = parse_params(
        {**_small(tmp_path / "b"), "pretrain": {**_small(tmp_path)["pretrain"], "seed": 1}}
    )
    lines.clear()
    pretrain(changed, log=lines.append, until="vae")
    assert any("other settings" in line for line in lines)


def test_latent_set_mixes_structure_controls_and_never_rgb_context_with_a_style(tmp_path: Path) -> None:
    """As Wan-VACE: controls + free text (styles included); RGB context only with "reconstruct."."""
    cfg = _small(tmp_path)
    cfg["pretrain"]["clips"] = 40
    params = parse_params(cfg)
    pretrain(params, log=lambda _: None, until="latents")
    data = torch.load(work_dir(params) / "latents.pt", weights_only=False)
    tasks = data["tasks"]
    assert set(tasks) == set(params.pretrain.task_mix), tasks
    for task, target, context, has, caption in zip(
        tasks, data["targets"], data["contexts"], data["has_context"], data["captions"], strict=True
    ):
        assert bool(has) == (not task.startswith("text"))
        if task == "reconstruct":  # the RGB source in the context: only ever to reconstruct it
            assert caption.startswith("reconstruct.") and torch.equal(context, target)
        else:
            assert not caption.startswith("reconstruct.")
        assert (" style. " in caption) == task.endswith("_style")
    assert any(" style. " in c for c in data["captions"])


def test_committed_vae_reconstructs_held_out_real_frames(tiny_backbone: Path) -> None:
    """Photos no stage trains on (a portrait, real textures), each whole and zoomed 2x, under a slow pan."""
    params = parse_params({})
    pipe = load_pipeline(tiny_backbone)
    result = footage_check(pipe, params, torch.device("cpu"))
    # measured 24.35 dB frame-wise (22.2 to 27.6 per clip; models/backbone/pickstyle_backbone.json,
    # vae_psnr_heldout_footage; 23.47 clip-wise): issue 18 asks for 24
    assert result["mean"] >= 24.0, result
