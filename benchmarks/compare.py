r"""The paper's Table 3 on this machine: first-cycle, last-cycle and multi-level model.

Trains three models with the same data, the same number of steps and the same
cyclic learning rate (cosine from eta_max to eta_min, restarted at the same
cycle boundaries; paper Sec. 5.2, Table 3):

* ``first_cycle``: fixed depth, the first cycle's blocks and h (ResNet-14 in
  the paper);
* ``last_cycle``: fixed depth, the last cycle's blocks, h = 1 (ResNet-50);
* ``multilevel``: the multi-level run of the config (ResNet-50-i).

The runs are those of `benchmarks.runs` (``OUTPUT_DIR/runs/MODEL/seedN``,
reused, resumed or trained). Then it writes, in ``OUTPUT_DIR``:

* ``compare.md``: the table (test error, train time, wall time, time saved
  against the last-cycle model, the theoretical saving of the cycle split);
* ``compare.json``: the same numbers per seed, mean ± std, the machine;
* ``compare_curves.png``: train and test error per epoch of the three models,
  cycle boundaries marked (paper Fig. 6).

Times are those of each run's ``summary.json``: *train time* is the run's
wall time without evaluation, checkpointing and data loading
(``totals.train_seconds``: the training steps, initialisation, compilation
and interpolation); *wall time* is the whole run (``totals.wall_seconds``).
Time saved = 1 - t(model) / t(last-cycle model), per seed, then mean ± std
over seeds.

Usage (from the repository root)::

    python -m benchmarks.compare                     # the CPU preset
    python -m benchmarks.compare --seeds=0,1,2 --parallel_runs=2
    python -m benchmarks.compare --config=benchmarks/presets/paper.py  # CIFAR-10, GPU
    python -m benchmarks.compare --config=configs/wrn50i.py --config.dataset=cifar100
    python -m benchmarks.compare --config.num_epochs=3 \
        --config.cycle_boundaries='(1.125, 2.0625)'  # a shorter CPU run
    python -m benchmarks.compare --resume            # after an interruption

``--config`` takes any multi-level config (``multilevel=True`` with cycle
boundaries); the two baselines are derived from it. The default is
``benchmarks/presets/cpu.py``, whose docstring has the time arithmetic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common, compare_report, runs
from mlres_jax import cli, models, plan

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
FLAGS = flags.FLAGS
MODELS = compare_report.MODELS

# Paper Tables 3 and 4 (GTX 1080, TensorFlow): (width, first-cycle
# blocks per stage) -> names of the fixed-depth and the multi-level model, and
# per data set (test error %, minutes) of each.
PAPER_RESULTS = {
    (16, (2, 2, 2)): (
        "ResNet-50",
        "ResNet-50-i",
        {
            "cifar10": ((7.58, 114), (7.10, 67)),
            "cifar100": ((28.64, 115), (28.71, 68)),
            "stl10": ((25.95, 114), (25.98, 68)),
        },
    ),
    (16, (5, 5, 5)): (
        "ResNet-122",
        "ResNet-122-i",
        {
            "cifar10": ((6.47, 266), (6.56, 154)),
            "cifar100": ((26.74, 266), (26.81, 154)),
            "stl10": ((25.16, 266), (24.36, 162)),
        },
    ),
    (32, (2, 2, 2)): (
        "WResNet-50",
        "WResNet-50-i",
        {
            "cifar10": ((5.87, 174), (5.95, 101)),
            "cifar100": ((24.49, 173), (24.92, 101)),
            "stl10": ((23.82, 222), (22.82, 131)),
        },
    ),
    (32, (5, 5, 5)): (
        "WResNet-122",
        "WResNet-122-i",
        {
            "cifar10": ((5.38, 406), (5.46, 239)),
            "cifar100": ((23.11, 406), (23.04, 237)),
            "stl10": ((22.00, 516), (22.65, 307)),
        },
    ),
}


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, dict]:
    """The three models as overrides of a multi-level config (`runs.plan_runs`).

    The baselines keep every field of ``config`` (data, epochs, boundaries,
    schedule, optimiser) and change only ``multilevel`` (False),
    ``stage_sizes`` and, for the last-cycle model, ``step_size`` (1.0); the
    last cycle's blocks are `plan.cycle_networks`'.

    Raises:
      common.BenchmarkError: if ``config`` is not a multi-level config with at
        least one cycle boundary.
    """
    if config.get("multilevel") is not True:
        raise common.BenchmarkError(
            f"config.multilevel = {config.get('multilevel')!r} is not allowed: "
            "compare needs a multi-level config (True), from which it derives "
            "the fixed-depth baselines"
        )
    boundaries = tuple(config.get("cycle_boundaries", ()))
    if not boundaries:
        raise common.BenchmarkError(
            f"config.cycle_boundaries = {boundaries!r} is not allowed: compare needs "
            "at least one cycle boundary (one interpolation), e.g. (60, 110)"
        )
    last_sizes, _ = plan.cycle_networks(config.stage_sizes, config.step_size, len(boundaries) + 1)[
        -1
    ]
    return {
        "first_cycle": {"multilevel": False},
        "last_cycle": {"multilevel": False, "stage_sizes": last_sizes, "step_size": 1.0},
        "multilevel": {},
    }


def theoretical_saving(config: ml_collections.ConfigDict) -> dict:
    """The paper's cost model (Sec. 4.2) for the config's cycle split.

    Returns:
      ``cycle_epochs`` (epochs per cycle), ``cost_ratio`` (multi-level cost
      over last-cycle cost) and ``time_saved`` (1 - cost_ratio), fractions.
    """
    lengths = plan.cycle_epochs(config.num_epochs, config.cycle_boundaries)
    ratio = plan.theoretical_cost_ratio(lengths)
    return {"cycle_epochs": lengths, "cost_ratio": ratio, "time_saved": 1 - ratio}


def paper_reference(config: ml_collections.ConfigDict) -> dict | None:
    """The paper's numbers for the same models and data (Tables 3-4), if it has them.

    Returns:
      None unless the config is one of the paper's multi-level settings (160
      epochs, boundaries at 60 and 110, a model and data set of Tables 3-4);
      else the fixed-depth and multi-level model's name, test error (%) and
      minutes, and the paper's measured saving (fraction).
    """
    if config.num_epochs != 160 or tuple(config.cycle_boundaries) != (60, 110):
        return None
    entry = PAPER_RESULTS.get((config.width, tuple(config.stage_sizes)))
    if entry is None or config.dataset not in entry[2]:
        return None
    fixed_name, multi_name, results = entry
    (fixed_error, fixed_minutes), (multi_error, multi_minutes) = results[config.dataset]
    return {
        "last_cycle": {
            "name": fixed_name,
            "test_error_percent": fixed_error,
            "minutes": fixed_minutes,
        },
        "multilevel": {
            "name": multi_name,
            "test_error_percent": multi_error,
            "minutes": multi_minutes,
        },
        "time_saved": 1 - multi_minutes / fixed_minutes,
        "source": "paper Tables 3-4 (GTX 1080, TensorFlow)",
    }


def run_record(result: runs.Result) -> dict:
    """The numbers of one run that the comparison uses (seconds, fractions)."""
    totals = result.summary["totals"]
    return {
        "seed": result.run.seed,
        "workdir": result.run.workdir,
        "status": result.status,
        "test_error": totals["final_test_error"],
        "train_seconds": totals["train_seconds"],
        "wall_seconds": totals["wall_seconds"],
        "compile_seconds": totals.get("compile_seconds"),
        "eval_seconds": totals.get("eval_seconds"),
        "steps": totals["steps"],
        "cycles": [
            {key: c[key] for key in ("stage_sizes", "steps", "train_seconds", "compile_seconds")}
            for c in result.summary["cycles"]
        ],
    }


def model_description(summary: dict) -> dict:
    """Blocks, h and parameter count of each cycle of a run."""
    cycles = summary["cycles"]
    return {
        "stage_sizes": [c["stage_sizes"] for c in cycles],
        "step_sizes": [c["step_size"] for c in cycles],
        "num_params": cycles[-1]["num_params"],
        "depth": models.depth(cycles[-1]["stage_sizes"]),
    }


def build_report(
    config, seeds, results: Sequence[runs.Result], machine: dict, parallel_runs: int, complete: bool
) -> dict:
    """The content of ``compare.json`` (see `run_comparison`)."""
    records = {name: [run_record(r) for r in results if r.run.name == name] for name in MODELS}
    last_cycle_sizes = model_overrides(config)["last_cycle"]["stage_sizes"]
    return {
        "benchmark": "compare",
        "complete": complete,
        "machine": machine,
        "settings": {
            "dataset": config.dataset,
            "width": config.width,
            "first_cycle_stage_sizes": list(config.stage_sizes),
            "last_cycle_stage_sizes": list(last_cycle_sizes),
            "num_epochs": config.num_epochs,
            "cycle_boundaries": list(config.cycle_boundaries),
            "batch_size": config.batch_size,
            "seeds": list(seeds),
            "parallel_runs": parallel_runs,
            "config": {
                k: v for k, v in config.to_dict().items() if k not in ("seed", "progress_bar")
            },
        },
        "theoretical": theoretical_saving(config),
        "paper_reference": paper_reference(config),
        "models": {r.run.name: model_description(r.summary) for r in results},
        "stats": compare_report.aggregate(records),
        "time_gap": compare_report.time_gap_over_seeds(records),
        "runs": records,
    }


def run_comparison(
    config: ml_collections.ConfigDict,
    seeds: Sequence[int],
    output_dir: str,
    *,
    resume: bool = False,
    parallel_runs: int = 1,
) -> dict:
    """Trains the three models per seed and writes the table, JSON and plot.

    ``compare.json`` and ``compare.md`` are rewritten (atomically) after every
    run with ``"complete": false``, so a crash keeps what finished.

    Args:
      config: a multi-level config (see `model_overrides`).
      seeds: seeds to run, each for all three models.
      output_dir: where the outputs and the runs' sub-folders go.
      resume, parallel_runs: as `runs.train_runs`.

    Returns:
      The report written to ``compare.json``: ``machine``, ``settings``,
      ``theoretical`` (cost ratio and saving of the cycle split), ``models``
      (blocks, h, parameters), ``stats`` (mean ± std per model, time saved),
      ``time_gap``, ``runs`` (per-seed records; ``status`` is ``trained``,
      ``reused`` or ``resumed``) and ``paper_reference``.

    Raises:
      common.BenchmarkError, configuration.ConfigError,
      datasets.DataSetError, OSError: before any training.
      checkpoint.CheckpointError: from a run (e.g. a resumed run whose
        checkpoints are of another config).
    """
    seeds = list(seeds)
    planned = runs.plan_runs(config, model_overrides(config), seeds, output_dir)
    config = planned[-1].config  # resolved: batch size etc. filled in
    machine = common.machine_info()

    def write(results, complete=False, figures=None, **extra):
        report = dict(
            build_report(config, seeds, results, machine, parallel_runs, complete), **extra
        )
        common.write_outputs(
            output_dir, "compare", report, compare_report.report_markdown(report), figures
        )
        return report

    results = runs.train_runs(
        planned, output_dir, resume=resume, parallel_runs=parallel_runs, on_finished=write
    )
    curves = {
        name: compare_report.mean_curves(
            [r.summary["history"] for r in results if r.run.name == name]
        )
        for name in MODELS
    }
    figure = compare_report.curves_figure(curves, config.cycle_boundaries, seeds, config.dataset)
    at_end = {"load_average_1_5_15_min": common.machine_info()["load_average_1_5_15_min"]}
    return write(
        results, complete=True, figures={"compare_curves.png": figure}, machine_at_end=at_end
    )


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the command-line flags (called only when run as a program, or by a test)."""
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(PRESETS_DIR, "cpu.py"),
        "A multi-level training config (configs/*i.py, benchmarks/presets/*.py: 'cpu', "
        "Fashion-MNIST, for a CPU, the default; 'paper', CIFAR-10 "
        "ResNet-50-i, needs the data and a GPU); fields can be overridden with "
        "--config.FIELD=VALUE.",
        lock_config=True,
        flag_values=flag_values,
    )
    common.define_list(
        "seeds",
        "0",
        "Seeds; every model is trained once per seed, results are mean ± std.",
        flags.IntegerParser(lower_bound=0),
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output_dir",
        "runs/bench/compare",
        "Folder for compare.md, compare.json, compare_curves.png and the runs' sub-folders.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "resume",
        False,
        "Reuse finished runs (same config) found "
        "in the output folder and continue unfinished ones from "
        "their checkpoints; without it such folders are an error.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "parallel_runs",
        1,
        "Runs trained side by side, each in its own "
        "process on one CPU core (CPU only); their times compare with "
        "each other only.",
        lower_bound=1,
        flag_values=flag_values,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    report = run_comparison(
        FLAGS.config,
        FLAGS.seeds,
        FLAGS.output_dir,
        resume=FLAGS.resume,
        parallel_runs=FLAGS.parallel_runs,
    )
    print(compare_report.report_markdown(report), flush=True)
    print(
        f"Wrote compare.md, compare.json and compare_curves.png to {FLAGS.output_dir}", flush=True
    )


if __name__ == "__main__":
    cli.run_command(main, define_flags)
