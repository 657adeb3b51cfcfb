r"""The paper's Table 3 on this machine: first-cycle, last-cycle and multi-level model.

Trains three models one after another with the same data, the same number of
steps and the same cyclic learning rate (cosine from eta_max to eta_min,
restarted at the same cycle boundaries; paper Sec. 5.2, Table 3):

* ``first_cycle``: fixed depth, the first cycle's blocks and h (ResNet-14 in
  the paper);
* ``last_cycle``: fixed depth, the last cycle's blocks, h = 1 (ResNet-50);
* ``multilevel``: the multi-level run of the config (ResNet-50-i).

Each run is ``mlres_jax.train.train_and_evaluate`` in its own sub-folder
``OUTPUT_DIR/runs/MODEL/seedN`` (with its ``summary.json`` and TensorBoard
events). Then it writes, in ``OUTPUT_DIR``:

* ``compare.md``: the table (test error, train time, wall time, time saved
  against the last-cycle model, the theoretical saving of the cycle split);
* ``compare.json``: the same numbers per seed, mean ± std, the machine;
* ``compare_curves.png``: train and test error per epoch of the three models,
  cycle boundaries marked (paper Fig. 6).

Times are those of each run's ``summary.json``: *train time* is the run's
wall time without evaluation, checkpointing and data loading
(``totals.train_seconds``: the training steps, initialisation, compilation
and interpolation);
*wall time* is the whole run (``totals.wall_seconds``). Time saved = 1 -
t(model) / t(last-cycle model), per seed, then mean ± std over seeds.

Usage (from the repository root)::

    python -m benchmarks.compare                     # CPU preset, ~40-45 min
    python -m benchmarks.compare --seeds=0,1,2 --output_dir=runs/bench/seeds
    python -m benchmarks.compare --preset=paper      # CIFAR-10, GPU, hours
    python -m benchmarks.compare --config=configs/wrn50i.py --config.dataset=cifar100
    python -m benchmarks.compare --config.num_epochs=3 \
        --config.cycle_boundaries='(1.125, 2.0625)'  # a shorter CPU run
    python -m benchmarks.compare --resume            # after an interruption

``--config`` takes any multi-level config (``multilevel=True`` with cycle
boundaries); the two baselines are derived from it. The default is
``benchmarks/presets/cpu.py``, whose docstring has the time arithmetic.
Everything that can be checked (flags, the three configs, the data, earlier
runs in ``OUTPUT_DIR``) is checked before the first run starts. A folder
with earlier runs needs ``--resume``: finished runs of the same config are
reused, unfinished ones continue from their checkpoints (and are marked
``resumed``: their times leave out the work lost at the interruption).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from benchmarks import common, compare_report
from mlres_jax import cli, configuration, errors, models, plan, train

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
PRESETS = ("cpu", "paper")

FLAGS = flags.FLAGS

MODELS = compare_report.MODELS
LABELS = compare_report.LABELS

# Paper Tables 3 and 4 (GTX 1080, TensorFlow): (width, first-cycle
# blocks per stage) -> names of the fixed-depth and the multi-level model, and
# per data set (test error %, minutes) of each.
PAPER_RESULTS = {
    (16, (2, 2, 2)): ("ResNet-50", "ResNet-50-i", {
        "cifar10": ((7.58, 114), (7.10, 67)), "cifar100": ((28.64, 115), (28.71, 68)),
        "stl10": ((25.95, 114), (25.98, 68))}),
    (16, (5, 5, 5)): ("ResNet-122", "ResNet-122-i", {
        "cifar10": ((6.47, 266), (6.56, 154)), "cifar100": ((26.74, 266), (26.81, 154)),
        "stl10": ((25.16, 266), (24.36, 162))}),
    (32, (2, 2, 2)): ("WResNet-50", "WResNet-50-i", {
        "cifar10": ((5.87, 174), (5.95, 101)), "cifar100": ((24.49, 173), (24.92, 101)),
        "stl10": ((23.82, 222), (22.82, 131))}),
    (32, (5, 5, 5)): ("WResNet-122", "WResNet-122-i", {
        "cifar10": ((5.38, 406), (5.46, 239)), "cifar100": ((23.11, 406), (23.04, 237)),
        "stl10": ((22.00, 516), (22.65, 307))}),
}


class CompareError(errors.UserError, ValueError):
    """The comparison cannot be set up from the given config or flags."""


# ---------------------------------------------------------------------------
# Set-up: configs of the three models, checked before any training.


def last_cycle_stage_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Blocks per stage in the last cycle: each interpolation doubles them."""
    doublings = len(config.cycle_boundaries)
    return tuple(int(n) * 2**doublings for n in config.stage_sizes)


