"""Live metrics: cross-rank means (pure merge functions) and what dvclive writes after each epoch."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.live import LiveLog, StepSeries, merge_points, sum_parts


def test_sum_parts_adds_key_wise_and_an_empty_rank_adds_nothing() -> None:
    assert sum_parts([{"a": 1.0, "b": 2.0}, {}, {"a": 0.5}]) == {"a": 1.5, "b": 2.0}


def test_merged_points_are_means_over_every_ranks_samples() -> None:
    # rank 0: 3 samples with loss 1 then 2 samples with loss 4; rank 1: 1 sample with loss 3, then none
    rank0 = [(5, {"loss": 3.0}, 3), (10, {"loss": 8.0}, 2)]
    rank1 = [(5, {"loss": 3.0}, 1)]
    assert merge_points([rank0, rank1]) == [(5, {"loss": 6.0 / 4}), (10, {"loss": 4.0})]
    # not the mean of the ranks' means (1 and 3 -> 2): the rank holding more samples weighs more
    assert merge_points([rank0, rank1])[0][1]["loss"] != pytest.approx(2.0)


def test_step_series_windows_sum_values_times_batch_size() -> None:
    series = StepSeries.for_epoch(steps=40)
    assert series.every == 2  # ~20 points per epoch
    running = {"loss": torch.tensor(1.0) * 4 + torch.tensor(2.0) * 2}  # the trainer's running sums
    assert series.close_window(2, running, 6, {"lr": 0.1}) == (2, {"loss": 8.0, "lr": pytest.approx(0.6)}, 6)
    assert series.close_window(3, running, 6, {"lr": 0.1}) is None  # an empty window makes no point
    assert series.merged(1) == [(2, {"loss": pytest.approx(8 / 6), "lr": pytest.approx(0.1)})]
    running = {"loss": running["loss"] + torch.tensor(3.0) * 2}  # the next window: its own samples only
    assert series.close_window(4, running, 8, {"lr": 0.1})[1:] == ({"loss": 6.0, "lr": pytest.approx(0.2)}, 2)


def test_live_log_rewrites_metrics_after_each_epoch(tmp_path: Path) -> None:
    live = LiveLog(tmp_path / "live", main=True, history=[])
    summaries = []
    for epoch, top1 in ((1, 0.5), (2, 0.75)):
        live.epoch({"epoch": epoch, "test_top1": top1, "loss/total": 2.0 / epoch})
        summaries.append(json.loads((tmp_path / "live" / "metrics.json").read_text()))
    live.points([(7, {"loss/total": 1.5, "lr": 0.01})])
    live.close()
    assert [(s["step"], s["test_top1"]) for s in summaries] == [(1, 0.5), (2, 0.75)]
    assert summaries[1]["loss"]["total"] == 1.0
    rows = (tmp_path / "live/plots/metrics/test_top1.tsv").read_text().splitlines()
    assert rows[0].split("\t")[-2:] == ["step", "test_top1"] and [r.split("\t")[-2:] for r in rows[1:]] == [
        ["1", "0.5"], ["2", "0.75"]]
    steps = (tmp_path / "live-steps/plots/metrics/loss/total.tsv").read_text().splitlines()
    assert [r.split("\t")[-2:] for r in steps[1:]] == [["7", "1.5"]]


def test_live_log_resumed_rewrites_the_checkpointed_epochs_and_is_silent_off_main(tmp_path: Path) -> None:
    stale = tmp_path / "live/plots/metrics/test_top1.tsv"
    first = LiveLog(tmp_path / "live", main=True, history=[])
    for epoch in (1, 2, 3):  # the run died after logging epoch 3; its checkpoint holds epochs 1-2
        first.epoch({"epoch": epoch, "test_top1": epoch / 10})
    resumed = LiveLog(tmp_path / "live", main=True, history=[{"epoch": 1, "test_top1": 0.1},
                                                              {"epoch": 2, "test_top1": 0.2}])
    resumed.close()
    assert [r.split("\t")[-2] for r in stale.read_text().splitlines()[1:]] == ["1", "2"]
    LiveLog(tmp_path / "rank1", main=False, history=[{"epoch": 1, "test_top1": 0.1}]).close()
    assert not (tmp_path / "rank1").exists()
