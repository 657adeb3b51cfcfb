"""What every command of the project shares: flags, quiet logs, one-line errors.

Each command module (``mlres_jax.main``, ``mlres_jax.grow``,
``mlres_jax.analyze``, ``benchmarks.study``, ``benchmarks.throughput``)
defines its flags in a ``define_flags()`` function and starts with
`run_command`, which calls it only when the module runs as a program, so that
importing a command (in a test, or beside another command) defines no flag.

`parse_flags` is the one place where a path typed with ``~`` becomes a path,
for every command: the shell leaves ``~`` after ``=`` as it is
(``--output=~/grown``), so every flag value, ``--config.FIELD`` override and
string field of a ``--config`` file that starts with ``~`` or ``~user`` is
expanded (`expand_home`), or refused in one line when it cannot be.

`run_command` is also the one place where a user's mistake becomes one line
instead of a traceback, for every command: a flag or ``--config`` field that
does not parse (`parse_flags`), any `errors.UserError` (config, data set,
checkpoint, workdir in use, non-finite loss, a stop on SIGINT or SIGTERM),
an ``OSError`` (disk full, permissions) and Ctrl-C outside the training loop.
Each gives ``error: <message>`` on stderr and a non-zero exit status: 2, or
128 + the signal's number for a stop on a signal.
"""

from __future__ import annotations

import logging as python_logging
import os
import re
import signal
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags, logging

from mlres_jax import errors

FLAGS = flags.FLAGS

# Libraries whose INFO records only bury the run's own lines: orbax (dozens
# per checkpoint) and JAX's backend probing ("Unable to initialize backend
# 'tpu'" on every machine without a TPU). Their warnings still show, as one
# line each: orbax also logs the traceback of every error of its threads (a
# full disk gave two of 30 lines each), and the error reaches the project's
# code, which reports it.
_CHATTY_LIBRARIES = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")


def quiet_library_info(record: python_logging.LogRecord) -> bool:
    """Logging filter: drops chatty libraries' INFO records, keeps their warnings in one line."""
    if not any(part in record.pathname for part in _CHATTY_LIBRARIES):
        return True
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return record.levelno >= python_logging.WARNING


def expand_home(value: str, where: str) -> str:
    """``value`` with a leading ``~`` or ``~user`` replaced by that home folder.

    Args:
      value: a flag's or config field's value.
      where: how the user gave it, for the message (``--output``).

    Returns:
      ``value`` itself unless it starts with ``~``.

    Raises:
      SystemExit: through `errors.fail`, if the home folder is not known here.
    """
    if not value.startswith("~"):
        return value
    expanded = os.path.expanduser(value)
    if expanded.startswith("~"):
        errors.fail(
            f"{where}={value}: {value.split(os.sep)[0]!r} is not a home folder on this "
            "machine (no such user, or $HOME unset); give the path without '~'"
        )
    return expanded


def _expand_config_fields(config: ml_collections.ConfigDict, prefix: str) -> None:
    """`expand_home` on every string field of a ConfigDict, in place."""
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            _expand_config_fields(value, f"{prefix}.{name}")
        elif isinstance(value, str) and value.startswith("~"):
            config[name] = expand_home(value, f"{prefix}.{name}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing with ``~`` expanded; one line for a bad flag or ``--config.FIELD``.

    A field the config does not have (``--config.batchsize=10``) or a value
    of the wrong type makes ml_collections raise while the flags are parsed,
    before the command's main runs; without this the user would get a
    traceback. ``--NAME=~...`` is expanded before parsing (a config file is
    loaded while parsing), the string fields of a config file after.
    """
    argv = [argv[0]] + [
        f"{name}={expand_home(value, name)}" if arg.startswith("--") and sep else arg
        for arg in argv[1:]
        for name, sep, value in [arg.partition("=")]
    ]
    try:
        remaining = FLAGS(argv)
        for name in FLAGS:
            if isinstance(FLAGS[name].value, ml_collections.ConfigDict):
                _expand_config_fields(FLAGS[name].value, f"--{name}")
        return remaining
    except flags.Error as error:
        errors.fail(f"{error}\nPass --helpfull to see the flags.")
    except (AttributeError, KeyError) as error:
        # ml_collections nests the KeyError's repr in the message: take the
        # field name and the "Did you mean" suggestion out of it.
        text = str(error)
        name = re.search(r"[A-Za-z_]\w*", text)
        suggestion = re.search(r'Did you mean "(\w+)"', text)
        errors.fail(
            f"the config has no field '{name.group(0) if name else text}'"
            + (f"; did you mean '{suggestion.group(1)}'?" if suggestion else ".")
            + " The fields and what they mean are in configs/default.py"
        )
    except (TypeError, ValueError) as error:
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        errors.fail(f"a --config override is not valid ({overrides}): {error}")
    return []  # not reached


def with_one_line_errors(main: Callable[[Sequence[str]], None]) -> Callable[[Sequence[str]], None]:
    """``main`` with every user error reported as one line and an exit status.

    `errors.UserError`: its message and ``exit_status`` (2, or 128 + the
    signal's number for a run stopped by a signal); ``OSError``: its message,
    status 2; ``KeyboardInterrupt`` (Ctrl-C where no run handles it): status
    130. Any other exception is a bug and keeps its traceback.
    """

    def wrapped(argv):
        try:
            main(argv)
        except errors.UserError as error:
            errors.fail(str(error), error.exit_status, at_once=error.exit_at_once)
        except OSError as error:
            errors.fail(str(error))
        except KeyboardInterrupt:
            errors.fail(
                "interrupted by Ctrl-C. Every file written so far is complete (result "
                "files and checkpoints are written atomically); a training run "
                "resumes from its last checkpoint when its command is run again.",
                128 + signal.SIGINT,
            )

    return wrapped


def run_command(
    main: Callable[[Sequence[str]], None],
    define_flags: Callable[[], None],
    *,
    verbosity: int = logging.INFO,
    takes_arguments: bool = False,
) -> None:
    """Defines the flags, quiets library logs, runs ``main`` and reports its errors.

    Args:
      main: the command's ``main(argv)``.
      define_flags: defines the command's flags.
      verbosity: absl's logging level for the run (``logging.INFO`` or
        ``logging.WARNING``).
      takes_arguments: False: arguments other than flags are refused
        (`absl.app.UsageError`, status 1) before ``main`` runs.
    """
    define_flags()
    main_with_errors = with_one_line_errors(main)

    def main_with_logging(argv):
        if not takes_arguments and len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(verbosity)
        logging.get_absl_handler().addFilter(quiet_library_info)
        main_with_errors(argv)

    app.run(main_with_logging, flags_parser=parse_flags)
