"""Smoke tests for bench/: every benchmark runs at tiny sizes and writes valid JSON with its keys.

No timing assertions: numbers on a shared CI CPU mean nothing; the structure must hold.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from bench import cache_read, object_store, run_all, scaling, stage1, student_step
from bench.common import format_table, linear_fit, machine_info, paired_ratio
from stages.bench import main as bench_command

MACHINE_KEYS = {"date", "device", "device_name", "cpu_count", "torch", "torch_threads"}


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    # The benchmarks pin torch to one thread on CPU; later tests should get the default back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_strict(path: Path) -> dict[str, Any]:
    """JSON as the standard defines it: NaN/Infinity (which json.dumps allows) are rejected."""
    def reject(token: str) -> None:
        raise ValueError(f"{path}: non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=reject)


def check_common(payload: dict[str, Any], name: str) -> None:
    assert payload["benchmark"] == name
    assert set(payload["machine"]) >= MACHINE_KEYS
    assert payload["machine"]["device"] == "cpu"


def test_student_step_writes_ratios(tmp_path: Path) -> None:
    argv = ["--pairs", "digits,cifar", "--batch", "4", "--steps", "1", "--warmup", "0", "--rounds", "2",
            "--out-dir", str(tmp_path)]
    assert student_step.main(argv) == 0
    payload = load_strict(tmp_path / "student_step-cpu.json")
    check_common(payload, "student_step")
    assert {r["pair"] for r in payload["results"]} == {"digits", "cifar"}
    for r in payload["results"]:
        assert set(r["img_per_s"]) == set(student_step.MODES)
        assert len(r["img_per_s_rounds"]["ce"]) == 2
        assert set(r["ratios"]) == {"cached_over_ce", "cached_over_online", "online_over_ce"}
        assert all(v > 0 for v in r["ratios"].values())


def test_stage1_writes_per_codec(tmp_path: Path) -> None:
    argv = ["--samples", "40", "--views", "1", "--rounds", "1", "--shard-size", "16", "--out-dir", str(tmp_path),
            "--profile"]
    assert stage1.main(argv) == 0
    payload = load_strict(tmp_path / "stage1-cpu.json")
    check_common(payload, "stage1")
    assert set(payload["codecs"]) == {"fp32", "fp16", "int8", "topk"}
    assert payload["config"]["sample_views"] == payload["config"]["samples"]
    for r in payload["codecs"].values():
        assert {"sample_views_per_s", "ratio_to_forward_only", "encode_sample_views_per_s",
                "write_sample_views_per_s", "disk_bytes_per_sample_view"} <= set(r)
    assert payload["profile_write_items"]


def test_object_store_reports_s3_over_local_ratios(tmp_path: Path) -> None:
    argv = ["--samples", "40", "--shard-size", "16", "--views", "1", "--rounds", "1", "--out-dir", str(tmp_path)]
    assert object_store.main(argv) == 0
    payload = load_strict(tmp_path / "object_store-cpu.json")
    check_common(payload, "object_store")
    assert set(payload["ratios"]) == {"loader_s3_over_local", "writer_s3_over_local"}
    assert all(r["median"] > 0 for r in payload["ratios"].values())
    assert "AWS_ENDPOINT_URL" not in os.environ, "the loopback endpoint is not left behind"


def test_cache_read_reports_bytes_and_fidelity(tmp_path: Path) -> None:
    argv = ["--classes", "10,100", "--samples", "64", "--views", "1", "--shard-sizes", "32,64", "--batch", "2",
            "--steps", "1", "--rounds", "1", "--out-dir", str(tmp_path)]
    assert cache_read.main(argv) == 0
    payload = load_strict(tmp_path / "cache_read-cpu.json")
    check_common(payload, "cache_read")
    assert [c["num_classes"] for c in payload["cases"]] == [10, 100]
    for case in payload["cases"]:
        assert {(r["codec"], r["shard_size"]) for r in case["results"]} == {
            (c, n) for c in ("fp32", "fp16", "int8", "topk") for n in (32, 64)}
        by_codec = {r["codec"]: r for r in case["results"]}
        # Structure, not speed: lossless fp32 decodes exactly, topk is the smallest raw row.
        assert by_codec["fp32"]["kl_tau1_max"] == 0.0
        assert by_codec["topk"]["raw_bytes_per_sample_view"] < by_codec["fp32"]["raw_bytes_per_sample_view"]
        for r in case["results"]:
            assert r["read_over_consumption"] > 0 and r["disk_bytes_per_sample_view"] > 0


def test_synthetic_logits_hit_the_calibrated_confidence(tmp_path: Path) -> None:
    _, originals, targets = cache_read.build_synthetic_store(
        tmp_path / "s.zarr", num_classes=100, codec="fp16", samples=512, views=1, shard_size=128)
    probs = torch.softmax(torch.from_numpy(originals[0]).double(), 1)[torch.arange(512), torch.from_numpy(targets)]
    assert abs(float(probs.mean()) - cache_read.TARGET_PROB) < 0.05


def test_scaling_fits_and_extrapolates(tmp_path: Path) -> None:
    argv = ["--samples", "30,60", "--views", "1,2", "--rounds", "1", "--imagenet-codecs", "fp16,topk",
            "--imagenet-shard-sizes", "64,128", "--imagenet-samples", "256", "--out-dir", str(tmp_path)]
    assert scaling.main(argv) == 0
    payload = load_strict(tmp_path / "scaling-cpu.json")
    check_common(payload, "scaling")
    assert len(payload["by_samples"]) == 2 and len(payload["by_views"]) == 2
    assert {"stage1_s_vs_samples", "stage1_s_vs_views", "stage2_epoch_s_vs_samples", "stage2_epoch_s_vs_views",
            "stage1_s_vs_sample_views"} == set(payload["fits"])
    rows = payload["imagenet"]["extrapolated"]
    assert {(r["codec"], r["views"]) for r in rows} == {(c, v) for c in ("fp16", "topk") for v in (10, 100)}
    for r in rows:
        assert r["cache_gb"] > 0 and r["files"] > 0
        assert r["gpu_decode+resnet50_bottleneck"] in {"decode", "teacher", "writer"}
    assert payload["imagenet"]["assumptions"]


def test_aekt_bench_command_passes_options_through(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench_command, ["stage1", "--samples", "20", "--views", "1", "--rounds", "1",
                                                "--codecs", "fp16", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "write_items" in result.output  # the table's header
    assert load_strict(tmp_path / "stage1-cpu.json")["codecs"].keys() == {"fp16"}
    assert CliRunner().invoke(bench_command, ["nonsense"]).exit_code != 0


def test_run_all_summarises_and_reports_failures(tmp_path: Path) -> None:
    assert run_all.main(["--quick", "--only", "stage1", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "stage1-cpu.json").is_file()
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nonsense", "--out-dir", str(tmp_path)])


def test_helpers() -> None:
    fit = linear_fit([1, 2, 3], [3, 5, 7])
    assert math.isclose(fit["slope"], 2.0) and math.isclose(fit["intercept"], 1.0) and fit["r2"] == 1.0
    assert linear_fit([1, 1], [2, 3])["slope"] is None
    assert paired_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])["median"] == 2.0
    assert "a" in format_table(["a", "b"], [[1.5, "x"]])
    assert set(machine_info(torch.device("cpu"))) >= MACHINE_KEYS


def test_cli_lists_the_same_benchmarks_as_the_package() -> None:
    import bench
    from stages import bench as bench_command

    assert bench_command.BENCHMARKS == bench.BENCHMARKS


def test_fit_epochs_sizes_runs_to_the_budget() -> None:
    """experiments/cifar10_gpu --budget-s: the most epochs whose estimated runs fit, never past the cap,
    at least one; the estimate scales the measured overhead with the epochs (errs long)."""
    from experiments.cifar10_gpu import fit_epochs

    # 4 runs, 5 s per epoch, 12 s overhead measured over 3 epochs: E=5 costs 4 * (25 + 20) = 180.
    assert fit_epochs(180.0, 4, 5.0, 12.0, 3, 15) == 5
    assert fit_epochs(179.9, 4, 5.0, 12.0, 3, 15) == 4
    assert fit_epochs(1e9, 4, 5.0, 12.0, 3, 15) == 15  # the cap
    assert fit_epochs(-10.0, 4, 5.0, 12.0, 3, 15) == 1  # nothing left: still one epoch
    # The teacher's use: one run, overhead from a one-epoch probe.
    assert fit_epochs(156.0, 1, 16.105, 26.29 - 16.105, 1, 30) == 5


def test_cifar10_report_states_what_a_run_shows(tmp_path: Path) -> None:
    """The rendered page says when the teacher is weaker than CE (so the losses are not compared)
    and gives the cached-vs-CE and cached-vs-online ratios from the run's own numbers."""
    from experiments.cifar10_report import findings, render

    result = json.loads((Path(__file__).parents[1] / "bench/results/cifar10-cuda.json").read_text())
    text = "\n".join(findings(result))
    assert "weaker than the student trained alone (CE 76.0%)" in text
    assert "Cached aekt epoch 9.18 s vs CE 5.81 s" in text and "1.44x" in text
    strong = json.loads(json.dumps(result))
    strong["steps"]["teacher"]["test_top1"] = 0.95
    assert "Teacher 95.0%; best student ce 76.0%" in "\n".join(findings(strong))
    smoke = dict(result, kind="gpu-smoke")
    assert findings(smoke) == []
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/cifar10-cuda.json").write_text(json.dumps(result))
    render([tmp_path / "runs"], tmp_path / "page.md")
    page = (tmp_path / "page.md").read_text()
    assert "NVIDIA H200" in page and "schedule sized to `--budget-s 520.0`" in page
    assert "Not yet run on a GPU" not in page


