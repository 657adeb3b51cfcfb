r"""The method's claim, measured: named models trained over seeds, compared in one table.

Every model is derived from one multi-level config (``--config``, default
``benchmarks/presets/cpu.py``) and trained with the same data, data order per
seed, number of steps and cyclic learning rate (cosine from eta_max to
eta_min, restarted at each cycle; paper Sec. 5.2):

* ``first_cycle``: fixed depth, the first cycle's blocks and h (the paper's
  ResNet-14 in Table 3);
* ``last_cycle``: fixed depth, the last cycle's blocks, h = 1 (ResNet-50);
* ``multilevel/RULE[/POLICY]``: the config's multi-level run (ResNet-50-i)
  under growth rule RULE (`multilevel.GROWTH_RULES`) and momentum policy
  POLICY (`multilevel.MOMENTUM_POLICIES`; default the config's);
* ``one_more_level/RULE[/POLICY]``: one level more in front: the config's
  first cycle split in two halves, the first on half the blocks with twice
  h (2-2-2 -> 1-1-1, h 1 -> 2), so the later cycles and the last network
  are the config's. From one block per stage only the rules for which
  `multilevel.grows_one_block_stages` can grow (identity,
  transition_keeping).

The runs are those of `benchmarks.runs` (``OUTPUT_DIR/runs/MODEL/seedN``,
reused, resumed or trained). After every run it writes, in ``OUTPUT_DIR``:

* ``study.md``: per model, test error and train time as mean ± std over
  seeds, the time saved against the last-cycle model (paired by seed) and
  by the paper's cost model (Sec. 4.2: a step costs in proportion to the
  blocks), whether the error is on par (`on_par`), the jump at each growth,
  and the answer (`answer`);
* ``study.json``: the same numbers, every run's record (errors per epoch,
  growths, cycles, its commit and date) and the machine;
* ``study.png``: test error per epoch, mean and the seeds' spread, cycle
  boundaries marked; the test-error jump at each growth.

*Train time* is a run's ``totals.train_seconds`` (training steps,
initialisation, compiling, interpolation; no evaluation, checkpoints or data
loading). Time saved = 1 - t(model) / t(last-cycle model), per seed, then
mean ± std.

Usage (from the repository root)::

    python -m benchmarks.study                      # 7 models x seeds 0, 1, 2 (the CPU preset)
    python -m benchmarks.study --models=first_cycle,last_cycle,multilevel/paper --seeds=0
    python -m benchmarks.study --models=multilevel/paper/reset,multilevel/identity/reset
    python -m benchmarks.study --config=benchmarks/presets/paper.py   # CIFAR-10, a GPU
    python -m benchmarks.study --resume             # after an interruption
"""

from __future__ import annotations

import csv
import os
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import config_flags

from benchmarks import common, runs
from mlres_jax import cli, configuration, files, models, multilevel, parallel, plan

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
FLAGS = flags.FLAGS
REFERENCE = "last_cycle"
PAPER_MODEL = "multilevel/paper"
DEFAULT_MODELS = (
    "first_cycle",
    "last_cycle",
    "multilevel/paper",
    "multilevel/identity",
    "multilevel/transition_keeping",
    "one_more_level/identity",
    "one_more_level/transition_keeping",
)
MODEL_NAMES = (
    "first_cycle",
    "last_cycle",
    *(
        f"{kind}/{rule}{suffix}"
        for kind in ("multilevel", "one_more_level")
        for rule in multilevel.GROWTH_RULES
        for suffix in ("", *(f"/{policy}" for policy in multilevel.MOMENTUM_POLICIES))
    ),
)

# Paper Tables 3 and 4 (GTX 1080, TensorFlow), one row per model and data set:
# the fixed-depth model's name, test error (%) and minutes, and the multi-level
# model's (the name with "-i"), keyed by width, first-cycle blocks per stage
# and data set.
PAPER_TABLES = pathlib.Path(__file__).with_name("paper_tables.csv")


