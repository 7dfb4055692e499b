"""The latent space the transformer works in, one definition for the latents stage, pretraining and sampling.

Wan normalises VAE latents per channel, ``(z - latents_mean) / latents_std`` (the VAE config's 16 numbers), and
the VACE context of a clip is ``[inactive, reactive, mask]`` along channels: with mask = ones (the whole source is
context, docs/method.md §2) ``inactive`` = VAE(zeros) and ``reactive`` = VAE(video), both normalised, then the
mask's channels (64 on Wan, 4 on the tiny backbone): 96 channels on Wan2.1.

A *frame-wise* VAE (:func:`framewise`: the tiny backbone's, which has no temporal compression) encodes and decodes
each frame on its own, as Wan's VAE treats a clip's first frame. Every VAE call goes through :func:`vae_encode` /
:func:`vae_decode` (the pipeline's context too), so the latents stage, pretraining, sampling and the evaluation's
round trip agree.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

#: The VAE config key (saved in ``vae/config.json``) that marks a frame-wise VAE.
FRAMEWISE_KEY = "_pickstyle_framewise"


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


def framewise(vae: Any) -> bool:
    """Whether ``vae`` encodes and decodes each frame on its own (its config says so; only possible without
    temporal compression)."""
    return bool(vae.config.get(FRAMEWISE_KEY, False))


def set_framewise(vae: Any, on: bool) -> None:
    """Mark ``vae`` frame-wise (or not) in its config, which ``save_pretrained`` writes and loading restores."""
    if on and vae.config.get("scale_factor_temporal", 1) != 1:
        raise ValueError("a frame-wise VAE cannot compress time (scale_factor_temporal must be 1)")
    vae.register_to_config(**{FRAMEWISE_KEY: bool(on)})


def _fold(x: torch.Tensor) -> torch.Tensor:
    """``[b, c, T, h, w]`` -> ``[b·T, c, 1, h, w]`` (each frame a clip of one)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, 1, h, w)


def _unfold(x: torch.Tensor, b: int) -> torch.Tensor:
    """The inverse of :func:`_fold` for ``b`` clips."""
    bt, c, _, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


def vae_encode(vae: Any, videos: torch.Tensor) -> DiagonalGaussianDistribution:
    """The VAE's latent distribution of videos ``[b, 3, T, H, W]`` in [-1, 1] (raw, not normalised)."""
    videos = videos.to(vae.device, vae.dtype)
    if not framewise(vae):
        return vae.encode(videos).latent_dist
    params = vae.encode(_fold(videos)).latent_dist.parameters
    return DiagonalGaussianDistribution(_unfold(params, videos.shape[0]))


def vae_decode(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """Decode raw latents ``[b, z, f, h, w]`` to videos ``[b, 3, T, H, W]`` (clamped to [-1, 1])."""
    if not framewise(vae):
        return vae.decode(z, return_dict=False)[0]
    return _unfold(vae.decode(_fold(z), return_dict=False)[0], z.shape[0])


def roundtrip(vae: Any, videos: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstruction (encode mode, decode) of videos ``[b, 3, T, H, W]`` in [-1, 1]."""
    return vae_decode(vae, vae_encode(vae, videos).mode())


@torch.no_grad()
def encode(vae: Any, videos: torch.Tensor) -> torch.Tensor:
    """Normalised VAE mode (fp32) of videos ``[b, 3, T, H, W]`` in [-1, 1], as the pipeline encodes its context."""
    return normalise(vae, vae_encode(vae, videos).mode())


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
