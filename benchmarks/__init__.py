"""Benchmarks: the paper's Table-3 comparison, the growth rules, per-depth and per-phase costs.

* ``python -m benchmarks.compare``: first-cycle, last-cycle and multi-level
  model over seeds; table, JSON and training curves.
* ``python -m benchmarks.growth``: every growth rule and momentum policy.
* ``python -m benchmarks.throughput``: compile time, images/s and memory of
  every depth of a multi-level run.
* ``python -m benchmarks.step_cost``: the train step's time by phase.
* ``python -m benchmarks.stop_agreement``: the per-step cost of agreeing on a stop.
* ``python -m benchmarks.results``: ``docs/results.md`` (and the README's
  results table) from the JSON these write, copied into ``docs/results/``.

``compare`` and ``growth`` train through one driver (`benchmarks.runs`).
"""
