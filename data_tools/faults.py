"""Fault injection for the resume tests: the environment variable below makes `encode` kill its own process
(SIGKILL, like an OOM kill) after writing that many samples in this run. Unset, nothing happens."""

from __future__ import annotations

import os
import signal

KILL_AFTER_SAMPLES_ENV = "MOVA_DATA_TOOLS_KILL_AFTER_SAMPLES"


def kill_if_requested(samples_written: int) -> None:
    limit = os.environ.get(KILL_AFTER_SAMPLES_ENV)
    if limit and samples_written >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)
