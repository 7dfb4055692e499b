"""Stage ``pairs``: build paired (source, style, caption) WebDataset shards. ``python -m flows.pairs``."""

from __future__ import annotations

import sys

from prefect import flow

from flows.common import stage_params, summary_artifact
from pickstyle.config import Params
from pickstyle.data.pairs import build_pairs


@flow(name="pairs", log_prints=True)
def pairs_flow(params: Params) -> dict:
    summary = build_pairs(params)
    summary_artifact("pairs-summary", "Paired style images", summary)
    return summary


if __name__ == "__main__":
    params, _ = stage_params(sys.argv[1:], __doc__)
    pairs_flow(params)
