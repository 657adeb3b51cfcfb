"""A run's folder: one writer at a time, and room for its checkpoints.

`hold` makes a process the only writer of a workdir for as long as it runs:
it takes an exclusive ``flock`` on ``<workdir>/.lock`` and writes who holds
it (process id, host, start time, command) into that file. A second writer
is refused at once with a message naming the holder. The operating system
releases the lock when the holder ends in any way (exit, SIGKILL, a crash,
power loss), so a dead holder never blocks the next run; its stale details
are simply overwritten.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from typing import Iterator

from mlres_jax import errors

LOCK_FILE = ".lock"


class WorkdirBusyError(errors.UserError):
    """Another process is writing to the workdir."""


def _holder_description(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.load(handle)
        return (f"process {holder['pid']} on {holder['host']} (started "
                f"{holder['started']}: {holder['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are not readable)"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds ``workdir`` for this process: creates it, locks it, releases it at the end.

    Raises:
      WorkdirBusyError: if another live process holds it, naming that process.
      OSError: if the folder cannot be created or written (before any work).
    """
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise OSError(f"workdir {workdir!r} is not writable: {error}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusyError(
                f"workdir {workdir!r} is in use by {_holder_description(path)}. "
                "Wait for that run to end (or stop it), or choose another "
                "--workdir.") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def check_free_space(workdir: str, needed_bytes: int) -> None:
    """Fails early if ``workdir`` has less than ``needed_bytes`` free.

    Raises:
      OSError: naming the folder, the free and the needed space.
    """
    free = shutil.disk_usage(workdir).free
    if free < needed_bytes:
        raise OSError(
            f"workdir {workdir!r} has {free / 2**20:.1f} MiB free, but the "
            f"checkpoints of this run need about {needed_bytes / 2**20:.1f} MiB")
