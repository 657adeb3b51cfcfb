"""Stops: one step for all processes, prompt, final; and a lost peer process.

A run stops on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption or time
limit) between two steps, with a checkpoint of the step reached:

* `StopRequest` turns the signals into a request. A second signal, whenever
  it comes (during the stop's save, a wait for a compilation, anything),
  ends the process at once with one line naming the last complete
  checkpoint; nothing is aborted and no core is dumped.
* `StopAgreement` turns the requests of all processes into one step at which
  every process stops. One process needs no agreement. Several processes
  (``jax.distributed``) may receive a signal at different steps, or only one
  of them may: before every step they exchange their requests through the
  key-value store of JAX's coordination service, so all of them see the same
  answer at the same step, save the same checkpoint (orbax, every process)
  and exit with the same status and message.

JAX's own preemption sync point (``multihost_utils.reached_preemption_sync_point``)
agrees on a step too, but it learns of a stop only from a SIGTERM that reaches
its own C++ handler; this run handles SIGINT and SIGTERM itself (to end at
once on a second signal), so it exchanges its own requests, the way JAX's
preemption service does, in the same store.

A peer that dies (SIGKILL, a lost host) or hangs (a frozen host) never
answers: a process waiting for it, at the agreement or for a step, gives up
once the peer has shown no sign of life for the agreement timeout
(`parallel.PeerWatch`) with `PeerLostError`, which every command reports in
one line and exits without waiting for the dead peer
(`PeerLostError.exit_at_once`). A step whose collective fails because its
peer is gone is reported the same way (`is_collective_failure`).
"""

from __future__ import annotations

import itertools
import signal
import threading
import time

import jax
from absl import logging

from mlres_jax import checkpoint, errors, parallel

_AGREEMENT_PREFIX = "mlres_jax/stop"
# Agreements made so far by this process (every process makes them in the same
# order): each one's keys are its own, also when a process runs several runs.
_agreements_made = itertools.count()
# How long one wait for a peer's answer blocks before Python signal handlers
# run again (they only run between Python bytecodes of the main thread).
_WAIT_SLICE_MS = 1000


class Interrupted(errors.UserError):
    """The run stopped on SIGINT or SIGTERM, after saving a checkpoint.

    Its exit status is the shell's convention for a signal: 128 + the
    signal's number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number


class PeerLostError(errors.UserError):
    """Another process of a multi-process run died, hangs or lost its host.

    Reported in one line like every `errors.UserError`, then the process
    exits at once (``os._exit``): a normal exit would wait in JAX's shutdown
    barrier for the dead peer.
    """

    exit_at_once = True


class StopRequest:
    """Turns SIGINT and SIGTERM into a request to stop between steps.

    As a context manager it installs the handlers (in the main thread only;
    elsewhere signals cannot be handled) and restores the previous ones on
    exit. The first signal sets ``signal_number``; the training loop stops at
    the next step boundary (`StopAgreement`). A second signal writes
    ``error: ...`` naming the last complete checkpoint and ends the process
    at once with status 128 + its number, without a new checkpoint.

    Args:
      checkpoint_directory: the run's checkpoint folder, to name the last
        complete checkpoint in messages (`last_checkpoint`).

    Attributes:
      signal_number: the first signal received, or None.
      steps_done: steps finished on the devices, kept up to date by the loop.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint_directory: str | None = None):
        self.signal_number = None
        self.steps_done = 0
        self._checkpoint_directory = checkpoint_directory
        self._previous = {}

    def last_checkpoint(self) -> str:
        """``"the last complete checkpoint is step N in DIR"``, read from the folder.

        Read from the folder (`checkpoint.complete_steps`), not through
        orbax's manager, so it is safe inside a signal handler.
        """
        folder = self._checkpoint_directory
        try:
            steps = checkpoint.complete_steps(folder) if folder else []
        except OSError:
            steps = []
        if not steps:
            return "no checkpoint was written yet"
        return f"the last complete checkpoint is step {max(steps)} in {folder}"

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:  # pylint: disable=unused-argument
        name = signal.Signals(number).name
        if self.signal_number is not None:
            errors.fail(  # at once, no cleanup: nothing left waits for a thread
                f"stopped at once by a second {name}, without a new checkpoint; "
                f"{self.last_checkpoint()}. To resume, run the same command again.",
                128 + number,
                at_once=True,
            )
        self.signal_number = number
        logging.warning(
            "%s received after step %d: the run stops at the next step and "
            "saves a checkpoint (a second Ctrl-C or SIGTERM ends it at once, "
            "without one)",
            name,
            self.steps_done,
        )


