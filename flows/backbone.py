"""Stage ``backbone``: build the tiny Wan2.1-VACE offline, or check a local one. ``python -m flows.backbone``."""

from __future__ import annotations

import sys

from prefect import flow

from flows.common import stage_params, summary_artifact
from pickstyle.config import Params
from pickstyle.model.components import ensure_backbone


@flow(name="backbone", log_prints=True)
def backbone_flow(params: Params) -> dict:
    path = ensure_backbone(params)
    summary = {"backbone": params.active.backbone, "path": str(path)}
    summary_artifact("backbone-summary", "Backbone", summary)
    return summary


if __name__ == "__main__":
    params, _ = stage_params(sys.argv[1:], __doc__)
    backbone_flow(params)
