"""The latent space the transformer works in, one definition for the latents stage, pretraining and sampling.

Wan normalises VAE latents per channel, ``(z - latents_mean) / latents_std`` (the VAE config's 16 numbers), and
the VACE context of a clip is ``[inactive, reactive, mask]`` along channels: with mask = ones (the whole source is
context, docs/method.md §2) ``inactive`` = VAE(zeros) and ``reactive`` = VAE(video), both normalised, then the
mask's channels (64 on Wan, 4 on the tiny backbone): 96 channels on Wan2.1.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.wan.pipeline_wan_vace import retrieve_latents


def _stats(vae: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=torch.float32).view(1, z_dim, 1, 1, 1)
    return mean, std


def normalise(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents ``[b, z, f, h, w]`` -> the transformer's space (fp32): ``(z - mean) / std``."""
    mean, std = _stats(vae, z.device)
    return (z.float() - mean) * (1.0 / std)


def denormalise(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The transformer's latents -> raw VAE latents in the VAE's dtype, ready to decode: ``z · std + mean``
    (written as diffusers' ``WanVACEPipeline`` decodes, ``z / (1 / std) + mean``, so outputs match it bit for
    bit)."""
    z_dim = vae.config.z_dim
    z = latents.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(z.device, z.dtype)
    return z / inv_std + mean


@torch.no_grad()
def encode(vae: Any, videos: torch.Tensor) -> torch.Tensor:
    """Normalised VAE mode (fp32) of videos ``[b, 3, T, H, W]`` in [-1, 1], as the pipeline encodes its context."""
    z = retrieve_latents(vae.encode(videos.to(vae.device, vae.dtype)), None, sample_mode="argmax")
    return normalise(vae, z)


def zeros_latent(vae: Any, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Normalised VAE(zeros) of a video of ``shape`` ``[b, 3, T, H, W]``: the context's inactive half, the same
    for every clip (cached on the VAE per shape, device and dtype)."""
    cache = vae.__dict__.setdefault("_pickstyle_zeros_latent", {})
    key = (tuple(shape), str(device), str(vae.dtype))
    if key not in cache:
        cache[key] = encode(vae, torch.zeros(shape, device=device))
    return cache[key]


def vace_context(inactive: torch.Tensor, reactive: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The VACE context ``[inactive, reactive, mask]`` along the channel axis (dim -4: works with and without a
    batch axis), in ``reactive``'s dtype and device."""
    return torch.cat([inactive.to(reactive), reactive, mask.to(reactive)], dim=-4)
