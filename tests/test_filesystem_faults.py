"""The workdir's file system (issue 18): unwritable, full, shared or damaged.

A user without root is simulated by running the command as user 65534
(``nobody``) with ``setpriv`` when the tests run as root (root ignores
permissions), or as the test's own user otherwise; the permissions are set
with chmod, so the same test works both ways. A full disk is simulated by
the free space ``shutil.disk_usage`` reports, a failing save by orbax's
``CheckpointManager.save`` raising ENOSPC, and the run writing a folder
while it is read by deleting its checkpoint during the read.
"""

import os
import shutil
import stat
import subprocess
import sys
import tempfile

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from mlres_jax import (
    analyze,
    checkpoint,
    datasets,
    errors,
    grow,
    input_pipeline,
    models,
    parallel,
    reporting,
    steps,
    train,
    workdir,
)
from tests import fake_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_USER = 65534  # nobody

# 64 fake training images, batch 8: one cycle of 8 steps, checkpoints every 3
# steps and at the end (3, 6, 8), two kept.
OVERRIDES = {
    "dataset": "fashion_mnist",
    "width": 2,
    "stage_sizes": (2,),
    "multilevel": False,
    "batch_size": 8,
    "num_epochs": 1.0,
    "cycle_boundaries": (),
    "eval_batch_size": 16,
    "log_every_steps": 2,
    "progress_bar": False,
    "checkpoint_every_steps": 3,
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
def finished_run(data_dir, tmp_path_factory):
    """A finished run: checkpoints 3, 6 and 8, events and its summary."""
    folder = str(tmp_path_factory.mktemp("finished"))
    summary = train.train_and_evaluate(_config(data_dir, checkpoints_to_keep=3), folder)
    return folder, summary


@pytest.fixture(scope="module")
def stopped_run(finished_run, tmp_path_factory):
    """A run stopped after step 6: checkpoints 3 and 6, events, no summary."""
    folder = shutil.copytree(finished_run[0], str(tmp_path_factory.mktemp("stopped") / "run"))
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
    env.update(
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        HOME=home,
        MPLCONFIGDIR=os.path.join(home, ".matplotlib"),
    )
    result = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "mlres_jax.main",
            "--config=configs/default.py",
            f"--workdir={folder}",
            *[f"--config.{k}={v}" for k, v in overrides.items()],
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
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
    data_dir, tmp_path, caplog, blocked
):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    if blocked == "checkpoints":  # a file where the checkpoints' folder belongs
        (tmp_path / "run" / blocked).write_text("not a folder")
    else:  # a folder where the summary file belongs
        os.makedirs(os.path.join(folder, blocked))
    with (
        caplog.at_level("INFO"),
        pytest.raises(
            OSError,  # workdir.WorkdirStorageError, a user error
            match=rf"^'{folder}/{blocked}' is not writable by this process",
        ),
    ):
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
        f"error: '{folder}/checkpoints' is not writable by this process"
    )
    assert "Loading" not in output and "epoch" not in output


@pytest.mark.parametrize("read_only", ["workdir", "old_checkpoint"])
def test_a_stopped_run_in_an_unwritable_folder_is_refused_before_loading(
    data_dir, shared_dir, stopped_run, read_only
):
    # workdir: read-only, but its lock file is writable. Before: the data was
    # loaded and the checkpoint restored, then a raw "Permission denied" for a
    # new event file. old_checkpoint: orbax deletes checkpoint 3 at the next
    # save, but the user cannot empty its folder.
    prefix = _as_other_user()
    folder = _copy_for_other_user(stopped_run, os.path.join(shared_dir, f"stopped_{read_only}"))
    blocked = (
        folder if read_only == "workdir" else os.path.join(folder, "checkpoints", "3", "state")
    )
    os.chmod(blocked, 0o555)
    status, output = _run_main(data_dir, folder, prefix)
    assert status == 2, output
    assert _one_line_error(output).startswith(f"error: '{blocked}' is not writable by this process")
    assert "Loading" not in output and "Resumed" not in output


def test_grow_checks_its_output_before_reading(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # The source does not exist: reading it first would fail with "no checkpoints".
    with pytest.raises(
        OSError,  # workdir.WorkdirStorageError
        match=rf"^'{blocker}/grown' is not writable by this process",
    ):
        grow.interpolate_checkpoint(str(tmp_path / "no_run"), str(blocker / "grown"))


# ---------------------------------------------------------------------------
# 2. A full disk: the estimate counts what orbax writes; leftovers; a failed save.


def _disk_with_free(monkeypatch, free_bytes):
    usage = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: usage(path)._replace(free=int(free_bytes))
    )


