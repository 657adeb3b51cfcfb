"""TensorBoard event files of a run that agree with its checkpoints.

Training flushes its event writer right before every checkpoint, so the
events up to a checkpoint are on disk when the checkpoint is. A run killed
after a checkpoint may have written events of later steps, which the resumed
run trains again. The resumed run's writer starts with tensorboardX's
``purge_step`` (a ``SessionLog.START`` event at the first step it writes):
TensorBoard then hides the older events of that step and later ones, so each
step shows once.
"""

from __future__ import annotations

import os
import time

from tensorboardX import SummaryWriter


def open_writer(workdir: str, resume_step: int | None, write: bool = True) -> SummaryWriter:
    """The run's TensorBoard writer.

    Args:
      workdir: the run's folder.
      resume_step: the step of the checkpoint the run resumes from, or None
        for a new run. The events of later steps written before are purged
        (hidden by TensorBoard).
      write: False for a writer that drops every event and creates no file
        (tensorboardX's ``write_to_disk=False``): the writer of processes other
        than the main one.
    """
    # tensorboardX names a file by the second it was opened and the host; the
    # suffix keeps a run resumed within the same second from overwriting it.
    return SummaryWriter(
        logdir=workdir,
        filename_suffix=f".{os.getpid()}.{time.time_ns()}",
        purge_step=None if resume_step is None else resume_step + 1,
        write_to_disk=write,
    )
