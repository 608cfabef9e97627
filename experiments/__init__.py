"""Experiment drivers and their report renderers (``bench/`` holds the benchmarks only).

- ``experiments.run``: the digits (and tiny CIFAR-10) method comparison -> docs/results.md;
  ``report`` (probe, plot, files), ``markdown`` (the page) and ``stats`` (paired statistics) render it.
- ``experiments.cifar10_real``: real CIFAR-10 with the published resnet56 teacher, as a queued
  ``dvc exp`` sweep from one cache -> docs/results-cifar10.md.
- ``experiments.cifar10_gpu`` / ``cifar10_report``: the prepared single GPU run and its page.

Import order is one-way: run -> report -> markdown -> stats; nothing here imports back.
"""