def model_configs(config: ml_collections.ConfigDict,
                  seed: int) -> dict[str, ml_collections.ConfigDict]:
    """The configs of the three models for one seed, resolved and checked.

    Args:
      config: a multi-level config (``multilevel=True``, >= 1 boundary).
      seed: the run's seed (initialisation and data order).

    Returns:
      ``{"first_cycle", "last_cycle", "multilevel"}`` -> resolved config. The
      baselines keep every field of ``config`` (data, epochs, boundaries,
      schedule, optimiser) and change only ``multilevel`` (False),
      ``stage_sizes`` and, for the last-cycle model, ``step_size`` (1.0).

    Raises:
      CompareError: if ``config`` is not a multi-level config.
      configuration.ConfigError: for a field with a value not allowed.
    """
    if config.get("multilevel") is not True:
        raise CompareError(
            f"config.multilevel = {config.get('multilevel')!r} is not allowed: "
            "compare needs a multi-level config (True), from which it derives "
            "the fixed-depth baselines")
    if not tuple(config.get("cycle_boundaries", ())):
        raise CompareError(
            f"config.cycle_boundaries = {config.get('cycle_boundaries')!r} is "
            "not allowed: compare needs at least one cycle boundary (one "
            "interpolation), e.g. (60, 110)")
    multi = ml_collections.ConfigDict(config.to_dict())
    multi.seed = seed
    multi = configuration.resolve(multi)  # checked before deriving from it
    configs = {}
    for name in MODELS:
        derived = ml_collections.ConfigDict(multi.to_dict())
        if name != "multilevel":
            derived.multilevel = False
        if name == "last_cycle":
            derived.stage_sizes = last_cycle_stage_sizes(multi)
            derived.step_size = 1.0
        configs[name] = configuration.resolve(derived)
    return configs


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
    return {"last_cycle": {"name": fixed_name, "test_error_percent": fixed_error,
                           "minutes": fixed_minutes},
            "multilevel": {"name": multi_name, "test_error_percent": multi_error,
                           "minutes": multi_minutes},
            "time_saved": 1 - multi_minutes / fixed_minutes,
            "source": "paper Tables 3-4 (GTX 1080, TensorFlow)"}


def run_dir(output_dir: str, model: str, seed: int) -> str:
    """The sub-folder of one run: ``OUTPUT_DIR/runs/MODEL/seedN``."""
    return os.path.join(output_dir, "runs", model, f"seed{seed}")


# ---------------------------------------------------------------------------
# Running.


def run_record(summary: dict, seed: int, workdir: str) -> dict:
    """The numbers of one run that the comparison uses (seconds, fractions)."""
    totals = summary["totals"]
    return {
        "seed": seed,
        "workdir": workdir,
        "test_error": totals["final_test_error"],
        "train_seconds": totals["train_seconds"],
        "wall_seconds": totals["wall_seconds"],
        "compile_seconds": totals.get("compile_seconds"),
        "eval_seconds": totals.get("eval_seconds"),
        "steps": totals["steps"],
        "cycles": [{key: c[key] for key in ("stage_sizes", "steps", "train_seconds",
                                            "compile_seconds")}
                   for c in summary["cycles"]],
    }


def model_description(summary: dict) -> dict:
    """Blocks, h and parameter count of each cycle of a run."""
    cycles = summary["cycles"]
    return {"stage_sizes": [c["stage_sizes"] for c in cycles],
            "step_sizes": [c["step_size"] for c in cycles],
            "num_params": cycles[-1]["num_params"],
            "depth": models.depth(cycles[-1]["stage_sizes"])}


