r"""Growth rules measured against each other on the same run.

Trains the Fashion-MNIST main job (``configs/fashion_mnist.py``: 2-2-2 ->
4-4-4 -> 8-8-8, 4/2/1 epochs) once per growth rule (`multilevel.GROWTH_RULES`)
and momentum policy (`multilevel.MOMENTUM_POLICIES`), with the same seed,
data order and steps; only ``interpolation_rule`` and
``momentum_at_interpolation`` differ. Each run is
``mlres_jax.train.train_and_evaluate`` in ``OUTPUT_DIR/runs/RULE/POLICY`` and
records, at each growth, the test and train-subset loss and error just before
and just after (``summary.json``'s ``growths``). Then it writes, in
``OUTPUT_DIR``:

* ``growth.md``: per rule and policy, the jump in test loss and test error
  at each growth, the final test error, and the train time, alone and with
  evaluation and checkpoints (every invocation of a resumed run counted);
* ``growth.json``: the same numbers, each run's growth records, the machine;
* ``growth.png``: the test-error jump at each growth per rule and policy, and
  the test error per epoch of every run.

Usage (from the repository root)::

    python -m benchmarks.growth                      # 15 runs, about 17 min each on 2 cores
    python -m benchmarks.growth --rules=paper,identity --policies=interpolate
    python -m benchmarks.growth --runs=paper/reset,identity/interpolate
    python -m benchmarks.growth --resume             # after an interruption

A folder with earlier runs needs ``--resume``: finished runs of the same
config are reused, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags

from benchmarks import common
from mlres_jax import cli, configuration, errors, files, multilevel, plan, train

FLAGS = flags.FLAGS
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "fashion_mnist.py")


class GrowthBenchmarkError(errors.UserError):
    """The benchmark cannot be set up from the given flags."""


def run_dir(output_dir: str, rule: str, policy: str) -> str:
    """The sub-folder of one run: ``OUTPUT_DIR/runs/RULE/POLICY``."""
    return os.path.join(output_dir, "runs", rule, policy)


def run_configs(config: ml_collections.ConfigDict,
                pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], ml_collections.ConfigDict]:
    """The resolved config of every (rule, policy) pair, the rest as ``config``.

    Raises:
      GrowthBenchmarkError: for a config that does not grow.
      configuration.ConfigError: for a field with a value not allowed.
    """
    if config.get("multilevel") is not True or not tuple(config.get("cycle_boundaries", ())):
        raise GrowthBenchmarkError(
            "the growth benchmark needs a multi-level config (multilevel=True and at "
            "least one cycle boundary), e.g. configs/fashion_mnist.py")
    result = {}
    for rule, policy in pairs:
        derived = ml_collections.ConfigDict(config.to_dict())
        derived.interpolation_rule, derived.momentum_at_interpolation = rule, policy
        result[(rule, policy)] = configuration.resolve(derived)
    return result


def run_record(rule: str, policy: str, summary: dict, workdir: str, status: str) -> dict:
    """The numbers of one run: jumps at each growth, final error, times."""
    totals = summary["totals"]
    return {
        "rule": rule, "policy": policy, "workdir": workdir, "status": status,
        "growths": summary["growths"],  # each with its "jump" (after - before)
        "final_test_error": totals["final_test_error"],
        "train_seconds": totals["train_seconds"],
        # Saved with every checkpoint, so a resumed run counts all its
        # invocations; wall_seconds is the last invocation's only.
        "timed_seconds": (totals["train_seconds"] + totals["eval_seconds"]
                          + totals["checkpoint_seconds"]),
        "wall_seconds": totals["wall_seconds"],
        "history": [{"epoch": r["epoch"], "test_error": r["test_error"]}
                    for r in summary["history"]],
    }


def _signed(value, scale=1.0, digits=3) -> str:
    return "—" if value is None else f"{scale * value:+.{digits}f}"


def results_table(records: Sequence[dict]) -> str:
    """The markdown table: one row per rule and policy."""
    growths = max((len(r["growths"]) for r in records), default=0)
    headers = ["rule", "momentum",
               *[f"jump test loss, growth {k + 1}" for k in range(growths)],
               *[f"jump test error (points), growth {k + 1}" for k in range(growths)],
               *[f"jump train-subset loss, growth {k + 1}" for k in range(growths)],
               "final test error", "train time (s)", "train + eval + checkpoints (s)"]
    body = []
    for r in records:
        jumps = [g["jump"] for g in r["growths"]] + [{}] * (growths - len(r["growths"]))
        body.append([
            r["rule"], r["policy"],
            *[_signed(j.get("test_loss")) for j in jumps],
            *[_signed(j.get("test_error"), 100, 2) for j in jumps],
            *[_signed(j.get("train_loss")) for j in jumps],
            f"{100 * r['final_test_error']:.2f} %", f"{r['train_seconds']:.0f}",
            f"{r['timed_seconds']:.0f}"])
    return common.markdown_table(headers, body, align=["l", "l", *["r"] * (len(headers) - 2)])


def report_markdown(report: dict) -> str:
    """``growth.md``: the table and how it was made."""
    s = report["settings"]
    return "\n".join([
        f"# Growth rules on {s['dataset']}: {s['blocks']}, {s['cycle_epochs']} epochs, "
        f"seed {s['seed']}",
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
    ])


def growth_figure(records: Sequence[dict]) -> Figure:
    """Left: test-error jump at each growth per run; right: test error per epoch."""
    figure = Figure(figsize=(12.0, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    labels = [f"{r['rule']}\n{r['policy']}" for r in records]
    growths = max((len(r["growths"]) for r in records), default=0)
    width = 0.8 / max(growths, 1)
    for k in range(growths):
        values = [100 * (r["growths"][k]["jump"]["test_error"] if k < len(r["growths"])
                         else np.nan)
                  for r in records]
        left.bar(np.arange(len(records)) + k * width, values, width, label=f"growth {k + 1}")
    left.axhline(0, color="black", linewidth=0.8)
    left.set_xticks(np.arange(len(records)) + width * (growths - 1) / 2, labels,
                    fontsize=7, rotation=60)
    left.set_ylabel("test error after - before growth (points)")
    left.set_title("The jump at each growth")
    left.legend(fontsize=8)
    for r in records:
        epochs = [h["epoch"] for h in r["history"]]
        right.plot(epochs, [100 * h["test_error"] for h in r["history"]], "-o", markersize=3,
                   label=f"{r['rule']} / {r['policy']}")
    right.set_xlabel("epoch")
    right.set_ylabel("test error (%)")
    right.set_title("Test error per epoch")
    right.legend(fontsize=6, ncol=2)
    return figure


def run_benchmark(config: ml_collections.ConfigDict, pairs: Sequence[tuple[str, str]],
                  output_dir: str, *, resume: bool = False) -> dict:
    """Trains every (rule, policy) pair and writes the table, JSON and plot after each run.

    Raises:
      GrowthBenchmarkError: a config that does not grow; without ``resume``,
        a run folder that is not empty.
      configuration.ConfigError, datasets.DataSetError, OSError:
        before any training.
    """
    configs = run_configs(config, pairs)
    used = [run_dir(output_dir, *key) for key in configs
            if common.holds_files(run_dir(output_dir, *key))]
    if used and not resume:
        raise GrowthBenchmarkError(
            f"{used[0]} already holds a run: pass --resume to reuse finished runs and "
            "continue unfinished ones, or choose another --output_dir")
    first = next(iter(configs.values()))
    train.check_config(first)  # data present, every cycle at least one step
    settings = {
        "dataset": first.dataset, "seed": first.seed,
        "blocks": " -> ".join("-".join(map(str, [n * 2**k for n in first.stage_sizes]))
                              for k in range(len(first.cycle_boundaries) + 1)),
        "cycle_epochs": "/".join(
            f"{e:g}" for e in plan.cycle_epochs(first.num_epochs, first.cycle_boundaries)),
        "growth_train_examples": first.growth_train_examples,
        "pairs": [list(pair) for pair in pairs]}
    machine = common.machine_info()
    records = []
    for (rule, policy), run_config in configs.items():
        workdir = run_dir(output_dir, rule, policy)
        summary = common.reusable_summary(workdir, run_config) if resume else None
        status = "reused"
        if summary is None:
            status = "resumed" if common.holds_files(workdir) else "trained"
            logging.info("Growth rule %s, momentum %s, in %s", rule, policy, workdir)
            summary = train.train_and_evaluate(run_config, workdir)
        records.append(run_record(rule, policy, summary, workdir, status))
        report = {"benchmark": "growth", "machine": machine, "settings": settings,
                  "runs": records}
        files.write_json(os.path.join(output_dir, "growth.json"), report)
        files.write_text(os.path.join(output_dir, "growth.md"), report_markdown(report))
        files.save_figure(growth_figure(records), os.path.join(output_dir, "growth.png"))
    return report


def define_flags() -> None:
    """Defines the command-line flags (called only when run as a program)."""
    config_flags.DEFINE_config_file(
        "config", CONFIG, "The multi-level config every run uses; fields can be "
        "overridden with --config.FIELD=VALUE.", lock_config=True)
    flags.DEFINE_string("rules", ",".join(multilevel.GROWTH_RULES),
                        f"Comma-separated growth rules of {sorted(multilevel.GROWTH_RULES)}.")
    flags.DEFINE_string("policies", ",".join(multilevel.MOMENTUM_POLICIES),
                        "Comma-separated momentum policies of "
                        f"{sorted(multilevel.MOMENTUM_POLICIES)}.")
    flags.DEFINE_string("runs", "", "Comma-separated RULE/POLICY pairs to run instead of "
                        "every rule with every policy, e.g. 'paper/reset,identity/interpolate'.")
    flags.DEFINE_string("output_dir", "runs/bench/growth",
                        "Folder for growth.md, growth.json, growth.png and the runs.")
    flags.DEFINE_bool("resume", False, "Reuse finished runs (same config) and continue "
                      "unfinished ones from their checkpoints.")


def pairs_from_flags() -> list[tuple[str, str]]:
    """The (rule, policy) pairs of ``--runs``, or of ``--rules`` x ``--policies``.

    Raises:
      common.FlagError: naming the flag with an unknown rule or policy.
    """
    if not FLAGS.runs:
        return [(rule, policy) for rule in common.parse_name_list("rules", FLAGS.rules, multilevel.GROWTH_RULES)
                for policy in common.parse_name_list("policies", FLAGS.policies,
                                                multilevel.MOMENTUM_POLICIES)]
    pairs = [tuple(part.strip().split("/")) for part in FLAGS.runs.split(",")]
    if any(len(p) != 2 or p[0] not in multilevel.GROWTH_RULES
           or p[1] not in multilevel.MOMENTUM_POLICIES for p in pairs) or len(set(pairs)) != len(pairs):
        raise common.flag_error("runs", FLAGS.runs, "comma-separated RULE/POLICY pairs, each "
                                f"once; rules {sorted(multilevel.GROWTH_RULES)}, policies "
                                f"{sorted(multilevel.MOMENTUM_POLICIES)}")
    return pairs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    report = run_benchmark(FLAGS.config, pairs_from_flags(), FLAGS.output_dir,
                           resume=FLAGS.resume)
    print(report_markdown(report), flush=True)
    print(f"Wrote growth.md, growth.json and growth.png to {FLAGS.output_dir}", flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
