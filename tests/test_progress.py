"""Progress records: ETA arithmetic, periodic log lines when there is no terminal, silence off rank 0."""

import logging
import math

import pytest

from pipeline.progress import Progress, RunClock, eta, format_eta


def test_format_eta_and_eta() -> None:
    assert format_eta(3725.4) == "1:02:05"
    assert format_eta(math.inf) == "?" and format_eta(-1) == "?"
    assert eta(done=25, total=100, elapsed=10.0) == pytest.approx(30.0)
    assert eta(done=0, total=100, elapsed=10.0) == math.inf


def test_without_a_terminal_progress_logs_records_with_eta(caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEKT_PROGRESS_EVERY", "0")
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        items = list(Progress(4, "cache rows", "row", logger=logger, suffix=lambda f: f", run {f:.2f}").wrap("abcd"))
    assert items == list("abcd")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # after items 1-3; the last one ends the step (its own summary line follows)
    assert lines[0].startswith("cache rows: 1/4 row (25%), ") and "ETA 0:00:00" in lines[0]
    assert lines[-1].endswith(", run 0.75")


def test_off_the_main_process_nothing_is_logged(caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEKT_PROGRESS_EVERY", "0")
    with caplog.at_level(logging.INFO):
        list(Progress(3, "x", main=False).wrap(range(3)))
    assert not caplog.records


def test_run_clock_extrapolates_the_mean_epoch_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("pipeline.progress.time.perf_counter", lambda: now[0])
    clock = RunClock(first=3, epochs=10)  # resumed at epoch 3: 8 epochs in this process
    now[0] = 120.0  # 20 s for epochs 3 and half of 4
    assert clock.remaining(epoch=4, fraction=0.5) == pytest.approx(20 / 1.5 * 6.5)