def _bytes_on_disk(folder):
    return sum(
        os.lstat(os.path.join(root, name)).st_blocks * 512
        for root, subs, names in os.walk(folder)
        for name in subs + names
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},  # 2 blocks, width 2
        {
            "width": 4,
            "stage_sizes": (2, 2, 2),
            "multilevel": True,
            "num_epochs": 3.0,
            "cycle_boundaries": (1.0, 2.0),
        },  # deepest 8-8-8, width 4
        {"width": 4, "stage_sizes": (2, 2, 2), "scan_blocks": True},
    ],
)
def test_the_estimate_of_a_checkpoint_covers_what_orbax_writes(data_dir, tmp_path, changes):
    # Issue 18: each checkpoint took about 0.8 MB, of which about 370 KB orbax
    # metadata the estimate did not count. Written here: the deepest network's
    # train state with incompressible values, and metadata with a full history.
    config = train.check_config(_config(data_dir, **changes))[0]
    growths = len(config.cycle_boundaries) if config.multilevel else 0
    deepest = tuple(n * 2**growths for n in config.stage_sizes)
    model = models.ResNet(
        deepest, width=config.width, num_classes=10, scan_blocks=config.scan_blocks
    )
    state = steps.create_train_state(
        jax.random.key(0), model, steps.create_optimizer(config, lambda step: 0.1), (28, 28, 1)
    )
    rng = np.random.default_rng(0)
    state = parallel.put_replicated(
        jax.tree.map(
            lambda x: (
                rng.integers(0, 2**32, x.shape, np.uint32).view(np.float32)
                if x.dtype == np.float32
                else x
            ),
            state,
        ),
        parallel.make_mesh(-1),
    )
    record = {
        "step": 8,
        "epoch": 1.0,
        "cycle": 1,
        "train_loss": 0.123456789,
        "train_error": 0.123456789,
        "test_loss": 0.123456789,
        "test_error": 0.123456789,
        "learning_rate": 0.123456789,
    }
    metadata = checkpoint.CheckpointMetadata(
        step=8,
        dataset="fashion_mnist",
        width=config.width,
        num_classes=10,
        image_shape=(28, 28, 1),
        stage_sizes=deepest,
        step_size=1.0,
        cycle=1,
        epoch=1.0,
        config=config.to_dict(),
        history=[record] * 4,
        scan_blocks=config.scan_blocks,
    )
    with checkpoint.Checkpointer(str(tmp_path)) as checkpointer:
        checkpointer.save(state, metadata)
    written = _bytes_on_disk(os.path.join(checkpoint.checkpoint_dir(str(tmp_path)), "8"))
    array_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    estimate = train._checkpoint_bytes(config)  # pylint: disable=protected-access
    assert written > 1.2 * array_bytes  # orbax's metadata is not negligible
    assert written <= estimate <= 2 * written + 2**17, (written, estimate)


def test_too_little_room_for_real_checkpoints_is_refused_before_loading(
    data_dir, stopped_run, tmp_path, monkeypatch, caplog
):
    # Room for three checkpoints of the arrays alone and the 1 MiB for events,
    # but not for three checkpoints as orbax writes them (two kept, one written).
    # Its train state is about 3 KB of arrays; the checkpoint about 120 KiB.
    real = _bytes_on_disk(os.path.join(checkpoint.checkpoint_dir(stopped_run), "6"))
    assert real > 2**16
    _disk_with_free(monkeypatch, 2**20 + 2 * real)
    with (
        caplog.at_level("INFO"),
        pytest.raises(
            OSError,
            match=r"has 1.\d MiB free, but the run needs about 1.\d MiB more: up "
            r"to 2 kept checkpoints .* and one being written",
        ),
    ):
        train.train_and_evaluate(_config(data_dir), str(tmp_path / "run"))
    assert "Loading" not in caplog.text


