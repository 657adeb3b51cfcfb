"""Data parallelism on JAX's own runtime: one mesh over every device of every process.

A run's devices form a one-axis `jax.sharding.Mesh` (axis ``"data"``) over
the devices of all processes. Parameters, batch-norm statistics, optimizer
state and the whole training set are replicated on every device; each step's
global mini-batch is split over the ``"data"`` axis, and `jax.jit` with these
shardings runs the step as one SPMD program (no ``pmap``, no hand-written
collectives). A mean over the batch inside the step, such as batch
normalisation's, is a mean over the *global* batch: the maths of a step does
not depend on the number of devices, only the order of float additions does.

Several processes (hosts, or processes on one machine) join through
`initialize`, a thin layer over ``jax.distributed.initialize``. Each process
computes the same global batch indices from the seed and the step, and puts
only its own devices' part of them on its devices (`shard_batch`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mlres_jax import errors

DATA_AXIS = "data"

# JAX's coordination service ends every process when one of them has sent no
# heartbeat for this long (a dead peer). JAX's own default is 100 s.
DEFAULT_HEARTBEAT_TIMEOUT_SECONDS = 60
_heartbeat_timeout_seconds = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS

# Environment variables by which cluster managers or users start several
# processes; ``jax.distributed.initialize()`` without arguments reads them
# (and detects Slurm, Open MPI and cloud TPU environments itself).
_CLUSTER_ENVIRONMENT = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = DEFAULT_HEARTBEAT_TIMEOUT_SECONDS,
) -> bool:
    """Joins the processes of a multi-process run, if there are several.

    With a coordinator address (flags), or in an environment that a cluster
    manager set up (``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
    ``JAX_PROCESS_ID``, Slurm, Open MPI), calls ``jax.distributed.initialize``,
    which must happen before anything else touches a device. Otherwise the run
    is one process and nothing is done.

    Args:
      coordinator_address, num_processes, process_id: as
        ``jax.distributed.initialize`` takes them; None to detect them.
      heartbeat_timeout_seconds: when a process has sent no heartbeat for
        this long (it died, or its host is lost), JAX's coordination service
        ends the others. This process also writes a sign of life every
        second (`PeerWatch`); a process waiting for a peer (the stop
        agreement, a step) gives up on it once it has shown none for a
        third of the heartbeat timeout (`agreement_timeout_seconds`), so that a lost
        peer is reported by this run, in one line, before JAX ends it.

    Returns:
      Whether ``jax.distributed.initialize`` was called.
    """
    global _heartbeat_timeout_seconds
    _heartbeat_timeout_seconds = heartbeat_timeout_seconds
    if (
        coordinator_address is None
        and num_processes is None
        and not any(name in os.environ for name in _CLUSTER_ENVIRONMENT)
    ):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
    threading.Thread(target=_write_signs_of_life, name="signs_of_life", daemon=True).start()
    logging.info(
        "Process %d of %d; %d local and %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


_SIGN_OF_LIFE_KEY = "mlres_jax/alive"


def _write_signs_of_life() -> None:
    """Every second, a new count under this process's key: it is alive (`PeerWatch`)."""
    client, key, beat = coordination_client(), f"{_SIGN_OF_LIFE_KEY}/{jax.process_index()}", 0
    while True:
        try:
            client.key_value_set(key, str(beat), allow_overwrite=True)
        except jax.errors.JaxRuntimeError:
            pass  # the coordination service is gone: JAX reports that itself
        beat += 1
        time.sleep(1.0)


class PeerWatch:
    """Which other processes have shown no sign of life for a while.

    Each process writes a count into the coordination service's store every
    second from its start (`initialize`); a peer whose count has not changed
    here for ``timeout`` seconds hangs, died or lost its host. Its own
    background thread keeps writing while its main thread compiles, loads or
    evaluates, so a slow peer is not a lost one. Thread-safe.
    """

    def __init__(self):
        self._client = coordination_client()
        self._seen = {}  # peer -> (its count, when it changed here)
        self._lock = threading.Lock()

    def lost(self, timeout: float) -> list[int]:
        """The peers whose count has not changed for ``timeout`` seconds (one read each)."""
        now, lost = time.monotonic(), []
        with self._lock:
            for peer in range(jax.process_count()):
                if peer == jax.process_index():
                    continue
                try:
                    count = self._client.key_value_try_get(f"{_SIGN_OF_LIFE_KEY}/{peer}")
                except jax.errors.JaxRuntimeError:  # not written yet
                    count = None
                if peer not in self._seen or self._seen[peer][0] != count:
                    self._seen[peer] = (count, now)
                elif now - self._seen[peer][1] > timeout:
                    lost.append(peer)
        return lost


def agreement_timeout_seconds() -> int:
    """How long a peer may show no sign of life before it counts as lost, s.

    A third of the heartbeat timeout (whole seconds): JAX's coordination
    service ends the processes at the heartbeat timeout after a peer's last
    heartbeat, and this run's own detection, read once a second, must come
    well before that even on a loaded machine.
    """
    return _heartbeat_timeout_seconds // 3


def coordination_client():
    """The client of JAX's coordination service (its key-value store), after `initialize`.

    JAX keeps it in ``jax._src.distributed.global_state``, as orbax's and
    JAX's own multi-host utilities read it; there is no public accessor.

    Raises:
      RuntimeError: if ``jax.distributed`` is not initialized.
    """
    from jax._src import distributed  # pylint: disable=import-outside-toplevel

    if distributed.global_state.client is None:
        raise RuntimeError("jax.distributed is not initialized (parallel.initialize)")
    return distributed.global_state.client


