"""The clips flow on a local two-worker Dask cluster (prefect-dask), against the serial library call."""

from __future__ import annotations

from pathlib import Path

import pytest

from pickstyle.data.clip_reader import iter_clips
from pickstyle.data.clips import build_clips
from tests.data.test_clips import make_pairs, make_params


@pytest.mark.slow
def test_clips_flow_on_a_local_dask_cluster(tmp_path):
    from prefect.artifacts import Artifact

    from flows.clips import clips_flow

    dask_data, serial_data = tmp_path / "dask", tmp_path / "serial"
    for data in (dask_data, serial_data):
        make_pairs(data, n=3)
    # 3 pairs x 2 variants in shards of 2 + 2 test clips: 4 chunks spread over the 2 workers
    params = make_params(dask_data, variants=2, shard_size=2, task_runner="dask", workers=2)
    summary = clips_flow(params)

    assert summary["clips"] == 6 and summary["test_clips"] == 2
    assert summary["shards"] == [f"clips-{i:06d}.tar" for i in range(3)]
    assert len(list(iter_clips(dask_data / "clips"))) == 6
    # the worker processes write the same bytes as a plain serial run
    build_clips(
        params.model_copy(update={"paths": params.paths.model_copy(update={"data": str(serial_data)})})
    )
    for rel in ("clips", "testclips"):
        for shard in sorted((serial_data / rel).glob("*.tar")):
            assert (dask_data / rel / shard.name).read_bytes() == shard.read_bytes(), shard.name
    for key in ("clips-summary", "clips-preview"):
        assert Artifact.get(key) is not None, key
    assert Path(summary["out_dir"], "preview.gif").is_file()
