"""TensorBoard event files of a run that agree with its checkpoints.

Training flushes its event writer right before every checkpoint, so the
events up to a checkpoint are on disk when the checkpoint is. A run killed
after a checkpoint may have written events of later steps; the resumed run
trains those steps again. `open_writer` therefore first drops, from the
workdir's event files, every event of a step after the checkpoint it resumes
from (each file rewritten atomically), so that no step appears twice.

Event files are TFRecord files of ``Event`` protocol buffers: each record is
its length (uint64, little-endian), the masked CRC-32C of the length, the
data and the masked CRC-32C of the data. tensorboardX writes them; reading
is the few lines of `read_records`.
"""

from __future__ import annotations

import glob
import os
import struct
import time

from absl import logging
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from mlres_jax import files

EVENT_FILE_PATTERN = "events.out.tfevents.*"


def read_records(path: str) -> list[bytes]:
    """The records of a TFRecord file, up to the first torn or corrupt one.

    A writer killed mid-record leaves a partial record at the end; it and
    anything after it are not returned.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    records, offset = [], 0
    while offset + 12 <= len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        end = offset + 12 + length + 4
        if header_crc != masked_crc32c(header) or end > len(data):
            break
        record = data[offset + 12:offset + 12 + length]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(record):
            break
        records.append(record)
        offset = end
    return records


def records_training(path: str) -> bool:
    """Whether an event file holds an event of a step after 0, that is of training.

    A run writes only its config (step 0) before its first step.
    """
    return any(Event.FromString(record).step > 0 for record in read_records(path))


def _framed(record: bytes) -> bytes:
    header = struct.pack("<Q", len(record))
    return (header + struct.pack("<I", masked_crc32c(header)) + record
            + struct.pack("<I", masked_crc32c(record)))


def drop_events_after(workdir: str, step: int) -> int:
    """Removes the events of steps after ``step`` from the workdir's event files.

    Args:
      workdir: the folder holding ``events.out.tfevents.*`` files.
      step: the global step of the checkpoint the run resumes from.

    Returns:
      The number of events removed (torn records at a file's end included).
    """
    removed = 0
    for path in sorted(glob.glob(os.path.join(workdir, EVENT_FILE_PATTERN))):
        records = read_records(path)
        kept = [r for r in records if Event.FromString(r).step <= step]
        size = sum(len(_framed(r)) for r in records)
        if len(kept) == len(records) and size == os.path.getsize(path):
            continue
        removed += len(records) - len(kept) + (size != os.path.getsize(path))
        files.write_atomically(path, lambda handle, kept=kept: handle.write(
            b"".join(_framed(r) for r in kept)), mode="wb")
    if removed:
        logging.info("Removed %d TensorBoard events after step %d (they were written "
                     "after the checkpoint the run resumes from)", removed, step)
    return removed


def open_writer(workdir: str, resume_step: int | None) -> SummaryWriter:
    """The run's TensorBoard writer; for a resumed run, after `drop_events_after`.

    Args:
      workdir: the run's folder.
      resume_step: the step of the checkpoint the run resumes from, or None
        for a new run.
    """
    if resume_step is not None:
        drop_events_after(workdir, resume_step)
    # tensorboardX names a file by the second it was opened and the host; the
    # suffix keeps a run resumed within the same second from overwriting it.
    return SummaryWriter(logdir=workdir,
                         filename_suffix=f".{os.getpid()}.{time.time_ns()}")


class NoEvents:
    """A writer that writes nothing: the event writer of processes other than the main one."""

    def add_scalar(self, *args, **kwargs) -> None:
        """Drops the scalar."""

    def add_text(self, *args, **kwargs) -> None:
        """Drops the text."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> "NoEvents":
        return self

    def __exit__(self, *exc_info) -> None:
        pass