def _unfinished_save(folder, step, size):
    """The temporary folder a killed save leaves behind, holding ``size`` bytes."""
    path = os.path.join(checkpoint.checkpoint_dir(folder), f"{step}.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(path, "state"))
    with open(os.path.join(path, "state", "_sharding"), "wb") as handle:
        handle.write(os.urandom(size))
    return path


def test_an_unfinished_save_counts_as_free_and_is_removed_by_the_run(
    data_dir, stopped_run, tmp_path, monkeypatch
):
    # Issue 18: a failed save's temporary folder held the space, and resuming in
    # place was refused ("0.0 MiB free") without saying what to remove.
    folder = shutil.copytree(stopped_run, str(tmp_path / "run"))
    leftover = _unfinished_save(folder, 8, 4 * 2**20)
    _disk_with_free(monkeypatch, 2**19)
    summary = train.train_and_evaluate(_config(data_dir), folder)
    assert summary["totals"]["steps"] == 8
    assert not os.path.exists(leftover)
    assert checkpoint.list_steps(folder) == [6, 8]


def test_an_unfinished_save_is_named_when_the_room_is_still_too_small(
    data_dir, stopped_run, tmp_path, monkeypatch, caplog
):
    folder = shutil.copytree(stopped_run, str(tmp_path / "run"))
    leftover = _unfinished_save(folder, 8, 2**16)
    _disk_with_free(monkeypatch, 0)
    with (
        caplog.at_level("INFO"),
        pytest.raises(
            OSError,
            match=rf"has 0.1 MiB free, counting 0.1 MiB in the unfinished "
            rf"save\(s\) {leftover}, which the run removes",
        ),
    ):
        train.train_and_evaluate(_config(data_dir), folder)
    assert "Loading" not in caplog.text and os.path.exists(leftover)


def test_a_failed_save_removes_its_unfinished_folder_and_says_how_to_resume(
    data_dir, stopped_run, tmp_path, monkeypatch
):
    folder = shutil.copytree(stopped_run, str(tmp_path / "run"))

    def disk_full_half_way(self, step, *args, **kwargs):
        _unfinished_save(folder, step, 2**12)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_half_way)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=(
            r"^saving the checkpoint of step 8 in .* failed \(OSError: \[Errno 28\] No space "
            r"left on device\)\. The run stops here \(8\.orbax-checkpoint-tmp, the unfinished "
            r"save, was removed\); the newest complete checkpoint is step 6, from which it "
            r"resumes .* copy that folder to another disk .* kept: steps \[3, 6\]$"
        ),
    ):
        train.train_and_evaluate(_config(data_dir), folder)
    assert sorted(os.listdir(checkpoint.checkpoint_dir(folder))) == ["3", "6"]


# ---------------------------------------------------------------------------
# 3. A damaged summary is rebuilt from the checkpoint, or refused in one line.

DAMAGED_SUMMARIES = {
    "truncated": b'{"cycles": [1, 2,,',  # the issue's
    "empty": b"",
    "binary": b"\xff\xfe\x00\x81 not text",
    "a list": b"[]",
    "fields missing": b'{"config": {}, "cycles": [1, 2], "totals": {}, "history": []}',
    "records damaged": b'{"config": {"cycle_boundaries": []}, "dataset": {}, "cycles": [1], '
    b'"totals": {}, "history": []}',
}


@pytest.mark.parametrize("damage", list(DAMAGED_SUMMARIES))
def test_a_damaged_summary_of_a_finished_run_is_rebuilt_from_its_checkpoint(
    data_dir, finished_run, tmp_path, caplog, damage
):
    folder = shutil.copytree(finished_run[0], str(tmp_path / "run"))
    path = os.path.join(folder, train.SUMMARY_FILE)
    with open(path, "wb") as handle:
        handle.write(DAMAGED_SUMMARIES[damage])
    with caplog.at_level("WARNING"):
        summary = train.train_and_evaluate(_config(data_dir), folder)
    assert f"{path} " in caplog.text and "rewriting it from the last checkpoint" in caplog.text
    original = finished_run[1]
    assert summary["history"] == original["history"]
    assert [c["test_error"] for c in summary["cycles"]] == [
        c["test_error"] for c in original["cycles"]
    ]
    assert reporting.read_summary(path)["history"] == original["history"]  # valid again
    assert checkpoint.list_steps(folder) == [3, 6, 8]  # nothing trained again


