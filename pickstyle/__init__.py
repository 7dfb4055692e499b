"""pickstyle: train, evaluate, register and serve PickStyle video-to-video style transfer."""

import os as _os

# Offline by default: no telemetry, no hub look-ups. Setting process environment defaults is the one thing done at
# import time, because these libraries read them when *they* are imported; a user's own export still wins.
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "GIT_PYTHON_REFRESH": "quiet",
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations asks PyPI for a newer version at import otherwise
}.items():
    _os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
