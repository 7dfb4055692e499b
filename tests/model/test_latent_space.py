"""The one latent space: the project's encoding and context equal what the diffusers pipeline builds itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch

from pickstyle.model import latent_space
from pickstyle.model.components import load_pipeline


def test_encode_and_context_equal_the_pipelines_own(tiny_backbone: Path) -> None:
    pipe = load_pipeline(tiny_backbone)
    latent_space.set_framewise(pipe.vae, False)  # diffusers' stock pipeline encodes clip-wise
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 96, 3), dtype=np.uint8)
    video, mask, refs = pipe.preprocess_conditions(
        [PIL.Image.fromarray(f) for f in frames], None, None, 1, 64, 96, 5, torch.float32, "cpu"
    )
    # diffusers: prepare_video_latents normalises VAE(video * mask) and VAE(video * (1 - mask)) itself
    theirs = pipe.prepare_video_latents(video, mask, refs, None, torch.device("cpu"))
    masks = pipe.prepare_masks(mask, refs, None)
    z = pipe.vae.config.z_dim
    reactive = latent_space.encode(pipe.vae, video)
    inactive = latent_space.zeros_latent(pipe.vae, tuple(video.shape), "cpu")
    torch.testing.assert_close(reactive, theirs[:, z : 2 * z].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inactive, theirs[:, :z].float(), rtol=1e-5, atol=1e-5)
    ours = latent_space.vace_context(inactive, reactive, masks)
    torch.testing.assert_close(ours, torch.cat([theirs, masks], dim=1).float(), rtol=1e-5, atol=1e-5)
    assert ours.shape[1] == pipe.transformer.config.vace_in_channels
    # unbatched: the same concatenation along the channel axis
    torch.testing.assert_close(latent_space.vace_context(inactive[0], reactive[0], masks[0]), ours[0])
    # normalise is (z - mean) / std with the VAE's 16 numbers
    raw = torch.randn(1, z, 2, 3, 4)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1, 1)
    torch.testing.assert_close(latent_space.normalise(pipe.vae, raw), (raw - mean) / std)


def _stock_latent(pipe, video: torch.Tensor) -> torch.Tensor:
    """Diffusers' own encoding (clip-wise), normalised."""
    with torch.no_grad():
        return latent_space.normalise(pipe.vae, pipe.vae.encode(video).latent_dist.mode())


def test_framewise_vae_encodes_and_decodes_each_frame_alone(tiny_backbone: Path, tmp_path: Path) -> None:
    from pickstyle.model.pipeline import PickStylePipeline

    pipe = load_pipeline(tiny_backbone, pipeline_cls=PickStylePipeline)
    rng = np.random.default_rng(1)
    video = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 5, 64, 96)).astype(np.float32))
    latent_space.set_framewise(pipe.vae, False)
    clipwise = latent_space.encode(pipe.vae, video)
    torch.testing.assert_close(clipwise, _stock_latent(pipe, video))

    latent_space.set_framewise(pipe.vae, True)
    assert latent_space.framewise(pipe.vae)
    ours = latent_space.encode(pipe.vae, video)
    per_frame = torch.cat([_stock_latent(pipe, video[:, :, t : t + 1]) for t in range(5)], dim=2)
    torch.testing.assert_close(ours, per_frame, rtol=1e-5, atol=1e-5)
    # the first frame is the same either way; the later ones no longer depend on the frames before them
    torch.testing.assert_close(ours[:, :, :1], clipwise[:, :, :1], rtol=1e-5, atol=1e-5)
    assert (ours[:, :, 1:] - clipwise[:, :, 1:]).abs().max() > 1e-3
    changed = video.clone()
    changed[:, :, 0] = 0.0
    torch.testing.assert_close(latent_space.encode(pipe.vae, changed)[:, :, 1:], ours[:, :, 1:])

    raw = latent_space.vae_encode(pipe.vae, video).mode()
    with torch.no_grad():
        decoded = latent_space.vae_decode(pipe.vae, raw)
        expected = torch.cat([pipe.vae.decode(raw[:, :, t : t + 1]).sample for t in range(5)], dim=2)
    assert decoded.shape == video.shape
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-5)

    # the pipeline's VACE context goes through the same frame-wise encoder
    frames = rng.integers(0, 256, (5, 64, 96, 3), dtype=np.uint8)
    v, mask, refs = pipe.preprocess_conditions(
        [PIL.Image.fromarray(f) for f in frames], None, None, 1, 64, 96, 5, torch.float32, "cpu"
    )
    context = pipe.prepare_video_latents(v, mask, refs, None, torch.device("cpu"))
    z = pipe.vae.config.z_dim
    torch.testing.assert_close(context[:, z:].float(), latent_space.encode(pipe.vae, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        context[:, :z].float(), latent_space.encode(pipe.vae, torch.zeros_like(v)), rtol=1e-5, atol=1e-5
    )

    # the mark is part of the VAE's saved config
    pipe.vae.save_pretrained(tmp_path / "vae")
    from diffusers import AutoencoderKLWan

    assert latent_space.framewise(AutoencoderKLWan.from_pretrained(tmp_path / "vae"))


def test_framewise_needs_a_vae_without_temporal_compression() -> None:
    import pytest
    from diffusers import AutoencoderKLWan

    from pickstyle.config import TinyBackbone
    from pickstyle.model.components import tiny_vae_config

    with pytest.raises(ValueError, match="vae_framewise"):
        TinyBackbone(vae_framewise=True, vae_temporal_downsample=[True])
    vae = AutoencoderKLWan(
        **tiny_vae_config(TinyBackbone(vae_temporal_downsample=[True], vae_framewise=False))
    )
    with pytest.raises(ValueError, match="frame-wise"):
        latent_space.set_framewise(vae, True)
    assert not latent_space.framewise(vae)