@pytest.mark.parametrize("damage", ["binary", "a list", "fields missing"])
def test_analysis_of_a_damaged_summary_is_refused_in_one_line(finished_run, tmp_path, damage):
    folder = shutil.copytree(finished_run[0], str(tmp_path / "run"))
    path = os.path.join(folder, train.SUMMARY_FILE)
    with open(path, "wb") as handle:
        handle.write(DAMAGED_SUMMARIES[damage])
    with pytest.raises(errors.UserError, match=rf"^{path} (cannot be read|is not a run)"):
        analyze.run_curves([folder], analyze.Options(output_dir=str(tmp_path / "analysis")))


@pytest.mark.parametrize("damaged", ["meta/metadata", "state/_METADATA", "state/_sharding"])
def test_damaged_checkpoint_metadata_is_refused_in_one_line_or_rebuilt_from_the_one_before(
    data_dir, finished_run, tmp_path, damaged
):
    folder = shutil.copytree(finished_run[0], str(tmp_path / "run"))
    with open(os.path.join(folder, "checkpoints", "8", damaged), "w") as handle:
        handle.write('{"step": 8,,')
    os.remove(os.path.join(folder, train.SUMMARY_FILE))
    # A reader (analyze, grow, init_from) names the checkpoint, in one line.
    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf"^checkpoint of step 8 in {folder}/checkpoints is unreadable "
        r"\([^\n]*\)$",
    ):
        checkpoint.load_model(folder)
    # The run itself sets it aside and trains again from the one before.
    summary = train.train_and_evaluate(_config(data_dir), folder)
    assert summary["history"] == finished_run[1]["history"]
    assert os.listdir(os.path.join(folder, "unreadable_checkpoints")) == ["8"]


# ---------------------------------------------------------------------------
# 4. A checkpoint folder that another run is writing; no stray workdir.


def _latest_deleted_at_first_read(monkeypatch, folder):
    """The run writing ``folder`` saves step 9 and deletes step 6 as soon as a read starts."""
    restore = ocp.CheckpointManager.restore
    directory = checkpoint.checkpoint_dir(folder)

    def restore_while_the_writer_moves_on(self, *args, **kwargs):
        if os.path.isdir(os.path.join(directory, "6")):
            shutil.copytree(os.path.join(directory, "6"), os.path.join(directory, "9"))
            shutil.rmtree(os.path.join(directory, "6"))
        return restore(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore_while_the_writer_moves_on)


def test_a_checkpoint_deleted_while_it_is_read_is_read_whole(stopped_run, tmp_path, monkeypatch):
    # Issue 18: init_from a run saving every step and keeping one died in 2 of
    # 4 tries: "checkpoint of step 46 ... is unreadable" (the writer had deleted
    # it mid-read) with a TensorStore dump, or "Event loop is closed" tracebacks.
    _, expected, _ = checkpoint.load_model(stopped_run, step=6)
    folder = shutil.copytree(stopped_run, str(tmp_path / "writer"))
    _latest_deleted_at_first_read(monkeypatch, folder)
    _, variables, metadata = checkpoint.load_model(folder)
    assert metadata.step == 6 and not os.path.exists(os.path.join(folder, "checkpoints", "6"))
    chex.assert_trees_all_equal(variables, expected)


def test_init_from_a_folder_another_run_writes_starts_from_one_whole_checkpoint(
    data_dir, stopped_run, tmp_path, monkeypatch
):
    folder = shutil.copytree(stopped_run, str(tmp_path / "writer"))
    _latest_deleted_at_first_read(monkeypatch, folder)
    summary = train.train_and_evaluate(_config(data_dir, init_from=folder), str(tmp_path / "run"))
    assert summary["config"]["init_from"] == folder and summary["totals"]["steps"] == 8


def _copy_deletes_its_source(monkeypatch, times=1, newer=False):
    """The writer deletes the checkpoint being copied (after saving a newer one)."""
    copytree = shutil.copytree
    deletions = [times]

    def copy_while_deleted(source, destination, *args, **kwargs):
        name = os.path.basename(source)
        if (
            name.isdigit()
            and os.path.basename(os.path.dirname(source)) == "checkpoints"
            and deletions[0] > 0
        ):
            deletions[0] -= 1
            if newer:
                copytree(source, os.path.join(os.path.dirname(source), str(int(name) + 10)))
            shutil.rmtree(source)
        return copytree(source, destination, *args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copy_while_deleted)


