"""The errors a command reports as one line instead of a traceback.

`UserError` is the base of every error that is a user's mistake or a fault of
the world around the run (a config value, a missing or damaged data set, a
checkpoint of another run, a workdir in use, a diverged run, a stop
request), as opposed to a bug. Every module raises a subclass of it with a
message that says what is wrong and what to do; `mlres_jax.cli` turns every
one of them, for every command, into ``error: <message>`` on stderr and the
error's ``exit_status`` (`fail`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """A mistake or a fault a command reports in one line (exit status 2).

    Attributes:
      exit_status: the command's exit status.
      exit_at_once: end the process without Python's clean-up (a lost peer
        process, which a normal exit of a multi-process run would wait for).
    """

    exit_status = 2
    exit_at_once = False


def fail(message: str, exit_status: int = 2, *, at_once: bool = False) -> None:
    """Ends the command with ``error: message`` on stderr and ``exit_status``.

    With ``at_once``, ends the process without Python's clean-up (``os._exit``):
    for a multi-process run whose peer is gone, where a normal exit would wait
    in JAX's shutdown barrier for it and then abort.
    """
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    if at_once:
        sys.stderr.flush()
        os._exit(exit_status)
    sys.exit(exit_status)


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most about ``limit`` characters, with its type.

    Libraries (orbax, TensorStore) put dumps of many lines into their errors.
    """
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