# ---------------------------------------------------------------------------
# The whole comparison.


def build_report(config, seeds, records, descriptions, machine,
                 complete: bool) -> dict:
    """The content of ``compare.json`` (see `run_comparison`)."""
    return {
        "benchmark": "compare",
        "complete": complete,
        "machine": machine,
        "settings": {
            "dataset": config.dataset, "width": config.width,
            "first_cycle_stage_sizes": list(config.stage_sizes),
            "last_cycle_stage_sizes": list(last_cycle_stage_sizes(config)),
            "num_epochs": config.num_epochs,
            "cycle_boundaries": list(config.cycle_boundaries),
            "batch_size": config.batch_size, "seeds": list(seeds),
            "config": {k: v for k, v in common.comparable_config(config.to_dict()).items()
                       if k != "seed"},
        },
        "theoretical": theoretical_saving(config),
        "paper_reference": paper_reference(config),
        "models": descriptions,
        "stats": compare_report.aggregate(records),
        "time_gap": compare_report.time_gap_over_seeds(records),
        "runs": records,
    }


def check_setup(config: ml_collections.ConfigDict, seeds: Sequence[int],
                output_dir: str, resume: bool) -> dict[int, dict]:
    """Every check that can fail before training; returns the configs per seed.

    Raises:
      CompareError: a config that is not multi-level; without ``resume`` a
        run folder that is not empty (its checkpoints would make
        `train.train_and_evaluate` resume, and a resumed run's times are not
        those of one run); with ``resume`` a finished run of another config.
      configuration.ConfigError: bad config, or a cycle without steps.
      datasets.DataSetError: the data set is missing or damaged.
      OSError: ``output_dir`` cannot be created or written.
    """
    per_seed = {seed: model_configs(config, seed) for seed in seeds}
    for seed in seeds:
        for name in MODELS:
            summary = common.read_summary(run_dir(output_dir, name, seed))
            differences = summary and common.config_differences(summary, per_seed[seed][name])
            if resume and differences:
                raise CompareError(
                    f"{run_dir(output_dir, name, seed)} holds a finished run of "
                    f"another config (differs in {', '.join(differences)}); "
                    "choose another --output_dir")
    if not resume:
        used = [run_dir(output_dir, name, seed) for seed in seeds for name in MODELS
                if common.holds_files(run_dir(output_dir, name, seed))]
        if used:
            raise CompareError(
                f"{used[0]} already holds a run ({len(used)} of the runs' folders "
                "do): pass --resume to reuse finished runs and continue "
                "unfinished ones from their checkpoints, or choose another "
                "--output_dir")
    for name in MODELS:  # data present, and every cycle at least one step long
        train.check_config(per_seed[seeds[0]][name])
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise OSError(f"output folder {output_dir!r} is not writable")
    return per_seed