class StopAgreement:
    """The step at which every process of the run stops, the same for all.

    `should_stop` is called by every process at the same points (before each
    step and between cycles). With one process it returns the local
    request. With several, each call is one exchange through JAX's
    coordination service: every process writes its request (0 for none)
    under the key of this call's number and reads everyone else's; if any
    process has a request, all of them stop there. An exchange costs a few
    round trips to process 0's coordination service
    (``benchmarks/stop_agreement.py`` measures it).

    A process may wait long for a peer that is alive (compiling, evaluating,
    saving); one that is gone never answers. To tell them apart, every
    process writes a sign of life into the store every second from its start
    (`parallel.initialize`); a peer whose sign of life has not changed for the
    agreement timeout is lost (`PeerLostError`, `parallel.PeerWatch`), found
    before JAX's heartbeat ends the process with a stack trace.

    Args:
      request: this process's `StopRequest`.
      agreement_timeout_seconds: how long a peer may show no sign of life
        before it counts as lost; default: a third of the heartbeat timeout
        (`parallel.agreement_timeout_seconds`), so that this run's message
        comes before JAX's own end of the process.
    """

    def __init__(self, request: StopRequest, agreement_timeout_seconds: float | None = None):
        self.request = request
        self._timeout = (
            parallel.agreement_timeout_seconds()
            if agreement_timeout_seconds is None
            else agreement_timeout_seconds
        )
        self._processes = jax.process_count()
        self._client = parallel.coordination_client() if self._processes > 1 else None
        self._exchanges = 0
        self._prefix = f"{_AGREEMENT_PREFIX}/{next(_agreements_made)}"
        self.received_by: dict[int, int] = {}
        self._waiting_since = None
        if self._client is not None:
            self._peers = parallel.PeerWatch()
            threading.Thread(target=self._watch_steps, name="step_watchdog", daemon=True).start()

    def should_stop(self) -> int | None:
        """The signal on which every process stops now, or None to go on.

        Returns:
          The same answer on every process: the smallest signal number that
          any process received (SIGINT before SIGTERM; the exit status is
          128 + it), or None. ``received_by`` then maps each process that
          received one to its signal.

        Raises:
          PeerLostError: if another process did not answer within the
            timeout; the message names it and the last complete checkpoint.
        """
        own = self.request.signal_number
        if self._client is None:
            self.received_by = {0: own} if own else {}
            return own
        exchange, self._exchanges = self._exchanges, self._exchanges + 1
        me = jax.process_index()
        folder = f"{self._prefix}/{exchange}"
        self._client.key_value_set(f"{folder}/{me}", str(own or 0))
        answers = {me: own or 0}
        for peer in range(self._processes):
            if peer != me:
                answers[peer] = int(self._wait_for(f"{folder}/{peer}", peer))
        if exchange >= 2:
            # Every process has read exchange - 2: it wrote exchange - 1 after that.
            self._client.key_value_delete(f"{self._prefix}/{exchange - 2}/{me}")
        self.received_by = {p: number for p, number in sorted(answers.items()) if number}
        return min(self.received_by.values()) if self.received_by else None

    def describe_signals(self) -> str:
        """``"SIGTERM"``, or with several processes ``"SIGTERM (received by process 0)"``.

        Each signal is named with the processes that received it, so that a
        SIGINT on one host and a SIGTERM on another read as such.
        """
        names = {}
        for process, number in self.received_by.items():
            names.setdefault(signal.Signals(number).name, []).append(str(process))
        if self._client is None:
            return " and ".join(names)
        return " and ".join(
            f"{name} (received by process {', '.join(processes)})"
            for name, processes in names.items()
        )

    def wait_for_step(self, outputs, steps_done: int) -> None:
        """Waits for a step's ``outputs``; then ``steps_done`` steps are finished.

        With several processes a step waits for all of them (its collectives);
        one that hangs (a frozen host) would hold it for good. When a peer has
        shown no sign of life for the agreement timeout while this process
        waits, the watchdog ends this process with one line naming the last
        complete checkpoint, before JAX's heartbeat does so with a stack trace.
        """
        self._waiting_since = time.monotonic()
        jax.block_until_ready(outputs)
        self._waiting_since = None
        self.request.steps_done = steps_done

    def _watch_steps(self) -> None:
        """Ends this process if a step waits on a peer that shows no sign of life."""
        while True:
            time.sleep(1.0)
            since = self._waiting_since
            lost = self._peers.lost(self._timeout) if since is not None else []
            if lost and self._waiting_since is not None:
                errors.fail(
                    f"process {jax.process_index()} waited for step "
                    f"{self.request.steps_done + 1} to finish, which needs every process of "
                    f"{self._processes}: process {', '.join(map(str, lost))} showed no sign "
                    f"of life for {self._timeout:g} s (it hangs, died or lost its host). This "
                    f"process stops too; {self.request.last_checkpoint()}. To resume, run the "
                    "same command on every host again.",
                    PeerLostError.exit_status,
                    at_once=True,
                )

    def _wait_for(self, key: str, peer: int) -> str:
        while True:
            try:
                return self._client.blocking_key_value_get(key, _WAIT_SLICE_MS)
            except jax.errors.JaxRuntimeError as error:
                if not str(error).startswith("DEADLINE_EXCEEDED"):
                    raise PeerLostError(self._lost_message(peer, str(error))) from error
            if peer in self._peers.lost(self._timeout):
                raise PeerLostError(
                    self._lost_message(peer, f"no sign of life for {self._timeout:g} s")
                )

    def _lost_message(self, peer: int, reason: str) -> str:
        return (
            f"process {jax.process_index()} waited for process {peer} of "
            f"{self._processes} to agree whether to stop after step "
            f"{self.request.steps_done} ({reason.splitlines()[0][:200]}): that process "
            f"died, hangs, or lost its host. This process stops too; "
            f"{self.request.last_checkpoint()}. To resume, run the same command on "
            "every host again."
        )


# What JAX's collectives say when a peer process is gone (gloo on CPUs, NCCL on GPUs).
_COLLECTIVE_FAILURES = ("Gloo", "NCCL", "by peer", "heartbeat")


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is a failed collective.

    JAX raises its runtime error (or, through orbax's save threads, a
    ``ValueError`` with the same text) in the processes that are left when a
    collective's peer is gone.
    """
    while error is not None:
        if isinstance(error, jax.errors.JaxRuntimeError) or any(
            word in str(error) for word in _COLLECTIVE_FAILURES
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def peer_lost(error: Exception, request: StopRequest) -> PeerLostError:
    """A `PeerLostError` for a collective that failed under a multi-process run.

    Args:
      error: what JAX raised (e.g. ``Gloo all-reduce failed: ... Connection
        closed by peer``).
      request: the run's `StopRequest`, for the step and the last checkpoint.
    """
    while error.__cause__ is not None:  # the collective's own error, not a wrapper's
        error = error.__cause__
    return PeerLostError(
        f"a step with the other processes failed after step {request.steps_done} "
        f"({errors.one_line(error)}): another process of the run died or "
        f"lost its host. This process stops too; {request.last_checkpoint()}. To resume, "
        "run the same command on every host again."
    )
