"""The one driver of the benchmarks that train: named runs over seeds, resumable.

A *run* is a name, a seed and a config: the benchmark's base config with the
name's field overrides and the seed set (`plan_runs`). `train_runs` gives the
summary of every run, each trained by ``mlres_jax.train.train_and_evaluate``
in its own folder ``OUTPUT_DIR/runs/NAME/seedN``:

* a finished run of the same config (its ``summary.json``) is *reused*;
* an interrupted one continues from its checkpoints (*resumed*: its times
  leave out the work lost at the interruption);
* the others are *trained*.

Without ``resume`` a run folder that holds files is an error (its
checkpoints would make the run resume, and a resumed run's times are not
those of one run). With ``parallel_runs`` > 1 independent runs train side by
side on the CPU, each in its own process on one core; their times compare
with each other, not with runs made one at a time. Everything that can be
checked is checked before the first run starts.

``benchmarks.study`` (the models over seeds) is built on it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from benchmarks import common
from mlres_jax import checkpoint, configuration, parallel, reporting, train

# Run statuses, in the records and tables.
TRAINED, RESUMED, REUSED = "trained", "resumed", "reused"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: ``name`` (its overrides), ``seed``, the resolved ``config``, its ``workdir``."""

    name: str
    seed: int
    config: ml_collections.ConfigDict
    workdir: str


@dataclasses.dataclass(frozen=True)
class Result:
    """A run's ``summary.json`` and how it was got (``status``: trained, resumed, reused)."""

    run: Run
    summary: dict
    status: str


def run_dir(output_dir: str, name: str, seed: int) -> str:
    """The folder of one run: ``OUTPUT_DIR/runs/NAME/seedN``."""
    return os.path.join(output_dir, "runs", name, f"seed{seed}")


def plan_runs(
    config: ml_collections.ConfigDict,
    overrides: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    output_dir: str,
) -> list[Run]:
    """Every run: per seed, per name, ``config`` with the name's overrides and the seed.

    Args:
      config: the base config (``configs/default.py`` documents the fields).
      overrides: name -> the fields it changes, e.g. ``{"last_cycle":
        {"multilevel": False, "stage_sizes": (8, 8, 8), "step_size": 1.0}}``.
      seeds: the seeds (initialisation and data order), each run once per seed.
      output_dir: the benchmark's folder.

    Returns:
      The runs, seed by seed, each seed's in the order of ``overrides``;
      their configs resolved (`configuration.resolve`).

    Raises:
      configuration.ConfigError: for a field with a value not allowed.
    """
    runs = []
    for seed in seeds:
        for name, fields in overrides.items():
            derived = ml_collections.ConfigDict(config.to_dict())
            derived.update(dict(fields, seed=seed))
            runs.append(
                Run(name, seed, configuration.resolve(derived), run_dir(output_dir, name, seed))
            )
    return runs


def read_summary(workdir: str) -> dict | None:
    """The run's ``summary.json``; None if it is missing or damaged (`reporting.read_summary`)."""
    try:
        return reporting.read_summary(os.path.join(workdir, train.SUMMARY_FILE))
    except reporting.SummaryError:
        return None