def test_gpu_protocol_r56_fills_what_the_user_did_not_set(tmp_path: Path) -> None:
    """--protocol r56 is the real-data experiment at GPU scale: the resnet56 preset, every method,
    3 seeds, 10 views and an 8-minute budget; a flag the user gives wins over the protocol's value."""
    from experiments.cifar10_gpu import LOSSES, PROTOCOL_R56, base_params, parse_args

    args = parse_args(["--protocol", "r56"])
    assert args.preset == PROTOCOL_R56["preset"] and args.losses == list(LOSSES)
    assert (args.seeds, args.views, args.budget_s, args.teacher_share) == (3, 10, 480.0, 0.15)
    assert "aekt_head_none" in LOSSES and args.tag.startswith("cifar10-r56-")
    mine = parse_args(["--protocol", "r56", "--seeds", "2", "--budget-s", "100", "--losses", "ce,kd"])
    assert (mine.seeds, mine.budget_s, mine.losses) == (2, 100.0, ["ce", "kd"])
    assert parse_args([]).seeds == 1  # without the protocol: one run per loss, as before
    data = tmp_path / "c10"
    data.mkdir()
    for name in ("train.tar", "test.tar"):
        (data / name).write_bytes(b"")
    weights = tmp_path / "resnet56.th"
    params = base_params(parse_args(["--protocol", "r56", "--data-root", str(data),
                                     "--teacher-checkpoint", str(weights)]))
    assert params["augment"]["views"] == 10
    assert (params["teacher"]["arch"], params["teacher"]["finetune"]) == ("resnet56_a", True)
    assert params["teacher"]["checkpoint"] == str(weights.resolve())