def model_overrides(config: ml_collections.ConfigDict, names: Sequence[str]) -> dict[str, dict]:
    """Each named model as the fields it changes in ``config`` (`runs.plan_runs`).

    Args:
      config: a multi-level config (``multilevel=True``, at least one cycle
        boundary).
      names: model names (module docstring; `MODEL_NAMES`).

    Returns:
      name -> overrides, in the order of ``names``. The baselines change only
      ``multilevel``, ``stage_sizes`` and ``step_size``; the last cycle's
      blocks are `plan.cycle_networks`' (stage sizes doubled per boundary).

    Raises:
      common.BenchmarkError: a config that is not multi-level, an unknown
        name, or ``one_more_level`` from a stage of an odd number of blocks.
    """
    if config.get("multilevel") is not True or not tuple(config.get("cycle_boundaries", ())):
        raise common.BenchmarkError(
            f"config.multilevel = {config.get('multilevel')!r} with cycle_boundaries = "
            f"{tuple(config.get('cycle_boundaries', ()))!r} is not allowed: the study needs a "
            "multi-level config (multilevel=True, at least one cycle boundary, e.g. (60, 110)), "
            "from which it derives every model"
        )
    sizes, boundaries = tuple(config.stage_sizes), tuple(config.cycle_boundaries)
    overrides = {}
    for name in names:
        kind, *growth = name.split("/")
        if name not in MODEL_NAMES:
            raise common.BenchmarkError(
                f"model {name!r} is not allowed: the models are first_cycle, last_cycle, "
                "multilevel/RULE[/POLICY] and one_more_level/RULE[/POLICY] with RULE one of "
                f"{list(multilevel.GROWTH_RULES)} and POLICY one of "
                f"{list(multilevel.MOMENTUM_POLICIES)}"
            )
        if kind == "first_cycle":
            overrides[name] = {"multilevel": False}
        elif kind == "last_cycle":
            last, _ = plan.cycle_networks(sizes, config.step_size, len(boundaries) + 1)[-1]
            overrides[name] = {"multilevel": False, "stage_sizes": last, "step_size": 1.0}
        else:
            rule, policy = (growth + [config.momentum_at_interpolation])[:2]
            fields = {"interpolation_rule": rule, "momentum_at_interpolation": policy}
            if kind == "one_more_level":
                if any(n % 2 for n in sizes):
                    raise common.BenchmarkError(
                        f"model {name!r} is not allowed with config.stage_sizes = {sizes}: "
                        "one more level halves every stage, which needs even stage sizes"
                    )
                fields.update(
                    stage_sizes=tuple(n // 2 for n in sizes),
                    step_size=2 * config.step_size,
                    cycle_boundaries=(boundaries[0] / 2, *boundaries),
                )
            overrides[name] = fields
    return overrides


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
    key = (str(config.width), "-".join(map(str, config.stage_sizes)), config.dataset)
    with open(PAPER_TABLES, newline="") as handle:
        rows = csv.DictReader(handle)
        row = next(
            (r for r in rows if (r["width"], r["first_cycle_blocks"], r["dataset"]) == key), None
        )
    if row is None:
        return None
    fixed_minutes, multi_minutes = int(row["minutes"]), int(row["multilevel_minutes"])
    return {
        REFERENCE: {
            "name": row["model"],
            "test_error_percent": float(row["test_error_percent"]),
            "minutes": fixed_minutes,
        },
        PAPER_MODEL: {
            "name": f"{row['model']}-i",
            "test_error_percent": float(row["multilevel_test_error_percent"]),
            "minutes": multi_minutes,
        },
        "time_saved": 1 - multi_minutes / fixed_minutes,
        "source": "paper Tables 3-4 (GTX 1080, TensorFlow)",
    }


def run_record(result: runs.Result) -> dict:
    """The numbers of one run that the study uses (seconds, fractions)."""
    summary, totals = result.summary, result.summary["totals"]
    environment = summary.get("environment", {})
    return {
        "seed": result.run.seed,
        "workdir": result.run.workdir,
        "status": result.status,
        "commit": environment.get("commit"),
        "time_utc": environment.get("time_utc"),
        "test_error": totals["final_test_error"],
        "train_seconds": totals["train_seconds"],
        "wall_seconds": totals["wall_seconds"],
        "compile_seconds": totals.get("compile_seconds"),
        "eval_seconds": totals.get("eval_seconds"),
        "steps": totals["steps"],
        "cycles": [
            {key: c[key] for key in ("stage_sizes", "step_size", "steps", "train_seconds")}
            | {"compile_seconds": c["compile_seconds"], "epochs": c["epochs"]}
            for c in summary["cycles"]
        ],
        "growths": [
            {key: g[key] for key in ("step", "from_stage_sizes", "to_stage_sizes", "jump")}
            for g in summary.get("growths", [])
        ],
        "history": [
            {key: h[key] for key in ("epoch", "train_error", "test_error")}
            for h in summary["history"]
        ],
    }


def schedule(record: dict) -> tuple:
    """What a run trains: ``((blocks per stage, steps), ...)`` per cycle.

    Runs of one schedule (one multi-level schedule under several growth rules)
    cost the same by the cost model (`cost_ratio`) and do the same work on
    the machine: their train times differ by its timing noise only.
    """
    return tuple((tuple(c["stage_sizes"]), c["steps"]) for c in record["cycles"])


def cost_ratio(record: dict, reference: dict) -> float:
    """The paper's cost model (Sec. 4.2): the run's cost over the reference model's.

    A step costs in proportion to the network's blocks, nothing else costs:
    ``sum_k blocks_k * steps_k / (blocks_ref * steps_ref)``. For the paper's
    ResNet-50-i (60/50/50 epochs of 2-2-2, 4-4-4, 8-8-8) against ResNet-50:
    (60/4 + 50/2 + 50) / 160 = 0.5625.
    """
    cost = sum(sum(c["stage_sizes"]) * c["steps"] for c in record["cycles"])
    reference_blocks = sum(reference["cycles"][-1]["stage_sizes"])
    return cost / (reference_blocks * sum(c["steps"] for c in reference["cycles"]))


def aggregate(records: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean ± std over seeds per model; savings and jumps paired against the reference.

    Args:
      records: model -> `run_record` per seed.

    Returns:
      model -> ``test_error``, ``train_seconds``, ``wall_seconds``,
      ``compile_seconds``, ``eval_seconds`` (`common.mean_std` dicts), and,
      once the reference (`REFERENCE`) has run a seed the model has:
      ``time_saved_train`` and ``time_saved_wall`` (per seed, paired by seed,
      and their mean ± std), ``cost_model_saving`` (1 - `cost_ratio`);
      ``schedule`` (`schedule`, of its first seed: the seeds share it);
      ``growth_jumps``: per growth, the test-error jump (after - before) as
      mean ± std.
    """
    result = {}
    by_seed = {r["seed"]: r for r in records.get(REFERENCE, [])}
    for name, model_runs in records.items():
        if not model_runs:
            continue
        stats = {
            key: common.mean_std([r[key] for r in model_runs])
            for key in ("test_error", "train_seconds", "wall_seconds")
        }
        for key in ("compile_seconds", "eval_seconds"):
            values = [r[key] for r in model_runs if r[key] is not None]
            stats[key] = common.mean_std(values) if values else None
        paired = [(r, by_seed[r["seed"]]) for r in model_runs if r["seed"] in by_seed]
        if paired:
            for kind in ("train", "wall"):
                per_seed = [
                    common.time_saved(r[f"{kind}_seconds"], ref[f"{kind}_seconds"])
                    for r, ref in paired
                ]
                stats[f"time_saved_{kind}"] = {**common.mean_std(per_seed), "per_seed": per_seed}
            stats["cost_model_saving"] = 1 - cost_ratio(*paired[0])
        stats["schedule"] = files.json_compatible(schedule(model_runs[0]))  # as study.json has it
        growths = min(len(r["growths"]) for r in model_runs)
        stats["growth_jumps"] = [
            common.mean_std([r["growths"][k]["jump"]["test_error"] for r in model_runs])
            for k in range(growths)
        ]
        result[name] = stats
    return result


def on_par_threshold(stats: dict[str, dict]) -> float | None:
    """The highest mean test error on par with the last-cycle model's (a fraction).

    The last-cycle model's mean plus its sample std over seeds (its seeds'
    spread). None while it has fewer than two seeds (no spread to compare
    with).
    """
    reference = stats.get(REFERENCE, {}).get("test_error")
    if not reference or reference["std"] is None:
        return None
    return reference["mean"] + reference["std"]


def on_par(stats: dict[str, dict], name: str) -> bool | None:
    """Whether a model's mean test error is at most `on_par_threshold` (lower is on par too).

    None while the threshold is unknown or the model has not run.
    """
    threshold = on_par_threshold(stats)
    if threshold is None or name not in stats:
        return None
    return stats[name]["test_error"]["mean"] <= threshold


def answer(stats: dict[str, dict]) -> dict | None:
    """The on-par model that saves the most train time, against the paper's rule.

    Which model saves the most is decided by the cost model (paper Sec. 4.2),
    which depends only on the networks a model trains and for how many
    steps: models of one schedule (one multi-level schedule under several
    growth rules) cost the same, and their measured train times differ by the
    machine's timing noise only (`same_network_spread`), which on a shared
    machine can exceed the differences between schedules. So the best is the
    on-par model (`on_par`) of the largest cost-model saving and, among models
    of that saving, of the lowest mean test error. When no model is on par,
    the answer is the closest: the model of the lowest mean test error.

    Returns:
      None while on par cannot be decided (the reference has fewer than two
      seeds); else ``{"on_par", "model", "time_saved", "time_saved_std",
      "cost_model_saving", "test_error", "same_schedule", "threshold"}``:
      whether ``model`` is on par (the best; else the closest), its measured
      saving as mean and std over seeds, its cost-model saving and mean test
      error (fractions), the other on-par models of the same `schedule`,
      the highest mean test error that is on par and the reference's
      mean test error (``reference_test_error``); and, when
      `PAPER_MODEL` has run, ``"against_paper"``: the model's measured
      saving, cost-model saving and test error minus the paper rule's
      (positive saving is more time saved), whether the paper's rule is on
      par and whether the model trains the paper rule's schedule.
    """
    threshold = on_par_threshold(stats)
    if threshold is None:
        return None
    others = [n for n in stats if n != REFERENCE and "time_saved_train" in stats[n]]
    if not others:
        return None
    candidates = [name for name in others if on_par(stats, name)]

    def error(name: str) -> float:
        return stats[name]["test_error"]["mean"]

    def same_schedule(name: str, other: str) -> bool:
        return stats[name]["schedule"] == stats[other]["schedule"]

    if candidates:
        model = min(candidates, key=lambda name: (-stats[name]["cost_model_saving"], error(name)))
    else:
        model = min(others, key=error)
    result = {
        "on_par": bool(candidates),
        "model": model,
        "time_saved": stats[model]["time_saved_train"]["mean"],
        "time_saved_std": stats[model]["time_saved_train"]["std"],
        "cost_model_saving": stats[model]["cost_model_saving"],
        "test_error": error(model),
        "same_schedule": [n for n in candidates if n != model and same_schedule(n, model)],
        "threshold": threshold,
        "reference_test_error": stats[REFERENCE]["test_error"]["mean"],
    }
    paper = stats.get(PAPER_MODEL)
    if paper and "time_saved_train" in paper:
        result["against_paper"] = {
            "time_saved": result["time_saved"] - paper["time_saved_train"]["mean"],
            "cost_model_saving": result["cost_model_saving"] - paper["cost_model_saving"],
            "test_error": result["test_error"] - paper["test_error"]["mean"],
            "paper_on_par": on_par(stats, PAPER_MODEL),
            "same_schedule": same_schedule(model, PAPER_MODEL),
        }
    return result


def time_gap(multilevel: dict, last_cycle: dict) -> dict:
    """Where the multi-level run's measured saving falls short of the theoretical one.

    The cost model of the theoretical saving (paper Sec. 4.2): a step of a
    network with n blocks costs n / N of a step of the last-cycle network
    with N blocks, and nothing else costs anything. Against it, with s the
    last-cycle model's seconds per step (its train time less compiling, over
    its steps), T its train time and C its compile time, the multi-level run
    should spend ``(n_k / N) x steps_k x s`` on cycle k and ``ratio x C``
    on compiling, where ratio = sum_k (n_k / N) steps_k / sum_k steps_k is the
    theoretical cost ratio. What each part spends beyond that, over T, is its
    share of the shortfall; the shares add up exactly to theoretical minus
    measured saving.

    Args:
      multilevel, last_cycle: `run_record`s of the same seed (with
        ``cycles``: stage sizes, steps, train and compile seconds each; train
        seconds include compiling, initialisation and interpolation).

    Returns:
      ``parts``: one per cycle (``"cycle 1 (2-2-2)"``...; its train time less
      compiling) and one ``"compiling"``, each ``{"measured_seconds",
      "model_seconds", "excess_seconds", "points"}`` (points: percentage points
      of saving lost, 100 x excess / T); ``theoretical_saving``,
      ``measured_saving`` (fractions) and ``shortfall_points``.

    Raises:
      ValueError: if the two runs' step counts differ.
    """
    last_blocks = sum(last_cycle["cycles"][-1]["stage_sizes"])
    total_steps = sum(c["steps"] for c in last_cycle["cycles"])
    if sum(c["steps"] for c in multilevel["cycles"]) != total_steps:
        raise ValueError("the multi-level and last-cycle runs have different step counts")
    last_train = last_cycle["train_seconds"]
    last_compile = sum(c["compile_seconds"] for c in last_cycle["cycles"])
    seconds_per_step = (last_train - last_compile) / total_steps
    fractions = [sum(c["stage_sizes"]) / last_blocks for c in multilevel["cycles"]]
    ratio = cost_ratio(multilevel, last_cycle)
    parts = {}
    for k, (fraction, cycle) in enumerate(zip(fractions, multilevel["cycles"])):
        name = f"cycle {k + 1} ({models.format_stage_sizes(cycle['stage_sizes'])})"
        parts[name] = (
            cycle["train_seconds"] - cycle["compile_seconds"],
            fraction * cycle["steps"] * seconds_per_step,
        )
    parts["compiling"] = (
        sum(c["compile_seconds"] for c in multilevel["cycles"]),
        ratio * last_compile,
    )
    result = {
        name: {
            "measured_seconds": measured,
            "model_seconds": model,
            "excess_seconds": measured - model,
            "points": 100 * (measured - model) / last_train,
        }
        for name, (measured, model) in parts.items()
    }
    measured_saving = common.time_saved(multilevel["train_seconds"], last_train)
    return {
        "parts": result,
        "theoretical_saving": 1 - ratio,
        "measured_saving": measured_saving,
        "shortfall_points": 100 * (1 - ratio - measured_saving),
    }


def time_gap_over_seeds(records: dict[str, list[dict]], name: str = PAPER_MODEL) -> dict | None:
    """`time_gap` of model ``name`` per seed, and its mean; None before a seed is shared.

    Runs are paired by seed with the last-cycle model's.
    """
    last = {r["seed"]: r for r in records.get(REFERENCE, [])}
    pairs = [(m, last[m["seed"]]) for m in records.get(name, []) if m["seed"] in last]
    if not pairs:
        return None
    per_seed = [time_gap(multi, last) for multi, last in pairs]
    mean = {
        name: {
            key: sum(g["parts"][name][key] for g in per_seed) / len(per_seed)
            for key in per_seed[0]["parts"][name]
        }
        for name in per_seed[0]["parts"]
    }
    return {
        "seeds": [m["seed"] for m, _ in pairs],
        "per_seed": per_seed,
        "mean": mean,
        "shortfall_points": sum(g["shortfall_points"] for g in per_seed) / len(per_seed),
    }


def time_gap_table(gap: dict) -> str:
    """Markdown: per part of the multi-level run, measured and cost-model seconds, points lost."""
    rows = [
        [
            name,
            f"{p['measured_seconds']:.1f}",
            f"{p['model_seconds']:.1f}",
            f"{p['excess_seconds']:+.1f}",
            f"{p['points']:+.2f}",
        ]
        for name, p in gap["mean"].items()
    ]
    rows.append(
        [
            "total (theoretical - measured saving)",
            "",
            "",
            f"{sum(p['excess_seconds'] for p in gap['mean'].values()):+.1f}",
            f"{gap['shortfall_points']:+.2f}",
        ]
    )
    return common.markdown_table(
        [
            "part of the multi-level run",
            "measured (s)",
            "cost model (s)",
            "excess (s)",
            "saving lost (points)",
        ],
        rows,
    )


def model_description(record: dict) -> dict:
    """Blocks and h of each cycle of a run, and the depth of its last network."""
    return {
        "stage_sizes": [c["stage_sizes"] for c in record["cycles"]],
        "step_sizes": [c["step_size"] for c in record["cycles"]],
        "depth": models.depth(record["cycles"][-1]["stage_sizes"]),
    }


def _changes(values: list, text) -> str:
    kept = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]
    return " → ".join(text(v) for v in kept)


def results_table(stats: dict[str, dict], descriptions: dict[str, dict]) -> str:
    """The markdown table: one row per model (mean ± std over seeds).

    Args:
      stats: from `aggregate`.
      descriptions: model -> `model_description`.
    """
    headers = [
        "model",
        "blocks",
        "h",
        "test error (%)",
        "on par",
        "train time (s)",
        "train time saved",
        "cost model",
        "test-error jump at each growth (points)",
    ]
    rows = []
    for name, s in stats.items():
        d = descriptions[name]
        par = on_par(stats, name)
        rows.append(
            [
                f"{name} (depth {d['depth']})",
                _changes(d["stage_sizes"], models.format_stage_sizes),
                _changes(d["step_sizes"], lambda h: f"{h:g}"),
                common.format_mean_std(s["test_error"], scale=100),
                "—" if name == REFERENCE or par is None else ("yes" if par else "no"),
                common.format_mean_std(s["train_seconds"], digits=1),
                common.format_mean_std(s.get("time_saved_train"), scale=100, digits=1, suffix=" %"),
                f"{100 * s['cost_model_saving']:.1f} %" if "cost_model_saving" in s else "—",
                ", ".join(common.format_mean_std(j, scale=100, digits=2) for j in s["growth_jumps"])
                or "—",
            ]
        )
    return common.markdown_table(headers, rows, align=["l", "l", "l", *["r"] * 6])


def answer_line(report: dict) -> str:
    """The study's answer in one paragraph, from `answer`."""
    best = report.get("answer")
    if best is None:
        return (
            "Nothing is known to be on par with the last-cycle model yet (it needs the "
            "last-cycle model on at least two seeds, and another model beside it)."
        )
    spread = "" if best["time_saved_std"] is None else f" ± {100 * best['time_saved_std']:.1f}"
    saved = (
        f"{100 * best['time_saved']:.1f}{spread} % of the last-cycle model's train time "
        f"measured ({100 * best['cost_model_saving']:.1f} % by the cost model)"
    )
    if best["on_par"]:
        line = (
            f"At this budget, {best['model']} saves the most train time at an error on par "
            f"with the last-cycle model: {saved}, {100 * best['test_error']:.2f} % test error"
        )
    else:
        line = (
            "At this budget no model is on par with the last-cycle model (on par: a mean test "
            f"error of at most {100 * best['threshold']:.2f} %); the closest, {best['model']}, "
            f"ends at {100 * best['test_error']:.2f} % "
            f"({100 * (best['test_error'] - best['reference_test_error']):+.2f} points over the "
            f"last-cycle model's {100 * best['reference_test_error']:.2f} %) and saves {saved}"
        )
    if best["same_schedule"]:
        line += (
            f"; {', '.join(best['same_schedule'])} train the same networks for the same "
            "steps and are on par too, so their train times differ by the machine's noise "
            f"only: of them, {best['model']} has the lowest test error"
        )
    against = best.get("against_paper")
    if against and best["model"] != PAPER_MODEL:
        paper = (
            f"the paper's rule ({PAPER_MODEL}, {'on' if against['paper_on_par'] else 'not on'} par)"
        )
        if against["same_schedule"]:
            line += (
                f"; {paper} trains the same networks for the same steps: against it "
                f"{100 * against['test_error']:+.2f} points of test error, and a measured "
                f"train time {100 * against['time_saved']:+.1f} points of saving apart, which "
                "is the machine's timing noise"
            )
        else:
            line += (
                f"; against {paper} that is {100 * against['time_saved']:+.1f} points of "
                f"measured time saved, {100 * against['cost_model_saving']:+.1f} by the cost "
                f"model, and {100 * against['test_error']:+.2f} points of test error"
            )
    return line + "."