def config_differences(summary: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Fields (but ``progress_bar``) that differ between a finished run and ``config``, as messages.

    A field the run's summary lacks, because it was added to the project
    later, counts with the value that gave the run's behaviour
    (`checkpoint.config_differences`).
    """
    saved = summary.get("config", {})
    return checkpoint.config_differences(saved, config.to_dict(), ignore={"progress_bar"})


def holds_files(folder: str) -> bool:
    """Whether ``folder`` exists and is not empty (an earlier run's folder)."""
    return os.path.isdir(folder) and bool(os.listdir(folder))


def check_runs(
    runs: Sequence[Run], output_dir: str, *, resume: bool, parallel_runs: int = 1
) -> None:
    """Every check that can fail before training.

    Raises:
      common.BenchmarkError: without ``resume``, a run folder that is not
        empty; with ``resume``, a finished run of another config; more
        ``parallel_runs`` than CPU cores, or side by side off the CPU.
      configuration.ConfigError: a cycle without steps on the data found.
      datasets.DataSetError: the data set is missing or damaged.
      OSError: ``output_dir`` cannot be created or written.
    """
    cores = len(parallel.cpus_available())
    if parallel_runs > 1 and (jax.default_backend() != "cpu" or parallel_runs > cores):
        raise common.BenchmarkError(
            f"--parallel_runs={parallel_runs} is not allowed here: runs side by side "
            f"take one CPU core each, and this process has {cores} on the "
            f"{jax.default_backend()} backend (use at most {cores}, on the CPU only)"
        )
    for run in runs:
        summary = read_summary(run.workdir)
        differences = summary and config_differences(summary, run.config)
        if resume and differences:
            raise common.BenchmarkError(
                f"{run.workdir} holds a finished run of another config ("
                f"{'; '.join(differences)}); choose another --output_dir"
            )
    used = [run.workdir for run in runs if holds_files(run.workdir)]
    if used and not resume:
        raise common.BenchmarkError(
            f"{used[0]} already holds a run ({len(used)} of the runs' folders do): pass "
            "--resume to reuse finished runs and continue unfinished ones from their "
            "checkpoints, or choose another --output_dir"
        )
    for run in {run.name: run for run in runs}.values():  # data, steps, devices
        train.check_config(run.config)
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise OSError(f"output folder {output_dir!r} is not writable")


def _pin_to_one_core(cores, verbosity: int) -> None:
    """Starts a spawned worker process: pinned to the next CPU core of ``cores`` (a queue)."""
    core = cores.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    logging.set_verbosity(verbosity)
    logging.info("This worker trains on CPU core %d", core)


def _train(run: Run) -> dict:
    """Trains one run in this process; returns its summary."""
    logging.info("Training %s, seed %d, in %s", run.name, run.seed, run.workdir)
    return train.train_and_evaluate(run.config, run.workdir)


def train_runs(
    runs: Sequence[Run],
    output_dir: str,
    *,
    resume: bool = False,
    parallel_runs: int = 1,
    on_finished: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Trains the runs that have not finished; returns every run's `Result`.

    Args:
      runs: from `plan_runs`.
      output_dir: the benchmark's folder (created).
      resume: reuse finished runs whose ``summary.json`` has the same config
        and continue unfinished ones from their checkpoints; without it, a
        run folder that is not empty is an error.
      parallel_runs: runs trained at the same time, each in its own process
        on one CPU core (CPU only); 1 trains them one after another in this
        process.
      on_finished: called after each run finishes (or is reused) with the
        results so far, in the order of ``runs``: to write a benchmark's
        report as it goes, so that an interruption keeps what finished.

    Returns:
      One `Result` per run, in the order of ``runs``.

    Raises:
      Everything `check_runs` raises, before any training; then what
      ``train.train_and_evaluate`` raises (e.g. a resumed run whose
      checkpoints are of another config).
    """
    check_runs(runs, output_dir, resume=resume, parallel_runs=parallel_runs)
    results: dict[int, Result] = {}

    def finish(index: int, summary: dict, status: str) -> None:
        results[index] = Result(runs[index], summary, status)
        if on_finished:
            on_finished([results[i] for i in sorted(results)])

    todo = []
    for index, run in enumerate(runs):
        summary = read_summary(run.workdir) if resume else None
        if summary is not None and not config_differences(summary, run.config):
            finish(index, summary, REUSED)
        else:
            todo.append((index, RESUMED if holds_files(run.workdir) else TRAINED))
    if parallel_runs == 1:
        for index, status in todo:
            finish(index, _train(runs[index]), status)
        return [results[i] for i in range(len(runs))]
    spawn = multiprocessing.get_context("spawn")
    cores = spawn.Queue()
    for core in parallel.cpus_available()[:parallel_runs]:
        cores.put(core)
    with concurrent.futures.ProcessPoolExecutor(
        parallel_runs,
        mp_context=spawn,
        initializer=_pin_to_one_core,
        initargs=(cores, logging.get_verbosity()),
    ) as pool:
        futures = {pool.submit(_train, runs[index]): (index, status) for index, status in todo}
        for future in concurrent.futures.as_completed(futures):
            index, status = futures[future]
            finish(index, future.result(), status)
    return [results[i] for i in range(len(runs))]
