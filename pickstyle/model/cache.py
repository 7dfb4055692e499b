"""A TeaCache-style step cache that is correct on Wan2.1-VACE.

TeaCache (Liu et al., https://arxiv.org/abs/2411.19108) skips the transformer blocks on steps where the
model's input has barely changed and adds back the residual (block output − block input) of the last fully
computed step. diffusers' FirstBlockCache and MagCache are wrong on VACE: they cache the main blocks only,
while the VACE hints are added inside that block loop, so on cached steps the hints get added twice
(docs/method.md §3). Here the whole stack, VACE context blocks AND main blocks, is skipped together:

    residual = hidden state before ``norm_out`` − hidden state after ``patch_embedding``

and on a cached step the forward is patch embedding → ``+ residual`` → ``norm_out``/``proj_out``.

Decision rule (per branch, one call per denoising step): the "modulated input" is the first main block's
AdaLN-modulated input ``norm1(x)·(1 + scale) + shift`` (it moves with both the latents and the timestep);
its relative L1 change from the previous step, rescaled as in TeaCache by a polynomial fitted per model
(``CALIBRATIONS``: relative L1 change of the input → relative L1 error of reusing the residual, clamped at
0), is accumulated and, while the sum stays *strictly* below ``threshold``, the stored residual is reused;
otherwise the step is computed and the sum resets. So ``threshold = 0`` never reuses anything and gives
exactly the uncached output. The first ``warmup`` steps (TeaCache's retention steps) and the last step are
always computed. A model without a calibration uses the raw distance (thresholds then mean little); see
``bench/RESULTS.md`` for speed and quality per threshold and ``bench/sample.py --calibrate`` for the fit.

Each guidance branch keeps its own state (``with cache.branch("cond"):``); a batched CS-CFG forward is one
branch whose batch holds all three predictions, and they share the reuse decision (the latents and
timestep, hence the modulated input, are the same for all three).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils.peft_utils import apply_lora_scale

#: TeaCache rescaling polynomials (numpy.polyval order, highest power first) per backbone, keyed by
#: :func:`calibration_key`. Fitted by ``python bench/sample.py --calibrate`` on uncached runs of the tiny
#: pretrained backbone (models/backbone): x = relative L1 change of the modulated input between steps,
#: y = the relative L1 error of reusing the previous step's residual, |Δ residual|₁ / |block output|₁.
#: None yet for the real Wan backbones.
CALIBRATIONS: dict[str, list[float]] = {
    # the tiny pretrained backbone: 78 step pairs (3 test clips, 8 and 20 DPM++ steps, cs_cfg), x in
    # [0.017, 0.49], y in [0.52, 0.92], R^2 0.24: reusing a residual costs >= ~50% of the output on this
    # backbone whatever the input change, so the rescaled distance is ~0.6-0.8 per step
    "4x128-vace4": [0.3908298, 0.6315786],
}


def calibration_key(transformer: Any) -> str:
    """The sizes that identify a backbone's calibration: ``layers x dim, vace layers``."""
    c = transformer.config
    return f"{c.num_layers}x{c.num_attention_heads * c.attention_head_dim}-vace{len(c.vace_layers)}"


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L1 change from ``b`` to ``a``, the most-changed sample of the batch."""
    dims = list(range(1, a.ndim))
    return float(((a - b).abs().mean(dims) / b.abs().mean(dims).clamp_min(1e-12)).max())


@dataclass
class _BranchState:
    previous_modulated: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    accumulated: float = 0.0
    last_distance: float | None = None
    calls: int = 0
    computed: int = 0
    reused: int = 0
    distances: list[float] = field(default_factory=list)
    #: (input change, residual change) of consecutive computed steps: the calibration data.
    pairs: list[tuple[float, float]] = field(default_factory=list)


class StepCache:
    """Per-branch cache state and the reuse rule; installed on a transformer by ``step_cache``.

    Args:
        threshold: reuse while the accumulated (rescaled) change stays below this (0 = never reuse).
        warmup: first steps of each branch that are always computed (retention steps; at least 1).
        num_steps: steps of the run (the last one is always computed); ``None`` = unknown.
        coefficients: the rescaling polynomial (``numpy.polyval`` order); ``None`` = the raw distance.
    """

    def __init__(
        self,
        threshold: float,
        warmup: int = 1,
        num_steps: int | None = None,
        coefficients: list[float] | None = None,
    ) -> None:
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.coefficients = coefficients
        self.warmup = max(1, warmup)
        self.num_steps = num_steps
        self.states: dict[str, _BranchState] = {}
        self._branch = "default"

    def reset(self, num_steps: int | None = None) -> None:
        """Forget every branch (call at the start of each video)."""
        self.states.clear()
        self.num_steps = num_steps

    @contextlib.contextmanager
    def branch(self, name: str) -> Iterator[None]:
        """Route the transformer calls inside the block to the state of branch ``name``."""
        previous, self._branch = self._branch, name
        try:
            yield
        finally:
            self._branch = previous

    def stats(self) -> dict[str, dict[str, int]]:
        """Computed and reused step counts per branch."""
        return {k: {"computed": s.computed, "reused": s.reused} for k, s in self.states.items()}

    def should_reuse(self, modulated: torch.Tensor, residual_shape: torch.Size) -> bool:
        """Update the current branch with this step's modulated input; True = reuse the stored residual."""
        state = self.states.setdefault(self._branch, _BranchState())
        step = state.calls
        state.calls += 1
        previous, state.previous_modulated = state.previous_modulated, modulated
        forced = (
            step < self.warmup
            or (self.num_steps is not None and step >= self.num_steps - 1)
            or previous is None
            or previous.shape != modulated.shape
            or state.residual is None
            or state.residual.shape != residual_shape
        )
        state.last_distance = None
        if previous is not None and previous.shape == modulated.shape:
            # Relative L1 per sample; the batch shares one decision, so the most-changed sample decides.
            state.last_distance = _rel_l1(modulated, previous)
        if not forced:
            distance = state.last_distance
            if self.coefficients is not None:
                # never negative: a fitted polynomial may dip below 0, and threshold 0 must mean "no cache"
                distance = max(0.0, float(np.polyval(self.coefficients, distance)))
            state.distances.append(distance)
            state.accumulated += distance
            if state.accumulated < self.threshold:
                state.reused += 1
                return True
        state.accumulated = 0.0
        state.computed += 1
        return False

    def store(self, residual: torch.Tensor, output: torch.Tensor | None = None) -> None:
        """Keep the residual of a fully computed step for the current branch.

        With ``output`` (the block stack's output), record the calibration pair: the input change and the
        error reusing the previous residual would have made, |Δ residual|₁ / |output|₁.
        """
        state = self.states[self._branch]
        previous = state.residual
        if (
            output is not None
            and state.last_distance is not None
            and previous is not None
            and previous.shape == residual.shape
        ):
            dims = list(range(1, output.ndim))
            error = (residual - previous).abs().mean(dims) / output.abs().mean(dims).clamp_min(1e-12)
            state.pairs.append((state.last_distance, float(error.max())))
        state.residual = residual