@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
def test_decode_writes_ratios_and_pixel_difference(tmp_path: Path, shared_data: Path) -> None:
    from bench import decode

    tar = shared_data / "imagenet-sample" / "val.tar"
    assert decode.main(["--quick", "--images", "8", "--tar", str(tar), "--out-dir", str(tmp_path)]) == 0
    payload = load_strict(tmp_path / "decode-cpu.json")
    check_common(payload, "decode")
    assert payload["config"]["images"] == 8 and payload["config"]["rounds"] == 1  # flags beside --quick win
    assert set(payload["images_per_s"]) == {a for pair in decode.PAIRS for a in pair}
    assert all(r["median"] > 0 for r in payload["ratios"].values())
    assert payload["pil_vs_device_pixels"]["max_abs"] <= 2  # the decode tolerance of test_device_decode


def test_the_gpu_script_runs_issue_20s_benchmarks_quick_on_cpu(tmp_path: Path, shared_data: Path) -> None:
    """`python -m bench.run_all --device cpu --quick` is the smoke run of the one GPU script: the loader
    (JPEG vs raw, per-sample vs batch, epoch vs step) and precision benchmarks on real data."""
    assert run_all.main(["--quick", "--only", "loader,precision", "--out-dir", str(tmp_path)]) == 0
    loader = json.loads((tmp_path / "loader-cpu.json").read_text())
    assert set(loader["loader_samples_per_s"]) == {"jpg/sample", "jpg/batch", "raw/sample", "raw/batch"}
    assert all(r["median"] > 0 for r in loader["loader_samples_per_s"].values())
    assert [e["batch"] for e in loader["epoch_vs_step"]] == [16] and loader["machine"]["cpu_count"]
    precision = json.loads((tmp_path / "precision-cpu.json").read_text())
    (row,) = precision["results"]
    assert row["precision"] == "bf16" and 0 < row["kl_tau1_max"] < row["stated_kl_tolerance"]
    assert row["top1_agreement"] > 0.9
