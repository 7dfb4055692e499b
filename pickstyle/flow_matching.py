"""Rectified-flow maths shared by pretraining and adapter training (Wan2.1 / SD3 flow matching).

Small pure functions: the shifted timestep draw, the noising interpolation and the velocity target.
"""

from __future__ import annotations

import torch

#: Wan's training timestep scale: the transformer takes ``timestep = σ · 1000``.
NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift noise levels toward 1: σ' = shift·σ / (1 + (shift − 1)·σ) (Wan / SD3 timestep shift).

    With ``shift > 1`` more of the draws land at high noise, where a 480p video's structure is decided.
    """
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """σ for each clip of a batch: a uniform draw u ~ U(0, 1), shifted (:func:`shift_sigmas`)."""
    u = torch.rand(batch, generator=generator, dtype=torch.float32)
    return shift_sigmas(u, shift)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation x_t = (1 − σ)·x0 + σ·ε, with σ broadcast over ``[b, c, f, h, w]``."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer predicts: d x_t / dσ = ε − x0."""
    return noise - latents
