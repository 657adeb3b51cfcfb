"""What the benchmarks share: list flags, statistics, tables, timing a step.

Pure helpers (`mean_std`, `format_mean_std`, `time_saved`, `percentiles`,
`markdown_table`) are unit-tested in ``tests/test_benchmarks.py``; the others
time compiled steps. The machine a benchmark ran on is `mlres_jax.parallel.environment`,
as for a run. `time_train_step` is the one
timing harness of ``benchmarks.throughput`` and ``benchmarks.step_cost``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import flags

from configs import default
from mlres_jax import errors, files, parallel, plan, steps


class BenchmarkError(errors.UserError, ValueError):
    """A benchmark cannot be set up from its flags, config or output folder.

    Raised before any training or compiling; the message says what to change.
    """


class ListOf(flags.ListParser):
    """absl parser of a comma-separated list whose items another absl parser reads.

    ``--seeds=0,1,2`` with ``ListOf(flags.IntegerParser(lower_bound=0))`` is
    ``[0, 1, 2]``. A bad item, an empty list or (with ``unique``) a repeated
    item is absl's ``IllegalFlagValueError``, whose message names the flag,
    the value and what is allowed.
    """

    def __init__(self, item: flags.ArgumentParser, unique: bool = True):
        super().__init__()
        self.item, self.unique = item, unique

    def allowed(self) -> str:
        """What the flag takes, in words."""
        kind = (
            f"one of {list(self.item.enum_values)}"
            if hasattr(self.item, "enum_values")
            else getattr(self.item, "syntactic_help", "") or self.item.flag_type()
        )
        return f"comma-separated values, each {kind}{', none twice' if self.unique else ''}"

    def parse(self, argument):
        values = []
        for text in super().parse(argument):
            try:
                values.append(self.item.parse(text))
            except ValueError:
                raise ValueError(f"{text!r} is not allowed: {self.allowed()}") from None
        if not values or (self.unique and len(set(values)) != len(values)):
            raise ValueError(f"allowed: {self.allowed()}")
        return values

    def flag_type(self) -> str:
        return self.allowed()


def define_list(
    name: str,
    default: str,
    help_text: str,
    item: flags.ArgumentParser,
    *,
    unique: bool = True,
    flag_values: flags.FlagValues = flags.FLAGS,
) -> None:
    """Defines ``--name`` as a comma-separated list of values ``item`` parses (`ListOf`)."""
    flags.DEFINE(
        ListOf(item, unique), name, default, help_text, flag_values, flags.CsvListSerializer(",")
    )


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (ddof = 1) of repeated measurements.

    Args:
      values: one value per seed (or repetition), in any unit.

    Returns:
      ``{"mean", "std", "n"}``; ``std`` is None for fewer than two values
      (a spread of one measurement is unknown, not zero).

    Raises:
      ValueError: for an empty sequence.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def format_mean_std(
    stats: dict | None, *, scale: float = 1.0, digits: int = 2, suffix: str = ""
) -> str:
    """Formats `mean_std` output as ``"12.34 ± 0.56"`` (or ``"12.34"`` for n = 1).

    Args:
      stats: from `mean_std`, or None for a value that was not measured.
      scale: multiplies mean and std (100 for fractions shown as percent).
      digits: decimals.
      suffix: appended to the text, e.g. ``" %"``.

    Returns:
      The text; ``"—"`` for None.
    """
    if stats is None:
        return "—"
    text = f"{stats['mean'] * scale:.{digits}f}"
    if stats.get("std") is not None:
        text += f" ± {stats['std'] * scale:.{digits}f}"
    return text + suffix


def time_saved(seconds: float, reference_seconds: float) -> float:
    """Fraction of the reference's time saved: ``1 - seconds / reference_seconds``.

    Args:
      seconds: time of the model compared (e.g. the multi-level run), s.
      reference_seconds: time of the reference (the last-cycle model), s.

    Returns:
      The saving as a fraction (0.4 = 40 % less time); negative when slower.

    Raises:
      ValueError: if ``reference_seconds`` is not > 0.
    """
    if not reference_seconds > 0:
        raise ValueError(f"reference time must be > 0 seconds, got {reference_seconds!r}")
    return 1.0 - seconds / reference_seconds


def percentiles(values: Sequence[float]) -> dict:
    """Median, quartiles, min and max of timed repetitions (numpy's linear interpolation).

    Args:
      values: at least one measurement (e.g. seconds per step).

    Returns:
      ``{"median", "p25", "p75", "min", "max", "n"}`` in the unit of ``values``.
    """
    if not len(values):
        raise ValueError("percentiles needs at least one value")
    p25, median, p75 = (float(q) for q in np.percentile(values, [25, 50, 75]))
    return {
        "median": median,
        "p25": p25,
        "p75": p75,
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None
) -> str:
    """A GitHub-flavoured markdown table.

    Args:
      headers: column titles.
      rows: one sequence of cells per row, as many as ``headers``; cells are
        formatted with ``str``.
      align: per column ``"l"`` or ``"r"``; default left for the first
        column, right for the others.

    Returns:
      The table, lines joined by newlines, without a trailing newline.

    Raises:
      ValueError: if a row has a different number of cells than ``headers``.
    """
    if align is None:
        align = ["l"] + ["r"] * (len(headers) - 1)
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(
                f"row {list(row)} has {len(row)} cells, expected {len(headers)} ({list(headers)})"
            )
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(
    output_dir: str, name: str, report: dict, markdown: str, figures: dict | None = None
) -> None:
    """Writes ``NAME.json``, ``NAME.md`` and each of ``figures`` (file name -> matplotlib
    ``Figure``, as PNG) into ``output_dir``, each atomically (`mlres_jax.files`)."""
    files.write_json(os.path.join(output_dir, f"{name}.json"), report)
    files.write_text(os.path.join(output_dir, f"{name}.md"), markdown)
    for file_name, figure in (figures or {}).items():
        files.save_figure(figure, os.path.join(output_dir, file_name))


# ---------------------------------------------------------------------------
# Timing compiled steps (benchmarks.throughput, benchmarks.step_cost).


def time_calls(call: Callable[[int], Any], count: int) -> list[float]:
    """Wall seconds of ``count`` calls of ``call(i)``, i = 0..count-1, each waited for alone."""
    seconds = []
    for i in range(count):
        start = time.perf_counter()
        jax.block_until_ready(call(i))
        seconds.append(time.perf_counter() - start)
    return seconds


def synthetic_images(
    rng: np.random.Generator, count: int, shape: Sequence[int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint8[count, H, W, C] random images and int32[count] random labels, on the host."""
    images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (count,), dtype=np.int32)
    return images, labels


