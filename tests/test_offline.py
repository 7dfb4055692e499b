"""Offline hygiene: importing every module of the project opens no connection beyond loopback.

A Python audit hook (installed before anything is imported, in a fresh interpreter) records every
``socket.connect`` and ``socket.getaddrinfo``; libraries that phone home at import time (update checks,
telemetry) show up there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for folder in ("pickstyle", "flows")
    for p in (ROOT / folder).rglob("*.py")
    if p.name != "__init__.py" or p.parent.name == folder
)

PROBE = textwrap.dedent(
    """
    import importlib, json, os, sys

    seen = []

    def hook(event, args):
        if event == "socket.connect":
            seen.append(("connect", repr(args[1])))
        elif event == "socket.getaddrinfo":
            seen.append(("getaddrinfo", repr(args[0])))

    sys.addaudithook(hook)
    for var in ("NO_ALBUMENTATIONS_UPDATE", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"):
        os.environ.pop(var, None)  # the project itself must set these, not the caller
    for name in json.loads(sys.argv[1]):
        importlib.import_module(name)
    local = ("127.0.0.1", "localhost", "::1", "'/")
    print(json.dumps([s for s in seen if not any(h in s[1] for h in local)]))
    """
)


def test_importing_everything_stays_offline():
    import json

    assert "pickstyle.data.pairs" in MODULES and "flows.retrain" in MODULES
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(MODULES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outbound = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outbound == [], outbound
