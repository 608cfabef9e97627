"""Benchmarks that measure the pipeline's speed ratios side by side in one run (see docs/benchmarks.md).

Each module has a ``run(...) -> dict`` (the measurement, importable and tested) and a ``main(argv)``
(argparse: prints a table, writes ``bench/results/<name>-<device>.json``).
"""

BENCHMARKS = ("student_step", "stage1", "cache_read", "scaling", "object_store", "loader", "precision", "decode")
