"""TensorBoard event files of a run that agree with its checkpoints.

Training flushes its event writer right before every checkpoint, so the
events up to a checkpoint are on disk when the checkpoint is. tensorboardX's
``SummaryWriter`` cannot promise that: its events go through a queue to a
background thread, and its ``flush()`` writes only what that thread has taken
from the queue (tensorboardX 2.6.5), so a run killed right after a checkpoint
lost the evaluation logged just before it. `EventWriter` writes each event in
the calling thread, with tensorboardX's own event file writer and summaries.

A run killed after a checkpoint may have written events of later steps,
which the resumed run trains again. The resumed run's file starts with a
``SessionLog.START`` event at the first step it writes (what tensorboardX's
``purge_step`` writes): TensorBoard then hides the older events of that step
and later ones, so each step shows once.
"""

from __future__ import annotations

import os
import time

from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog


class EventWriter:
    """The run's TensorBoard writer: each event is in the file when the call returns.

    Args:
      workdir: the run's folder (created if needed).
      resume_step: the step of the checkpoint the run resumes from, or None
        for a new run. The events of later steps written before are purged
        (hidden by TensorBoard).
      write: False for a writer that drops every event and creates no file:
        the writer of processes other than the main one.
    """

    def __init__(self, workdir: str, resume_step: int | None = None, write: bool = True):
        self._file = None
        if not write:
            return
        os.makedirs(workdir, exist_ok=True)
        # tensorboardX names a file by the second it was opened and the host;
        # the suffix keeps a run resumed within the same second from overwriting it.
        self._file = EventsWriter(
            os.path.join(workdir, "events"), f".{os.getpid()}.{time.time_ns()}"
        )
        if resume_step is not None:
            self._write(
                Event(step=resume_step + 1, session_log=SessionLog(status=SessionLog.START))
            )

    def _write(self, event: Event) -> None:
        if self._file is not None:
            event.wall_time = time.time()
            self._file.write_event(event)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Writes ``value`` (a number) of the series ``tag`` at ``step``."""
        self._write(Event(step=step, summary=summary.scalar(tag, float(value))))

    def add_text(self, tag: str, text: str, step: int) -> None:
        """Writes ``text`` (markdown) under ``tag`` at ``step``."""
        self._write(Event(step=step, summary=summary.text(tag, text)))

    def flush(self) -> None:
        """Writes the file's buffer to disk (``fsync``)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
