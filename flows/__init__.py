"""Prefect flows: one thin flow per DVC stage (``python -m flows.<stage>``), plus ``retrain``.

Importing :mod:`pickstyle` first sets the offline/telemetry defaults before Prefect is imported.
"""

import pickstyle  # noqa: F401  (offline defaults before prefect is imported)
