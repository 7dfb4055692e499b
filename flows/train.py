"""Stage ``train``: train the context-style LoRA adapter on the cached latents. ``python -m flows.train``.

Multi-GPU runs bypass Prefect (one process per GPU): ``accelerate launch --config_file
configs/accelerate/ddp.yaml -m pickstyle.cli train``.
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.common import stage_params, summary_artifact
from pickstyle.config import Params
from pickstyle.training import train


@flow(name="train", log_prints=True)
def train_flow(params: Params, resume: bool = False) -> dict:
    summary = train(params, resume=resume)
    summary_artifact("train-summary", "Context-style adapter training", summary)
    return summary


if __name__ == "__main__":
    resume = "--resume" in sys.argv[1:]
    params, _ = stage_params([a for a in sys.argv[1:] if a != "--resume"], __doc__)
    train_flow(params, resume=resume)
