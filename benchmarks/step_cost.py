r"""Where a train step's time goes: the part that does not shrink with depth.

A step of the multi-level method costs a fixed part plus a part per block;
the saving of the shallow cycles comes only from the second. This benchmark
times the real train step (`steps.make_train_step`) stopped after each of its
phases (`steps.TRAIN_STEP_PHASES`: gather, augment, forward, backward,
update, check), at every depth of a multi-level run (`plan.cycle_networks`),
and fits ``time = fixed + per_block * blocks`` to each: the rise in ``fixed``
from one phase to the next is that phase's fixed cost. It is a differential
profile: each number is a measured difference of whole compiled steps, not a
guess. Beside them it times the whole step with the batch indices put on the
device inside the timed call (`parallel.shard_batch`), as the training loop
does: the host's share.

Writes ``step_cost.json`` and ``step_cost.md`` to ``--output_dir``::

    python -m benchmarks.step_cost                  # width 8, 28x28x1, batch 100
"""

from __future__ import annotations

import numpy as np
from absl import flags, logging

from benchmarks import common
from mlres_jax import cli, datasets, models, parallel, plan, steps

FLAGS = flags.FLAGS
HOST_INDICES = "check, indices from the host"


def measure_depth(stage_sizes, settings: dict) -> dict[str, float]:
    """Median step seconds of the step stopped after each phase, and with host indices."""
    model = models.ResNet(stage_sizes, width=settings["width"], num_classes=settings["num_classes"])
    timing = {
        key: settings[key]
        for key in ("image_shape", "num_classes", "crop_padding", "batch_size", "warmup")
    }
    result = {}
    for name, phase, from_host in [
        *((p, p, False) for p in steps.TRAIN_STEP_PHASES),
        (HOST_INDICES, "check", True),
    ]:
        timed = common.time_train_step(
            model, count=settings["steps"], last_phase=phase, indices_from_host=from_host, **timing
        )
        result[name] = timed["step_seconds"]["median"]
    return result


def fit(blocks, seconds) -> dict:
    """Least-squares ``seconds = fixed + per_block * blocks``."""
    per_block, fixed = np.polyfit(np.asarray(blocks, float), np.asarray(seconds, float), 1)
    return {"fixed": float(fixed), "per_block": float(per_block)}


def report_markdown(report: dict) -> str:
    """``step_cost.md``: per phase the step time at each depth and the fit."""
    depths = report["depths"]
    names = list(report["seconds"][0])
    first = report["seconds"][0]["check"]
    headers = [
        "step stopped after",
        *[f"{models.format_stage_sizes(d)} (ms)" for d in depths],
        "fixed (ms)",
        "per block (ms)",
        f"fixed, share of the {models.format_stage_sizes(depths[0])} step",
    ]
    body = []
    for name in names:
        f = report["fits"][name]
        body.append(
            [
                name,
                *[f"{1e3 * s[name]:.1f}" for s in report["seconds"]],
                f"{1e3 * f['fixed']:.1f}",
                f"{1e3 * f['per_block']:.2f}",
                f"{100 * f['fixed'] / first:.0f} %",
            ]
        )
    s = report["settings"]
    return "\n".join(
        [
            f"# Train-step cost by phase: width {s['width']}, images "
            f"{'x'.join(map(str, s['image_shape']))}, batch {s['batch_size']}",
            "",
            common.markdown_table(headers, body),
            "",
            f"- Median of {s['steps']} steps after {s['warmup']}; blocks = all blocks of the "
            "network; fixed and per block from a least-squares line through the depths. "
            "'check' is the whole step.",
            f"- Machine: {parallel.describe_environment(report['machine'])}.",
            "",
        ]
    )


def define_flags() -> None:
    """Defines the command-line flags (called only when run as a program)."""
    flags.DEFINE_integer("width", 8, "First-stage filters.", lower_bound=1)
    flags.DEFINE_enum(
        "dataset",
        "fashion_mnist",
        sorted(datasets.DATASETS),
        "Image shape, classes and crop padding of this data set.",
    )
    common.define_list(
        "stage_sizes",
        "2,2,2",
        "Blocks per stage of the first depth.",
        flags.IntegerParser(lower_bound=1),
        unique=False,
    )
    flags.DEFINE_integer(
        "levels", 3, "Depths: the first and LEVELS - 1 interpolations.", lower_bound=2
    )
    flags.DEFINE_integer("batch_size", 100, "Training mini-batch (images).", lower_bound=1)
    flags.DEFINE_integer("steps", 20, "Timed steps per phase and depth.", lower_bound=1)
    flags.DEFINE_integer("warmup", 3, "Untimed steps first.", lower_bound=0)
    flags.DEFINE_string("output_dir", "runs/bench/step_cost", "Folder for the outputs.")


def main(argv):
    del argv  # run_command refuses arguments
    info = datasets.DATASETS[FLAGS.dataset]
    settings = {
        "width": FLAGS.width,
        "image_shape": tuple(info.image_shape),
        "num_classes": info.num_classes,
        "crop_padding": info.padding,
        "batch_size": FLAGS.batch_size,
        "steps": FLAGS.steps,
        "warmup": FLAGS.warmup,
    }
    depths = [sizes for sizes, _ in plan.cycle_networks(FLAGS.stage_sizes, 1.0, FLAGS.levels)]
    machine = parallel.environment()
    seconds = []
    for depth in depths:
        logging.info("Measuring %s", models.format_stage_sizes(depth))
        seconds.append(measure_depth(depth, settings))
    fits = {name: fit([sum(d) for d in depths], [s[name] for s in seconds]) for name in seconds[0]}
    report = {
        "benchmark": "step_cost",
        "machine": machine,
        "settings": settings,
        "depths": depths,
        "seconds": seconds,
        "fits": fits,
    }
    common.write_outputs(FLAGS.output_dir, "step_cost", report, report_markdown(report))
    print(report_markdown(report), flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