def test_a_checkpoint_deleted_while_it_is_copied_gives_the_newest_left(
    stopped_run, tmp_path, monkeypatch
):
    folder = shutil.copytree(stopped_run, str(tmp_path / "writer"))
    _copy_deletes_its_source(monkeypatch)
    assert checkpoint.load_model(folder)[2].step == 3  # 6 went while it was copied
    folder = shutil.copytree(stopped_run, str(tmp_path / "writer_of_step"))
    _copy_deletes_its_source(monkeypatch)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"^no checkpoint of step 6 in .*; steps: \[3\]$"
    ):
        checkpoint.load_model(folder, step=6)


def test_checkpoints_deleted_faster_than_they_are_read_are_refused_in_one_line(
    stopped_run, tmp_path, monkeypatch
):
    folder = shutil.copytree(stopped_run, str(tmp_path / "writer"))
    _copy_deletes_its_source(monkeypatch, times=100, newer=True)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"^the checkpoints in .* were deleted while they were read, 5 "
        r"in turn: the run writing there replaces them faster",
    ):
        checkpoint.load_model(folder)


def test_an_unreadable_init_from_is_refused_before_the_workdir_is_made(
    data_dir, stopped_run, tmp_path
):
    # Issue 18: the failed start left a workdir holding a .lock and an events file.
    damaged = shutil.copytree(stopped_run, str(tmp_path / "damaged"))
    for step in ("3", "6"):
        with open(os.path.join(damaged, "checkpoints", step, "state", "_METADATA"), "w") as f:
            f.write("{")
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint of step 6 .* unreadable"):
        train.train_and_evaluate(_config(data_dir, init_from=damaged), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_a_run_that_fails_after_making_its_workdir_but_before_training_removes_it(
    data_dir, tmp_path, monkeypatch
):

    def damaged_data(*args, **kwargs):  # found only when loaded, after the headers
        raise datasets.DataSetDamagedError("Data set 'fashion_mnist' cannot be read")

    monkeypatch.setattr(datasets, "load", damaged_data)
    with pytest.raises(datasets.DataSetDamagedError):
        train.train_and_evaluate(_config(data_dir), str(tmp_path / "runs" / "run"))
    assert os.listdir(tmp_path / "runs") == []
    existing = tmp_path / "made_by_the_user"  # a folder the run did not make stays
    existing.mkdir()
    with pytest.raises(datasets.DataSetDamagedError):
        train.train_and_evaluate(_config(data_dir), str(existing))
    assert os.listdir(existing) == [workdir.LOCK_FILE]


def test_grow_from_a_folder_without_checkpoints_leaves_no_output(tmp_path):
    # grow holds (and checks) its output before reading its source.
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoints in"):
        grow.interpolate_checkpoint(str(tmp_path / "no_run"), str(tmp_path / "grown"))
    assert not os.path.exists(tmp_path / "grown")


def test_a_run_that_recorded_something_keeps_its_workdir(data_dir, tmp_path, monkeypatch):
    save = ocp.CheckpointManager.save

    def disk_full_from_step_6(self, step, *args, **kwargs):
        if step >= 6:
            raise OSError(28, "No space left on device")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_from_step_6)
    folder = str(tmp_path / "run")
    with pytest.raises(checkpoint.CheckpointError, match="newest complete checkpoint is step 3"):
        train.train_and_evaluate(_config(data_dir), folder)
    assert checkpoint.list_steps(folder) == [3]


# ---------------------------------------------------------------------------
# 5. Paths as users type them: the shell leaves "~" after "=" as it is.


