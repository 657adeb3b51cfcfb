"""Benchmarks: the method's claim over seeds, per-depth and per-phase costs.

* ``python -m benchmarks.study``: first-cycle, last-cycle and multi-level
  models (growth rules, one more level) over seeds; table, JSON, plot.
* ``python -m benchmarks.throughput``: compile time, images/s and memory of
  every depth of a multi-level run.
* ``python -m benchmarks.step_cost``: the train step's time by phase.
* ``python -m benchmarks.stop_agreement``: the per-step cost of agreeing on a stop.
* ``python -m benchmarks.results``: ``docs/results.md`` (and the README's
  results table) from the JSON these write, copied into ``docs/results/``.

``study`` trains through one driver (`benchmarks.runs`).
"""
