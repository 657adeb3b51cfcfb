"""Clean stops: SIGINT (Ctrl-C) and SIGTERM end a run between two steps, with a checkpoint.

`StopRequest` turns the signals into a request that the training loop reads
between steps and between cycles; the loop then saves the step reached and
raises `Interrupted`, which every command reports as one line with the
shell's exit status for the signal (`mlres_jax.cli`).
"""

from __future__ import annotations

import signal
import threading

from absl import logging

from mlres_jax import errors


class Interrupted(errors.UserError):
    """The run stopped on SIGINT or SIGTERM, after saving a checkpoint.

    Its exit status is the shell's convention for a signal: 128 + the
    signal's number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a request to stop between steps.

    As a context manager it installs the handlers (in the main thread only;
    elsewhere signals cannot be handled) and restores the previous ones on
    exit. The training loop reads ``signal_number`` before every step. A
    second SIGINT stops at once, as a ``KeyboardInterrupt``, without a new
    checkpoint.

    Attributes:
      signal_number: the first signal received, or None.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:  # pylint: disable=unused-argument
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number
        logging.warning("%s received: the run stops after the current step and saves a "
                        "checkpoint (Ctrl-C again stops at once, without one)",
                        signal.Signals(number).name)