def _command(module, *args, home, cwd):
    """Runs ``python -m module args`` with $HOME ``home`` in ``cwd``."""
    env = dict(os.environ, HOME=str(home), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def _home_and_cwd(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    return home, cwd


def test_grow_output_with_a_tilde_is_in_the_home_folder(stopped_run, tmp_path):
    # Issue 18: --output=~/grown made a folder named "~" in the current directory.
    home, cwd = _home_and_cwd(tmp_path)
    shutil.copytree(stopped_run, home / "run")
    result = _command("mlres_jax.grow", "--workdir=~/run", "--output=~/grown", home=home, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert checkpoint.list_steps(str(home / "grown")) == [6]
    assert os.listdir(cwd) == []


def test_training_paths_with_a_tilde_in_flags_overrides_and_config_files(data_dir, tmp_path):
    home, cwd = _home_and_cwd(tmp_path)
    shutil.copytree(data_dir, home / "fmnist")
    with open(os.path.join(REPO_ROOT, "configs", "default.py")) as handle:
        config_file = handle.read()
    (home / "my_config.py").write_text(
        config_file + "\n\n_default = get_config\n\n\ndef get_config():\n"
        "    config = _default()\n    config.fashion_mnist_dir = '~/fmnist'\n"
        "    return config\n"
    )
    (home / "run" / "summary.json").mkdir(parents=True)  # stops the run before loading
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    result = _command(
        "mlres_jax.main",
        "--config=~/my_config.py",
        "--workdir=~/run",
        *overrides,
        home=home,
        cwd=cwd,
    )
    assert _one_line_error(result.stderr).startswith(
        f"error: '{home}/run/summary.json' is not writable"
    ), result.stderr
    result = _command(
        "mlres_jax.main",
        "--config=~/my_config.py",
        "--workdir=~/run",
        "--config.init_from=~/no_run",
        *overrides,
        home=home,
        cwd=cwd,
    )
    assert _one_line_error(result.stderr).startswith(
        f"error: config.init_from = '{home}/no_run' is not allowed: there is no checkpoint "
        f"in {home}/no_run/checkpoints"
    ), result.stderr
    assert os.listdir(cwd) == []


def test_analysis_paths_with_a_tilde(finished_run, tmp_path):
    home, cwd = _home_and_cwd(tmp_path)
    shutil.copytree(finished_run[0], home / "run")
    result = _command(
        "mlres_jax.analyze",
        "curves",
        "--workdir=~/run",
        "--output_dir=~/analysis",
        home=home,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(home / "analysis")) == ["training_curves.csv", "training_curves.png"]
    assert os.listdir(cwd) == []


def test_a_home_folder_that_is_not_known_is_refused_in_one_line(tmp_path):
    home, cwd = _home_and_cwd(tmp_path)
    result = _command(
        "mlres_jax.grow", "--workdir=~/run", "--output=~no_such_user_here/grown", home=home, cwd=cwd
    )
    assert result.returncode == 2
    assert _one_line_error(result.stderr) == (
        "error: --output=~no_such_user_here/grown: '~no_such_user_here' is not a home folder "
        "on this machine (no such user, or $HOME unset); give the path without '~'"
    )
    assert os.listdir(cwd) == []


# ---------------------------------------------------------------------------
# 6. An evaluation batch larger than the split is fitted to it.


@pytest.mark.parametrize(
    "batch_size,num_examples,multiple,expected",
    [
        (100_000, 500, 1, 500),  # the issue's: one batch of the whole split
        (100_000, 500, 8, 504),  # 8 devices: 63 images each
        (256, 500, 8, 256),  # smaller than the split: as asked
        (500, 500, 4, 500),
        (16, 20, 1, 16),
    ],
)
def test_the_fitted_eval_batch(batch_size, num_examples, multiple, expected):
    assert input_pipeline.fitted_eval_batch_size(batch_size, num_examples, multiple) == expected


@pytest.mark.parametrize("eval_batch_size,expected", [(100_000, 20), (24, 20), (16, 16)])
def test_a_run_evaluates_in_batches_no_larger_than_its_test_split(
    data_dir, tmp_path, monkeypatch, eval_batch_size, expected
):
    # Issue 18: --config.eval_batch_size=100000 on a 500-image test split padded
    # every evaluation to 100,000 images. The fake split has 20 images.
    batches = input_pipeline.eval_batches
    sizes = []

    def recorded(images, labels, batch_size):
        sizes.append((len(images), batch_size))
        return batches(images, labels, batch_size)

    monkeypatch.setattr(input_pipeline, "eval_batches", recorded)
    summary = train.train_and_evaluate(
        _config(data_dir, eval_batch_size=eval_batch_size, num_epochs=0.5), str(tmp_path / "run")
    )
    assert sizes == [(20, expected)]  # the one evaluation, at the end
    assert summary["config"]["eval_batch_size"] == expected


def test_analyses_evaluate_in_batches_no_larger_than_their_images(finished_run):
    loaded = analyze._Loader(  # pylint: disable=protected-access
        analyze.Options(output_dir="unused", batch_size=100_000)
    ).load(finished_run[0], 8)
    assert len(loaded.images) == 20 and loaded.batch_size == 20
    loaded = analyze._Loader(  # pylint: disable=protected-access
        analyze.Options(output_dir="unused", batch_size=100_000, num_examples=7)
    ).load(finished_run[0], 8)
    assert loaded.batch_size == 7
