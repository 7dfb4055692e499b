"""Prefect flows: one thin flow per DVC stage (``python -m flows.<stage>``), plus ``retrain``.

Importing :mod:`pickstyle` first sets the offline/telemetry defaults before Prefect is imported.
"""

import os

import pickstyle  # noqa: F401  (offline defaults before prefect is imported)

# With no PREFECT_API_URL, each flow process starts a temporary local API server; on a busy 2-core machine it
# can need more than Prefect's default 20 s to come up. A user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
