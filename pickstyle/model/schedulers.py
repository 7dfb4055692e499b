"""Sampling schedulers: the flow-matching schedulers PickStyle samples with, built for a given timestep shift."""

from __future__ import annotations

from typing import Any

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from pickstyle.config import SCHEDULERS


def make_scheduler(name: str, shift: float, base_config: Any = None):
    """A flow-matching scheduler for sampling.

    Args:
        name: ``unipc`` (Wan's default), ``dpmpp`` (DPM-Solver++ 2M on flow sigmas, the paper's sampler) or
            ``euler`` (first-order flow-matching Euler).
        shift: sampling shift of the sigma schedule, σ' = sσ / (1 + (s−1)σ) (paper: 16).
        base_config: the backbone's scheduler config; only ``num_train_timesteps`` is taken from it.
    """
    num_train_timesteps = int((base_config or {}).get("num_train_timesteps", 1000))
    if name == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=num_train_timesteps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )
    if name == "dpmpp":
        return DPMSolverMultistepScheduler(
            num_train_timesteps=num_train_timesteps,
            algorithm_type="dpmsolver++",
            solver_order=2,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)
    raise ValueError(f"unknown scheduler {name!r}: expected one of {SCHEDULERS}")


def scheduler_name(scheduler: Any) -> str:
    if isinstance(scheduler, UniPCMultistepScheduler):
        return "unipc"
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return "dpmpp"
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "euler"
    raise ValueError(f"cannot change the shift of a {type(scheduler).__name__}: pass scheduler= too")
