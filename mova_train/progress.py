"""Progress of long loops for every command: a tqdm bar on a terminal, and anywhere else (nohup, SLURM, a pipe) a
plain line every `MOVA_PROGRESS_EVERY_S` seconds (default 30) with done/total, rate and ETA, plus a final line.

Standard library only at import (tqdm is imported when a bar is shown), so any command may import it cheaply. The
interface follows tqdm's (`update`, `set_postfix`, `close`, `disable`, a context manager), so a loop written for
tqdm switches by changing the constructor.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

ENV_EVERY_S = "MOVA_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0


def progress_every_s() -> float:
    """Seconds between two plain progress lines: `MOVA_PROGRESS_EVERY_S`, else 30. A bad value is refused by
    name rather than silently replaced, so a typo does not turn the log lines off."""
    text = os.environ.get(ENV_EVERY_S, "").strip()
    if not text:
        return DEFAULT_EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{ENV_EVERY_S}={text!r}: expected a number of seconds >= 0 (0 = a line per update)")
    return value


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _format_rate(rate: float, unit: str) -> str:
    if rate >= 1 or rate == 0:
        return f"{rate:.2f} {unit}/s"
    return f"{1 / rate:.1f} s/{unit}"


class Progress:
    """One loop's progress. `disable=True` shows nothing; `tty=None` asks whether stderr is a terminal.

    Off a terminal, `log` (default: a line on stderr) receives the text lines, so the trainer can route them to its
    logger and rank log file. The first update always prints a line (a slow first item says the job is alive),
    then at most one line per `every_s`, and `close()` prints the final one.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        leave: bool = False,
        every_s: float | None = None,
        tty: bool | None = None,
        log: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream: TextIO | None = None,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.disable = disable
        self.postfix: dict[str, Any] = {}
        self.clock = clock
        self.started = clock()
        self.closed = False
        self.bar = None
        self._log = log
        self._stream = stream
        if disable:
            return
        if tty is None:
            tty = (stream or sys.stderr).isatty()
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                leave=leave,
                dynamic_ncols=True,
                file=stream,
            )
        else:
            self.every_s = progress_every_s() if every_s is None else float(every_s)
            self.last_line = -math.inf

    # --- tqdm-like interface --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("Progress: no iterable to iterate over")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, postfix: dict[str, Any] | None = None, refresh: bool = False, **kwargs) -> None:
        self.postfix = {**(postfix or {}), **kwargs}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=refresh)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last_line >= self.every_s:
            self.last_line = now
            self._emit(self.line())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.disable:
            return
        if self.bar is not None:
            self.bar.close()
            return
        self._emit(self.line(final=True))

    # --- the plain line -------------------------------------------------------------------------------------
    def line(self, *, final: bool = False) -> str:
        """`encode: 12/40 clip (30%), 0.42 clip/s, ETA 1m07s` (the final line: `done`/`stopped`, elapsed)."""
        elapsed = max(self.clock() - self.started, 1e-9)
        done = self.n - self.initial
        rate = done / elapsed
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        if self.total:
            count += f" {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count += f" {self.unit}"
        head = f"{self.desc}: " if self.desc else ""
        post = "".join(f", {k}={v}" for k, v in self.postfix.items())
        if final:
            state = "done" if self.total is None or self.n >= self.total else "stopped at"
            return (
                f"{head}{state} {count} in {format_duration(elapsed)} ({_format_rate(rate, self.unit)}){post}"
            )
        eta = ""
        if self.total is not None and done > 0:
            eta = f", ETA {format_duration((self.total - self.n) / rate)}"
        return f"{head}{count}, {_format_rate(rate, self.unit)}{eta}{post}"

    def _emit(self, text: str) -> None:
        if self._log is not None:
            self._log(text)
        else:
            print(text, file=self._stream or sys.stderr, flush=True)


def track(
    iterable: Iterable, *, total: int | None = None, desc: str = "", unit: str = "it", **kwargs
) -> Iterator:
    """`for x in track(items, desc="scan", unit="file")`: the items, with progress shown as `Progress` does."""
    return iter(Progress(iterable, total=total, desc=desc, unit=unit, **kwargs))
