"""Live metrics of a training run through dvclive, and the cross-rank sums they are made of.

Two dvclive folders per run, written by the main process only:

- ``<dir>/``: one step per epoch (``step`` = epoch). ``metrics.json`` is rewritten after every
  epoch, so ``dvc exp show`` shows a running experiment's latest epoch; ``plots/metrics/`` holds one
  TSV per metric (``test_top1``, ``loss/<term>``, ``lr``, ...) for ``dvc plots``.
- ``<dir>-steps/``: the loss terms and lr about 20 times per epoch (``step`` = optimizer step),
  each a mean over the samples of all ranks since the previous point.

Every value is reduced across ranks: sums and sample counts are gathered, never one rank's mean.
A resumed run rewrites the epoch folder from the checkpoint's history; the step folder then starts
at the resumed epoch (the steps before it are not in the checkpoint).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

POINTS_PER_EPOCH = 20  # step-level points per epoch: enough to see a spike, cheap in host syncs
Point = tuple[int, dict[str, float], int]  # (optimizer step, sums over the window, samples in it)


def sum_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise sum of every rank's sums (a rank with no batches contributes an empty dict)."""
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def merge_points(ranks: list[list[Point]]) -> list[tuple[int, dict[str, float]]]:
    """Window by window, the mean over every rank's samples: ``(step, {name: mean})``, at the first
    (main) rank's step. Ranks step together, so window i covers the same steps on each; a rank with
    fewer batches ends with a shorter window or none."""
    out = []
    for i in range(max((len(r) for r in ranks), default=0)):
        here = [r[i] for r in ranks if i < len(r)]
        n = sum(count for _, _, count in here)
        total = sum_parts([sums for _, sums, _ in here])
        out.append((here[0][0], {k: v / n for k, v in total.items()}))
    return out


def all_ranks(value: Any, world: int) -> list[Any]:
    """``value`` of every rank (a collective: every rank must call it, the same number of times)."""
    if world == 1:
        return [value]
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, value)
    return parts


def gather_sums(sums: dict[str, float], world: int) -> dict[str, float]:
    return sum_parts(all_ranks(sums, world))


@dataclass
class StepSeries:
    """A point every ``every`` steps of this rank, derived from the epoch's running sums (which
    the trainer keeps anyway): nothing is accumulated per step here."""

    every: int
    last: dict[str, float] = field(default_factory=dict)  # the running sums at the previous point
    last_seen: int = 0
    points: list[Point] = field(default_factory=list)

    @classmethod
    def for_epoch(cls, steps: int) -> StepSeries:
        return cls(every=max(1, math.ceil(steps / POINTS_PER_EPOCH)))

    def close_window(self, global_step: int, sums: dict[str, Any], seen: int,
                     extra: dict[str, float]) -> Point | None:
        """End the window at ``global_step``: ``sums`` are the running sums (value x batch size) and
        ``seen`` the samples so far (one host sync); ``extra`` values are per point, not summed."""
        n = seen - self.last_seen
        if not n:
            return None
        now = {k: float(v) for k, v in sums.items()}
        window = {k: v - self.last.get(k, 0.0) for k, v in now.items()}
        window.update({k: v * n for k, v in extra.items()})
        self.last, self.last_seen = now, seen
        point = (global_step, window, n)
        self.points.append(point)
        return point

    def merged(self, world: int) -> list[tuple[int, dict[str, float]]]:
        """Every rank's points as means over all ranks' samples (a collective when world > 1)."""
        return merge_points(all_ranks(self.points, world))


class LiveLog:
    """dvclive writers of one run; a no-op without a folder or off the main process."""

    def __init__(self, folder: Path | None, *, main: bool, history: list[dict[str, Any]]) -> None:
        self.epochs = self.steps = None
        if folder is None or not main:
            return
        from dvclive import Live  # ~0.8 s to import: only when a run logs live

        options = dict(resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
        self.epochs = Live(dir=str(folder), **options)
        self.steps = Live(dir=f"{folder}-steps", **options)
        for row in history:  # a resumed run: the epochs its checkpoint holds
            self.epoch(row)

    def epoch(self, row: dict[str, Any]) -> None:
        if self.epochs is None:
            return
        self.epochs.step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float) and math.isfinite(value):
                self.epochs.log_metric(key, value)
        self.epochs.next_step()  # writes metrics.json and the TSVs now: `dvc exp show` sees this epoch

    def points(self, points: list[tuple[int, dict[str, float]]]) -> None:
        if self.steps is None:
            return
        for step, values in points:
            self.steps.step = step
            for key, value in values.items():
                self.steps.log_metric(key, value)
            self.steps.next_step()

    def close(self) -> None:
        for live in (self.epochs, self.steps):
            if live is not None:
                live.end()
