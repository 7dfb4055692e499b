"""Stage ``train``: train the context-style LoRA adapter on the cached latents. ``python -m flows.train``.

A killed run (``kill -9``, a pre-empted job) continues from its last checkpoint on the next ``dvc repro``: the
checkpoints live in ``models/.checkpoints/adapter``, outside the stage's output. ``--fresh`` starts from step 0.

Multi-GPU runs bypass Prefect (one process per GPU): ``accelerate launch --config_file
configs/accelerate/ddp.yaml -m pickstyle.cli train``.
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.common import stage_params, summary_artifact
from pickstyle.config import Params
from pickstyle.train import train


@flow(name="train", log_prints=True)
def train_flow(params: Params, fresh: bool = False) -> dict:
    summary = train(params, fresh=fresh)
    summary_artifact("train-summary", "Context-style adapter training", summary)
    return summary


if __name__ == "__main__":
    fresh = "--fresh" in sys.argv[1:]
    params, _ = stage_params([a for a in sys.argv[1:] if a != "--fresh"], __doc__)
    train_flow(params, fresh=fresh)
