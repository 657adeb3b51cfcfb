"""Stops (`mlres_jax.stopping`): one step for all processes, prompt, final; a lost peer.

Every run here is a real training process (``python -m mlres_jax.main``), as
in `tests.test_parallel`: two processes joined by ``jax.distributed`` over
localhost (gloo), or one. Signals are sent as a scheduler or a person sends
them, at moments read off the run's own output.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import chex
import pytest

from mlres_jax import checkpoint
from tests import fake_data
from tests.test_parallel import (
    LOSS_TOLERANCE,
    _free_port,
    assert_same_final_checkpoint,
    main_command,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One stage of 2 blocks, width 2, 8 steps per epoch, 12 epochs: 96 steps of a
# few milliseconds, long enough to be signalled mid-run; an evaluation line
# after every epoch tells the test where the run is.
OVERRIDES = {
    "width": 2,
    "stage_sizes": (2,),
    "multilevel": False,
    "batch_size": 8,
    "eval_batch_size": 16,
    "num_epochs": 12.0,
    "cycle_boundaries": (),
    "learning_rate_max": 0.01,
    "log_every_steps": 10_000,
    "checkpoint_every_steps": 40,
    "checkpoints_to_keep": 3,
    "progress_bar": False,
}
END_STEP = 96
# A stop that never comes would hang: every wait here is bounded.
STOP_SECONDS = 60
HEARTBEAT_SECONDS = 21  # a peer without a sign of life for 7 s is lost


class Run:
    """A training process whose output lines are collected as they come."""

    def __init__(self, command, *, devices=1):
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        )
        self.process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self):
        return "\n".join(self.lines)

    def wait_for_line(self, pattern, timeout=240):
        """Returns the first output line matching ``pattern``, as soon as it is printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            assert self.process.poll() is None or self._reader.is_alive(), self.output
            time.sleep(0.005)
        raise AssertionError(f"no line matching {pattern!r}:\n{self.output}")

    def finish(self, timeout):
        """Waits for the exit (at most ``timeout`` s); returns ``(status, seconds waited)``."""
        start = time.monotonic()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"no exit within {timeout} s:\n{self.output}") from None
        self._reader.join(timeout=10)
        return self.process.returncode, time.monotonic() - start


def _command(data_dir, workdir, **changes):
    return main_command(data_dir, workdir, OVERRIDES, **changes)


def _two_processes(data_dir, workdir, **changes):
    port = _free_port()
    return [
        Run(
            [
                *_command(data_dir, workdir, **changes),
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                f"--heartbeat_timeout_seconds={HEARTBEAT_SECONDS}",
            ]
        )
        for i in (0, 1)
    ]


def _stopped_at(run, signals=r"SIGTERM"):
    """The step of the stop message, which must be the run's last line.

    Args:
      signals: a pattern for what the message says stopped the run.
    """
    last = run.lines[-1]
    match = re.fullmatch(
        rf"error: stopped by {signals} at step (?P<step>\d+) \(epoch [\d.]+\); "
        r"the checkpoint of step (?P<saved>\d+) \(cycle 1, 2 blocks\) is in .*\. To resume, "
        r"run the same command again\.",
        last,
    )
    assert match, run.output
    assert match["step"] == match["saved"]
    return int(match["step"]), last


def _received_after(run, signal_name="SIGTERM"):
    line = run.wait_for_line(rf"{signal_name} received after step \d+", timeout=5)
    return int(re.search(r"after step (\d+)", line).group(1))