def source_commit() -> str | None:
    """The commit of this code: ``git describe --always --dirty`` (12 hex digits).

    Returns:
      e.g. ``"ee07604feb08"``, with ``-dirty`` when tracked files differ from
      it; None outside a git checkout or without git.
    """
    try:
        return (
            subprocess.run(
                ["git", "describe", "--always", "--dirty", "--abbrev=12"],
                check=True,
                text=True,
                capture_output=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
                timeout=10,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpus_available() -> list[int]:
    """The CPU cores this process may run on (all of them where that is not known)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def environment() -> dict:
    """What runs this process, and when: devices, CPUs, load, code and library versions.

    The one record of the machine for runs (``summary.json``) and benchmarks
    (their JSON's ``machine``).

    Returns:
      ``platform`` (e.g. ``"cpu"``, ``"gpu"``), ``device_kind`` (e.g.
      ``"NVIDIA H200"``), ``devices`` (global), ``local_devices``,
      ``processes``, ``host`` (process 0's host name when written by it),
      ``cpu_model``, ``cpu_count`` (``os.cpu_count``), ``cpus_available``
      (those this process may run on), ``load_average_1_5_15_min`` (at the
      call: other processes make timings noisy; None where unknown),
      ``commit`` (`source_commit`), ``time_utc`` (now, ISO 8601), ``python``
      and ``versions`` of jax, jaxlib, flax, optax, orbax-checkpoint and numpy.
    """
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(cpus_available()),
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "commit": source_commit(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
        },
    }


def describe_environment(record: dict, brief: bool = False) -> str:
    """One line from an `environment` record (a field it lacks is left out).

    E.g. ``"2 cpu device(s) (cpu) in 1 process(es) on vm; AMD EPYC 7B13, 2 of 2
    CPUs, load average 0.73; Python 3.11.7, jax 0.10.2, ...; commit
    ee07604feb08; 2026-12-01T23:56:52+00:00"``; with ``brief``, the devices
    and the CPU only (``"2 cpu device(s) (cpu) in 1 process(es) on vm; AMD EPYC
    7B13, 2 of 2 CPUs"``).
    """
    versions = ", ".join(f"{name} {version}" for name, version in record["versions"].items())
    cpus = (
        f", {record['cpus_available']} of {record['cpu_count']} CPUs"
        if "cpu_count" in record
        else ""
    )
    load = record.get("load_average_1_5_15_min")
    parts = [
        f"{record['devices']} {record['platform']} device(s) ({record['device_kind']}) in "
        f"{record['processes']} process(es) on {record['host']}",
        f"{record.get('cpu_model', 'CPU unknown')}{cpus}"
        + (f", load average {load[0]:.2f}" if load and not brief else ""),
        f"Python {record['python']}, {versions}",
        f"commit {record.get('commit') or 'unknown'}",
        record["time_utc"],
    ]
    return "; ".join(parts[:2] if brief else parts)


def is_main_process() -> bool:
    """Whether this process writes logs, events, ``summary.json`` and plots."""
    return jax.process_index() == 0


def make_mesh(num_devices: int = -1) -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices of all processes.

    Args:
      num_devices: how many devices; -1 for all of them.

    Raises:
      errors.UserError: for more devices than there are, or a count that leaves a
        process without a device (several processes need all devices).
    """
    devices = jax.devices()
    if num_devices == -1:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise errors.UserError(
            f"config.num_devices = {num_devices} is not allowed: this run "
            f"has {len(devices)} device(s) ({devices[0].platform}); use -1 "
            "for all of them, or a number from 1 to that"
        )
    if jax.process_count() > 1 and num_devices != len(devices):
        raise errors.UserError(
            f"config.num_devices = {num_devices} is not allowed with "
            f"{jax.process_count()} processes: a multi-process run uses all "
            f"{len(devices)} devices (-1)"
        )
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of what every device holds whole: state, data set, keys."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: its first axis split over the ``"data"`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_divides(name: str, batch_size: int, mesh: Mesh) -> None:
    """Raises `errors.UserError` unless ``batch_size`` splits evenly over the mesh's devices."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise errors.UserError(
            f"config.{name} = {batch_size} is not allowed: the global batch is split "
            f"evenly over the {devices} devices of the mesh, so it must be a multiple "
            f"of {devices} (e.g. {devices * max(1, round(batch_size / devices))}); or "
            "set config.num_devices"
        )


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (the same on every process) as arrays replicated on the mesh.

    Each process copies the data to its own devices only; nothing is sent
    between processes. Arrays already on the mesh are moved without a copy
    where they are placed right; PRNG keys (``jax.random.key``) go as their
    key data and come back as keys of the same implementation.
    """
    sharding = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_batch(batch: Sequence[np.ndarray] | np.ndarray, mesh: Mesh):
    """A global batch (the same on every process) split over the mesh's ``"data"`` axis.

    Each process puts only its own devices' part of the batch on them.

    Args:
      batch: an array (or a tuple of arrays) whose first axis is the global
        batch, divisible by the number of devices.
    """
    sharding = batch_sharded(mesh)

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, batch)
