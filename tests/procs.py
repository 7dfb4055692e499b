"""Child processes of the tests, started in their own process group and never left behind.

A launcher (torchrun, accelerate, dvc, mlflow) starts children of its own: killing the launcher on a timeout or
a failed assertion would orphan them, still holding ports, CPUs and temporary folders. Every helper here kills
the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole process group (it must have been started with ``start_new_session=True``)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def group(cmd: Sequence[str], **kwargs) -> Iterator[subprocess.Popen]:
    """``Popen(cmd)`` in a new process group, killed with all its children when the block ends, however it ends."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        kill_group(proc)


def run_group(cmd: Sequence[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=...)`` whose timeout kills the whole group."""
    with group(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise AssertionError(
                f"{cmd[:3]}... timed out after {timeout} s:\n{(out or '')[-2000:]}{(err or '')[-2000:]}"
            ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