def default_optimizer() -> optax.GradientTransformation:
    """The training SGD of ``configs/default.py`` (momentum, weight decay) under one
    cosine cycle of 10,000 steps: the optimizer the step benchmarks time."""
    config = default.get_config()
    return steps.create_optimizer(
        config,
        plan.cosine_cycle_schedule(10_000, config.learning_rate_max, config.learning_rate_min),
    )


def time_train_step(
    model,
    *,
    image_shape: Sequence[int],
    num_classes: int,
    crop_padding: int,
    batch_size: int,
    warmup: int,
    count: int,
    seed: int = 0,
    mesh=None,
    last_phase: str = "check",
    indices_from_host: bool = False,
) -> dict:
    """Compiles the real train step (`steps.make_train_step`) of ``model`` and times it.

    The data is a pool of 8 batches of random images, replicated on the
    mesh's devices; every step gets a new random mini-batch of it, split over
    the devices, as the training loop gathers from the whole training set on
    the devices.

    Args:
      model: the network.
      image_shape, num_classes, crop_padding: of the data set.
      batch_size: the global mini-batch.
      warmup: untimed steps after compiling.
      count: timed steps.
      seed: of the data, the batches and the initialisation.
      mesh: the devices (`parallel.make_mesh`); default one device.
      last_phase: the step's phases run (`steps.TRAIN_STEP_PHASES`).
      indices_from_host: put each step's batch indices on the devices inside
        the timed call, as the training loop does (`parallel.shard_batch`),
        rather than before.

    Returns:
      ``compiled`` (the executable), ``compile_seconds`` (tracing, lowering
      and compiling), ``step_seconds`` (`percentiles` of ``count`` steps,
      each waited for alone) and ``state`` (the train state after the last).
    """
    mesh = mesh or parallel.make_mesh(1)
    rng = np.random.default_rng(seed)
    images, labels = parallel.put_replicated(
        synthetic_images(rng, 8 * batch_size, image_shape, num_classes), mesh
    )
    host_indices = [
        rng.permutation(8 * batch_size)[:batch_size].astype(np.int32) for _ in range(warmup + count)
    ]
    indices = (
        host_indices if indices_from_host else [parallel.shard_batch(i, mesh) for i in host_indices]
    )
    augment_rng = parallel.put_replicated(jax.random.key(seed + 1), mesh)
    optimizer = default_optimizer()
    state = parallel.put_replicated(
        steps.create_train_state(jax.random.key(seed), model, optimizer, tuple(image_shape)),
        mesh,
    )
    compiled, compile_seconds = steps.compile_ahead(
        steps.make_train_step(model, optimizer, crop_padding, mesh, last_phase),
        state,
        images,
        labels,
        parallel.shard_batch(host_indices[0], mesh),
        augment_rng,
    )
    holder = {"state": state}  # the state is donated: keep only the newest

    def call(i):
        batch = parallel.shard_batch(indices[i], mesh) if indices_from_host else indices[i]
        holder["state"], metrics = compiled(holder["state"], images, labels, batch, augment_rng)
        return holder["state"], metrics

    time_calls(call, warmup)
    seconds = time_calls(lambda i: call(warmup + i), count)
    return {
        "compiled": compiled,
        "compile_seconds": compile_seconds,
        "step_seconds": percentiles(seconds),
        "state": holder["state"],
    }
