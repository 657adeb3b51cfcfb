"""The workdir's file system (issue 18): unwritable, full, shared or damaged.

A user without root is simulated by running the command as user 65534
(``nobody``) with ``setpriv`` when the tests run as root (root ignores
permissions), or as the test's own user otherwise; the permissions are set
with chmod, so the same test works both ways.
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from configs import default
from mlres_jax import checkpoint, grow, train, workdir
from tests import fake_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_USER = 65534  # nobody

# 64 fake training images, batch 8: one cycle of 8 steps, checkpoints every 3
# steps and at the end (3, 6, 8), two kept.
OVERRIDES = {
    "dataset": "fashion_mnist", "width": 2, "stage_sizes": (2,), "multilevel": False,
    "batch_size": 8, "num_epochs": 1.0, "cycle_boundaries": (), "eval_batch_size": 16,
    "log_every_steps": 2, "progress_bar": False, "checkpoint_every_steps": 3,
    "checkpoints_to_keep": 2,
}


def _config(data_dir, **changes):
    config = default.get_config()
    config.update(dict(OVERRIDES, fashion_mnist_dir=data_dir, **changes))
    return config


@pytest.fixture(scope="module")
def shared_dir():
    """A folder every user can enter (pytest's own is private to its user)."""
    folder = tempfile.mkdtemp(prefix="mlres_jax_filesystem_")
    os.chmod(folder, 0o755)
    os.makedirs(os.path.join(folder, "home"), mode=0o777)
    os.chmod(os.path.join(folder, "home"), 0o777)  # the other user's home
    yield folder
    _make_writable(folder)
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def data_dir(shared_dir):
    folder = fake_data.write_fashion_mnist(os.path.join(shared_dir, "fmnist"))
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)
    os.chmod(folder, 0o755)
    return folder


@pytest.fixture(scope="module")
def stopped_run(data_dir, tmp_path_factory):
    """A run stopped after step 6: checkpoints 3 and 6, events, no summary."""
    folder = str(tmp_path_factory.mktemp("stopped"))
    train.train_and_evaluate(_config(data_dir, checkpoints_to_keep=3), folder)
    shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(folder), "8"))
    os.remove(os.path.join(folder, train.SUMMARY_FILE))
    return folder


def _make_writable(folder):
    for root, subs, names in os.walk(folder):
        for name in subs + names:
            path = os.path.join(root, name)
            os.chmod(path, os.stat(path).st_mode | stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)
    os.chmod(folder, 0o777)


def _copy_for_other_user(source, destination):
    """A copy of a run that the other user can read and write everywhere."""
    shutil.copytree(source, destination)
    _make_writable(destination)
    return destination


def _as_other_user():
    """The command prefix that runs a command as a user without root's rights."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return ["setpriv", f"--reuid={OTHER_USER}", f"--regid={OTHER_USER}", "--clear-groups"]


def _run_main(data_dir, folder, prefix=(), **changes):
    """Runs the training command; returns (exit status, stdout + stderr)."""
    overrides = dict(OVERRIDES, fashion_mnist_dir=data_dir, **changes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    home = os.path.join(os.path.dirname(folder), "home")
    env.update(JAX_DISABLE_MOST_OPTIMIZATIONS="1", HOME=home,
               MPLCONFIGDIR=os.path.join(home, ".matplotlib"))
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "mlres_jax.main", "--config=configs/default.py",
         f"--workdir={folder}", *[f"--config.{k}={v}" for k, v in overrides.items()]],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    return result.returncode, result.stdout + result.stderr


def _one_line_error(output):
    """The command's last line, which must be its only error line, without a traceback."""
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: ") and output.count("error: ") == 1, output
    return last


# ---------------------------------------------------------------------------
# 1. Unwritable paths are found before any work.


@pytest.mark.parametrize("blocked", ["checkpoints", "summary.json"])
def test_a_path_the_run_writes_that_is_not_a_folder_or_file_is_refused_before_loading(
        data_dir, tmp_path, caplog, blocked):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    if blocked == "checkpoints":  # a file where the checkpoints' folder belongs
        (tmp_path / "run" / blocked).write_text("not a folder")
    else:  # a folder where the summary file belongs
        os.makedirs(os.path.join(folder, blocked))
    with caplog.at_level("INFO"), pytest.raises(
            OSError,  # workdir.WorkdirNotWritableError, a user error
            match=rf"^'{folder}/{blocked}' is not writable by this process"):
        train.train_and_evaluate(_config(data_dir), folder)
    assert "Loading" not in caplog.text


def test_unwritable_checkpoints_folder_is_refused_before_training(data_dir, shared_dir):
    # A run started as root and resumed as a user: the workdir is writable, its
    # checkpoints/ is not. Before: the whole cycle trained, then the first save failed.
    prefix = _as_other_user()
    folder = os.path.join(shared_dir, "checkpoints_read_only")
    os.makedirs(os.path.join(folder, "checkpoints"))
    os.chmod(folder, 0o777)
    os.chmod(os.path.join(folder, "checkpoints"), 0o555)
    status, output = _run_main(data_dir, folder, prefix)
    assert status == 2, output
    assert _one_line_error(output).startswith(
        f"error: '{folder}/checkpoints' is not writable by this process")
    assert "Loading" not in output and "epoch" not in output


@pytest.mark.parametrize("read_only", ["workdir", "old_checkpoint"])
def test_a_stopped_run_in_an_unwritable_folder_is_refused_before_loading(
        data_dir, shared_dir, stopped_run, read_only):
    # workdir: read-only, but its lock file is writable. Before: the data was
    # loaded and the checkpoint restored, then a raw "Permission denied" for a
    # new event file. old_checkpoint: orbax deletes checkpoint 3 at the next
    # save, but the user cannot empty its folder.
    prefix = _as_other_user()
    folder = _copy_for_other_user(stopped_run, os.path.join(shared_dir, f"stopped_{read_only}"))
    blocked = (folder if read_only == "workdir"
               else os.path.join(folder, "checkpoints", "3", "state"))
    os.chmod(blocked, 0o555)
    status, output = _run_main(data_dir, folder, prefix)
    assert status == 2, output
    assert _one_line_error(output).startswith(
        f"error: '{blocked}' is not writable by this process")
    assert "Loading" not in output and "Resumed" not in output


def test_grow_checks_its_output_before_reading(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # The source does not exist: reading it first would fail with "no checkpoints".
    with pytest.raises(OSError,  # workdir.WorkdirNotWritableError
                       match=rf"^'{blocker}/grown' is not writable by this process"):
        grow.grow(str(tmp_path / "no_run"), str(blocker / "grown"))