def run_comparison(config: ml_collections.ConfigDict, seeds: Sequence[int],
                   output_dir: str, *, resume: bool = False) -> dict:
    """Trains the three models per seed and writes the table, JSON and plot.

    ``compare.json`` and ``compare.md`` are rewritten (atomically) after every
    run with ``"complete": false``, so a crash keeps what finished.

    Args:
      config: a multi-level config (see `model_configs`).
      seeds: seeds to run, each for all three models.
      output_dir: where the outputs and the runs' sub-folders go.
      resume: reuse finished runs whose ``summary.json`` has the same
        config, and let unfinished ones continue from their checkpoints
        (`train.train_and_evaluate` resumes by itself). Without it, a run
        folder that is not empty is an error.

    Returns:
      The report written to ``compare.json``: ``machine``, ``settings``,
      ``theoretical`` (cost ratio and saving of the cycle split), ``models``
      (blocks, h, parameters), ``stats`` (mean ± std per model, time saved),
      ``runs`` (per-seed records; ``status`` is ``trained``, ``reused`` or
      ``resumed``) and ``paper_reference``.

    Raises:
      CompareError, configuration.ConfigError,
      datasets.DataSetError, OSError: before any training.
      checkpoint.CheckpointError: from a run (e.g. a resumed run whose
        checkpoints are of another config).
    """
    seeds = list(seeds)
    per_seed = check_setup(config, seeds, output_dir, resume)
    config = per_seed[seeds[0]]["multilevel"]  # resolved: batch size etc. filled in
    machine = common.machine_info()
    records = {name: [] for name in MODELS}
    descriptions, histories = {}, {name: [] for name in MODELS}
    for seed in seeds:
        for name in MODELS:
            workdir = run_dir(output_dir, name, seed)
            summary = common.reusable_summary(workdir, per_seed[seed][name]) if resume else None
            status = "reused"
            if summary is None:
                status = "resumed" if common.holds_files(workdir) else "trained"
                logging.info("Training the %s, seed %d, in %s", LABELS[name], seed, workdir)
                summary = train.train_and_evaluate(per_seed[seed][name], workdir)
            records[name].append({**run_record(summary, seed, workdir), "status": status})
            descriptions[name] = model_description(summary)
            histories[name].append(summary["history"])
            report = build_report(config, seeds, records, descriptions, machine,
                                  complete=False)
            compare_report.write_outputs(output_dir, report, {})
    report = build_report(config, seeds, records, descriptions, machine,
                          complete=True)
    report["machine_at_end"] = {"load_average_1_5_15_min":
                                common.machine_info()["load_average_1_5_15_min"]}
    curves = {name: compare_report.mean_curves(histories[name]) for name in MODELS}
    compare_report.write_outputs(output_dir, report, curves)
    return report


# ---------------------------------------------------------------------------
# Command line.


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Calls ``get_config()`` of a config file given by its path."""
    spec = importlib.util.spec_from_file_location("compare_preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_from_flags() -> ml_collections.ConfigDict:
    """The config chosen by ``--config`` (with overrides) or ``--preset``.

    Raises:
      common.FlagError: ``--preset`` together with ``--config`` or a
        ``--config.FIELD`` override.
    """
    if FLAGS.preset is None:
        return FLAGS.config
    overrides = [name for name in FLAGS
                 if name.startswith("config.") and FLAGS[name].present]
    if FLAGS["config"].present or overrides:
        given = "--config" if FLAGS["config"].present else f"--{overrides[0]}"
        raise common.flag_error(
            "preset", FLAGS.preset,
            f"it cannot be combined with {given}; to change fields of a "
            f"preset use --config=benchmarks/presets/{FLAGS.preset}.py "
            "--config.FIELD=VALUE")
    return load_config_file(os.path.join(PRESETS_DIR, f"{FLAGS.preset}.py"))


def define_flags() -> None:
    """Defines the command-line flags (called only when run as a program)."""
    config_flags.DEFINE_config_file(
        "config", os.path.join(PRESETS_DIR, "cpu.py"),
        "A multi-level training config (configs/*i.py, benchmarks/presets/*.py); "
        "fields can be overridden with --config.FIELD=VALUE.", lock_config=True)
    flags.DEFINE_enum(
        "preset", None, list(PRESETS),
        "Shorthand for --config=benchmarks/presets/PRESET.py: 'cpu' (Fashion-MNIST, "
        "about 40 min on 2 cores, the default) or 'paper' (CIFAR-10 ResNet-50-i, "
        "needs the data and a GPU).")
    flags.DEFINE_string("seeds", "0", "Comma-separated seeds; every model is "
                        "trained once per seed, results are mean ± std.")
    flags.DEFINE_string("output_dir", "runs/bench/compare",
                        "Folder for compare.md, compare.json, compare_curves.png "
                        "and the runs' sub-folders.")
    flags.DEFINE_bool("resume", False, "Reuse finished runs (same config) found "
                      "in the output folder and continue unfinished ones from "
                      "their checkpoints; without it such folders are an error.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    seeds = common.parse_int_list("seeds", FLAGS.seeds, minimum=0, unique=True)
    report = run_comparison(config_from_flags(), seeds, FLAGS.output_dir,
                            resume=FLAGS.resume)
    print(compare_report.report_markdown(report), flush=True)
    print(f"Wrote compare.md, compare.json and compare_curves.png to "
          f"{FLAGS.output_dir}", flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
