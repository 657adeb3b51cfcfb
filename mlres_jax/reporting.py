"""What a run reports: its evaluation records, per-cycle records and summary.

Plain data and text, no plotting (figures are in `mlres_jax.figures`):

* `evaluation_record` and `evaluation_line`: one evaluation of the history;
* `cycle_record`: one finished cycle;
* `growth_record`, `growth_description` and `growth_line`: one growth and its jump;
* `run_summary`: the content of ``summary.json``, and `read_summary`, the
  one reader of that file, which refuses a damaged one in one line;
* `summary_table`: the end-of-run table printed on stdout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from mlres_jax import errors, models, parallel, plan, stopwatch


class SummaryError(errors.UserError):
    """A ``summary.json`` that cannot be read or is not a run's summary."""


def evaluation_record(
    *,
    step: int,
    steps_per_epoch: int,
    cycle: plan.Cycle,
    train: dict,
    test: dict,
    learning_rate: float,
) -> dict:
    """One record of the history (``summary.json``'s ``history``).

    Args:
      step: global steps taken when evaluating.
      steps_per_epoch: to express ``step`` in epochs.
      cycle: the cycle evaluated in.
      train: ``{"loss", "error"}`` means over the steps since the previous
        evaluation (`steps.take_metric_means`).
      test: ``{"loss", "error"}`` on the test split (`steps.evaluate`).
      learning_rate: at the last step taken.

    Returns:
      ``epoch``, ``step``, ``cycle`` (1-based), ``train_loss``,
      ``train_error``, ``test_loss``, ``test_error`` (fractions) and
      ``learning_rate``.
    """
    return {
        "epoch": step / steps_per_epoch,
        "step": step,
        "cycle": cycle.index + 1,
        "train_loss": train["loss"],
        "train_error": train["error"],
        "test_loss": test["loss"],
        "test_error": test["error"],
        "learning_rate": float(learning_rate),
    }


def evaluation_line(record: dict, stage_sizes: Sequence[int]) -> str:
    """The progress line of one evaluation, e.g. ``epoch 2.00 (cycle 1, 2-2-2): ...``."""
    return (
        f"epoch {record['epoch']:.2f} (cycle {record['cycle']}, "
        f"{models.format_stage_sizes(stage_sizes)}): train loss "
        f"{record['train_loss']:.4f} error {100 * record['train_error']:.2f}%"
        f" | test loss {record['test_loss']:.4f} error "
        f"{100 * record['test_error']:.2f}%"
    )


def cycle_record(
    cycle: plan.Cycle,
    *,
    num_params: int,
    steps_per_epoch: int,
    seconds: dict,
    last_evaluation: dict,
) -> dict:
    """The record of a finished cycle (``summary.json``'s ``cycles``).

    Args:
      cycle: the cycle.
      num_params: trainable parameters of its network.
      steps_per_epoch: to express its length in epochs.
      seconds: its `stopwatch.Stopwatch` readings.
      last_evaluation: the evaluation record at its end.
    """
    return {
        "cycle": cycle.index + 1,
        "stage_sizes": list(cycle.stage_sizes),
        "depth": models.depth(cycle.stage_sizes),
        "step_size": cycle.step_size,
        "num_params": num_params,
        "epochs": cycle.num_steps / steps_per_epoch,
        "steps": cycle.num_steps,
        **{name: seconds[name] for name in stopwatch.ACTIVITIES},
        "final_train_loss": last_evaluation["train_loss"],
        "final_train_error": last_evaluation["train_error"],
        "test_loss": last_evaluation["test_loss"],
        "test_error": last_evaluation["test_error"],
    }


GROWTH_METRICS = ("test_loss", "test_error", "train_loss", "train_error")


