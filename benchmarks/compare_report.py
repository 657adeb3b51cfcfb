"""Results of ``benchmarks/compare.py``: statistics over seeds, the table, the plot.

Pure functions of the per-run records; `curves_figure` draws a matplotlib
``Figure`` (no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmarks import common
from mlres_jax import models

# The three models, in the order they are trained and shown.
MODELS = ("first_cycle", "last_cycle", "multilevel")
LABELS = {
    "first_cycle": "first-cycle model",
    "last_cycle": "last-cycle model",
    "multilevel": "multi-level",
}


def aggregate(records: dict[str, list[dict]], reference: str = "last_cycle") -> dict[str, dict]:
    """Mean ± std over seeds per model, and the time saved against the reference model.

    Args:
      records: model -> `compare.run_record` per seed.
      reference: the model the savings are measured against.

    Returns:
      model -> ``{"test_error", "train_seconds", "wall_seconds",
      "compile_seconds", "eval_seconds"}`` as `common.mean_std` dicts, plus for
      models other than the reference ``"time_saved_train"`` and
      ``"time_saved_wall"``: the saving per seed (paired by seed, over the
      seeds both have run) and its mean ± std. The savings are absent until
      the reference has run a seed the model has.
    """
    result = {}
    by_seed = {r["seed"]: r for r in records.get(reference, [])}
    for name, runs in records.items():
        if not runs:
            continue
        stats = {
            key: common.mean_std([r[key] for r in runs])
            for key in ("test_error", "train_seconds", "wall_seconds")
        }
        for key in ("compile_seconds", "eval_seconds"):
            values = [r[key] for r in runs if r[key] is not None]
            stats[key] = common.mean_std(values) if values else None
        paired = [(r, by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
        if name != reference and paired:
            for kind in ("train", "wall"):
                per_seed = [
                    common.time_saved(r[f"{kind}_seconds"], ref[f"{kind}_seconds"])
                    for r, ref in paired
                ]
                stats[f"time_saved_{kind}"] = {**common.mean_std(per_seed), "per_seed": per_seed}
        result[name] = stats
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
      multilevel, last_cycle: `compare.run_record`s of the same seed (with
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
    ratio = sum(f * c["steps"] for f, c in zip(fractions, multilevel["cycles"])) / total_steps
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


def time_gap_over_seeds(records: dict[str, list[dict]]) -> dict | None:
    """`time_gap` per seed and its mean over seeds; None until both models have run a seed.

    Runs are paired by seed; records without ``cycles`` (written before it
    was recorded) are left out.
    """
    last = {r["seed"]: r for r in records.get("last_cycle", []) if "cycles" in r}
    pairs = [
        (m, last[m["seed"]])
        for m in records.get("multilevel", [])
        if "cycles" in m and m["seed"] in last
    ]
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


def _blocks_text(description: dict) -> str:
    sizes = [models.format_stage_sizes(s) for s in description["stage_sizes"]]
    unique = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    return " → ".join(unique)


def _h_text(description: dict) -> str:
    steps = description["step_sizes"]
    unique = [h for i, h in enumerate(steps) if i == 0 or h != steps[i - 1]]
    return " → ".join(f"{h:g}" for h in unique)


def results_table(stats: dict[str, dict], descriptions: dict[str, dict]) -> str:
    """The Table-3-like markdown table of the three models.

    Args:
      stats: from `aggregate`.
      descriptions: model -> `model_description`.

    Returns:
      Markdown: model, blocks, h, parameters, test error (%), train and wall
      time (s), compile and eval time (s), train and wall time saved against
      the last-cycle model (%).
    """
    headers = [
        "model",
        "blocks",
        "h",
        "params",
        "test error (%)",
        "train time (s)",
        "wall time (s)",
        "compile (s)",
        "eval (s)",
        "train time saved",
        "wall time saved",
    ]
    rows = []
    for name in MODELS:
        if name not in stats:
            continue
        s, d = stats[name], descriptions[name]
        rows.append(
            [
                f"{LABELS[name]} (depth {d['depth']})",
                _blocks_text(d),
                _h_text(d),
                f"{d['num_params']:,}",
                common.format_mean_std(s["test_error"], scale=100),
                common.format_mean_std(s["train_seconds"], digits=1),
                common.format_mean_std(s["wall_seconds"], digits=1),
                common.format_mean_std(s["compile_seconds"], digits=1),
                common.format_mean_std(s["eval_seconds"], digits=1),
                common.format_mean_std(s.get("time_saved_train"), scale=100, digits=1, suffix=" %"),
                common.format_mean_std(s.get("time_saved_wall"), scale=100, digits=1, suffix=" %"),
            ]
        )
    return common.markdown_table(headers, rows)


def report_markdown(report: dict) -> str:
    """``compare.md``: the table and the lines that say what it means."""
    theory = report["theoretical"]
    split = " / ".join(f"{e:g}" for e in theory["cycle_epochs"])
    settings = report["settings"]
    lines = [
        f"# Multi-level vs fixed depth: {settings['dataset']}, width "
        f"{settings['width']}, {settings['num_epochs']:g} epochs",
        "",
        results_table(report["stats"], report["models"]),
        "",
        f"- Theoretical saving of the multi-level run for cycles of {split} "
        f"epochs (paper Sec. 4.2): {100 * theory['time_saved']:.2f} % "
        f"(cost ratio {theory['cost_ratio']:.4f}).",
        f"- Seeds: {', '.join(str(s) for s in settings['seeds'])}; "
        "mean ± sample std over seeds where more than one.",
        "- Train time: the run without evaluation, checkpoints and data loading "
        "(training steps, initialisation, compilation, interpolation). Wall "
        "time: the whole run. Saved = 1 - t / t(last-cycle model), per seed.",
        f"- Machine: {common.machine_line(report['machine'])}.",
    ]
    paper = report.get("paper_reference")
    if paper:
        lines.append(
            f"- Paper (GTX 1080, same data): {paper['last_cycle']['name']} "
            f"{paper['last_cycle']['test_error_percent']} % / "
            f"{paper['last_cycle']['minutes']} min, {paper['multilevel']['name']} "
            f"{paper['multilevel']['test_error_percent']} % / "
            f"{paper['multilevel']['minutes']} min: "
            f"{100 * paper['time_saved']:.1f} % saved."
        )
    resumed = [
        f"{name} seed {r['seed']}"
        for name, runs in report["runs"].items()
        for r in runs
        if r.get("status") == "resumed"
    ]
    if resumed:
        lines.append(
            f"- **Resumed from checkpoints**: {', '.join(resumed)}. Their train "
            "time leaves out the work lost since the last checkpoint, and their "
            "wall time is that of the last invocation only."
        )
    if not report["complete"]:
        lines.append("- **Incomplete**: not every run has finished.")
    gap = report.get("time_gap")
    if gap:
        lines += [
            "",
            f"## Where the multi-level run's time goes (mean over seeds "
            f"{', '.join(str(s) for s in gap['seeds'])})",
            "",
            time_gap_table(gap),
            "",
            "- Cost model: a step of n blocks per stage costs n/N of a last-cycle "
            "step (N blocks), measured as the last-cycle model's train time less "
            "compiling, per step; compiling should cost the cost ratio times the "
            "last-cycle model's. Cycle rows: train time less compiling (steps, "
            "initialisation, interpolation). Points: excess / last-cycle train time.",
        ]
    return "\n".join(lines) + "\n"


def mean_curves(histories: Sequence[list[dict]]) -> dict[str, list[float]]:
    """Per-epoch means over seeds of ``train_error`` and ``test_error``.

    Args:
      histories: one summary ``history`` per seed (records with ``epoch``,
        ``train_error``, ``test_error``).

    Returns:
      ``{"epoch", "train_error", "test_error"}``, lists over the epochs that
      every seed evaluated, in order.
    """
    by_epoch: dict[float, list[dict]] = {}
    for history in histories:
        for record in history:
            by_epoch.setdefault(round(record["epoch"], 6), []).append(record)
    epochs = sorted(e for e, rs in by_epoch.items() if len(rs) == len(histories))
    return {
        "epoch": epochs,
        **{
            key: [sum(r[key] for r in by_epoch[e]) / len(by_epoch[e]) for e in epochs]
            for key in ("train_error", "test_error")
        },
    }


def curves_figure(
    curves: dict[str, dict], boundaries: Sequence[float], seeds: Sequence[int], dataset: str
) -> Figure:
    """Train and test error per epoch of each model, cycle boundaries dashed (paper Fig. 6).

    Args:
      curves: model -> `mean_curves` output.
      boundaries: epochs at which cycles start (vertical lines).
      seeds: the seeds the curves are the mean of.
      dataset: the data set's name, for the title.
    """
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharex=True)
    for axis, key, name in zip(
        axes,
        ("train_error", "test_error"),
        ("train error (augmented, mean since last eval)", "test error"),
    ):
        for model, curve in curves.items():
            axis.plot(
                curve["epoch"],
                [100 * v for v in curve[key]],
                marker="o",
                markersize=3,
                label=LABELS[model],
            )
        for i, boundary in enumerate(boundaries):
            axis.axvline(
                boundary,
                color="grey",
                linestyle="--",
                linewidth=1,
                label="cycle boundary" if i == 0 else None,
            )
        axis.set_xlim(left=0)
        axis.set_xlabel("epoch")
        axis.set_ylabel(f"{name} (%)")
        axis.grid(alpha=0.3)
    axes[1].legend()
    seeds_text = (
        f"seed {seeds[0]}"
        if len(seeds) == 1
        else "mean over seeds " + ", ".join(str(seed) for seed in seeds)
    )
    figure.suptitle(f"{dataset}: first-cycle, last-cycle and multi-level model ({seeds_text})")
    return figure