def _assert_ends_like(workdir, reference):
    metadata, ref_metadata = assert_same_final_checkpoint(workdir, reference, END_STEP)
    losses = [r["test_loss"] for r in metadata.history]
    ref_losses = [r["test_loss"] for r in ref_metadata.history]
    chex.assert_trees_all_close(losses, ref_losses, atol=LOSS_TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fake_data.write_fashion_mnist(str(tmp_path_factory.mktemp("stops_data")))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run, one process."""
    workdir = tmp_path_factory.mktemp("stops_reference")
    run = Run(_command(data_dir, workdir))
    status, _ = run.finish(timeout=300)
    assert status == 0, run.output
    return workdir


def _resume_both(data_dir, workdir, reference):
    runs = _two_processes(data_dir, workdir)
    for run in runs:
        status, _ = run.finish(timeout=300)
        assert status == 0, run.output
    assert re.search(r"Resumed from the checkpoint of step \d+", runs[0].output)
    _assert_ends_like(workdir, reference)


@pytest.mark.parametrize(
    "signalled",
    [
        ((0, signal.SIGTERM),),  # a SIGTERM that reaches one host only
        ((1, signal.SIGTERM), (0, signal.SIGINT)),  # each host, at different moments
    ],
)
def test_a_signal_to_some_processes_stops_all_at_one_step_and_resumes(
    data_dir, reference, tmp_path, signalled
):
    runs = _two_processes(data_dir, tmp_path)
    runs[0].wait_for_line(r"epoch 2\.00")
    for number, (process_id, signal_number) in enumerate(signalled):
        if number:
            time.sleep(0.05)
        runs[process_id].process.send_signal(signal_number)
    results = [run.finish(timeout=STOP_SECONDS) for run in runs]
    named_signals = r"SIG[A-Z]+ \(received by process [\d, ]+\)(?: and SIG[A-Z]+ \(.*\))?"
    (step0, message0), (step1, message1) = (_stopped_at(run, named_signals) for run in runs)
    # The same step, status and message on both; the step is a complete checkpoint.
    assert step0 == step1 and message0 == message1
    assert results[0][0] == results[1][0], [r.output for r in runs]
    # Each signal is named with the process(es) that received it; the first
    # one sent is always among them, and the status is that of the smallest.
    named = {
        getattr(signal, name): processes.split(", ")
        for name, processes in re.findall(
            r"(SIG[A-Z]+) \(received by process ([\d, ]+)\)", message0
        )
    }
    first_process, first_signal = signalled[0]
    assert str(first_process) in named[first_signal], message0
    assert results[0][0] == 128 + min(named)
    assert 16 <= step0 < END_STEP
    assert max(checkpoint.list_steps(str(tmp_path))) == step0
    _, variables, metadata = checkpoint.load_model(str(tmp_path))
    assert metadata.step == step0
    chex.assert_tree_all_finite(variables)
    for run in runs:
        assert "Traceback" not in run.output and "Check failure" not in run.output
    _resume_both(data_dir, tmp_path, reference)


@pytest.mark.parametrize("peer_fault", [signal.SIGKILL, signal.SIGSTOP])  # died, hangs
def test_a_lost_peer_ends_the_other_process_which_says_so_and_the_run_resumes(
    data_dir, reference, tmp_path, peer_fault
):
    runs = _two_processes(data_dir, tmp_path)
    try:
        runs[0].wait_for_line(r"epoch 6\.00")  # after the checkpoint of step 40
        runs[1].process.send_signal(peer_fault)
        status, seconds = runs[0].finish(timeout=HEARTBEAT_SECONDS + STOP_SECONDS)
    finally:
        runs[1].process.kill()
    assert status == 2, runs[0].output
    # Documented bound: the heartbeat timeout (here 21 s); this run's own
    # detection comes after a third of it (7 s), plus reading the signs.
    assert seconds < HEARTBEAT_SECONDS, (seconds, runs[0].output)
    last = runs[0].lines[-1]
    assert re.fullmatch(
        r"error: (a step with the other processes failed after step \d+ \(.*\): another "
        r"process of the run died or lost its host|process 0 waited for process 1 of 2 to agree "
        r"whether to stop after step \d+ \(.*\): that process died, hangs, or lost its host"
        r"|process 0 waited for step \d+ to finish, which needs every process of 2: process 1 "
        r"showed no sign of life for 7 s \(it hangs, died or lost its host\))\. This process "
        r"stops too; the last complete "
        r"checkpoint is step (40|80) in .*checkpoints\. To resume, run the same command on "
        r"every host again\.",
        last,
    ), runs[0].output
    assert "Check failure" not in runs[0].output
    if peer_fault == signal.SIGKILL:
        _resume_both(data_dir, tmp_path, reference)


def test_a_single_process_stop_lands_within_two_steps_of_the_signal(data_dir, tmp_path):
    # log_every_steps = 10,000: the loop never waits for metrics; yet the
    # host stays at most one step ahead of the device.
    run = Run(_command(data_dir, tmp_path))
    run.wait_for_line(r"epoch 2\.00")
    run.process.send_signal(signal.SIGTERM)
    status, _ = run.finish(timeout=STOP_SECONDS)
    assert status == 143, run.output
    stopped, _ = _stopped_at(run)
    received = _received_after(run)
    assert 16 <= received <= stopped <= received + 2, run.output


def test_a_second_sigterm_ends_a_stopping_process_at_once_while_it_waits_for_a_compilation(
    data_dir, tmp_path
):
    # 2 -> 4 blocks at epoch 2: the 4-block steps compile ahead while cycle 1
    # trains. Slow the compilation down (a sleep in the compile thread), stop
    # at the boundary where the run waits for it, and signal again.
    command = _command(data_dir, tmp_path, multilevel=True, cycle_boundaries=(2.0,))
    run = Run([sys.executable, "-c", SLOW_AHEAD_COMPILE, *command[3:]])
    run.wait_for_line(r"epoch 2\.00")
    run.process.send_signal(signal.SIGTERM)
    run.wait_for_line(r"Waiting for the ahead compilation", timeout=STOP_SECONDS)
    run.process.send_signal(signal.SIGTERM)
    status, seconds = run.finish(timeout=10)
    assert status == 143, run.output
    assert seconds < 5, seconds  # the compile thread sleeps 120 s
    last = run.lines[-1]
    assert re.fullmatch(
        r"error: stopped at once by a second SIGTERM, without a new checkpoint; "
        r"the last complete checkpoint is step 16 in .*checkpoints\. To resume, "
        r"run the same command again\.",
        last,
    ), run.output
    assert "Fatal Python error" not in run.output and "terminate called" not in run.output
    assert checkpoint.list_steps(str(tmp_path))[-1] == 16


# `python -m mlres_jax.main` with a compile-ahead thread that sleeps first.
SLOW_AHEAD_COMPILE = """
import sys, time
sys.argv[0] = "mlres_jax.main"
from mlres_jax import cli, main, steps
compile_now = steps.StepCompiler._compile
def slow_compile(self, cycle, state):
    if cycle.index > 0:
        time.sleep(120)
    return compile_now(self, cycle, state)
steps.StepCompiler._compile = slow_compile
cli.run_command(main.main, main.define_flags)
"""


def test_a_second_ctrl_c_ends_the_process_at_once_naming_the_last_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in ("3", "8", "12.orbax-checkpoint-tmp-1"):
        (folder / step).mkdir(parents=True)
    script = (
        "import os, signal, time\n"
        "from mlres_jax import stopping\n"
        f"with stopping.StopRequest({str(folder)!r}) as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert stop.signal_number == signal.SIGINT\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, text=True, capture_output=True, timeout=60
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: stopped at once by a second SIGINT, without a new checkpoint; the last "
        f"complete checkpoint is step 8 in {folder}. To resume, run the same command again."
    )


def test_handlers_before_the_stop_request_are_restored():
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    from mlres_jax import stopping

    with stopping.StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle  # pylint: disable=protected-access
    assert {number: signal.getsignal(number) for number in before} == before


# Two processes join; process 1 freezes (SIGSTOP, as a frozen host) before the
# agreement, process 0 asks whether to stop.
SILENT_PEER = """
import os, signal, sys, time
from mlres_jax import parallel, stopping
port, process_id = sys.argv[1], int(sys.argv[2])
parallel.initialize(f"localhost:{port}", 2, process_id, heartbeat_timeout_seconds=10)
if process_id == 1:
    time.sleep(1.5)  # a sign of life or two first
    os.kill(os.getpid(), signal.SIGSTOP)
start = time.monotonic()
try:
    stopping.StopAgreement(stopping.StopRequest()).should_stop()
except stopping.PeerLostError as error:
    print(f"{time.monotonic() - start:.1f}", error, flush=True)
os._exit(0)  # not JAX's shutdown barrier, which would wait for process 1
"""


def test_an_agreement_that_a_peer_never_answers_ends_naming_it():
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SILENT_PEER, str(port), str(i)],
            cwd=REPO_ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for i in (0, 1)
    ]
    try:
        output = processes[0].communicate(timeout=60)[0]
    finally:
        for process in processes:
            process.kill()
    seconds, message = output.strip().splitlines()[-1].split(" ", 1)
    # No sign of life from the peer for a third of the heartbeat timeout of
    # 10 s (its signs are read once a second), then the one-line error: before
    # JAX's own end of the process at 10 s.
    assert 3.0 <= float(seconds) < 9.0, output
    assert message == (
        "process 0 waited for process 1 of 2 to agree whether to stop after step 0 (no "
        "sign of life for 3 s): that process died, hangs, or lost its host. This process "
        "stops too; no checkpoint was written yet. To resume, run the same command on "
        "every host again."
    ), output