def seeds_label(seeds) -> str:
    """``"seed 0"`` or ``"seeds 0, 1, 2"``, for titles."""
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def same_network_spread(runs_by_model: dict[str, list[dict]]) -> list[tuple]:
    """Train times of runs that train the same networks for the same steps, per seed.

    Such runs (e.g. one multi-level schedule under several growth rules)
    cost the same in the paper's cost model; their spread is the timing
    noise of the machine.

    Returns:
      ``(seed, model names, lowest, highest train seconds)`` for every group
      of two or more such runs.
    """
    groups: dict[tuple, list[tuple[str, float]]] = {}
    for name, model_runs in runs_by_model.items():
        for r in model_runs:
            key = (r["seed"], schedule(r))
            groups.setdefault(key, []).append((name, r["train_seconds"]))
    return [
        (key[0], [n for n, _ in group], min(t for _, t in group), max(t for _, t in group))
        for key, group in groups.items()
        if len(group) > 1
    ]


def report_markdown(report: dict) -> str:
    """``study.md``: the table, the answer and how the numbers were made."""
    s = report["settings"]
    lines = [
        f"# The multi-level method on {s['dataset']}: {len(report['stats'])} models, width "
        f"{s['width']}, {s['num_epochs']:g} epochs, {seeds_label(s['seeds'])}",
        "",
        results_table(report["stats"], report["models"]),
        "",
        f"- **Answer.** {answer_line(report)}",
        "- Mean ± sample std over seeds. Train time: steps, initialisation, compiling and "
        "interpolation (no evaluation, checkpoints, data loading). Saved = 1 - t / t(last-cycle "
        "model), paired by seed. Cost model: the saving if a step cost in proportion to the "
        "blocks and nothing else cost (paper Sec. 4.2).",
        "- On par: mean test error at most the last-cycle model's mean plus its seeds' std. "
        "Jump: test error just after - just before a growth, in eval mode (negative is better).",
        f"- Runs side by side: {s['parallel_runs']} (times compare within this study only). "
        f"Machine: {parallel.describe_environment(report['machine'])}.",
        f"- Runs made at {', '.join(f'commit {c}' for c in report['commits']) or 'no commit'}"
        f"{', ' + report['dates'] if report['dates'] else ''}.",
    ]
    for seed, names, low, high in same_network_spread(report["runs"]):
        lines.append(
            f"- Timing noise: {', '.join(names)} train the same networks for the same steps; "
            f"with seed {seed} their train times ran from {low:.1f} to {high:.1f} s "
            f"({100 * (high / low - 1):.0f} % apart)."
        )
    paper = report.get("paper_reference")
    if paper:
        lines.append(
            f"- Paper (GTX 1080, same data): {paper[REFERENCE]['name']} "
            f"{paper[REFERENCE]['test_error_percent']} % / {paper[REFERENCE]['minutes']} min, "
            f"{paper[PAPER_MODEL]['name']} {paper[PAPER_MODEL]['test_error_percent']} % / "
            f"{paper[PAPER_MODEL]['minutes']} min: {100 * paper['time_saved']:.1f} % saved."
        )
    resumed = [
        f"{name} seed {r['seed']}"
        for name, model_runs in report["runs"].items()
        for r in model_runs
        if r["status"] == runs.RESUMED
    ]
    if resumed:
        lines.append(
            f"- **Resumed from checkpoints**: {', '.join(resumed)}; their train time leaves "
            "out the work lost at the interruption."
        )
    if not report["complete"]:
        lines.append("- **Incomplete**: not every run has finished.")
    gap = report["time_gap"].get(PAPER_MODEL)
    if gap:
        lines += [
            "",
            f"## Where the time of {PAPER_MODEL} goes (mean over seeds "
            f"{', '.join(str(s) for s in gap['seeds'])})",
            "",
            time_gap_table(gap),
            "",
            "- Cost model: a step of n blocks per stage costs n/N of a last-cycle step (N "
            "blocks), measured as the last-cycle model's train time less compiling, per step; "
            "compiling should cost the cost ratio times the last-cycle model's. Points: excess / "
            "last-cycle train time. study.json has this for every model that grows.",
        ]
    return "\n".join(lines) + "\n"


