"""Guiders: one small class per guidance mode, as diffusers' ``guiders/`` (its branches, its combine rule, its state).

The denoising loop (:class:`~pickstyle.model.pipeline.PickStylePipeline`) asks a guider which predictions to
compute at a step (:meth:`Guider.computed`), runs them, and hands them back to be combined (:meth:`Guider.guide`).
A guider instance holds the state of one video window across the steps (APG momentum, reused guidance
directions), so a long video gets one per window (:meth:`Guider.fresh`). Adding a mode is one class here (its
name added to ``pickstyle.config.Guidance``, which the CLI, the served model and the evaluation read).

Predictions, by branch name: ``"c"`` = ε(x; text, C), ``"t"`` = ε(x; ∅, C), ``"0"`` = ε(x; ∅, π(C)) (the
formulas are in :mod:`pickstyle.model.guidance`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from pickstyle.model.guidance import MomentumBuffer, cfg, cs_cfg, cs_cfg_apg

#: What the steps between full guidance steps compute (``guidance_every`` > 1): ``all`` = ε_c alone (every
#: direction reused), ``context`` = ε_c and ε_t where the mode has ε_t (only the context direction reused).
REUSE_MODES = ("all", "context")


def reuse_guidance(
    eps: dict[str, torch.Tensor], branches: tuple[str, ...], offsets: dict[str, torch.Tensor], full: bool
) -> dict[str, torch.Tensor]:
    """Guidance-direction reuse (FasterCache, https://arxiv.org/abs/2410.19355, §CFG-Cache style).

    The guidance directions (ε_c − ε_t, ε_t − ε_0) change slowly from step to step while ε_c itself follows
    the latents. On a full step every prediction in ``branches`` was computed and the offsets ε_c − ε_b are
    stored; on the steps in between only some were, and each missing one is rebuilt as
    ε_b = ε_ref − (ε_ref − ε_b)_stored, with ε_ref = ε_t for ε_0 when ε_t was computed (only the context
    direction reused), else ε_c. For ``cs_cfg`` with all directions reused this is
    ε̂ = ε_c + (t_g − 1)·(ε_c − ε_t)_stored + c_g·(ε_t − ε_0)_stored: one forward instead of three.
    """
    if full:
        offsets.clear()
        for b in branches[1:]:
            offsets[b] = eps["c"] - eps[b]
        return eps
    eps = dict(eps)
    for b in branches[1:]:
        if b in eps:
            continue
        if b == "0" and "t" in eps:
            eps[b] = eps["t"] - (offsets["0"] - offsets["t"])  # (ε_t − ε_0)_stored = off_0 − off_t
        else:
            eps[b] = eps["c"] - offsets[b]
    return eps


class Guider:
    """A guidance mode: the predictions it needs (``branches``, in batch order) and how it combines them.

    Args:
        t_guide: text (style) scale t_g.
        c_guide: context scale c_g.
        every: k: all the predictions every k-th step only; in between the last full step's guidance
            directions are reused (:func:`reuse_guidance`).
        reuse: what the steps in between compute (:data:`REUSE_MODES`).
        apg_momentum, apg_norm_threshold: APG settings (``cs_cfg_apg``).
    """

    name: ClassVar[str]
    branches: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        t_guide: float = 5.0,
        c_guide: float = 4.0,
        every: int = 1,
        reuse: str = "all",
        apg_momentum: float = 0.75,
        apg_norm_threshold: float = 55.0,
    ) -> None:
        if every < 1 or reuse not in REUSE_MODES:
            raise ValueError(
                f"need guidance_every >= 1 and guidance_reuse in {REUSE_MODES}, got {every}, {reuse!r}"
            )
        self.t_guide, self.c_guide, self.every, self.reuse = t_guide, c_guide, every, reuse
        self.apg_momentum, self.apg_norm_threshold = apg_momentum, apg_norm_threshold
        self.offsets: dict[str, torch.Tensor] = {}  # ε_c − ε_b of the last full step

    def fresh(self) -> Guider:
        """The same settings with new state (one guider per video window)."""
        return type(self)(
            self.t_guide, self.c_guide, self.every, self.reuse, self.apg_momentum, self.apg_norm_threshold
        )

    def computed(self, step: int) -> tuple[str, ...]:
        """The predictions to compute at ``step``: all ``branches`` on full steps, fewer in between."""
        if step % self.every == 0:
            return self.branches
        if self.reuse == "context" and "t" in self.branches:
            return ("c", "t")
        return ("c",)

    def guide(self, eps: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The guided prediction from the step's computed predictions (the missing ones rebuilt first)."""
        if self.every > 1:
            eps = reuse_guidance(eps, self.branches, self.offsets, step % self.every == 0)
        return self.combine(eps)

    def combine(self, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class NoGuidance(Guider):
    """ε̂ = ε_c: the conditional prediction alone (1 prediction)."""

    name, branches = "none", ("c",)

    def combine(self, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        return eps["c"]


class TextCFG(Guider):
    """ε̂ = ε_t + t_g(ε_c − ε_t): plain text CFG, the stock ``WanVACEPipeline`` behaviour (2 predictions)."""

    name, branches = "cfg", ("c", "t")

    def combine(self, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        return cfg(eps["c"], eps["t"], self.t_guide)


class JointCFG(Guider):
    """ε̂ = ε_0 + t_g(ε_c − ε_0): text and context dropped together, not separated (2 predictions)."""

    name, branches = "cfg_joint", ("c", "0")

    def combine(self, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        return cfg(eps["c"], eps["0"], self.t_guide)


class ContextStyleCFG(Guider):
    """ε̂ = ε_t + t_g(ε_c − ε_t) + c_g(ε_t − ε_0): PickStyle Eq. 16 (3 predictions)."""

    name, branches = "cs_cfg", ("c", "t", "0")

    def combine(self, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        return cs_cfg(eps["c"], eps["t"], eps["0"], self.t_guide, self.c_guide)


class ContextStyleAPG(Guider):
    """ε̂ = ε_c + (t_g−1)APG(ε_c−ε_t) + (c_g−1)APG(ε_t−ε_0): the public code's default (3 predictions); one
    momentum buffer per direction, kept across the steps of one window."""

    name, branches = "cs_cfg_apg", ("c", "t", "0")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.text_buffer = MomentumBuffer(self.apg_momentum)
        self.context_buffer = MomentumBuffer(self.apg_momentum)

    def combine(self, eps: dict[str, torch.Tensor]) -> torch.Tensor:
        return cs_cfg_apg(
            eps["c"],
            eps["t"],
            eps["0"],
            self.t_guide,
            self.c_guide,
            self.text_buffer,
            self.context_buffer,
            self.apg_norm_threshold,
        )


#: Every guider by mode name (the names of ``pickstyle.config.Guidance``).
GUIDERS: dict[str, type[Guider]] = {
    g.name: g for g in (NoGuidance, TextCFG, JointCFG, ContextStyleCFG, ContextStyleAPG)
}


def make_guider(mode: str, **settings) -> Guider:
    """The guider of ``mode`` with ``settings`` (:class:`Guider`'s arguments).

    Scales under which a mode is the conditional prediction alone (``cfg``/``cfg_joint`` at t_g = 1, ``cs_cfg``
    at t_g = 1 and c_g = 0: the tiny profile's evaluated best) get :class:`NoGuidance`, one prediction a step
    instead of two or three.
    """
    if mode not in GUIDERS:
        raise ValueError(f"unknown guidance {mode!r}: expected one of {tuple(GUIDERS)}")
    mode = effective_mode(mode, settings.get("t_guide", 5.0), settings.get("c_guide", 4.0))
    return GUIDERS[mode](**settings)


def effective_mode(mode: str, t_guide: float, c_guide: float) -> str:
    """The guidance ``mode`` actually runs under these scales: ``none`` where it reduces to the conditional
    prediction alone (``cfg``/``cfg_joint`` at t_g = 1, ``cs_cfg`` at t_g = 1 and c_g = 0), else ``mode``."""
    if t_guide == 1 and (mode in ("cfg", "cfg_joint") or (mode == "cs_cfg" and c_guide == 0)):
        return "none"
    return mode
