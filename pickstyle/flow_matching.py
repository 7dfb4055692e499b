"""Rectified-flow maths shared by pretraining and adapter training (Wan2.1 / SD3 flow matching).

Small pure functions: the shifted timestep draw, the noising interpolation, the velocity target, the
mid-schedule loss weights and the loss.
"""

from __future__ import annotations

import math

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


def _bell(sigmas: torch.Tensor) -> torch.Tensor:
    # exp(−2(σ − ½)²) minus its value at the ends (σ = 0 or 1), so the weight falls to 0 there.
    return torch.exp(-2.0 * (sigmas - 0.5) ** 2) - math.exp(-0.5)


def bell_weights(sigmas: torch.Tensor, shift: float, grid: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Mid-schedule loss weights w(σ) = (exp(−2(σ − ½)²) − exp(−½)) / Z, with mean 1 over the training draws.

    This is the reference's weighting (DiffSynth-Studio ``FlowMatchScheduler`` in training mode, used by the
    PickStyle code): a Gaussian bump over the timestep ``t = 1000σ`` peaking at t = 500, shifted to be 0 at the
    ends. ``Z`` is the bump's mean over the ``grid`` shifted noise levels σ_i = shift((i + ½)/grid), so that
    ``E[w(σ)] = 1`` when σ is drawn as :func:`sample_sigmas` draws it: the weighting changes which timesteps
    matter, not the loss's overall scale (nor the right learning rate).

    Args:
        sigmas: Noise levels in [0, 1], any shape.
        shift: The timestep shift the sigmas were drawn with.
        grid: Number of points of the normalising grid.
    """
    u = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    z = _bell(shift_sigmas(u, shift)).mean().item()
    return (_bell(sigmas.double()) / z).to(sigmas.dtype)


def flow_matching_loss(
    pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE to the flow target ε − x0. With ``weights`` (one per clip, e.g. :func:`bell_weights`): per clip, then
    the weighted mean, mean_b w_b · mean((pred_b − (ε_b − x0_b))²) (adapter training); without: the plain mean
    over every element (pretraining; equal to unit weights for clips of one size)."""
    target = flow_target(latents.float(), noise.float())
    if weights is None:
        return ((pred.float() - target) ** 2).mean()
    per_clip = ((pred.float() - target) ** 2).flatten(1).mean(dim=1)  # [b]
    return (weights.float() * per_clip).mean()
