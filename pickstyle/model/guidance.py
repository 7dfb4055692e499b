"""Guidance maths: CFG, Context-Style CFG (PickStyle, arXiv 2510.07546) and its APG variant.

Small pure functions on noise predictions shaped ``[b, c, f, h, w]``; the denoising loop in
``pickstyle.model.pipeline`` decides which predictions to compute and calls these to combine them.

Notation (paper §3.4, https://arxiv.org/abs/2510.07546):
  * ``eps_c`` = ε(x; text, C)      conditional: style prompt and source context;
  * ``eps_t`` = ε(x; ∅, C)         text dropped (the "∅ text" is Wan's negative prompt), context kept;
  * ``eps_0`` = ε(x; ∅, π(C))      text dropped and the context replaced by a permuted "null" context.
"""

from __future__ import annotations

import torch


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, https://arxiv.org/abs/2207.12598).

    ε̂ = ε_u + s·(ε_c − ε_u)

    Written in exactly the order diffusers' ``WanVACEPipeline`` uses, so mode ``cfg`` matches it bit for bit.
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def cs_cfg(
    eps_c: torch.Tensor, eps_t: torch.Tensor, eps_0: torch.Tensor, t_guide: float, c_guide: float
) -> torch.Tensor:
    """Context-Style CFG, PickStyle Eq. 16 (https://arxiv.org/abs/2510.07546).

    ε̂ = ε_t + t_g·(ε_c − ε_t) + c_g·(ε_t − ε_0)

    The text term pushes towards the style prompt; the context term pushes away from a prediction whose
    context has lost its spatio-temporal structure, i.e. towards following the source video. With
    ``c_guide = 0`` this is plain text CFG with ``eps_t`` as the unconditional prediction.
    """
    return cfg(eps_c, eps_t, t_guide) + c_guide * (eps_t - eps_0)


class MomentumBuffer:
    """Running sum of guidance updates, APG (Sadat et al., https://arxiv.org/abs/2410.02416), §4.

    avg ← Δ + β·avg. The PickStyle public code uses β = 0.75 (the APG paper recommends a negative β);
    it is a parameter so both can be tried.
    """

    def __init__(self, momentum: float = 0.75) -> None:
        self.momentum = momentum
        self.running_average: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        """Fold ``value`` into the running average and return the new average."""
        self.running_average = value + self.momentum * self.running_average
        return self.running_average


def _sample_dims(x: torch.Tensor) -> list[int]:
    # Norms and projections are per sample: every axis except the batch axis.
    return list(range(1, x.ndim))


def apg_update(
    diff: torch.Tensor,
    reference: torch.Tensor,
    buffer: MomentumBuffer | None = None,
    norm_threshold: float = 55.0,
    eta: float = 0.0,
) -> torch.Tensor:
    """Adaptive projected guidance update (APG, https://arxiv.org/abs/2410.02416, Alg. 1).

    Δ ← momentum(Δ); Δ ← Δ·min(1, r/‖Δ‖); Δ = Δ∥ + Δ⊥ w.r.t. ``reference``; return Δ⊥ + η·Δ∥.

    The parallel part (η = 0 drops it) is what oversaturates colours at high scales; the norm clip ``r``
    bounds the update. Projection is done in float64 as in the reference implementation.
    """
    if buffer is not None:
        diff = buffer.update(diff)
    dims = _sample_dims(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm.clamp_min(1e-12))
    dtype = diff.dtype
    d, ref = diff.double(), reference.double()
    unit = ref / ref.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = d - parallel
    return (orthogonal + eta * parallel).to(dtype)


def cs_cfg_apg(
    eps_c: torch.Tensor,
    eps_t: torch.Tensor,
    eps_0: torch.Tensor,
    t_guide: float,
    c_guide: float,
    text_buffer: MomentumBuffer | None = None,
    context_buffer: MomentumBuffer | None = None,
    norm_threshold: float = 55.0,
) -> torch.Tensor:
    """CS-CFG with APG updates, the PickStyle public code's default sampler.

    ε̂ = ε_c + (t_g − 1)·APG(ε_c − ε_t) + (c_g − 1)·APG(ε_t − ε_0),
    each APG keeping the part orthogonal to ε_c after momentum and norm clipping (see ``apg_update``).
    Each difference has its own momentum buffer, kept across the steps of one video.
    """
    text = apg_update(eps_c - eps_t, eps_c, text_buffer, norm_threshold)
    context = apg_update(eps_t - eps_0, eps_c, context_buffer, norm_threshold)
    return eps_c + (t_guide - 1) * text + (c_guide - 1) * context


def permute_context(context: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The null context π(C): the T, H and W axes of ``context`` ``[b, c, f, h, w]`` permuted independently.

    PickStyle §3.4: the permuted context keeps the source's colours and textures (the same multiset of
    values per channel) but loses its spatio-temporal structure, so ε_t − ε_0 points towards following the
    source layout and motion. The permutations are drawn from ``generator`` (on its device), so a seeded
    pipeline is reproducible; the caller draws a fresh one every step.
    """
    device = generator.device if generator is not None else context.device
    _, _, f, h, w = context.shape
    perm_f = torch.randperm(f, generator=generator, device=device).to(context.device)
    perm_h = torch.randperm(h, generator=generator, device=device).to(context.device)
    perm_w = torch.randperm(w, generator=generator, device=device).to(context.device)
    return context[:, :, perm_f][:, :, :, perm_h][:, :, :, :, perm_w]
