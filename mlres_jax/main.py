"""Command line: train a multi-level (or fixed-depth) ResNet from a config file.

  python -m mlres_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
  python -m mlres_jax.main --config=configs/wrn122i.py --workdir=runs/wrn122i \
      --config.dataset=cifar100

A run uses every device of the machine (``--config.num_devices`` to choose).
On several hosts, start the same command on each with
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`` (or
let Slurm, Open MPI or ``$JAX_COORDINATOR_ADDRESS`` say so); see
docs/devices-and-hosts.md.

Any config field can be overridden with ``--config.FIELD=VALUE``. This module
parses flags and at the end draws the training curves and prints the
per-cycle table; the work is in `mlres_jax.train`, and `mlres_jax.cli` turns
a user's mistake into one line.
"""

import os

from absl import flags, logging
from ml_collections import config_flags

from mlres_jax import cli, figures, parallel, reporting, train

FLAGS = flags.FLAGS
CURVES_FILE = "training_curves.png"


def define_flags() -> None:
    """Defines ``--workdir`` and ``--config`` (with ``--config.FIELD`` overrides)."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Folder for checkpoints, TensorBoard events, summary.json and the training curves.",
    )
    config_flags.DEFINE_config_file(
        "config", None, "Training configuration file (configs/*.py).", lock_config=True
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Several processes: host:port of process 0's coordinator. "
        "Unset: from $JAX_COORDINATOR_ADDRESS or the cluster manager "
        "(Slurm, Open MPI), or a single process.",
    )
    flags.DEFINE_integer("num_processes", None, "Several processes: how many.")
    flags.DEFINE_integer("process_id", None, "Several processes: this one's index, 0..N-1.")
    flags.DEFINE_integer(
        "heartbeat_timeout_seconds",
        parallel.DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
        "Several processes: when one has sent no heartbeat for this long "
        "(it died, or its host is lost), the others stop. A process waits "
        "for a peer that shows no sign of life for a third of it.",
        lower_bound=6,
    )
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # run_command refuses arguments
    parallel.initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        FLAGS.heartbeat_timeout_seconds,
    )
    if not parallel.is_main_process():
        logging.set_verbosity(logging.WARNING)  # process 0 reports for all
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if parallel.is_main_process():
        figures.plot_training_curves(
            summary["history"],
            summary["config"]["cycle_boundaries"],
            os.path.join(FLAGS.workdir, CURVES_FILE),
        )
        print(reporting.summary_table(summary), flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
