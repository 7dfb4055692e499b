"""Stage ``latents``: encode every clip once (target latent, 96-ch context, prompt). ``python -m flows.latents``."""

from __future__ import annotations

import sys

from prefect import flow

from flows.common import stage_params, summary_artifact
from pickstyle.config import Params
from pickstyle.latents import build_latents


@flow(name="latents", log_prints=True)
def latents_flow(params: Params) -> dict:
    summary = build_latents(params)
    summary_artifact("latents-summary", "Cached latents", summary)
    return summary


if __name__ == "__main__":
    params, _ = stage_params(sys.argv[1:], __doc__)
    latents_flow(params)
