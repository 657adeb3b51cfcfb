r"""Growth rules measured against each other on the same runs.

Trains the Fashion-MNIST main job (``configs/fashion_mnist.py``: 2-2-2 ->
4-4-4 -> 8-8-8, 4/2/1 epochs) once per growth rule (`multilevel.GROWTH_RULES`),
momentum policy (`multilevel.MOMENTUM_POLICIES`) and seed, with the same data
order and steps per seed; only ``interpolation_rule`` and
``momentum_at_interpolation`` differ. The runs are those of `benchmarks.runs`
(``OUTPUT_DIR/runs/RULE/POLICY/seedN``, reused, resumed or trained); each
records, at each growth, the test and train-subset loss and error just before
and just after (``summary.json``'s ``growths``). Then it writes, in
``OUTPUT_DIR``:

* ``growth.md``: per run, the jump in test loss and test error at each
  growth, the final test error, and the train time, alone and with
  evaluation and checkpoints (every invocation of a resumed run counted);
* ``growth.json``: the same numbers, each run's growth records, the machine;
* ``growth.png``: the test-error jump at each growth per run, and the test
  error per epoch of every run.

Usage (from the repository root)::

    python -m benchmarks.growth                      # 15 runs, each as long as the main job
    python -m benchmarks.growth --rules=paper,identity --policies=interpolate
    python -m benchmarks.growth --runs=paper/reset,identity/interpolate --seeds=0,1
    python -m benchmarks.growth --resume             # after an interruption
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags

from benchmarks import common, runs
from mlres_jax import cli, models, multilevel, plan

FLAGS = flags.FLAGS
CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "fashion_mnist.py"
)


def run_overrides(pairs: Sequence[tuple[str, str]]) -> dict[str, dict]:
    """Each (rule, policy) pair as a named run, ``RULE/POLICY`` (`runs.plan_runs`)."""
    return {
        f"{rule}/{policy}": {"interpolation_rule": rule, "momentum_at_interpolation": policy}
        for rule, policy in pairs
    }


def run_record(result: runs.Result) -> dict:
    """The numbers of one run: jumps at each growth, final error, times."""
    totals, config = result.summary["totals"], result.run.config
    return {
        "rule": config.interpolation_rule,
        "policy": config.momentum_at_interpolation,
        "seed": result.run.seed,
        "workdir": result.run.workdir,
        "status": result.status,
        "growths": result.summary["growths"],  # each with its "jump" (after - before)
        "final_test_error": totals["final_test_error"],
        "train_seconds": totals["train_seconds"],
        # Saved with every checkpoint, so a resumed run counts all its
        # invocations; wall_seconds is the last invocation's only.
        "timed_seconds": (
            totals["train_seconds"] + totals["eval_seconds"] + totals["checkpoint_seconds"]
        ),
        "wall_seconds": totals["wall_seconds"],
        "history": [
            {"epoch": r["epoch"], "test_error": r["test_error"]} for r in result.summary["history"]
        ],
    }


def _signed(value, scale=1.0, digits=3) -> str:
    return "—" if value is None else f"{scale * value:+.{digits}f}"


def results_table(records: Sequence[dict]) -> str:
    """The markdown table: one row per rule, policy and seed."""
    growths = max((len(r["growths"]) for r in records), default=0)
    headers = [
        "rule",
        "momentum",
        "seed",
        *[f"jump test loss, growth {k + 1}" for k in range(growths)],
        *[f"jump test error (points), growth {k + 1}" for k in range(growths)],
        *[f"jump train-subset loss, growth {k + 1}" for k in range(growths)],
        "final test error",
        "train time (s)",
        "train + eval + checkpoints (s)",
    ]
    body = []
    for r in records:
        jumps = [g["jump"] for g in r["growths"]] + [{}] * (growths - len(r["growths"]))
        body.append(
            [
                r["rule"],
                r["policy"],
                r["seed"],
                *[_signed(j.get("test_loss")) for j in jumps],
                *[_signed(j.get("test_error"), 100, 2) for j in jumps],
                *[_signed(j.get("train_loss")) for j in jumps],
                f"{100 * r['final_test_error']:.2f} %",
                f"{r['train_seconds']:.0f}",
                f"{r['timed_seconds']:.0f}",
            ]
        )
    return common.markdown_table(headers, body, align=["l", "l", *["r"] * (len(headers) - 2)])


def report_markdown(report: dict) -> str:
    """``growth.md``: the table and how it was made."""
    s = report["settings"]
    return "\n".join(
        [
            f"# Growth rules on {s['dataset']}: {s['blocks']}, {s['cycle_epochs']} epochs, "
            f"seeds {', '.join(map(str, s['seeds']))}",
            "",
            results_table(report["runs"]),
            "",
            "- Jump: after - before the growth, the same parameters otherwise, in eval mode; "
            "test split, and the first "
            f"{s['growth_train_examples']} training images (train subset). Negative is better.",
            "- Train time: the runs' train_seconds (steps, compiling, interpolation; no "
            "evaluation or checkpoints); with the evaluations (growth jumps included) and "
            "checkpoints added, the next column. Both count every invocation of a resumed run "
            "(growth.json also has each run's wall_seconds, of its last invocation only).",
            f"- Machine: {common.machine_line(report['machine'])}.",
            "",
        ]
    )


def growth_figure(records: Sequence[dict]) -> Figure:
    """Left: test-error jump at each growth per run; right: test error per epoch."""
    figure = Figure(figsize=(12.0, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    labels = [f"{r['rule']}\n{r['policy']}\nseed {r['seed']}" for r in records]
    growths = max((len(r["growths"]) for r in records), default=0)
    width = 0.8 / max(growths, 1)
    for k in range(growths):
        values = [
            100 * (r["growths"][k]["jump"]["test_error"] if k < len(r["growths"]) else np.nan)
            for r in records
        ]
        left.bar(np.arange(len(records)) + k * width, values, width, label=f"growth {k + 1}")
    left.axhline(0, color="black", linewidth=0.8)
    left.set_xticks(
        np.arange(len(records)) + width * (growths - 1) / 2, labels, fontsize=7, rotation=60
    )
    left.set_ylabel("test error after - before growth (points)")
    left.set_title("The jump at each growth")
    left.legend(fontsize=8)
    for r in records:
        epochs = [h["epoch"] for h in r["history"]]
        right.plot(
            epochs,
            [100 * h["test_error"] for h in r["history"]],
            "-o",
            markersize=3,
            label=f"{r['rule']} / {r['policy']} / {r['seed']}",
        )
    right.set_xlabel("epoch")
    right.set_ylabel("test error (%)")
    right.set_title("Test error per epoch")
    right.legend(fontsize=6, ncol=2)
    return figure


def run_benchmark(
    config: ml_collections.ConfigDict,
    pairs: Sequence[tuple[str, str]],
    output_dir: str,
    *,
    seeds: Sequence[int] | None = None,
    resume: bool = False,
    parallel_runs: int = 1,
) -> dict:
    """Trains every (rule, policy) pair per seed; writes the table, JSON and plot after each run.

    ``seeds`` default to the config's seed; ``resume`` and ``parallel_runs``
    are those of `runs.train_runs`.

    Raises:
      common.BenchmarkError: a config that does not grow; without ``resume``,
        a run folder that is not empty.
      configuration.ConfigError, datasets.DataSetError, OSError: before any
        training.
    """
    if config.get("multilevel") is not True or not tuple(config.get("cycle_boundaries", ())):
        raise common.BenchmarkError(
            "the growth benchmark needs a multi-level config (multilevel=True and at "
            "least one cycle boundary), e.g. configs/fashion_mnist.py"
        )
    seeds = list(seeds or [config.seed])
    planned = runs.plan_runs(config, run_overrides(pairs), seeds, output_dir)
    first = planned[0].config
    networks = plan.cycle_networks(
        first.stage_sizes, first.step_size, len(first.cycle_boundaries) + 1
    )
    settings = {
        "dataset": first.dataset,
        "seeds": list(seeds),
        "blocks": " -> ".join(models.format_stage_sizes(sizes) for sizes, _ in networks),
        "cycle_epochs": "/".join(
            f"{e:g}" for e in plan.cycle_epochs(first.num_epochs, first.cycle_boundaries)
        ),
        "growth_train_examples": first.growth_train_examples,
        "pairs": [list(pair) for pair in pairs],
        "parallel_runs": parallel_runs,
    }
    machine = common.machine_info()

    def write(results):
        records = [run_record(result) for result in results]
        report = {"benchmark": "growth", "machine": machine, "settings": settings, "runs": records}
        common.write_outputs(
            output_dir,
            "growth",
            report,
            report_markdown(report),
            {"growth.png": growth_figure(records)},
        )
        return report

    return write(
        runs.train_runs(
            planned, output_dir, resume=resume, parallel_runs=parallel_runs, on_finished=write
        )
    )


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the command-line flags (called only when run as a program, or by a test)."""
    config_flags.DEFINE_config_file(
        "config",
        CONFIG,
        "The multi-level config every run uses; fields can be "
        "overridden with --config.FIELD=VALUE.",
        lock_config=True,
        flag_values=flag_values,
    )
    common.define_list(
        "rules",
        ",".join(multilevel.GROWTH_RULES),
        "Growth rules.",
        flags.EnumParser(list(multilevel.GROWTH_RULES)),
        flag_values=flag_values,
    )
    common.define_list(
        "policies",
        ",".join(multilevel.MOMENTUM_POLICIES),
        "Momentum policies.",
        flags.EnumParser(list(multilevel.MOMENTUM_POLICIES)),
        flag_values=flag_values,
    )
    common.define_list(
        "runs",
        None,
        "RULE/POLICY pairs to run instead of every rule with "
        "every policy, e.g. 'paper/reset,identity/interpolate'.",
        flags.EnumParser(
            [
                f"{rule}/{policy}"
                for rule in multilevel.GROWTH_RULES
                for policy in multilevel.MOMENTUM_POLICIES
            ]
        ),
        flag_values=flag_values,
    )
    common.define_list(
        "seeds",
        None,
        "Seeds; every pair is trained once per seed. Default: the config's seed.",
        flags.IntegerParser(lower_bound=0),
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output_dir",
        "runs/bench/growth",
        "Folder for growth.md, growth.json, growth.png and the runs.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "resume",
        False,
        "Reuse finished runs (same config) and continue unfinished ones from their checkpoints.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "parallel_runs",
        1,
        "Runs trained side by side, each in its own process on one CPU core (CPU only).",
        lower_bound=1,
        flag_values=flag_values,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    pairs = (
        [tuple(name.split("/")) for name in FLAGS.runs]
        if FLAGS.runs
        else [(rule, policy) for rule in FLAGS.rules for policy in FLAGS.policies]
    )
    report = run_benchmark(
        FLAGS.config,
        pairs,
        FLAGS.output_dir,
        seeds=FLAGS.seeds,
        resume=FLAGS.resume,
        parallel_runs=FLAGS.parallel_runs,
    )
    print(report_markdown(report), flush=True)
    print(f"Wrote growth.md, growth.json and growth.png to {FLAGS.output_dir}", flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