def growth_record(
    *,
    cycle: plan.Cycle,
    step: int,
    from_stage_sizes: Sequence[int],
    rule: str,
    momentum: str,
    before: dict,
    after: dict,
) -> dict:
    """The record of one growth (``summary.json``'s ``growths``).

    Args:
      cycle: the cycle the growth starts.
      step: global steps taken at the growth.
      from_stage_sizes: blocks per stage before it.
      rule, momentum: the growth rule and the momentum policy.
      before, after: `GROWTH_METRICS` of the network just before and just
        after the growth (train metrics on a fixed subset, eval mode; None
        where not measured).

    Returns:
      ``cycle`` (1-based), ``step``, ``from_stage_sizes``,
      ``to_stage_sizes``, ``step_size`` (after), ``rule``, ``momentum``,
      ``before``, ``after`` and ``jump`` (after - before, per metric).
    """
    return {
        "cycle": cycle.index + 1,
        "step": step,
        "from_stage_sizes": list(from_stage_sizes),
        "to_stage_sizes": list(cycle.stage_sizes),
        "step_size": cycle.step_size,
        "rule": rule,
        "momentum": momentum,
        "before": dict(before),
        "after": dict(after),
        "jump": {
            name: (
                None if before[name] is None or after[name] is None else after[name] - before[name]
            )
            for name in GROWTH_METRICS
        },
    }


def growth_description(record: dict) -> str:
    """One growth in words: ``growth at step 2400 (2-2-2 -> 4-4-4, paper rule, momentum
    interpolate): `` and its `growth_line`."""
    return (
        f"growth at step {record['step']} ({models.format_stage_sizes(record['from_stage_sizes'])}"
        f" -> {models.format_stage_sizes(record['to_stage_sizes'])}, {record['rule']} rule, "
        f"momentum {record['momentum']}): {growth_line(record)}"
    )


def growth_line(record: dict) -> str:
    """``test loss 0.2552 -> 0.3110 (+0.0558), test error 9.36% -> 11.02% (+1.66 points)``."""
    b, a, j = record["before"], record["after"], record["jump"]
    text = (
        f"test loss {b['test_loss']:.4f} -> {a['test_loss']:.4f} ({j['test_loss']:+.4f}), "
        f"test error {100 * b['test_error']:.2f}% -> {100 * a['test_error']:.2f}% "
        f"({100 * j['test_error']:+.2f} points)"
    )
    if j["train_loss"] is not None:
        text += (
            f"; train-subset loss {b['train_loss']:.4f} -> {a['train_loss']:.4f} "
            f"({j['train_loss']:+.4f})"
        )
    return text


def run_summary(
    *,
    config: dict,
    dataset: dict,
    cycles: Sequence[plan.Cycle],
    cycle_records: list[dict],
    history: list[dict],
    wall_seconds: float,
    growths: Sequence[dict] = (),
    environment: dict | None = None,
) -> dict:
    """The content of ``summary.json``.

    Args:
      config: the resolved config as a dict.
      dataset: ``name``, ``train_examples``, ``test_examples``,
        ``steps_per_epoch``.
      cycles: the run's plan (`plan.plan_cycles`).
      cycle_records: one `cycle_record` per cycle.
      history: every `evaluation_record`.
      wall_seconds: wall time of this invocation (a resumed run counts from
        its restart).
      growths: every `growth_record`.
      environment: what ran it (`parallel.environment`): platform, device
        kind, devices, processes, library versions.

    Returns:
      ``config``, ``environment``, ``dataset``, ``cycles``, ``totals`` (steps, the seconds of
      each activity, wall seconds, final test error and accuracy, parameter
      counts of the first and last cycle, and the theoretical cost ratio of
      paper Sec. 4.2), ``growths`` and ``history``.
    """
    lengths = [c.num_steps for c in cycles]
    last = cycle_records[-1]
    return {
        "config": config,
        "environment": environment or {},
        "dataset": dataset,
        "cycles": cycle_records,
        "totals": {
            "steps": cycles[-1].end_step,
            **{name: sum(c[name] for c in cycle_records) for name in stopwatch.ACTIVITIES},
            "wall_seconds": wall_seconds,
            "final_test_error": last["test_error"],
            "final_test_accuracy": 1 - last["test_error"],
            "test_examples": dataset["test_examples"],
            "num_params_first_cycle": cycle_records[0]["num_params"],
            "num_params_last_cycle": last["num_params"],
            "theoretical_cost_ratio": (
                plan.theoretical_cost_ratio(lengths) if config["multilevel"] else 1.0
            ),
        },
        "growths": list(growths),
        "history": history,
    }


# What the readers of a summary use: every reader, the config's cycle
# boundaries and the evaluations (the curves); `summary_table` also the
# cycles and totals.
_EVALUATION_FIELDS = ("epoch", "train_error", "test_error")
_CYCLE_FIELDS = (
    "cycle",
    "stage_sizes",
    "step_size",
    "num_params",
    "epochs",
    "steps",
    "compile_seconds",
    "train_seconds",
    "eval_seconds",
    "final_train_loss",
    "test_error",
)
_TOTALS_FIELDS = (
    "steps",
    "train_seconds",
    "compile_seconds",
    "eval_seconds",
    "checkpoint_seconds",
    "wall_seconds",
    "final_test_error",
    "test_examples",
)


