"""Stage ``pretrain``: train the tiny Wan2.1-VACE from scratch (tiny profile). ``python -m flows.pretrain``.

Its output, ``models/backbone``, is committed with the repository (DVC ``cache: false``), so a fresh clone's
``dvc repro`` skips this stage; ``dvc repro -f pretrain`` makes it again (README: The tiny backbone).
"""

from __future__ import annotations

import sys

from prefect import flow

from flows.common import stage_params, summary_artifact
from pickstyle.config import Params
from pickstyle.pretrain import pretrain


@flow(name="pretrain", log_prints=True)
def pretrain_flow(params: Params) -> dict:
    summary = pretrain(params)
    summary_artifact("pretrain-summary", "Pretrained tiny backbone", summary)
    return summary


if __name__ == "__main__":
    params, _ = stage_params(sys.argv[1:], __doc__)
    pretrain_flow(params)
