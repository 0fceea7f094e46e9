"""Stopping on a signal: SIGTERM/SIGUSR1 (SLURM's warning, preemption) and Ctrl-C (SIGINT) set a flag that every
rank reports in the step's all-reduce, so all ranks stop together after saving a checkpoint. A second Ctrl-C aborts
at once, without saving."""

from __future__ import annotations

import signal
import time
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# `accelerate launch` / torchrun forward the SIGINT a terminal already sent to every process of its group, a few
# milliseconds later: a second SIGINT within this window is that copy, not the user pressing Ctrl-C again.
SIGINT_REPEAT_WINDOW_S = 2.0


class StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT; every rank reports its flag each step and all stop together."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._first_sigint: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > SIGINT_REPEAT_WINDOW_S:
                raise KeyboardInterrupt("second Ctrl-C: stopping at once, without a checkpoint")
            if self._first_sigint is None:
                self._first_sigint = now
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
