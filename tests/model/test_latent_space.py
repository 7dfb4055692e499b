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
