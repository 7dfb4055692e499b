"""Prefect flow tests run against one temporary Prefect API and database for the whole session."""

from __future__ import annotations

import os

import pytest

# offline hygiene (docs/method.md §3): no telemetry from Prefect, nothing fetched
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(scope="session", autouse=True)
def prefect_harness():
    """``prefect_test_harness``: a throwaway API server + SQLite database (started once, ~10 s).

    The start-up timeout is raised from 30 s: on a busy 2-core machine the server can take longer to come up.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
