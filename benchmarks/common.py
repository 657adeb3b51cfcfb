"""Helpers shared by the benchmark scripts: statistics, tables, files, machine.

Pure helpers (`mean_std`, `format_mean_std`, `time_saved`, `markdown_table`,
`parse_int_list`) are unit-tested in ``tests/test_benchmarks.py``; the others
touch the file system or ask JAX about the machine.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from configs import default
from mlres_jax import checkpoint, errors, plan, reporting, steps


class FlagError(errors.UserError, ValueError):
    """A command-line flag has a value that is not allowed.

    Raised before any training or compiling starts; the message names the
    flag, the value and what is allowed.
    """


def flag_error(flag: str, value: Any, allowed: str) -> FlagError:
    """The error for ``--flag=value``, saying what is allowed instead."""
    return FlagError(f"--{flag}={value!r} is not allowed: {allowed}")


def parse_int_list(flag: str, text: str, *, minimum: int = 0,
                   unique: bool = False) -> list[int]:
    """Parses a comma-separated list of integers such as ``"0,1,2"``.

    Args:
      flag: the flag's name, for the error message.
      text: the flag's value.
      minimum: the smallest allowed integer.
      unique: whether repeated values are an error.

    Returns:
      The integers, in the given order.

    Raises:
      FlagError: for an empty list, a non-integer, a value below ``minimum``
        or (with ``unique``) a repeated value.
    """
    allowed = (f"a comma-separated list of integers >= {minimum}"
               f"{' without repeats' if unique else ''}, e.g. '0,1,2'")
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise flag_error(flag, text, allowed) from None
    if not values or any(v < minimum for v in values) or (
            unique and len(set(values)) != len(values)):
        raise flag_error(flag, text, allowed)
    return values


def parse_name_list(flag: str, text: str, known: Sequence[str]) -> list[str]:
    """Parses a comma-separated list of names, each one of ``known`` and each once.

    Raises:
      FlagError: for an empty list, an unknown name or a repeated one.
    """
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names or set(names) - set(known) or len(set(names)) != len(names):
        raise flag_error(flag, text, f"a comma-separated list of {list(known)}, each once")
    return names


def parse_float_list(flag: str, text: str) -> list[float]:
    """Parses a comma-separated list of finite numbers > 0 (``"60,50,50"``).

    Raises:
      FlagError: for an empty list, a non-number or a number <= 0.
    """
    allowed = "a comma-separated list of numbers > 0, e.g. '60,50,50'"
    try:
        values = [float(p) for p in str(text).split(",")]
    except ValueError:
        raise flag_error(flag, text, allowed) from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise flag_error(flag, text, allowed)
    return values


def comparable_config(config_dict: dict) -> dict:
    """A config as ``summary.json`` stores it, without fields that do not change results."""
    plain = json.loads(json.dumps(config_dict))
    plain.pop("progress_bar", None)
    return plain


def read_summary(workdir: str) -> dict | None:
    """The run's ``summary.json``; None if it is missing or damaged (`reporting.read_summary`)."""
    try:
        return reporting.read_summary(os.path.join(workdir, "summary.json"))
    except reporting.SummaryError:
        return None


def config_differences(summary: dict, config) -> list[str]:
    """Config fields (but ``progress_bar``) that differ between a finished run and ``config``.

    A field the run's summary lacks, because it was added to the project
    later, counts with the value that gave the run's behaviour
    (`checkpoint.FIELDS_ADDED`).
    """
    old = comparable_config(checkpoint.with_added_fields(summary.get("config", {})))
    new = comparable_config(config.to_dict())
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def reusable_summary(workdir: str, config) -> dict | None:
    """The run's existing ``summary.json`` if it was made with ``config``, else None."""
    summary = read_summary(workdir)
    if summary is None or config_differences(summary, config):
        return None
    return summary


def holds_files(folder: str) -> bool:
    """Whether ``folder`` exists and is not empty (an earlier run's folder)."""
    return os.path.isdir(folder) and bool(os.listdir(folder))


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
    n = len(values)
    mean = sum(values) / n
    std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
           if n > 1 else None)
    return {"mean": mean, "std": std, "n": n}


def format_mean_std(stats: dict | None, *, scale: float = 1.0, digits: int = 2,
                    suffix: str = "") -> str:
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
        raise ValueError(
            f"reference time must be > 0 seconds, got {reference_seconds!r}")
    return 1.0 - seconds / reference_seconds


def percentiles(values: Sequence[float]) -> dict:
    """Median, quartiles, min and max of timed repetitions (linear interpolation).

    Args:
      values: at least one measurement (e.g. seconds per step).

    Returns:
      ``{"median", "p25", "p75", "min", "max", "n"}`` in the unit of ``values``.
    """
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("percentiles needs at least one value")

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"median": at(0.5), "p25": at(0.25), "p75": at(0.75),
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
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
            raise ValueError(f"row {list(row)} has {len(row)} cells, expected "
                             f"{len(headers)} ({list(headers)})")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on.

    Returns:
      JAX and Python versions, JAX's backend platform and devices, the CPU
      model, the number of CPUs (``os.cpu_count``, and those this process may
      run on), the 1/5/15-minute load average at the time of the call (other
      processes on the machine make timings noisy) and a UTC time stamp.
    """
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    devices = jax.devices()
    return {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "platform": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "jax_version": jax.__version__,
        "python_version": sys.version.split()[0],
        "os": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "load_average_1_5_15_min": load,
    }


def machine_line(info: dict) -> str:
    """One line for a table's caption: platform, devices, CPUs, load."""
    load = info.get("load_average_1_5_15_min")
    load_text = (f", load average {load[0]:.2f} at start" if load else "")
    return (f"{info['platform']} ({info['device_kind']}, "
            f"{len(info['devices'])} device(s)); {info['cpu_model']}, "
            f"{info['cpus_available'] or info['cpu_count']} CPUs{load_text}; "
            f"jax {info['jax_version']}")


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


def synthetic_images(rng: np.random.Generator, count: int, shape: Sequence[int],
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8[count, H, W, C] random images and int32[count] random labels, on the host."""
    images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (count,), dtype=np.int32)
    return images, labels


def default_optimizer() -> optax.GradientTransformation:
    """The training SGD of ``configs/default.py`` (momentum, weight decay) under one
    cosine cycle of 10,000 steps: the optimizer the step benchmarks time."""
    config = default.get_config()
    return steps.create_optimizer(config, plan.cosine_cycle_schedule(
        10_000, config.learning_rate_max, config.learning_rate_min))
