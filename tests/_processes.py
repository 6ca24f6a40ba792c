"""Running a multi-process test scenario in a child process, with a bound (tests of DDP and FSDP).

The child runs in its own session, so a deadlocked run (a rank waiting forever in a
collective) is killed with its whole process group when the bound runs out, and the test
fails naming what hung, with the end of its output.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import pytest


def run_bounded(cmd: Sequence[str], *, env: Mapping[str, str], timeout_s: float, what: str) -> tuple[int, str]:
    """Run ``cmd`` to the end or for ``timeout_s`` at most; returns (exit code, stdout and stderr)."""
    proc = subprocess.Popen(
        list(cmd), env=dict(env), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish within {timeout_s} s (deadlock?):\n{out[-4000:]}")
    return proc.returncode, out
