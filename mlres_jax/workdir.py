"""A run's folder: one writer at a time, every folder it writes writable, room for its checkpoints.

`hold` makes a process the only writer of a workdir for as long as it runs:
it takes an exclusive ``flock`` on ``<workdir>/.lock`` and writes who holds
it (process id, host, start time, command) into that file. A second writer
is refused at once with a message naming the holder. The operating system
releases the lock when the holder ends in any way (exit, SIGKILL, a crash,
power loss), so a dead holder never blocks the next run; its stale details
are simply overwritten.

`hold` is also the one place where every path a run (or ``mlres_jax.grow``)
writes is checked, before the caller does any work (`check_writable`): a
folder this user cannot write, or a file the run replaces that is a folder,
is refused in one line instead of failing at the first save, after the
training it was to keep. So is a file system without room for the run's
checkpoints (`check_free_space`). A run that fails before it recorded
anything leaves no folder behind: `hold` removes the folder it created.
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
import tempfile
from collections.abc import Iterator, Sequence

from absl import logging

from mlres_jax import checkpoint, errors

LOCK_FILE = ".lock"
# Folders of the workdir whose whole tree a run may change: orbax deletes
# old checkpoints (with their subfolders), and a damaged one is moved aside.
_TREES_WRITTEN = (checkpoint.CHECKPOINT_FOLDER, checkpoint.UNREADABLE_FOLDER)


class WorkdirBusyError(errors.UserError):
    """Another process is writing to the workdir."""


def _holder_description(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.load(handle)
        return (
            f"process {holder['pid']} on {holder['host']} (started "
            f"{holder['started']}: {holder['command']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are not readable)"


class WorkdirStorageError(errors.UserError, OSError):
    """The workdir's file system cannot take the run's files.

    A folder or file the run writes cannot be written by this user, or there
    is no room for the run's checkpoints; the message says which.
    """


class Holding:
    """A workdir held by `hold`.

    Attributes:
      recorded: set by the caller once the run records something there (it
        starts training); until then a folder that `hold` made is removed
        if the run fails.
    """

    def __init__(self):
        self.recorded = False


@contextlib.contextmanager
def hold(
    workdir: str, files: Sequence[str] = (), checkpoint_bytes: int = 0, checkpoints_to_keep: int = 1
) -> Iterator[Holding]:
    """Holds ``workdir`` for this process: creates it, locks it, releases it at the end.

    Once it holds the folder it checks, before the caller does any work,
    that everything the run writes there can be written (`check_writable`)
    and, given ``checkpoint_bytes``, that there is room for the checkpoints
    (`check_free_space`). If this call created the folder and the caller
    fails before it says it recorded something (``Holding.recorded``, set
    when training starts), the folder is removed, so that a failed start
    leaves no stray workdir.

    Args:
      workdir: the folder.
      files: names of files in it that the run writes or replaces (e.g.
        ``summary.json``).
      checkpoint_bytes: disk space of one checkpoint of the run's largest
        network (`checkpoint.estimated_bytes`); 0 skips the space check.
      checkpoints_to_keep: how many checkpoints the run keeps.

    Raises:
      WorkdirBusyError: if another live process holds it, naming that process.
      WorkdirStorageError: if a folder or file the run writes cannot be
        written (`check_writable`), or the checkpoints do not fit
        (`check_free_space`).
    """
    path = os.path.join(workdir, LOCK_FILE)
    created = not os.path.lexists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        if created and os.path.isdir(workdir):
            os.rmdir(workdir)
        raise _not_writable(
            workdir, error.filename or workdir, error.strerror or str(error)
        ) from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusyError(
                f"workdir {workdir!r} is in use by {_holder_description(path)}. "
                "Wait for that run to end (or stop it), or choose another "
                "--workdir."
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        }
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        holding = Holding()
        try:
            check_writable(workdir, files)
            if checkpoint_bytes:
                check_free_space(workdir, checkpoint_bytes, checkpoints_to_keep)
            yield holding
        except BaseException:
            if created and not holding.recorded:
                shutil.rmtree(workdir, ignore_errors=True)
                logging.info("Removed %s: the run ended before it started training", workdir)
            raise
    finally:
        os.close(descriptor)  # releases the lock


def _not_writable(workdir: str, path: str, reason: str) -> WorkdirStorageError:
    user = f"uid {os.geteuid()}" if hasattr(os, "geteuid") else "this user"
    return WorkdirStorageError(
        f"{path!r} is not writable by this process ({user}): {reason}. The run writes "
        f"there, so it stops before any work: make it writable (e.g. chown or chmod "
        f"{os.path.abspath(workdir)!r} and what it holds), or copy that folder elsewhere "
        "and run the same command on the copy."
    )


def _probe(folder: str) -> None:
    """Creates and removes a file in ``folder``: the one sure test that it can be written.

    Raises:
      OSError: as the operating system reports it (permissions, a read-only
        file system, not a folder).
    """
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
        pass


def check_writable(workdir: str, files: Sequence[str] = ()) -> None:
    """Fails early unless this process can write every path a run writes in ``workdir``.

    Checked: the workdir itself (lock, events, result files, a new
    ``checkpoints/``), ``checkpoints/`` and every folder below it (orbax
    writes new checkpoints there and deletes the oldest with their
    folders), ``unreadable_checkpoints/`` if present, and each of ``files``
    that exists must be a plain file (it is replaced by a rename). A run
    started as one user (say root) and resumed as another, or a read-only
    mount, is found here, before data loading, compiling or training.

    Raises:
      WorkdirStorageError: naming the first path that cannot be written,
        the reason, and what to do.
    """

    def refuse(path: str, reason: str):
        raise _not_writable(workdir, path, reason)

    probed = [workdir]  # the run creates files and folders right in these
    nested = []  # orbax deletes (or the run moves) these with their content
    for name in _TREES_WRITTEN:
        top = os.path.join(workdir, name)
        if os.path.lexists(top):
            probed.append(top)
            nested += sorted(
                os.path.join(root, sub) for root, subs, _ in os.walk(top) for sub in subs
            )
    for folder in probed:
        try:
            _probe(folder)
        except OSError as error:
            refuse(folder, error.strerror or str(error))
    for folder in nested:
        if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
            refuse(folder, "no permission to change what it holds")
    for name in files:
        path = os.path.join(workdir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            refuse(path, "it is not a file (the run replaces it with one)")


def _bytes_on_disk(path: str) -> int:
    """Bytes allocated to a folder's files (what removing it frees), or to a file."""
    paths = [path] + [
        os.path.join(root, name) for root, subs, names in os.walk(path) for name in subs + names
    ]
    return sum(os.lstat(p).st_blocks * 512 for p in paths if os.path.lexists(p))


