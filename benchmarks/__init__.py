"""Benchmarks: the paper's Table-3 comparison and per-depth costs.

* ``python -m benchmarks.compare``: first-cycle, last-cycle and multi-level
  model trained one after another; table, JSON and training curves.
* ``python -m benchmarks.throughput``: compile time, images/s and memory of
  every depth of a multi-level run, for the ResNet and Wide ResNet families.
"""