def error_curves(histories: Sequence[list[dict]]) -> dict[str, list[float]]:
    """Test error per epoch over seeds: ``{"epoch", "mean", "std"}`` (std 0 for one seed).

    Only the epochs that every seed evaluated, in order.
    """
    by_epoch: dict[float, list[float]] = {}
    for history in histories:
        for record in history:
            by_epoch.setdefault(round(record["epoch"], 6), []).append(record["test_error"])
    epochs = sorted(e for e, values in by_epoch.items() if len(values) == len(histories))
    values = [np.asarray(by_epoch[e]) for e in epochs]
    return {
        "epoch": epochs,
        "mean": [float(v.mean()) for v in values],
        "std": [float(v.std(ddof=1)) if len(v) > 1 else 0.0 for v in values],
    }


def study_figure(report: dict) -> Figure:
    """Left: test error per epoch (mean, ± std band); right: the test-error jump at each growth."""
    figure = Figure(figsize=(12, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    colors = {}  # one colour per model in both panels
    for name, model_runs in report["runs"].items():
        curve = error_curves([r["history"] for r in model_runs])
        mean, std = 100 * np.asarray(curve["mean"]), 100 * np.asarray(curve["std"])
        (line,) = left.plot(curve["epoch"], mean, marker="o", markersize=2.5, label=name)
        colors[name] = line.get_color()
        left.fill_between(curve["epoch"], mean - std, mean + std, color=colors[name], alpha=0.2)
    for boundary in report["settings"]["cycle_boundaries"]:
        left.axvline(boundary, color="grey", linestyle="--", linewidth=0.8)
    left.set(xlabel="epoch", ylabel="test error (%)", title="Test error (mean ± std over seeds)")
    left.set_ylim(top=min(left.get_ylim()[1], 30))
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    growing = {name: s["growth_jumps"] for name, s in report["stats"].items() if s["growth_jumps"]}
    width = 0.8 / max(len(growing), 1)
    for i, (name, jumps) in enumerate(growing.items()):
        right.bar(
            np.arange(len(jumps)) + i * width,
            [100 * j["mean"] for j in jumps],
            width,
            yerr=[100 * (j["std"] or 0.0) for j in jumps],
            color=colors.get(name),
            label=name,
        )
    right.axhline(0, color="black", linewidth=0.8)
    right.set(
        xlabel="growth", ylabel="test error after - before (points)", title="Jump at each growth"
    )
    right.set_xticks(
        np.arange(max((len(j) for j in growing.values()), default=0))
        + width * (len(growing) - 1) / 2,
        [f"growth {k + 1}" for k in range(max((len(j) for j in growing.values()), default=0))],
    )
    if growing:
        right.legend(fontsize=7)
    figure.suptitle(
        f"{report['settings']['dataset']}: {seeds_label(report['settings']['seeds'])}; "
        "dashed: the config's cycle boundaries"
    )
    return figure


def build_report(config, names, seeds, results, machine, parallel_runs, complete) -> dict:
    """The content of ``study.json`` (see `run_study`)."""
    records = {
        name: [run_record(r) for r in results if r.run.name == name]
        for name in names
        if any(r.run.name == name for r in results)
    }
    stats = aggregate(records)
    dates = sorted(r["time_utc"] for rs in records.values() for r in rs if r["time_utc"])
    report = {
        "benchmark": "study",
        "complete": complete,
        "machine": machine,
        "settings": {
            "dataset": config.dataset,
            "width": config.width,
            "num_epochs": config.num_epochs,
            "cycle_boundaries": list(config.cycle_boundaries),
            "seeds": list(seeds),
            "models": list(names),
            "parallel_runs": parallel_runs,
            "config": {
                k: v for k, v in config.to_dict().items() if k not in ("seed", "progress_bar")
            },
        },
        "commits": sorted({r["commit"] for rs in records.values() for r in rs if r["commit"]}),
        "dates": f"from {dates[0]} to {dates[-1]}" if dates else "",
        "paper_reference": paper_reference(config),
        "models": {name: model_description(rs[0]) for name, rs in records.items()},
        "stats": stats,
        "time_gap": {
            name: time_gap_over_seeds(records, name)
            for name, rs in records.items()
            if len(rs[0]["cycles"]) > 1 and name != REFERENCE
        },
        "runs": records,
    }
    report["answer"] = answer(stats)
    return report


def run_study(
    config: ml_collections.ConfigDict,
    names: Sequence[str],
    seeds: Sequence[int],
    output_dir: str,
    *,
    resume: bool = False,
    parallel_runs: int = 1,
) -> dict:
    """Trains every model per seed and writes ``study.{md,json,png}`` after each run.

    The outputs are rewritten (atomically) after every run with ``"complete":
    false``, so an interruption keeps what finished.

    Args:
      config: a multi-level config (`model_overrides`).
      names: the models (`MODEL_NAMES`).
      seeds: seeds, each for every model (initialisation and data order).
      output_dir: where the outputs and the runs' sub-folders go.
      resume, parallel_runs: as `runs.train_runs`.

    Returns:
      The report written to ``study.json``: ``machine``, ``settings``,
      ``commits`` and ``dates`` of the runs, ``models`` (blocks and h per
      cycle), ``stats`` (`aggregate`), ``answer`` (`answer`), ``runs``
      (per-seed `run_record`s) and ``paper_reference``.

    Raises:
      common.BenchmarkError, configuration.ConfigError,
      datasets.DataSetError, OSError: before any training.
      checkpoint.CheckpointError: from a run (e.g. a resumed run whose
        checkpoints are of another config).
    """
    names, seeds = list(names), list(seeds)
    planned = runs.plan_runs(config, model_overrides(config, names), seeds, output_dir)
    resolved = configuration.resolve(config)  # batch size etc. filled in
    machine = parallel.environment()

    def write(results, complete=False):
        report = build_report(resolved, names, seeds, results, machine, parallel_runs, complete)
        common.write_outputs(
            output_dir,
            "study",
            report,
            report_markdown(report),
            {"study.png": study_figure(report)},
        )
        return report

    results = runs.train_runs(
        planned, output_dir, resume=resume, parallel_runs=parallel_runs, on_finished=write
    )
    return write(results, complete=True)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the command-line flags (called only when run as a program, or by a test)."""
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(PRESETS_DIR, "cpu.py"),
        "The multi-level config every model is derived from (benchmarks/presets/cpu.py, "
        "Fashion-MNIST for a CPU, the default; benchmarks/presets/paper.py, CIFAR-10 "
        "ResNet-50-i for a GPU; configs/*i.py); fields can be overridden with "
        "--config.FIELD=VALUE.",
        lock_config=True,
        flag_values=flag_values,
    )
    common.define_list(
        "models",
        ",".join(DEFAULT_MODELS),
        "Models: first_cycle, last_cycle, multilevel/RULE[/POLICY], one_more_level/RULE[/POLICY].",
        flags.EnumParser(list(MODEL_NAMES)),
        flag_values=flag_values,
    )
    common.define_list(
        "seeds",
        "0,1,2",
        "Seeds; every model is trained once per seed, results are mean ± std.",
        flags.IntegerParser(lower_bound=0),
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output_dir",
        "runs/bench/study",
        "Folder for study.md, study.json, study.png and the runs' sub-folders.",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "resume",
        False,
        "Reuse finished runs (same config) found in the output folder and continue "
        "unfinished ones from their checkpoints; without it such folders are an error.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "parallel_runs",
        1,
        "Runs trained side by side, each in its own process on one CPU core (CPU only); "
        "their times compare with each other only.",
        lower_bound=1,
        flag_values=flag_values,
    )


def main(argv):
    del argv  # run_command refuses arguments
    report = run_study(
        FLAGS.config,
        FLAGS.models,
        FLAGS.seeds,
        FLAGS.output_dir,
        resume=FLAGS.resume,
        parallel_runs=FLAGS.parallel_runs,
    )
    print(report_markdown(report), flush=True)
    print(f"Wrote study.md, study.json and study.png to {FLAGS.output_dir}", flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
