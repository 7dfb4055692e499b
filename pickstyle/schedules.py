"""Learning-rate schedules (factors of the peak learning rate), shared by pretraining and adapter training."""

from __future__ import annotations

import math


def warmup_constant(step: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant 1 (adapter training, as the reference)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def warmup_cosine(step: int, warmup_steps: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak at ``total`` steps (pretraining, tiny adapters)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    tau = (step - warmup_steps) / max(1, total - warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, tau)))
