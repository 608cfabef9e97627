"""Progress of long steps: a tqdm bar on a terminal, one log record with an ETA every
``every_s`` seconds otherwise (under DVC, where stderr is a pipe and a bar would print nothing
useful until the end), and nothing on ranks other than the main process.

``--no-progress`` hides the bar only: the periodic records stay, so a stage run by ``dvc repro``
still says how far it is and when it will end.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

EVERY_ENV = "AEKT_PROGRESS_EVERY"  # seconds between log records when no bar is shown (default 30)


def format_eta(seconds: float) -> str:
    """``h:mm:ss`` for a finite, non-negative duration; ``?`` while it cannot be estimated."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta(done: float, total: float, elapsed: float) -> float:
    """Seconds left at the mean rate so far (``inf`` before any progress)."""
    return (total - done) * elapsed / done if done > 0 else math.inf


def record_interval() -> float:
    try:
        return max(0.0, float(os.environ.get(EVERY_ENV, "30")))
    except ValueError:
        return 30.0


class Progress:
    """Counts ``total`` units of one step. ``suffix(fraction_done)`` adds text to each record and
    to the bar (the trainer's whole-run ETA)."""

    def __init__(self, total: int, desc: str, unit: str = "it", *, bar: bool = True, main: bool = True,
                 suffix: Callable[[float], str] | None = None, logger: logging.Logger = log) -> None:
        self.total, self.desc, self.unit, self.suffix, self.log = total, desc, unit, suffix, logger
        self.main = main
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.every = record_interval()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False) \
            if main and bar and sys.stderr.isatty() else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.main:
            return
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(n)
            if self.suffix is not None and now - self.last >= 1.0:
                self.bar.set_postfix_str(self.suffix(self.fraction()), refresh=False)
                self.last = now
        elif now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.log.info("%s", self.line(now))

    def wrap(self, items: Iterable, units: Callable[[Any], int] | None = None) -> Iterator:
        """Yield ``items``, counting ``units(item)`` units each (default 1) once it is handled;
        closes at the end."""
        with self:
            for item in items:
                yield item
                self.update(1 if units is None else units(item))

    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.fraction():.0f}%), "
                f"{rate:.1f} {self.unit}/s, ETA {format_eta(eta(self.done, self.total, elapsed))}")
        return text + (self.suffix(self.fraction()) if self.suffix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RunClock:
    """Whole-run ETA of a loop over ``epochs`` (epochs ``first``..``epochs`` run in this process):
    the mean wall time per epoch so far, evaluation and checkpoints included."""

    def __init__(self, first: int, epochs: int) -> None:
        self.first, self.epochs = first, epochs
        self.start = time.perf_counter()

    def remaining(self, epoch: int, fraction: float) -> float:
        """Seconds left when ``fraction`` of epoch ``epoch`` is done."""
        done = epoch - self.first + fraction
        return eta(done, self.epochs - self.first + 1, time.perf_counter() - self.start)

    def suffix(self, epoch: int) -> Callable[[float], str]:
        return lambda fraction: f", run ETA {format_eta(self.remaining(epoch, fraction))}"
