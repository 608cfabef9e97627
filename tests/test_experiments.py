"""Smoke test of experiments/run.py: `--quick` end to end into tmp_path, checking the outputs'
structure (not the accuracies, which mean nothing after 2 epochs on ~100 samples)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from experiments import run as experiments


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experiments")
    threads, handlers = torch.get_num_threads(), logging.root.handlers[:]
    try:  # main() sets one torch thread and configures logging: restore both for the other tests
        code = experiments.main(["--quick", "--workdir", str(out / "work"), "--json", str(out / "e.json"),
                                 "--doc", str(out / "results.md"), "--plot", str(out / "results.png")])
    finally:
        torch.set_num_threads(threads)
        logging.root.handlers[:] = handlers
    assert code == 0
    return out


def test_quick_json_structure(quick_run: Path) -> None:
    payload = json.loads((quick_run / "e.json").read_text())
    assert payload["kind"] == "quick"
    assert payload["dvc_exp_check"] is None  # the dvc copy is too slow for --quick
    methods = set(experiments.QUICK_METHODS)
    assert set(payload["methods"]) == methods
    assert {(c["method"], c["seed"]) for c in payload["cells"]} == {(m, 0) for m in methods}
    epochs = payload["params"]["train"]["epochs"]
    for cell in payload["cells"]:
        assert 0.0 <= cell["final_top1"] <= cell["best_top1"] <= 1.0
        assert len(cell["history"]["test_top1"]) == cell["epochs"] == epochs
        assert {"loss_ce", "loss_total", "lr"} <= set(cell["history"])
        assert cell["cpu_s"] >= 0 and cell["wall_s"] > 0
    aekt = next(c for c in payload["cells"] if c["method"] == "aekt")
    assert len(aekt["history"]["stat_w_mean"]) == epochs  # the trainer's stat/w_mean, one per epoch
    assert 0.0 <= payload["stage1"]["teacher_top1"] <= 1.0
    assert payload["stage1"]["samples"]["train"] > 0


def test_quick_statistics_and_probe(quick_run: Path) -> None:
    payload = json.loads((quick_run / "e.json").read_text())
    analysis = payload["analysis"]
    assert set(analysis["summary"]) == set(experiments.QUICK_METHODS)
    assert set(analysis["vs_reference"]) == set(experiments.QUICK_METHODS) - {"dkd"}
    assert {"mean", "ci95", "wins", "losses", "ties", "sign_p", "t_p_holm"} <= set(analysis["vs_reference"]["aekt"])
    # Same seed -> same initialisation and data order, and AEKT(adaptive none, head none) is DKD exactly:
    # the pairing every comparison relies on.
    assert analysis["vs_reference"]["aekt_adaptive_none_head_none"]["diffs"] == [0.0]
    probe = payload["gradient_probe"]
    assert set(probe) == {"batch_size", "dkd", "aekt"}
    for state in ("init", "final"):
        assert {"ce", "tckd", "nckd"} <= set(probe["dkd"][state])
        assert {"ce", "explicit", "implicit", "explicit@w=1", "stats"} <= set(probe["aekt"][state])
        assert probe["aekt"][state]["implicit"]["grad_head"] > 0  # the serial head gets the KD gradient
    assert probe["dkd"]["init"]["ce"] == probe["aekt"]["init"]["ce"]  # same seed-0 initialisation


def test_quick_report_files(quick_run: Path) -> None:
    doc = (quick_run / "results.md").read_text()
    for heading in ("## Answer", "## Top-1 (%) per method", "### Against DKD", "## Reproduce",
                    "## Environment and timings"):
        assert heading in doc
    for method in experiments.QUICK_METHODS:
        assert f"| {method} |" in doc
    assert "results.png" in doc and "optimistic" in doc
    assert (quick_run / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_modules_import_one_way() -> None:
    """No import circle inside experiments/, and bench/ (benchmarks only) never imports experiments/."""
    import ast

    root = Path(__file__).resolve().parents[1]
    graph: dict[str, set[str]] = {}
    for package in ("experiments", "bench"):
        for path in (root / package).glob("*.py"):
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
            graph[f"{package}.{path.stem}"] = names
    edges = {m: {n for n in names if n in graph and n != m} for m, names in graph.items()}
    assert not [m for m in edges if m.startswith("bench.") and any(n.startswith("experiments.") for n in edges[m])]

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in edges[start])

    assert [m for m in edges if reaches(m, m, set())] == []
    assert "experiments.stats" in edges["experiments.markdown"]  # the circle this replaced


def test_cifar10_real_page_answers_from_the_cells() -> None:
    """The real-data section computes its answer from the cells: paired by seed, Holm over the two
    questions, the verdict from the interval, and the online/cached ratio from the two timing runs."""
    from experiments import cifar10_real as real

    loss = {"name": "aekt", "tau": 4.0, "alpha": 1.0, "beta": 8.0, "adaptive": "ratio", "explicit": "binary_kl",
            "head": "serial", "warmup_epochs": 2, "warmup_losses": ["dkd", "aekt"], "ce_weight": 1.0,
            "kd_weight": 1.0, "gamma": 1.0, "dist_beta": 2.0, "dist_gamma": 2.0}
    finals = {"kd": [0.70, 0.72, 0.71], "dkd": [0.72, 0.70, 0.74], "aekt": [0.75, 0.76, 0.77]}
    cells = [{"method": m, "seed": s, "final_top1": v, "best_top1": v, "history": {"test_top1": [v / 2, v]},
              "loss": {**loss, "name": "kd" if m == "kd" else m}}
             for m, values in finals.items() for s, v in enumerate(values)]
    stage = {"teacher_source": {"checkpoint_sha256": "4bfd9763" * 8, "finetune": {"epochs": 1}},
             "teacher_arch": "resnet56_a", "samples": {"train": 50000, "test": 10000},
             "teacher_metrics": {"imported_top1": 0.832, "test_top1": 0.89, "seconds": 400.0},
             "cache": {"seconds": 500.0, "disk_bytes": {"logits": 5_000_000}}}
    timing = {mode: {"epoch_img_per_s": 50_000 / sec, "epoch_s": sec, "final_top1": 0.5,
                     "history": {"stat_pt_teacher": [0.63457]}} for mode, sec in (("cached", 50.0), ("online", 125.0))}
    params = real.preset_params()
    text = "\n".join(real.section(stage, cells, timing))
    assert "**aekt − kd: +5.00 pp**, 95 % interval [+2.52, +7.48], 3/3 seeds won" in text
    assert "AEKT is better beyond seed noise" in text  # aekt − kd: diffs 5, 4, 6
    assert "**aekt − dkd: +4.00 pp**, 95 % interval [-0.30, +8.30]" in text
    assert "no difference beyond seed noise (the interval contains 0)" in text
    assert "imported top-1 **83.20 %**" in text and "**89.00 %**" in text
    assert "**2.50×** as long (75 s more)" in text and "(identical to 5 digits)" in text
    runs, epochs = len(cells), params["train"]["epochs"]
    assert f"the {runs} student runs × {epochs} epochs above would have spent {runs * epochs * 75 / 3600:.1f} h" in text
    assert "| kd | 1·CE + 1·KD, τ=4 | 3 | 71.00 ± 1.00 | 70.00, 72.00, 71.00 |" in text  # no warm-up for KD
    assert "| aekt | CE + 1·w·TCKD + 8·NCKD, τ=4, head=serial, warm-up 2 ep | 3 | 76.00 ± 1.00 |" in text


def test_paired_differences_with_no_spread_are_certain_not_null() -> None:
    from experiments.stats import paired

    same_gain = paired({0: 75.0, 1: 76.0, 2: 77.0}, {0: 70.0, 1: 71.0, 2: 72.0})
    assert same_gain is not None and same_gain["t_p"] == 0.0 and same_gain["ci95"] == [5.0, 5.0]
    tie = paired({0: 70.0, 1: 71.0}, {0: 70.0, 1: 71.0})
    assert tie is not None and tie["t_p"] == 1.0 and tie["ties"] == 2
