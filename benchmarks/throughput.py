r"""Cost of every depth of a multi-level run: compile time, images/s, memory.

For each family (ResNet, 16 filters; Wide ResNet, 32 filters) and each depth
of a multi-level run (2-2-2, 4-4-4, 8-8-8 with h = 1, 0.5, 0.25 by default) it
compiles the project's real train and eval steps with the builders training
uses (``steps.make_train_step``, ``steps.make_eval_step``,
``steps.compile_ahead``), runs them on synthetic data of the data set's image
shape and measures:

* compile time of the train step and of the eval step (s; tracing and
  lowering included, as training counts it);
* steady-state training and evaluation throughput (images/s): every timed
  step is dispatched and waited for alone; the median over ``--steps`` steps
  after ``--warmup`` untimed ones, with the quartiles and min/max;
* memory: XLA's estimate for the compiled train step (arguments + outputs -
  donated aliases + temporaries, bytes; per configuration) and the peak the
  runtime saw — ``memory_stats()['peak_bytes_in_use']`` of the device where
  JAX provides it (GPU), else the process's max RSS (CPU; the whole Python
  process, not only JAX). Both peaks are high-water marks of the process so
  far, so configurations run from the smallest to the largest;
* the share of a cycle's time spent compiling: (train + eval compile) /
  (train + eval compile + cycle steps x median step time), for cycles of
  ``--cycle_epochs`` epochs of the data set at ``--batch_size``
  (evaluation time not counted);
* per family, the multi-level run's saving predicted from these step times
  against the theoretical one: does the step time double with the depth?

Writes ``throughput.json`` and ``throughput.md`` into ``--output_dir`` and
prints the table. Usage (from the repository root)::

    python -m benchmarks.throughput                        # ResNet and WResNet, 3 depths
    python -m benchmarks.throughput --families=8 --steps=10   # the study's CPU model
    python -m benchmarks.throughput --device_counts=1,2    # 1 and 2 devices (host devices on a CPU)
    python -m benchmarks.throughput --dataset=cifar10 --cycle_epochs=60,50,50 \
        --steps=50 --warmup=5                              # paper sizes, on a GPU

``--families`` takes ``resnet`` (width 16), ``wresnet`` (width 32) or a
width as an integer. Timings on a shared machine are noisy: look at the
spread.
"""

from __future__ import annotations

import itertools
import os
import resource
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from benchmarks import common
from mlres_jax import cli, configuration, cpu_backend, datasets, models, parallel, plan, steps

FAMILIES = {"resnet": 16, "wresnet": 32}
FAMILY_NAMES = {16: "ResNet", 32: "WResNet"}
# Block layouts (models.ResNet.scan_blocks False / True).
LAYOUTS = ("unrolled", "scanned")
# Epochs per cycle when --cycle_epochs is not given: benchmarks/presets/cpu.py's
# for three levels, else 2 each.
DEFAULT_CYCLE_EPOCHS = (2.25, 1.875, 1.875)

FLAGS = flags.FLAGS


class FamilyParser(flags.ArgumentParser):
    """absl parser of a family: 'resnet' (width 16), 'wresnet' (32) or a width >= 1."""

    syntactic_help = "'resnet', 'wresnet' or a first-stage width (an integer >= 1)"

    def parse(self, argument) -> int:
        text = str(argument).strip().lower()
        if text in FAMILIES:
            return FAMILIES[text]
        if text.isdigit() and int(text) >= 1:
            return int(text)
        raise ValueError(f"{argument!r} is not {self.syntactic_help}")

    def flag_type(self) -> str:
        return "family"


def family_name(width: int) -> str:
    """``"ResNet"`` (width 16), ``"WResNet"`` (32) or ``"ResNet w8"``."""
    return FAMILY_NAMES.get(width, f"ResNet w{width}")


