"""Offline interpolation of a saved network: depth d in, depth 2d out.

  python -m mlres_jax.grow --workdir=runs/resnet14 --output=runs/resnet14_grown

Reads the latest (or ``--step``) checkpoint of ``--workdir``, interpolates its
parameters and batch-norm statistics with `multilevel.interpolate_model` (stage sizes
doubled, h halved; paper Sec. 4.1, App. B) and writes a model checkpoint to
``--output`` that `checkpoint.load_model` and the analyses read.
"""

import dataclasses

import jax
from absl import flags, logging

from mlres_jax import checkpoint, cli, errors, models, multilevel
from mlres_jax import workdir as workdirs

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines ``--workdir``, ``--output``, ``--step`` and ``--rule``."""
    flags.DEFINE_string("workdir", None, "Run folder holding checkpoints/ to read.")
    flags.DEFINE_string("output", None, "Folder to write the interpolated checkpoint to.")
    flags.DEFINE_integer("step", None, "Checkpoint step to read; the latest if unset.")
    flags.DEFINE_string("rule", "paper", f"Interpolation rule: {sorted(multilevel.GROWTH_RULES)}.")
    flags.mark_flags_as_required(["workdir", "output"])


def interpolate_checkpoint(
    workdir: str, output: str, step: int | None = None, rule: str = "paper"
) -> checkpoint.CheckpointMetadata:
    """Interpolates a checkpoint of ``workdir`` into a new one in ``output``.

    Returns:
      The written checkpoint's metadata (kind ``checkpoint.MODEL``, with
      ``grown_from`` naming the source).

    Raises:
      checkpoint.CheckpointError: if the checkpoint cannot be read, or
        ``output`` already holds checkpoints.
      workdir.WorkdirBusyError: if another process writes to ``output``.
      workdir.WorkdirStorageError: if ``output`` cannot be written
        (checked before the checkpoint is read).
      errors.UserError: if the network cannot be interpolated under ``rule``.
    """
    with workdirs.hold(output):  # checks that it can be written, before any reading
        existing = checkpoint.list_steps(output)
        if existing:
            raise checkpoint.CheckpointError(
                f"{output} already holds checkpoints {existing}; choose an empty folder"
            )
        model, variables, metadata = checkpoint.load_model(workdir, step)
        try:
            deeper_model, deeper_variables = multilevel.interpolate_model(
                model,
                variables,
                rule,
                # Blocks the rule makes from nothing (a one-block stage).
                initial=lambda deeper: models.init_variables(
                    deeper, jax.random.key(metadata.config.get("seed", 0)), metadata.image_shape
                ),
            )
        except ValueError as error:
            raise errors.UserError(
                f"cannot grow the checkpoint of step {metadata.step} in {workdir}: {error}"
            ) from None
        grown = dataclasses.replace(
            metadata,
            stage_sizes=tuple(deeper_model.stage_sizes),
            step_size=deeper_model.step_size,
            history=[],
            cycle_records=[],
            growths=[],
            stopwatch={},
            kind=checkpoint.MODEL,
            scan_blocks=False,
            grown_from={"workdir": workdir, "step": metadata.step, "rule": rule},
        )
        checkpoint.save_model(output, deeper_variables, grown)
    print(
        f"Interpolated {models.format_stage_sizes(model.stage_sizes)} blocks (h = "
        f"{model.step_size:g}) into {models.format_stage_sizes(deeper_model.stage_sizes)} "
        f"(h = {deeper_model.step_size:g}): {output}",
        flush=True,
    )
    return grown


def main(argv):
    del argv  # run_command refuses arguments
    interpolate_checkpoint(FLAGS.workdir, FLAGS.output, FLAGS.step, FLAGS.rule)


if __name__ == "__main__":
    cli.run_command(main, define_flags, verbosity=logging.WARNING)