@apply_lora_scale("attention_kwargs")
def _cached_forward(
    transformer: Any,
    cache: StepCache,
    original_forward: Any,
    hidden_states: torch.Tensor,
    timestep: torch.LongTensor,
    encoder_hidden_states: torch.Tensor,
    encoder_hidden_states_image: torch.Tensor | None = None,
    control_hidden_states: torch.Tensor | None = None,
    control_hidden_states_scale: torch.Tensor | None = None,
    return_dict: bool = True,
    attention_kwargs: dict[str, Any] | None = None,
) -> Any:
    """``WanVACETransformer3DModel.forward`` (diffusers 0.42) with the block stack skippable as one unit.

    Mirrors the stock forward operation for operation, so a computed step is bit-identical to it.
    """
    if torch.is_grad_enabled() and transformer.gradient_checkpointing:
        # Training path: never cache.
        return original_forward(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_image=encoder_hidden_states_image,
            control_hidden_states=control_hidden_states,
            control_hidden_states_scale=control_hidden_states_scale,
            return_dict=return_dict,
            attention_kwargs=attention_kwargs,
        )
    config = transformer.config
    batch_size, _, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = config.patch_size
    post_f, post_h, post_w = num_frames // p_t, height // p_h, width // p_w

    if control_hidden_states_scale is None:
        control_hidden_states_scale = control_hidden_states.new_ones(len(config.vace_layers))
    control_hidden_states_scale = torch.unbind(control_hidden_states_scale)
    if len(control_hidden_states_scale) != len(config.vace_layers):
        raise ValueError(
            f"Length of `control_hidden_states_scale` {len(control_hidden_states_scale)} should be "
            f"equal to {len(config.vace_layers)}."
        )

    rotary_emb = transformer.rope(hidden_states)
    hidden_states = transformer.patch_embedding(hidden_states)
    hidden_states = hidden_states.flatten(2).transpose(1, 2)  # [b, tokens, dim]

    temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = transformer.condition_embedder(
        timestep, encoder_hidden_states, encoder_hidden_states_image
    )
    timestep_proj = timestep_proj.unflatten(1, (6, -1))  # [b, 6, dim]
    if encoder_hidden_states_image is not None:
        encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

    # The first main block's AdaLN-modulated input: what TeaCache watches.
    first = transformer.blocks[0]
    shift_msa, scale_msa = (first.scale_shift_table + timestep_proj.float()).chunk(6, dim=1)[:2]
    modulated = first.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa

    if cache.should_reuse(modulated, hidden_states.shape):
        hidden_states = hidden_states + cache.states[cache._branch].residual
    else:
        block_input = hidden_states
        control_hidden_states = transformer.vace_patch_embedding(control_hidden_states)
        control_hidden_states = control_hidden_states.flatten(2).transpose(1, 2)
        padding = control_hidden_states.new_zeros(
            batch_size, hidden_states.size(1) - control_hidden_states.size(1), control_hidden_states.size(2)
        )
        control_hidden_states = torch.cat([control_hidden_states, padding], dim=1)

        hints = []
        for i, block in enumerate(transformer.vace_blocks):
            conditioning_states, control_hidden_states = block(
                hidden_states, encoder_hidden_states, control_hidden_states, timestep_proj, rotary_emb
            )
            hints.append((conditioning_states, control_hidden_states_scale[i]))
        hints = hints[::-1]
        for i, block in enumerate(transformer.blocks):
            hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
            if i in config.vace_layers:
                control_hint, scale = hints.pop()
                hidden_states = hidden_states + control_hint.to(hidden_states.device) * scale
        cache.store(hidden_states - block_input, hidden_states)

    shift, scale = (transformer.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    shift = shift.to(hidden_states.device)
    scale = scale.to(hidden_states.device)
    hidden_states = (transformer.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
    hidden_states = transformer.proj_out(hidden_states)
    hidden_states = hidden_states.reshape(batch_size, post_f, post_h, post_w, p_t, p_h, p_w, -1)
    hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
    output = hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # [b, c, f, h, w]
    if not return_dict:
        return (output,)

    return Transformer2DModelOutput(sample=output)


@contextlib.contextmanager
def step_cache(
    transformer: torch.nn.Module,
    threshold: float,
    warmup: int = 1,
    num_steps: int | None = None,
    coefficients: list[float] | None | str = "auto",
) -> Iterator[StepCache]:
    """Install a ``StepCache`` on ``transformer`` for the duration of the block; diffusers is not modified.

    The instance's ``forward`` is replaced (``_old_forward`` when an accelerate offload hook wraps it), so
    ``transformer(...)`` calls, module hooks and offloading keep working; the original is restored on exit.

    Args:
        transformer: a ``WanVACETransformer3DModel``.
        threshold: see ``StepCache``; 0 computes every step (identical to no cache).
        warmup: first steps per branch that are always computed.
        num_steps: steps of the run, so the last one is always computed.
        coefficients: the rescaling polynomial; ``"auto"`` = ``CALIBRATIONS`` for this transformer's sizes
            (the raw distance when there is none); ``None`` = the raw distance.
    """
    if coefficients == "auto":
        coefficients = CALIBRATIONS.get(calibration_key(transformer))
    cache = StepCache(threshold, warmup=warmup, num_steps=num_steps, coefficients=coefficients)
    attr = (
        "_old_forward"
        if hasattr(transformer, "_hf_hook") and hasattr(transformer, "_old_forward")
        else "forward"
    )
    had_instance_attr = attr in transformer.__dict__
    original = getattr(transformer, attr)
    setattr(transformer, attr, functools.partial(_cached_forward, transformer, cache, original))
    try:
        yield cache
    finally:
        if had_instance_attr:
            setattr(transformer, attr, original)
        else:
            delattr(transformer, attr)