def _mib(count: float) -> str:
    return f"{count / 2**20:.1f} MiB"


# Room for what a run writes beside its checkpoints: events, summary, plot.
OTHER_FILES_BYTES = 2**20


def check_free_space(workdir: str, checkpoint_bytes: int, checkpoints_to_keep: int) -> None:
    """Fails early if ``workdir``'s file system has no room for the run's checkpoints.

    At its fullest, the checkpoint folder holds ``checkpoints_to_keep``
    checkpoints and the one being written (orbax deletes the oldest after a
    save), or, with more kept from before, those and the new one. The
    checkpoints already there count as written; the temporary folders of
    unfinished saves (`checkpoint.unfinished_saves`) count as free, because
    the run removes them when it opens its checkpoints. ``OTHER_FILES_BYTES``
    is added for the events and result files.

    Args:
      workdir: the run's folder (existing).
      checkpoint_bytes: one checkpoint of the largest network
        (`checkpoint.estimated_bytes`).
      checkpoints_to_keep: ``config.checkpoints_to_keep``.

    Raises:
      WorkdirStorageError: naming the folder, the free and the needed space,
        any unfinished saves, and what to do.
    """
    directory = checkpoint.checkpoint_dir(workdir)
    existing = sum(
        _bytes_on_disk(os.path.join(directory, str(step)))
        for step in checkpoint.list_steps(workdir)
    )
    unfinished = checkpoint.unfinished_saves(directory)
    reclaimable = sum(_bytes_on_disk(path) for path in unfinished)
    fullest = max(existing + checkpoint_bytes, (checkpoints_to_keep + 1) * checkpoint_bytes)
    needed = fullest - existing + OTHER_FILES_BYTES
    free = shutil.disk_usage(workdir).free + reclaimable
    if free >= needed:
        return
    leftovers = (
        f", counting {_mib(reclaimable)} in the unfinished save(s) "
        f"{', '.join(unfinished)}, which the run removes"
        if unfinished
        else ""
    )
    raise WorkdirStorageError(
        f"workdir {workdir!r} has {_mib(free)} free{leftovers}, but the run needs about "
        f"{_mib(needed)} more: up to {checkpoints_to_keep} kept checkpoints "
        f"(config.checkpoints_to_keep) and one being written, about "
        f"{_mib(checkpoint_bytes)} each (orbax's metadata included), and "
        f"{_mib(OTHER_FILES_BYTES)} for events and results. Free some space, lower "
        "--config.checkpoints_to_keep, or copy the workdir to a larger disk and run the "
        "same command with --workdir=COPY."
    )
