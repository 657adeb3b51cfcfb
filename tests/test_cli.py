"""Tests of the one place where errors become one line (`mlres_jax.cli`)."""

import errno
import logging as python_logging
import os
import signal
import sys

import pytest

from mlres_jax import checkpoint, cli, configuration, datasets, errors, stopping, train, workdir


def _raising(error):
    def main(argv):  # pylint: disable=unused-argument
        raise error

    return main


@pytest.mark.parametrize(
    "error,status",
    [
        (configuration.ConfigError("config.width = 0 is not allowed"), 2),
        (datasets.DataSetDamagedError("Data set 'x' cannot be read"), 2),
        (checkpoint.CheckpointMismatchError("holds a network of 8-8-8 blocks"), 2),
        (workdir.WorkdirBusyError("in use by process 7"), 2),
        (train.NonFiniteLossError("non-finite loss at step 3"), 2),
        (stopping.Interrupted("stopped by SIGINT at step 5", signal.SIGINT), 130),
        (stopping.Interrupted("stopped by SIGTERM at step 5", signal.SIGTERM), 143),
        (OSError(errno.ENOSPC, "No space left on device"), 2),
        (KeyboardInterrupt(), 130),
    ],
)
def test_user_errors_are_one_line_with_their_exit_status(error, status, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.with_one_line_errors(_raising(error))(["command"])
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if not isinstance(error, KeyboardInterrupt):
        assert str(error) in err


def test_every_user_error_class_derives_from_the_one_base():
    for cls in (
        configuration.ConfigError,
        datasets.DataSetError,
        datasets.DataSetUnavailableError,
        checkpoint.CheckpointError,
        checkpoint.CheckpointMismatchError,
        workdir.WorkdirBusyError,
        train.NonFiniteLossError,
        stopping.Interrupted,
    ):
        assert issubclass(cls, errors.UserError), cls


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.with_one_line_errors(_raising(ZeroDivisionError("a bug")))(["command"])


def _record(pathname, level, exc_info=None):
    return python_logging.LogRecord(
        "absl", level, pathname, 1, "thread raised: %s", ("disk full",), exc_info
    )


def test_library_errors_are_one_line_and_their_info_is_dropped():
    # Issue 18: a full disk gave two orbax tracebacks of 30 lines before the
    # run's own one-line error.
    try:
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
    except ValueError:
        exc_info = sys.exc_info()
    orbax = f"{os.sep}site-packages{os.sep}orbax{os.sep}checkpoint{os.sep}future.py"
    error = _record(orbax, python_logging.ERROR, exc_info)
    assert cli.quiet_library_info(error)
    assert python_logging.Formatter().format(error) == "thread raised: disk full"
    assert not cli.quiet_library_info(_record(orbax, python_logging.INFO))
    own = _record(f"{os.sep}mlres_jax{os.sep}train.py", python_logging.ERROR, exc_info)
    assert cli.quiet_library_info(own)  # the project's own records keep their traceback
    assert "Traceback" in python_logging.Formatter().format(own)


def test_a_command_refuses_arguments_before_it_runs(monkeypatch, capsys):
    # Every command but analyze takes flags only; run_command refuses the rest
    # (absl's usage error, status 1) before the command's main runs.
    ran = []
    monkeypatch.setattr(sys, "argv", ["command", "extra"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(ran.append, lambda: None)
    assert exit_info.value.code == 1 and not ran
    assert "Unexpected arguments: ['extra']" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["command", "curves"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run_command(
            lambda argv: ran.append(argv) or sys.exit(0), lambda: None, takes_arguments=True
        )
    assert exit_info.value.code == 0 and ran == [["command", "curves"]]


def test_a_library_error_of_many_lines_becomes_one_line_with_its_type():
    # orbax and TensorStore put dumps of many lines into their errors.
    error = ValueError("cannot read\n   tensorstore:\n" + "x" * 400)
    assert errors.one_line(error, limit=30) == "ValueError: cannot read tensorstore: xxxxx..."
    assert errors.one_line(OSError("disk full")) == "OSError: disk full"
