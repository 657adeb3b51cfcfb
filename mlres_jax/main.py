"""Command line: train a multi-level (or fixed-depth) ResNet from a config file.

  python -m mlres_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
  python -m mlres_jax.main --config=configs/wrn122i.py --workdir=runs/wrn122i \
      --config.dataset=cifar100

Any config field can be overridden with ``--config.FIELD=VALUE``. This module
parses flags and reports a user's mistakes as one line; the work is in
`mlres_jax.train`.
"""

import logging as python_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mlres_jax import checkpoint, configuration, input_pipeline, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for metrics and summary.json.")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/*.py).",
    lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def quiet_library_info(record: python_logging.LogRecord) -> bool:
    """Drops INFO records of orbax (dozens per checkpoint); keeps warnings."""
    return (record.levelno >= python_logging.WARNING
            or f"{os.sep}orbax{os.sep}" not in record.pathname)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(quiet_library_info)
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (configuration.ConfigError, input_pipeline.DataSetUnavailableError,
            checkpoint.CheckpointError, train.NonFiniteLossError,
            OSError) as error:
        sys.stderr.write(f"error: {error}\n")
        sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a one-line error for a bad ``--config.FIELD``.

    A field the config does not have (``--config.batchsize=10``) or a value
    of the wrong type makes ml_collections raise while the flags are parsed,
    before `main` runs; without this the user would get a traceback.
    """
    try:
        return FLAGS(argv)
    except flags.Error as error:
        sys.stderr.write(f"error: {error}\nPass --helpfull to see the flags.\n")
        sys.exit(2)
    except (AttributeError, KeyError) as error:
        # ml_collections nests the KeyError's repr in the message: take the
        # field name and the "Did you mean" suggestion out of it.
        text = str(error)
        name = re.search(r"[A-Za-z_]\w*", text)
        suggestion = re.search(r'Did you mean "(\w+)"', text)
        sys.stderr.write(
            f"error: the config has no field '{name.group(0) if name else text}'"
            + (f"; did you mean '{suggestion.group(1)}'?" if suggestion else ".")
            + " The fields and what they mean are in configs/default.py\n")
        sys.exit(2)
    except (TypeError, ValueError) as error:
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        sys.stderr.write(f"error: a --config override is not valid ({overrides}): {error}\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