def plan_levels(stage_sizes, epochs, steps_per_epoch: int) -> list[plan.Cycle]:
    """The cycles of a multi-level run, one per level (`plan.plan_cycles`).

    Args:
      stage_sizes: blocks per stage of the first level, h = 1.
      epochs: epochs of each cycle.
      steps_per_epoch: training steps per epoch.

    Raises:
      common.BenchmarkError: for a cycle without steps.
    """
    try:
        return plan.plan_cycles(
            stage_sizes=stage_sizes,
            step_size=1.0,
            num_epochs=sum(epochs),
            cycle_boundaries=list(itertools.accumulate(epochs))[:-1],
            steps_per_epoch=steps_per_epoch,
            multilevel=True,
        )
    except ValueError as error:
        raise common.BenchmarkError(
            f"--cycle_epochs={','.join(map(str, epochs))} is not allowed: {error}"
        ) from None


def settings_from_flags() -> dict:
    """The settings of the benchmark from its (checked) flags."""
    info = datasets.DATASETS[FLAGS.dataset]
    epochs = list(
        FLAGS.cycle_epochs or (DEFAULT_CYCLE_EPOCHS if FLAGS.levels == 3 else [2.0] * FLAGS.levels)
    )
    epochs *= FLAGS.levels if len(epochs) == 1 else 1
    cycles = plan_levels(FLAGS.stage_sizes, epochs, max(1, info.num_train // FLAGS.batch_size))
    return {
        "dataset": FLAGS.dataset,
        "image_shape": FLAGS.image_shape or list(info.image_shape),
        "num_classes": info.num_classes,
        "crop_padding": info.padding,
        "families": [(family_name(width), width) for width in FLAGS.families],
        "levels": [(c.stage_sizes, c.step_size) for c in cycles],
        "batch_size": FLAGS.batch_size,
        "eval_batch_size": FLAGS.eval_batch_size,
        "warmup": FLAGS.warmup,
        "steps": FLAGS.steps,
        "eval_steps": FLAGS.eval_steps,
        "cycle_epochs": epochs,
        "cycle_steps": [c.num_steps for c in cycles],
        "seed": FLAGS.seed,
        "device_counts": FLAGS.device_counts,
        "layouts": FLAGS.layouts,
        "compute_dtype": FLAGS.compute_dtype,
    }


# ---------------------------------------------------------------------------
# Measuring one configuration.


def xla_memory_bytes(executable) -> int | None:
    """XLA's memory estimate of a compiled step: arguments + outputs - aliases + temporaries."""
    try:
        stats = executable.memory_analysis()
    except Exception:  # pylint: disable=broad-except  # not every backend has it
        return None
    if stats is None:
        return None
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes
    )


def xla_flops(executable) -> float | None:
    """XLA's floating-point operation count of one call, if the backend reports it."""
    try:
        analysis = executable.cost_analysis()
    except Exception:  # pylint: disable=broad-except
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def peak_memory() -> dict:
    """The process's memory high-water mark so far.

    Returns:
      ``{"bytes", "source"}``: the first device's ``peak_bytes_in_use`` where
      JAX reports it (``source="device peak_bytes_in_use"``), otherwise the
      process's max resident set size (``source="process max RSS"``; Linux
      reports KiB, converted to bytes).
    """
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # pylint: disable=broad-except
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"bytes": int(stats["peak_bytes_in_use"]), "source": "device peak_bytes_in_use"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return {"bytes": int(rss * scale), "source": "process max RSS"}


def images_per_second(batch_size: int, seconds: dict) -> dict:
    """Images/s from step-time statistics (`common.percentiles`).

    Returns:
      ``median`` (at the median step time) and the range implied by the
      quartiles (``p25``, ``p75``) and the extremes (``min``, ``max``),
      in images per second.
    """
    return {
        "median": batch_size / seconds["median"],
        "p25": batch_size / seconds["p75"],
        "p75": batch_size / seconds["p25"],
        "min": batch_size / seconds["max"],
        "max": batch_size / seconds["min"],
    }


def compile_share(compile_seconds: float, steps: int, step_seconds: float) -> float:
    """Fraction of a cycle's time spent compiling.

    Args:
      compile_seconds: train + eval step compilation, s.
      steps: training steps in the cycle.
      step_seconds: time of one training step, s.

    Returns:
      ``compile / (compile + steps * step_seconds)``.
    """
    return compile_seconds / (compile_seconds + steps * step_seconds)


def time_eval_step(model: models.ResNet, variables, settings: dict, mesh):
    """Compiles `steps.eval_step` for ``model`` on ``mesh`` and times it on random images.

    Returns:
      ``(compile_seconds, step_seconds)``: step seconds as `common.percentiles`
      of ``settings["eval_steps"]`` batches after one untimed batch.
    """
    rng = np.random.default_rng(settings["seed"] + 2)
    batch = settings["eval_batch_size"]
    images, labels, mask = parallel.shard_batch(
        (
            *common.synthetic_images(rng, batch, settings["image_shape"], settings["num_classes"]),
            np.ones((batch,), bool),
        ),
        mesh,
    )
    compiled, compile_seconds = steps.compile_ahead(
        steps.make_eval_step(model, mesh), variables, images, labels, mask
    )

    def call(_):
        return compiled(variables, images, labels, mask)

    common.time_calls(call, 1)
    return compile_seconds, common.percentiles(common.time_calls(call, settings["eval_steps"]))


def measure(
    width: int,
    stage_sizes: tuple[int, ...],
    step_size: float,
    settings: dict,
    devices: int = 1,
    layout: str = "unrolled",
) -> dict:
    """Compiles and times the train and eval step of one network on ``devices`` devices.

    Args:
      width: first-stage filters.
      stage_sizes: blocks per stage.
      step_size: h.
      settings: from `settings_from_flags`.
      devices: devices of the data-parallel mesh (`parallel.make_mesh`); the
        batches are split over them.
      layout: ``"unrolled"`` (a block after another) or ``"scanned"`` (the
        blocks after the first of each stage as one scan, `models.ResNet.scan_blocks`).

    Returns:
      Parameter count; compile seconds of both steps; step seconds as
      `common.percentiles`; images/s; XLA memory estimate (bytes) and flops
      of the train step; the peak memory so far (`peak_memory`).
    """
    model = models.ResNet(
        stage_sizes=stage_sizes,
        width=width,
        num_classes=settings["num_classes"],
        step_size=step_size,
        scan_blocks=layout == "scanned",
        dtype=jnp.dtype(settings["compute_dtype"]),
        scanned_conv=cpu_backend.scanned_conv(),
    )
    mesh = parallel.make_mesh(devices)
    timed = common.time_train_step(
        model,
        image_shape=settings["image_shape"],
        num_classes=settings["num_classes"],
        crop_padding=settings["crop_padding"],
        batch_size=settings["batch_size"],
        warmup=settings["warmup"],
        count=settings["steps"],
        seed=settings["seed"],
        mesh=mesh,
    )
    train_seconds, state = timed["step_seconds"], timed["state"]
    eval_compile, eval_seconds = time_eval_step(model, state.variables, settings, mesh)
    return {
        "num_params": models.count_parameters(state.params),
        "compile_train_seconds": timed["compile_seconds"],
        "compile_eval_seconds": eval_compile,
        "train_step_seconds": train_seconds,
        "train_images_per_second": images_per_second(settings["batch_size"], train_seconds),
        "eval_step_seconds": eval_seconds,
        "eval_images_per_second": images_per_second(settings["eval_batch_size"], eval_seconds),
        "train_step_flops": xla_flops(timed["compiled"]),
        "train_step_xla_memory_bytes": xla_memory_bytes(timed["compiled"]),
        "peak_memory": peak_memory(),
    }


# ---------------------------------------------------------------------------
# The whole benchmark.


def model_name(family: str, stage_sizes: Sequence[int]) -> str:
    """The row's name: ``"ResNet-50"``, ``"WResNet-14"``, ``"ResNet-14 w8"`` (width 8)."""
    base, _, width = family.partition(" ")
    name = f"{base}-{models.depth(stage_sizes)}"
    return f"{name} {width}" if width else name


def run_order(families, levels) -> list[tuple[str, int, int]]:
    """(family, width, level index), smallest activations (width x blocks) first.

    Peak-memory readings are high-water marks of the process, so each
    configuration should be at least as large as those before it.
    """
    items = [(name, width, i) for name, width in families for i in range(len(levels))]
    return sorted(items, key=lambda item: (item[1] * sum(levels[item[2]][0]), item[1]))


def family_summary(rows: list[dict], cycle_steps_list: Sequence[int]) -> dict:
    """What the step times of one family's depths say about the multi-level saving.

    Args:
      rows: the family's rows, first level first (with ``train_step_seconds``,
        ``compile_train_seconds``, ``compile_eval_seconds``).
      cycle_steps_list: training steps of each cycle.

    Returns:
      ``step_time_ratio_to_deepest`` (measured) and ``theoretical_ratio``
      (1/2 per level below the deepest); ``predicted_time_saved`` of the
      multi-level run against the deepest fixed model from the median step
      times, without and with compilation (the multi-level run compiles every
      depth, the fixed model once); and ``theoretical_time_saved``.
    """
    step = [r["train_step_seconds"]["median"] for r in rows]
    compiles = [r["compile_train_seconds"] + r["compile_eval_seconds"] for r in rows]
    total_steps = sum(cycle_steps_list)
    multi_steps = sum(n * t for n, t in zip(cycle_steps_list, step))
    fixed_steps = total_steps * step[-1]
    last = len(rows) - 1
    return {
        "step_time_ratio_to_deepest": [t / step[-1] for t in step],
        "theoretical_ratio": [1 / 2 ** (last - i) for i in range(len(rows))],
        "predicted_time_saved_steps_only": common.time_saved(multi_steps, fixed_steps),
        "predicted_time_saved_with_compile": common.time_saved(
            multi_steps + sum(compiles), fixed_steps + compiles[-1]
        ),
        "theoretical_time_saved": 1 - plan.theoretical_cost_ratio(cycle_steps_list),
    }


def results_table(rows: list[dict]) -> str:
    """The markdown table of all measured configurations."""
    headers = [
        "model",
        "blocks",
        "h",
        "devices",
        "layout",
        "params",
        "compile train / eval (s)",
        "train step (s), median [IQR]",
        "train images/s [min-max]",
        "eval images/s",
        "XLA mem (MB)",
        "peak mem (MB)",
        "compile share",
    ]
    body = []
    for r in rows:
        t, ips = r["train_step_seconds"], r["train_images_per_second"]
        memory = r["train_step_xla_memory_bytes"]
        body.append(
            [
                model_name(r["family"], r["stage_sizes"]),
                models.format_stage_sizes(r["stage_sizes"]),
                f"{r['step_size']:g}",
                str(r["devices"]),
                r["layout"],
                f"{r['num_params']:,}",
                f"{r['compile_train_seconds']:.1f} / {r['compile_eval_seconds']:.1f}",
                f"{t['median']:.3f} [{t['p25']:.3f}-{t['p75']:.3f}]",
                f"{ips['median']:.0f} [{ips['min']:.0f}-{ips['max']:.0f}]",
                f"{r['eval_images_per_second']['median']:.0f}",
                "—" if memory is None else f"{memory / 1e6:.0f}",
                f"{r['peak_memory']['bytes'] / 1e6:.0f}",
                f"{100 * r['compile_share']:.1f} % of {r['cycle_steps']} steps",
            ]
        )
    return common.markdown_table(headers, body)


def _cell(row: dict | None, key: str, digits: str) -> str:
    """A table cell: the row's value (of a step time, the median); "—" where not measured."""
    if row is None:
        return "—"
    value = row[key]["median"] if isinstance(row[key], dict) else row[key]
    return f"{value:{digits}}"


def layout_table(rows: list[dict]) -> str:
    """Compile and step time of each network in both layouts, side by side (first device count)."""
    first = min(r["devices"] for r in rows)
    rows = [r for r in rows if r["devices"] == first]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    networks = list(dict.fromkeys((r["family"], tuple(r["stage_sizes"])) for r in rows))
    by = {(r["family"], tuple(r["stage_sizes"]), r["layout"]): r for r in rows}
    headers = [
        "model",
        "blocks",
        *[f"compile train, {name} (s)" for name in layouts],
        *[f"train step, {name} (s)" for name in layouts],
    ]
    body = [
        [
            model_name(family, sizes),
            models.format_stage_sizes(sizes),
            *[
                _cell(by.get((family, sizes, name)), "compile_train_seconds", ".1f")
                for name in layouts
            ],
            *[
                _cell(by.get((family, sizes, name)), "train_step_seconds", ".3f")
                for name in layouts
            ],
        ]
        for family, sizes in networks
    ]
    return common.markdown_table(headers, body)


def scaling_table(rows: list[dict]) -> str:
    """Train images/s of each network per device count, side by side (first layout).

    Returns:
      A markdown table with one row per network and a column per device
      count, then the speed-up of the most devices over one (or the fewest).
    """
    rows = [r for r in rows if r["layout"] == rows[0]["layout"]]
    counts = sorted({r["devices"] for r in rows})
    networks = list(
        dict.fromkeys((r["family"], tuple(r["stage_sizes"]), r["step_size"]) for r in rows)
    )
    by = {(r["family"], tuple(r["stage_sizes"]), r["step_size"], r["devices"]): r for r in rows}
    headers = [
        "model",
        "blocks",
        *[f"train images/s, {n} device{'s' * (n > 1)}" for n in counts],
        f"{counts[-1]} vs {counts[0]} device{'s' * (counts[0] > 1)}",
    ]
    body = []
    for family, sizes, h in networks:
        cells = [by.get((family, sizes, h, n)) for n in counts]
        first, last = (c and c["train_images_per_second"]["median"] for c in (cells[0], cells[-1]))
        speed_up = f"x{last / first:.2f}" if first and last else "—"
        body.append(
            [
                model_name(family, sizes),
                models.format_stage_sizes(sizes),
                *[_cell(c, "train_images_per_second", ".0f") for c in cells],
                speed_up,
            ]
        )
    return common.markdown_table(headers, body)


def summary_lines(families_summary: dict) -> list[str]:
    """One line per family: measured step-time ratios and predicted vs theoretical saving."""
    lines = []
    for name, s in families_summary.items():
        ratios = ", ".join(f"{v:.2f}" for v in s["step_time_ratio_to_deepest"])
        theory = ", ".join(f"{v:.2f}" for v in s["theoretical_ratio"])
        lines.append(
            f"- {name}: step time relative to the deepest {ratios} (theory "
            f"{theory}); multi-level saving predicted from these step times "
            f"{100 * s['predicted_time_saved_steps_only']:.1f} % (steps only), "
            f"{100 * s['predicted_time_saved_with_compile']:.1f} % (with "
            f"compilation); theoretical {100 * s['theoretical_time_saved']:.1f} %."
        )
    return lines


def _section(shown: bool, title: str, table: Callable[[], str]) -> list[str]:
    """The lines of an optional table with its title: none unless ``shown``."""
    return [title, "", table(), ""] if shown else []


def report_markdown(report: dict) -> str:
    """``throughput.md``: the table and what its columns mean."""
    s = report["settings"]
    rows = report["rows"]
    peak_source = rows[0]["peak_memory"]["source"] if rows else "—"
    lines = [
        f"# Per-depth cost: {s['dataset']} images {'x'.join(map(str, s['image_shape']))}, "
        f"batch {s['batch_size']} (eval {s['eval_batch_size']})",
        "",
        results_table(rows),
        "",
        *_section(
            len(s["device_counts"]) > 1,
            f"Scaling with the number of devices ({report['machine']['device_kind']}; "
            "the global batch is split over them):",
            lambda: scaling_table(rows),
        ),
        *_section(
            len(s["layouts"]) > 1,
            "Layouts: the blocks one after another (unrolled) or the blocks after the "
            "first of each stage as one scan (scanned):",
            lambda: layout_table(rows),
        ),
        *summary_lines(report["families"]),
        f"- Step times: median of {s['steps']} timed train steps after "
        f"{s['warmup']} untimed ({s['eval_steps']} eval batches after 1); each "
        "step waited for alone. "
        f"Compile share: compile / (compile + cycle steps x median step), cycles of "
        f"{', '.join(f'{e:g}' for e in s['cycle_epochs'])} epochs; evaluation not counted.",
        f"- Peak mem: {peak_source}, high-water mark of the process so far "
        "(configurations ran smallest first). XLA mem: the compiled train "
        "step's arguments + outputs - donated + temporaries.",
        f"- Machine: {parallel.describe_environment(report['machine'])}.",
        *(
            []
            if report.get("complete", True)
            else ["- **Incomplete**: not every configuration has been measured (yet)."]
        ),
    ]
    return "\n".join(lines) + "\n"


def build_report(settings: dict, measured: dict, machine: dict) -> dict:
    """The report of the configurations measured so far.

    Returns:
      ``machine``, ``settings``, ``complete`` (every configuration measured),
      ``rows`` (one per configuration measured, family by family, first level
      first: `measure` output plus family, width, stage sizes, h, device
      count, layout, cycle steps and compile share) and ``families``
      (`family_summary` per family whose levels are all measured, on the
      first device count and layout).
    """
    levels = settings["levels"]
    variants = [
        (devices, layout) for layout in settings["layouts"] for devices in settings["device_counts"]
    ]
    rows, families = [], {}
    for name, width in settings["families"]:
        for devices, layout in variants:
            family_rows = []
            for level, (sizes, h) in enumerate(levels):
                if (width, level, devices, layout) not in measured:
                    continue
                row = {
                    "family": name,
                    "width": width,
                    "stage_sizes": list(sizes),
                    "step_size": h,
                    "devices": devices,
                    "layout": layout,
                    "cycle_steps": settings["cycle_steps"][level],
                    **measured[(width, level, devices, layout)],
                }
                row["compile_share"] = compile_share(
                    row["compile_train_seconds"] + row["compile_eval_seconds"],
                    row["cycle_steps"],
                    row["train_step_seconds"]["median"],
                )
                family_rows.append(row)
            rows += family_rows
            if (devices, layout) == variants[0] and len(family_rows) == len(levels):
                families[name] = family_summary(family_rows, settings["cycle_steps"])
    plain_settings = {
        **settings,
        "families": [{"name": n, "width": w} for n, w in settings["families"]],
        "levels": [{"stage_sizes": list(s), "step_size": h} for s, h in levels],
    }
    return {
        "benchmark": "throughput",
        "machine": machine,
        "settings": plain_settings,
        "complete": len(rows) == len(variants) * len(levels) * len(settings["families"]),
        "rows": rows,
        "families": families,
    }


def run_benchmark(settings: dict, on_measured=None) -> dict:
    """Measures every (family, level, device count, layout) of ``settings``.

    Args:
      settings: from `settings_from_flags`.
      on_measured: called with the report so far (`build_report`) after each
        configuration: a run cut short still tells what it measured.

    Returns:
      The report (`build_report`).
    """
    machine = parallel.environment()
    levels = settings["levels"]
    measured = {}
    for layout in settings["layouts"]:
        for devices in settings["device_counts"]:
            for name, width, level in run_order(settings["families"], levels):
                sizes, h = levels[level]
                logging.info(
                    "Measuring %s, width %d, %s blocks, h = %g, %d device(s), %s",
                    model_name(name, sizes),
                    width,
                    models.format_stage_sizes(sizes),
                    h,
                    devices,
                    layout,
                )
                result = measure(width, sizes, h, settings, devices, layout)
                measured[(width, level, devices, layout)] = result
                logging.info(
                    "  compile train %.1f s, eval %.1f s; train step %.3f s (median)",
                    result["compile_train_seconds"],
                    result["compile_eval_seconds"],
                    result["train_step_seconds"]["median"],
                )
                if on_measured:
                    on_measured(build_report(settings, measured, machine))
    return build_report(settings, measured, machine)


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the command-line flags and their checks (when run as a program, or by a test)."""
    integer = flags.IntegerParser
    flags.DEFINE_enum(
        "dataset",
        "fashion_mnist",
        sorted(datasets.DATASETS),
        "Image shape, classes, crop padding and epoch length of this data set.",
        flag_values=flag_values,
    )
    common.define_list(
        "image_shape",
        None,
        "H,W,C of the synthetic images; default: the data set's.",
        integer(lower_bound=1),
        unique=False,
        flag_values=flag_values,
    )
    common.define_list(
        "families",
        "resnet,wresnet",
        "'resnet' (width 16), 'wresnet' (width 32) or first-stage widths as integers.",
        FamilyParser(),
        flag_values=flag_values,
    )
    common.define_list(
        "stage_sizes",
        "2,2,2",
        "Blocks per stage of the first level.",
        integer(lower_bound=1),
        unique=False,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "levels",
        3,
        "Depths measured: the first level and LEVELS - 1 "
        "interpolations (blocks x2, h / 2 each; plan.cycle_networks).",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "batch_size", 100, "Training mini-batch (images).", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_integer(
        "eval_batch_size", 500, "Evaluation batch (images).", lower_bound=1, flag_values=flag_values
    )
    flags.DEFINE_integer(
        "warmup", 2, "Untimed steps after compiling.", lower_bound=0, flag_values=flag_values
    )
    flags.DEFINE_integer(
        "steps",
        5,
        "Timed training steps per configuration.",
        lower_bound=1,
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "eval_steps",
        3,
        "Timed evaluation steps per configuration.",
        lower_bound=1,
        flag_values=flag_values,
    )
    common.define_list(
        "cycle_epochs",
        None,
        "Epochs per cycle, one per level (or one for "
        "all), for the compile share and the predicted saving. Default: "
        "benchmarks/presets/cpu.py's 2.25,1.875,1.875 for 3 levels, else 2 "
        "per level; the paper's is 60,50,50.",
        flags.FloatParser(lower_bound=0),
        unique=False,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "output_dir",
        "runs/bench/throughput",
        "Folder for throughput.json and throughput.md.",
        flag_values=flag_values,
    )
    flags.DEFINE_integer(
        "seed",
        0,
        "Seed of the synthetic data and initialisation.",
        lower_bound=0,
        flag_values=flag_values,
    )
    common.define_list(
        "layouts",
        "unrolled",
        "Block layouts to measure: 'unrolled' and/or 'scanned' (models.ResNet.scan_blocks).",
        flags.EnumParser(LAYOUTS),
        flag_values=flag_values,
    )
    flags.DEFINE_enum(
        "compute_dtype",
        "float32",
        list(configuration.COMPUTE_DTYPES),
        "Computation dtype (parameters stay float32).",
        flag_values=flag_values,
    )
    common.define_list(
        "device_counts",
        "1",
        "Numbers of devices to measure each network on "
        "(data parallel, the batch split over them), e.g. '1,2'. On a CPU the "
        "benchmark makes that many host devices (jax_num_cpu_devices) unless "
        "XLA_FLAGS sets --xla_force_host_platform_device_count.",
        integer(lower_bound=1),
        flag_values=flag_values,
    )
    checks = {
        ("levels", "stage_sizes"): (
            lambda f: f["levels"] == 1 or min(f["stage_sizes"]) >= 2,
            "with --levels > 1 every stage needs >= 2 blocks in --stage_sizes (the "
            "paper's interpolation rule copies the second block, App. B)",
        ),
        ("levels", "cycle_epochs"): (
            lambda f: not f["cycle_epochs"] or len(f["cycle_epochs"]) in (1, f["levels"]),
            "--cycle_epochs needs one number of epochs per level (--levels) or one for all",
        ),
        ("image_shape",): (
            lambda f: (
                not f["image_shape"]
                or (len(f["image_shape"]) == 3 and min(f["image_shape"][:2]) >= 4)
            ),
            "--image_shape needs three integers H,W,C with H, W >= 4, e.g. '32,32,3'",
        ),
        ("batch_size", "eval_batch_size", "device_counts"): (
            lambda f: all(
                f[b] % n == 0 for b in ("batch_size", "eval_batch_size") for n in f["device_counts"]
            ),
            "--batch_size and --eval_batch_size must split evenly over every count of "
            "--device_counts",
        ),
    }
    for names, (check, message) in checks.items():
        flags.register_multi_flags_validator(list(names), check, message, flag_values)


def main(argv):
    del argv  # run_command refuses arguments
    settings = settings_from_flags()
    needed = max(settings["device_counts"])
    if "force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # CPU devices are fixed when JAX starts its backend, which no device query has done yet.
        jax.config.update("jax_num_cpu_devices", needed)
    if jax.device_count() < needed:
        raise common.BenchmarkError(
            f"--device_counts={','.join(map(str, FLAGS.device_counts))} is not allowed: "
            f"this machine has {jax.device_count()} {jax.default_backend()} devices"
        )
    report = run_benchmark(
        settings,
        on_measured=lambda report: common.write_outputs(
            FLAGS.output_dir, "throughput", report, report_markdown(report)
        ),
    )
    print(report_markdown(report), flush=True)
    print(f"Wrote throughput.json and throughput.md to {FLAGS.output_dir}", flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
