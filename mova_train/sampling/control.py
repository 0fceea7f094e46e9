"""Controlling renders from outside the denoising loop: `generate(should_stop=...)` asks a callable before every
denoising step and abandons the renders (RenderInterrupted) when it answers True; `StepClock` is such a callable
that also logs, after the first step, about how long the renders will take."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class RenderInterrupted(Exception):
    """`should_stop` answered True before a denoising step (or a held-out batch): the work was abandoned, nothing
    of it was decoded or written."""

    def __init__(
        self, steps_done: int, steps_total: int | None, what: str = "render", unit: str = "denoising steps"
    ):
        of = "" if steps_total is None else f" of {steps_total}"
        super().__init__(f"{what} abandoned after {steps_done}{of} {unit}")
        self.steps_done, self.steps_total = steps_done, steps_total


class StopCheck:
    """Asked before each denoising step (the loop's one hook for stopping): counts the steps and raises
    RenderInterrupted when `should_stop` says so."""

    def __init__(self, should_stop: Callable[[], bool] | None, steps_total: int):
        self.should_stop, self.steps_total, self.steps_done = should_stop, steps_total, 0

    def before_step(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise RenderInterrupted(self.steps_done, self.steps_total)
        self.steps_done += 1


def format_duration(seconds: float) -> str:
    """'0.4 s', '95 s', '12 min 5 s', '1 h 17 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class StepClock:
    """A `should_stop` for generate() that times the first denoising step and then logs one line: how long a step
    takes and about how long `num_steps` steps (all renders of the run) will take. `stop` (optional) is asked
    whether to abandon the renders, e.g. a training run's stop flag."""

    def __init__(self, num_steps: int, *, stop: Callable[[], bool] | None = None, what: str = "the renders"):
        self.num_steps, self.stop, self.what = int(num_steps), stop, what
        self.first_step_started: float | None = None
        self.estimate_s: float | None = None  # set after the first step

    def __call__(self) -> bool:
        now = time.perf_counter()
        if self.first_step_started is None:
            self.first_step_started = now
        elif self.estimate_s is None:
            per_step = now - self.first_step_started
            self.estimate_s = per_step * self.num_steps
            log.info(
                "first denoising step took %s: about %s for %s (%d steps)",
                format_duration(per_step), format_duration(self.estimate_s), self.what, self.num_steps,
            )  # fmt: skip
        return bool(self.stop is not None and self.stop())