def _summary_problem(summary, whole: bool) -> str | None:
    """What a summary lacks that its readers use, or None."""
    if not isinstance(summary, dict):
        return f"it holds a {type(summary).__name__}, not an object"
    kinds = {"config": dict, "history": list, **({"cycles": list, "totals": dict} if whole else {})}
    for field, kind in kinds.items():
        if not isinstance(summary.get(field), kind):
            return f"'{field}' is missing or not a{'n' if kind is dict else ''} {kind.__name__}"
    if "cycle_boundaries" not in summary["config"]:
        return "'config' lacks 'cycle_boundaries'"
    records = [("history", r, _EVALUATION_FIELDS) for r in summary["history"]]
    if whole:
        records += [("cycles", r, _CYCLE_FIELDS) for r in summary["cycles"]]
        records.append(("totals", summary["totals"], _TOTALS_FIELDS))
    for name, record, fields in records:
        if not isinstance(record, dict):
            return f"a record of '{name}' is a {type(record).__name__}, not an object"
        missing = [field for field in fields if field not in record]
        if missing:
            return f"a record of '{name}' lacks {', '.join(missing)}"
    return None


def read_summary(path: str, whole: bool = True) -> dict:
    """A run's ``summary.json``, checked to hold what its readers use.

    The one reader of the file: a finished run's second invocation, the
    curves analysis and the benchmarks' reuse of finished runs.

    Args:
      path: the file.
      whole: also check the cycles and totals (what `summary_table` reads);
        False for a reader of the history alone.

    Returns:
      The summary (`run_summary`'s content).

    Raises:
      SummaryError: in one line naming the file, if it is missing,
        unreadable, not JSON (e.g. truncated or overwritten), or lacks a
        field its readers use.
    """
    try:
        with open(path, "rb") as handle:
            summary = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise SummaryError(
            f"no {os.path.basename(path)} in {os.path.dirname(path)!r}: a run "
            "writes it when it ends"
        ) from None
    except (OSError, ValueError) as error:  # JSONDecodeError, UnicodeDecodeError
        raise SummaryError(f"{path} cannot be read ({errors.one_line(error, limit=200)})") from None
    problem = _summary_problem(summary, whole)
    if problem:
        raise SummaryError(f"{path} is not a run's summary: {problem}")
    return summary


def summary_table(summary: dict) -> str:
    """A plain-text table of a run's cycles and totals, for stdout."""
    header = (
        f"{'cycle':>5} {'blocks':>10} {'h':>7} {'params':>10} {'epochs':>7} "
        f"{'steps':>7} {'compile s':>9} {'train s':>8} {'eval s':>7} "
        f"{'train loss':>10} {'test error':>10}"
    )
    lines = [header, "-" * len(header)]
    for c in summary["cycles"]:
        lines.append(
            f"{c['cycle']:>5} {models.format_stage_sizes(c['stage_sizes']):>10} "
            f"{c['step_size']:>7.4g} {c['num_params']:>10,} {c['epochs']:>7.4g} "
            f"{c['steps']:>7} {c['compile_seconds']:>9.1f} "
            f"{c['train_seconds']:>8.1f} {c['eval_seconds']:>7.1f} "
            f"{c['final_train_loss']:>10.4f} {100 * c['test_error']:>9.2f}%"
        )
    t = summary["totals"]
    lines.append("-" * len(header))
    lines.append(
        f"total: {t['steps']} steps, train {t['train_seconds']:.1f} s "
        f"(compile {t['compile_seconds']:.1f} s), eval {t['eval_seconds']:.1f} s, "
        f"checkpoints {t['checkpoint_seconds']:.1f} s, wall of the invocation that finished it "
        f"{t['wall_seconds']:.1f} s; "
        f"final test error {100 * t['final_test_error']:.2f}% "
        f"({t['test_examples']} examples)"
    )
    if summary.get("environment"):
        lines.append(f"run on {parallel.describe_environment(summary['environment'])}")
    lines += [growth_description(g) for g in summary.get("growths", [])]
    return "\n".join(lines)
