"""Checkpoints, resuming after SIGKILL, and the faults of issue 3."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import optax
import orbax.checkpoint as ocp
import pytest

from configs import default
from mlres_jax import checkpoint, models, multilevel, steps, stopwatch, train
from tests import fake_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_FIELDS = {*stopwatch.ACTIVITIES, "wall_seconds"}

# 64 fake training images, batch 8: 8 steps per epoch; cycles of 1 epoch each.
OVERRIDES = {
    "dataset": "fashion_mnist", "width": 2, "stage_sizes": (2, 2, 2),
    "multilevel": True, "batch_size": 8, "num_epochs": 3.0,
    "cycle_boundaries": (1.0, 2.0), "eval_batch_size": 16,
    "log_every_steps": 2, "progress_bar": False, "checkpoint_every_steps": 3,
    "checkpoints_to_keep": 20,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fake_data.write_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


def _config(data_dir, **changes):
    config = default.get_config()
    config.update(dict(OVERRIDES, fashion_mnist_dir=data_dir, **changes))
    return config


def _without_timing(tree):
    if isinstance(tree, dict):
        return {k: _without_timing(v) for k, v in tree.items() if k not in TIMING_FIELDS}
    if isinstance(tree, list):
        return [_without_timing(v) for v in tree]
    return tree


def _final(workdir):
    _, variables, metadata = checkpoint.load_model(workdir)
    with open(os.path.join(workdir, "summary.json")) as handle:
        summary = json.load(handle)
    return jax.device_get(variables), metadata, summary


def _assert_same_run(workdir, reference):
    variables, metadata, summary = _final(workdir)
    ref_variables, ref_metadata, ref_summary = reference
    chex.assert_trees_all_equal(variables, ref_variables)  # bitwise
    assert metadata.step == ref_metadata.step == 24
    assert _without_timing(summary["history"]) == _without_timing(ref_summary["history"])
    assert _without_timing(summary["cycles"]) == _without_timing(ref_summary["cycles"])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    train.train_and_evaluate(_config(data_dir), workdir)
    return _final(workdir)


def test_checkpoints_hold_depth_metadata(data_dir, reference, tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(_config(data_dir, checkpoint_every_steps=100), workdir)
    checkpointer = checkpoint.Checkpointer(workdir, create=False)
    # Only the cycle ends: steps 8, 16, 24 at 2-2-2, 4-4-4, 8-8-8.
    assert checkpointer.all_steps() == [8, 16, 24]
    metadata = [checkpointer.read_metadata(s) for s in (8, 16, 24)]
    assert [m.stage_sizes for m in metadata] == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert [m.step_size for m in metadata] == [1.0, 0.5, 0.25]
    assert [m.cycle for m in metadata] == [1, 2, 3]
    model, variables, _ = checkpoint.load_model(workdir, step=16)
    assert model.stage_sizes == (4, 4, 4) and model.step_size == 0.5
    chex.assert_trees_all_equal_shapes(variables, models.init_variables(
        model, jax.random.PRNGKey(0), (28, 28, 1)))


def test_metadata_round_trip_and_other_formats_refused():
    metadata = checkpoint.CheckpointMetadata(
        step=5, dataset="cifar10", width=16, num_classes=10, image_shape=(32, 32, 3),
        stage_sizes=(2, 2, 2), step_size=1.0, cycle=1, epoch=0.1, config={"seed": 0})
    data = json.loads(json.dumps(metadata.to_json()))  # as orbax stores it
    assert data["format"] == checkpoint.METADATA_FORMAT
    assert checkpoint.CheckpointMetadata.from_json(data) == metadata
    assert metadata.model() == models.ResNet((2, 2, 2), width=16, num_classes=10)
    with pytest.raises(checkpoint.CheckpointError, match="metadata format 1"):
        checkpoint.CheckpointMetadata.from_json(dict(data, format=1), "in /x/5")
    incomplete = {k: v for k, v in data.items() if k not in ("width", "cycle")}
    with pytest.raises(checkpoint.CheckpointError, match=r"lacks \['cycle', 'width'\]"):
        checkpoint.CheckpointMetadata.from_json(incomplete)


def _launch(data_dir, workdir):
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mlres_jax.main", "--config=configs/default.py",
         f"--workdir={workdir}", f"--config.fashion_mnist_dir={data_dir}", *args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def _kill_when_checkpoint(process, workdir, step, timeout=240):
    """SIGKILLs ``process`` as soon as the checkpoint of ``step`` is complete.

    Returns:
      The process's output.
    """
    path = os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0]
    assert process.returncode == -signal.SIGKILL
    return output


def _resumed_at(output):
    match = re.search(r"Resumed from the checkpoint of step (\d+): cycle (\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def test_sigkill_in_cycle1_at_boundary_and_in_last_cycle_then_resume(
        data_dir, reference, tmp_path):
    workdir = str(tmp_path)
    # Checkpoints every 3 steps and at the cycle ends 8 and 16: 3, 6, 8, 9, 12,
    # 15, 16, 18, 21, 24. Kill in cycle 1 (after step 3), at the 2-2-2 -> 4-4-4
    # boundary (the cycle-end checkpoint of step 8, before the interpolation's
    # compile and step 9), and in cycle 3 (after step 21).
    resumed = []
    for kill_step in (3, 8, 21):
        output = _kill_when_checkpoint(_launch(data_dir, workdir), workdir, kill_step)
        resumed.append(_resumed_at(output))
    process = _launch(data_dir, workdir)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output
    resumed.append(_resumed_at(output))
    assert resumed[0] is None  # the first launch starts fresh
    assert resumed[1][1] == 1 and 3 <= resumed[1][0] < 8  # inside cycle 1
    assert resumed[2] == (8, 1)  # the boundary: 2-2-2 state, then interpolation
    assert resumed[3][1] == 3 and resumed[3][0] >= 21
    _assert_same_run(workdir, reference)


def _drop_checkpoints_after(workdir, step):
    for folder in glob.glob(os.path.join(workdir, "checkpoints", "*")):
        if int(os.path.basename(folder)) > step:
            shutil.rmtree(folder)


def test_resume_exactly_at_interpolation_boundary(data_dir, reference, tmp_path):
    workdir = str(tmp_path)
    config = _config(data_dir)
    train.train_and_evaluate(config, workdir)
    # Keep only what existed when cycle 1 had just ended, before interpolation.
    _drop_checkpoints_after(workdir, 8)
    os.remove(os.path.join(workdir, "summary.json"))
    train.train_and_evaluate(config, workdir)
    _assert_same_run(workdir, reference)


# --- Faults ------------------------------------------------------------------


def _truncate_largest_file(folder):
    files = [os.path.join(root, name) for root, _, names in os.walk(folder)
             for name in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as handle:
        handle.truncate(os.path.getsize(largest) // 2)
    return largest


def test_truncated_latest_checkpoint_falls_back_to_previous(
        data_dir, reference, tmp_path, caplog):
    workdir = str(tmp_path)
    config = _config(data_dir)
    train.train_and_evaluate(config, workdir)
    # As if killed during the save of step 18 after a crash at step 19:
    # drop the later checkpoints and damage step 18's state.
    _drop_checkpoints_after(workdir, 18)
    _truncate_largest_file(os.path.join(workdir, "checkpoints", "18", "state"))
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(config, workdir)
    assert "checkpoint of step 18 is unreadable" in caplog.text
    assert "Restored the checkpoint of step 16 instead" in caplog.text
    # The damaged checkpoint is set aside, not deleted.
    assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", "18"))
    _assert_same_run(workdir, reference)


def test_resume_with_different_model_is_refused(data_dir, reference, tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(_config(data_dir, num_epochs=1.0, cycle_boundaries=()),
                             workdir)
    steps_before = checkpoint.Checkpointer(workdir, create=False).all_steps()
    with pytest.raises(checkpoint.ConfigMismatchError,
                       match=r"learning_rate_max: checkpoint 0.5, now 0.3; "
                             r"width: checkpoint 2, now 4"):
        train.train_and_evaluate(
            _config(data_dir, num_epochs=1.0, cycle_boundaries=(), width=4,
                    learning_rate_max=0.3), workdir)
    # Safe fields (logging, evaluation batch) may change. The run is complete:
    # nothing is trained again and summary.json, wall time included, is kept.
    with open(os.path.join(workdir, "summary.json")) as handle:
        summary_before = json.load(handle)
    summary = train.train_and_evaluate(
        _config(data_dir, num_epochs=1.0, cycle_boundaries=(), log_every_steps=1,
                eval_batch_size=7), workdir)
    assert summary == summary_before
    assert checkpoint.Checkpointer(workdir, create=False).all_steps() == steps_before


def test_nonfinite_update_stops_and_keeps_last_good_checkpoint(
        data_dir, tmp_path, monkeypatch):
    poison_at = 7  # 0-based step whose update becomes NaN
    create_optimizer = steps.create_optimizer

    def poisoned(config, schedule):
        def update(updates, state, params=None):
            factor = jax.numpy.where(state >= poison_at, jax.numpy.nan, 1.0)
            return jax.tree_util.tree_map(lambda u: u * factor, updates), state + 1
        poison = optax.GradientTransformation(
            lambda params: jax.numpy.zeros((), jax.numpy.int32), update)
        return optax.chain(create_optimizer(config, schedule), poison)

    monkeypatch.setattr(steps, "create_optimizer", poisoned)
    workdir = str(tmp_path)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"non-finite loss or gradient at step 7 \(cycle 1, "
                             r"epoch 0.88\).*last good checkpoint, step 6"):
        train.train_and_evaluate(_config(data_dir), workdir)
    assert checkpoint.Checkpointer(workdir, create=False).all_steps() == [3, 6]
    _, variables, metadata = checkpoint.load_model(workdir)
    assert metadata.step == 6
    chex.assert_tree_all_finite(variables)


def test_unwritable_workdir_fails_before_training(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    result = subprocess.run(
        [sys.executable, "-m", "mlres_jax.main", "--config=configs/default.py",
         f"--workdir={blocker / 'run'}", f"--config.fashion_mnist_dir={data_dir}",
         *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "is not writable" in result.stderr
    assert "Traceback" not in result.stderr and "Loading" not in result.stderr


def test_failing_save_keeps_earlier_checkpoints(data_dir, tmp_path, monkeypatch):
    original_save = ocp.CheckpointManager.save

    def disk_full_from_step_9(self, step, *args, **kwargs):
        if step >= 9:
            raise OSError(28, "No space left on device")
        return original_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_from_step_9)
    workdir = str(tmp_path)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"step 9.*No space left on device.*kept: steps \[3, 6, 8\]"):
        train.train_and_evaluate(_config(data_dir), workdir)
    model, variables, metadata = checkpoint.load_model(workdir)
    assert metadata.step == 8 and model.stage_sizes == (2, 2, 2)
    chex.assert_tree_all_finite(variables)


def test_grow_interpolates_a_saved_checkpoint(data_dir, reference, tmp_path):
    from mlres_jax import grow  # pylint: disable=import-outside-toplevel
    workdir, output = str(tmp_path / "run"), str(tmp_path / "grown")
    train.train_and_evaluate(_config(data_dir, num_epochs=1.0, cycle_boundaries=()),
                             workdir)
    model, variables, _ = checkpoint.load_model(workdir)
    written = grow.grow(workdir, output)
    grown_model, grown_variables, grown = checkpoint.load_model(output)
    assert grown_model.stage_sizes == (4, 4, 4) and grown_model.step_size == 0.5
    assert grown.grown_from["step"] == 8 == written.step
    expected_model, expected = multilevel.deepen(model, variables)
    assert expected_model == grown_model
    chex.assert_trees_all_equal(jax.device_get(grown_variables), jax.device_get(expected))
    with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
        grow.grow(workdir, output)
