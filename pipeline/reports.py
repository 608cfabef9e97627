"""Metrics and plot data in the files dvc.yaml declares (`dvc metrics show`, `dvc plots show`)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json_atomic
from pipeline.outputs import atomic_path


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    write_json_atomic(path, metrics)


def write_history_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """One row per epoch; columns are the union of keys (first row's order first)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c.replace("/", "_") for c in columns])
        writer.writeheader()
        for row in rows:
            writer.writerow({k.replace("/", "_"): _fmt(v) for k, v in row.items()})


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value
