"""One writer per workdir (`mlres_jax.workdir`), and a dead holder does not block."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import default
from mlres_jax import train, workdir
from tests import fake_data

HOLD_AND_WAIT = """
import sys, time
from mlres_jax import workdir
with workdir.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder_process(folder):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_WAIT, folder], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    folder = str(tmp_path / "run")
    holder = _holder_process(folder)
    try:
        with pytest.raises(
            workdir.WorkdirBusyError, match=rf"in use by process {holder.pid} on .*-c {folder}"
        ):
            with workdir.hold(folder):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_holder_killed_by_sigkill_does_not_block(tmp_path):
    folder = str(tmp_path / "run")
    holder = _holder_process(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdir.hold(folder):  # the kernel released the dead process's lock
        with open(os.path.join(folder, workdir.LOCK_FILE)) as handle:
            assert json.load(handle)["pid"] == os.getpid()


def test_stale_details_of_a_dead_holder_are_replaced(tmp_path):
    # As after a power loss: the file names a process that no longer holds a lock.
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / workdir.LOCK_FILE).write_text(
        json.dumps({"pid": 999999, "host": "gone", "started": "yesterday", "command": "old run"})
    )
    with workdir.hold(str(folder)):
        assert json.loads((folder / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_training_refuses_a_held_workdir_before_loading_data(tmp_path, caplog):
    data = fake_data.write_fashion_mnist(str(tmp_path / "data"))
    config = default.get_config()
    config.update(
        dataset="fashion_mnist",
        fashion_mnist_dir=data,
        width=2,
        batch_size=8,
        num_epochs=1.0,
        cycle_boundaries=(),
        progress_bar=False,
    )
    folder = str(tmp_path / "run")
    with workdir.hold(folder):  # this process holds it; a second hold is refused too
        start = time.perf_counter()
        with caplog.at_level("INFO"):
            with pytest.raises(workdir.WorkdirBusyError, match=rf"in use by process {os.getpid()}"):
                train.train_and_evaluate(config, folder)
    assert "Loading" not in caplog.text and time.perf_counter() - start < 10
    assert os.listdir(folder) == [workdir.LOCK_FILE]
