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
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import default
from mlres_jax import checkpoint, models, multilevel, steps, stopping, stopwatch, train
from tests import fake_data
from tests.test_events import scalar_steps

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_FIELDS = {*stopwatch.ACTIVITIES, "wall_seconds"}

# 64 fake training images, batch 8: 8 steps per epoch; cycles of 1 epoch each.
# One stage of 2 -> 4 -> 8 blocks: three depths at a third of the compile time
# of three stages.
OVERRIDES = {
    "dataset": "fashion_mnist",
    "width": 2,
    "stage_sizes": (2,),
    "multilevel": True,
    "batch_size": 8,
    "num_epochs": 3.0,
    "cycle_boundaries": (1.0, 2.0),
    "eval_batch_size": 16,
    "log_every_steps": 2,
    "progress_bar": False,
    "checkpoint_every_steps": 3,
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


@pytest.fixture(scope="module")
def cycle_end_run(data_dir, tmp_path_factory):
    """A run that saved only at its cycle ends: steps 8, 16, 24 (2, 4, 8 blocks)."""
    workdir = str(tmp_path_factory.mktemp("cycle_ends"))
    train.train_and_evaluate(_config(data_dir, checkpoint_every_steps=100), workdir)
    return workdir


def test_checkpoints_hold_depth_metadata(cycle_end_run):
    workdir = cycle_end_run
    checkpointer = checkpoint.Checkpointer(workdir, create=False)
    # Only the cycle ends: steps 8, 16, 24 at 2, 4 and 8 blocks.
    assert checkpointer.all_steps() == [8, 16, 24]
    metadata = [checkpointer.read_metadata(s) for s in (8, 16, 24)]
    assert [m.stage_sizes for m in metadata] == [(2,), (4,), (8,)]
    assert [m.step_size for m in metadata] == [1.0, 0.5, 0.25]
    assert [m.cycle for m in metadata] == [1, 2, 3]
    model, variables, _ = checkpoint.load_model(workdir, step=16)
    assert model.stage_sizes == (4,) and model.step_size == 0.5
    chex.assert_trees_all_equal_shapes(
        variables, models.init_variables(model, jax.random.key(0), (28, 28, 1))
    )


def test_metadata_round_trip_and_other_formats_refused():
    metadata = checkpoint.CheckpointMetadata(
        step=5,
        dataset="cifar10",
        width=16,
        num_classes=10,
        image_shape=(32, 32, 3),
        stage_sizes=(2, 2, 2),
        step_size=1.0,
        cycle=1,
        epoch=0.1,
        config={"seed": 0},
    )
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
        [
            sys.executable,
            "-m",
            "mlres_jax.main",
            "--config=configs/default.py",
            f"--workdir={workdir}",
            f"--config.fashion_mnist_dir={data_dir}",
            *args,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_checkpoint(process, workdir, step, timeout=240):
    """Returns as soon as the checkpoint of ``step`` is complete."""
    path = os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def _kill_when_checkpoint(process, workdir, step, timeout=240):
    """SIGKILLs ``process`` as soon as the checkpoint of ``step`` is complete.

    Returns:
      The process's output.
    """
    _wait_for_checkpoint(process, workdir, step, timeout)
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0]
    assert process.returncode == -signal.SIGKILL
    return output


def _resumed_at(output):
    match = re.search(r"Resumed from the checkpoint of step (\d+): cycle (\d+)", output)
    return (int(match.group(1)), int(match.group(2))) if match else None


def test_sigkill_in_cycle1_at_boundary_and_in_last_cycle_then_resume(data_dir, reference, tmp_path):
    workdir = str(tmp_path)
    # Checkpoints every 3 steps and at the cycle ends 8 and 16: 3, 6, 8, 9, 12,
    # 15, 16, 18, 21, 24. Kill in cycle 1 (after step 3), at the 2 -> 4 blocks
    # boundary (the cycle-end checkpoint of step 8, before the interpolation's
    # compile and step 9), and in cycle 3 (after step 21).
    resumed = []
    for kill_step in (3, 8, 21):
        output = _kill_when_checkpoint(_launch(data_dir, workdir), workdir, kill_step)
        resumed.append(_resumed_at(output))
        # The events up to the checkpoint are on disk with it: logs every 2 steps.
        logged = scalar_steps(workdir)["train/loss"]
        assert max(logged) >= kill_step - kill_step % 2, (kill_step, logged)
    process = _launch(data_dir, workdir)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output
    resumed.append(_resumed_at(output))
    assert resumed[0] is None  # the first launch starts fresh
    assert resumed[1][1] == 1 and 3 <= resumed[1][0] < 8  # inside cycle 1
    assert resumed[2] == (8, 1)  # the boundary: 2-block state, then interpolation
    assert resumed[3][1] == 3 and resumed[3][0] >= 21
    _assert_same_run(workdir, reference)
    _assert_events_once(workdir)


def _assert_events_once(workdir):
    """Every scalar of the run appears once per step after the kills and resumes."""
    steps = scalar_steps(workdir)
    assert steps["train/loss"] == list(range(2, 25, 2))  # logged every 2 steps of 24
    assert steps["test/error"] == [8, 16, 24]  # one evaluation per cycle


def _stopped_at(output, signal_name):
    """The step of the one-line stop message, which must be the last line."""
    last = output.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"error: stopped by {signal_name} at step (\d+) \(epoch [\d.]+\); "
        r"the checkpoint of step \d+ \(cycle \d, \d blocks\) is "
        r"in .*\. To resume, run the same command again\.",
        last,
    )
    assert match, output
    return int(match.group(1))


def test_sigint_and_sigterm_stop_with_a_checkpoint_and_a_second_writer_is_refused(
    data_dir, reference, tmp_path
):
    workdir = str(tmp_path)
    first = _launch(data_dir, workdir)
    _wait_for_checkpoint(first, workdir, 3)
    first.send_signal(signal.SIGSTOP)  # holds the workdir while the second one tries
    # A second run on the same workdir is refused at once, naming the first.
    second = _launch(data_dir, workdir)
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 2 and first.poll() is None, output
    assert f"error: workdir {workdir!r} is in use by process {first.pid}" in output
    assert "Traceback" not in output and "Loading" not in output
    # Ctrl-C between two saves: a checkpoint at the step reached, exit status 130.
    first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 130 and "Traceback" not in output, output
    stopped = _stopped_at(output, "SIGINT")
    assert 3 <= stopped < 16 and stopped in checkpoint.list_steps(workdir)
    # SIGTERM (a cluster's preemption) at the interpolation boundary: exit status 143.
    resumed = _launch(data_dir, workdir)
    _wait_for_checkpoint(resumed, workdir, 16)
    resumed.send_signal(signal.SIGTERM)
    output = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 143 and "Traceback" not in output, output
    assert _stopped_at(output, "SIGTERM") >= 16
    last = _launch(data_dir, workdir)
    output = last.communicate(timeout=240)[0]
    assert last.returncode == 0, output
    _assert_same_run(workdir, reference)
    _assert_events_once(workdir)


@pytest.mark.parametrize(
    "save_step,saved",
    [
        (6, [3, 6]),  # in the middle of cycle 1
        (8, [3, 6, 8]),  # the cycle end: the run stops before it grows
    ],
)
def test_sigint_during_a_save_finishes_the_save_then_stops(
    data_dir, reference, tmp_path, monkeypatch, caplog, save_step, saved
):
    original_save = ocp.CheckpointManager.save

    def save_interrupted(self, step, *args, **kwargs):
        if step == save_step:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while orbax writes
        return original_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_interrupted)
    workdir = str(tmp_path)
    # What the run restores: Python's handler, or SIG_IGN where the tests run
    # as a background job of a non-interactive shell (as CI may run them).
    sigint_before = signal.getsignal(signal.SIGINT)
    with (
        caplog.at_level("INFO"),
        pytest.raises(
            stopping.Interrupted,
            match=rf"stopped by SIGINT at step {save_step} .*the checkpoint "
            rf"of step {save_step} \(cycle 1, 2 blocks\)",
        ) as error,
    ):
        train.train_and_evaluate(_config(data_dir), workdir)
    assert error.value.exit_status == 130
    assert checkpoint.list_steps(workdir) == saved
    assert "Interpolated" not in caplog.text  # no growth after the stop request
    _, variables, metadata = checkpoint.load_model(workdir)  # complete and readable
    assert metadata.step == save_step
    chex.assert_tree_all_finite(variables)
    assert signal.getsignal(signal.SIGINT) is sigint_before  # restored


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
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as handle:
        handle.truncate(os.path.getsize(largest) // 2)
    return largest


def test_truncated_latest_checkpoint_falls_back_to_previous(data_dir, reference, tmp_path, caplog):
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


def _abstract_state(stage_sizes, width=2):
    model = models.ResNet(stage_sizes, width=width, num_classes=10)
    optimizer = steps.create_optimizer(default.get_config(), lambda step: 0.1)
    return jax.eval_shape(
        lambda: steps.create_train_state(jax.random.key(0), model, optimizer, (28, 28, 1))
    )


def _files_under(folder):
    return sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
    )


@pytest.mark.parametrize(
    "stage_sizes,width,words",
    [
        (
            (4,),
            2,
            r"holds a network of 8 blocks of width 2 .*, but a network of "
            r"4 blocks of width 2 .* was expected",
        ),
        ((8,), 4, r"8 blocks of width 2 .*, but a network of 8 blocks of width 4"),
    ],
)
def test_a_readable_checkpoint_of_another_structure_is_refused_not_moved(
    cycle_end_run, stage_sizes, width, words
):
    before = _files_under(cycle_end_run)
    with checkpoint.Checkpointer(cycle_end_run, create=False) as checkpointer:
        with pytest.raises(checkpoint.CheckpointMismatchError, match=words) as error:
            checkpointer.restore_latest(lambda metadata: _abstract_state(stage_sizes, width))
    message = str(error.value)
    assert "step 24" in message and "left as it is" in message and len(message) < 1000
    assert _files_under(cycle_end_run) == before  # nothing moved, nothing written
    assert not os.path.exists(os.path.join(cycle_end_run, "unreadable_checkpoints"))


def test_metadata_of_another_format_is_refused_not_moved(cycle_end_run, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(cycle_end_run, workdir)
    meta_dir = os.path.join(workdir, "checkpoints", "24", "meta")
    (meta_file,) = [
        os.path.join(meta_dir, n)
        for n in os.listdir(meta_dir)
        if n.endswith(".json") or n == "metadata"
    ]
    with open(meta_file) as handle:
        meta = json.load(handle)
    with open(meta_file, "w") as handle:
        json.dump(dict(meta, format=1), handle)
    with checkpoint.Checkpointer(workdir, create=False) as checkpointer:
        with pytest.raises(checkpoint.CheckpointError, match="metadata format 1"):
            checkpointer.restore_latest(lambda metadata: _abstract_state((8,)))
        assert checkpointer.all_steps() == [8, 16, 24]


def test_resume_with_different_model_is_refused(data_dir, reference, tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(_config(data_dir, num_epochs=1.0, cycle_boundaries=()), workdir)
    steps_before = checkpoint.Checkpointer(workdir, create=False).all_steps()
    with pytest.raises(
        checkpoint.CheckpointMismatchError,
        match=r"learning_rate_max: was 0.5, now 0.3; "
        r"width: was 2, now 4",
    ):
        train.train_and_evaluate(
            _config(data_dir, num_epochs=1.0, cycle_boundaries=(), width=4, learning_rate_max=0.3),
            workdir,
        )
    # Safe fields (logging, evaluation batch) may change. The run is complete:
    # nothing is trained again and summary.json, wall time included, is kept.
    with open(os.path.join(workdir, "summary.json")) as handle:
        summary_before = json.load(handle)
    summary = train.train_and_evaluate(
        _config(
            data_dir, num_epochs=1.0, cycle_boundaries=(), log_every_steps=1, eval_batch_size=7
        ),
        workdir,
    )
    assert summary == summary_before
    assert checkpoint.Checkpointer(workdir, create=False).all_steps() == steps_before


def test_a_field_added_since_the_checkpoint_counts_with_its_old_behaviour():
    current = default.get_config().to_dict()
    # A config saved before scan_blocks and compute_dtype existed.
    saved = {k: v for k, v in current.items() if k not in ("scan_blocks", "compute_dtype")}
    assert checkpoint.config_differences(saved, current) == []
    assert checkpoint.config_differences(saved, dict(current, scan_blocks=True)) == [
        "scan_blocks: was False, now True"
    ]
    assert checkpoint.config_differences(saved, dict(current, compute_dtype="bfloat16")) == [
        "compute_dtype: was 'float32', now 'bfloat16'"
    ]
    # Every added field is a field of the config (no typo hides one).
    assert set(checkpoint.FIELDS_ADDED) <= set(current)


def test_nonfinite_update_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    poison_at = 7  # 0-based step whose update becomes NaN
    create_optimizer = steps.create_optimizer

    def poisoned(config, schedule):
        def update(updates, state, params=None):
            factor = jax.numpy.where(state >= poison_at, jax.numpy.nan, 1.0)
            return jax.tree.map(lambda u: u * factor, updates), state + 1

        poison = optax.GradientTransformation(
            lambda params: jax.numpy.zeros((), jax.numpy.int32), update
        )
        return optax.chain(create_optimizer(config, schedule), poison)

    monkeypatch.setattr(steps, "create_optimizer", poisoned)
    workdir = str(tmp_path)
    with pytest.raises(
        train.NonFiniteLossError,
        match=r"non-finite loss or gradient at step 7 \(cycle 1, "
        r"epoch 0.88\).*last good checkpoint, step 6",
    ):
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
        [
            sys.executable,
            "-m",
            "mlres_jax.main",
            "--config=configs/default.py",
            f"--workdir={blocker / 'run'}",
            f"--config.fashion_mnist_dir={data_dir}",
            *args,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"step 9.*No space left on device.*kept: steps \[3, 6, 8\]",
    ):
        train.train_and_evaluate(_config(data_dir), workdir)
    model, variables, metadata = checkpoint.load_model(workdir)
    assert metadata.step == 8 and model.stage_sizes == (2,)
    chex.assert_tree_all_finite(variables)


def test_grow_interpolates_a_one_block_checkpoint_under_the_identity_rule(data_dir, tmp_path):
    from mlres_jax import grow  # pylint: disable=import-outside-toplevel

    workdir, output = str(tmp_path / "run"), str(tmp_path / "grown")
    config = _config(data_dir, num_epochs=1.0, cycle_boundaries=(), stage_sizes=(1,))
    train.train_and_evaluate(config, workdir)
    model, variables, _ = checkpoint.load_model(workdir)
    grow.interpolate_checkpoint(workdir, output, rule="identity")
    grown_model, grown_variables, _ = checkpoint.load_model(output)
    assert grown_model.stage_sizes == (2,) and grown_model.step_size == 0.5
    images = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    before = model.apply(variables, images)
    np.testing.assert_allclose(
        grown_model.apply(grown_variables, images), before, rtol=1e-5, atol=1e-6
    )


def test_grow_interpolates_a_saved_checkpoint(data_dir, reference, tmp_path):
    from mlres_jax import grow  # pylint: disable=import-outside-toplevel

    workdir, output = str(tmp_path / "run"), str(tmp_path / "grown")
    train.train_and_evaluate(_config(data_dir, num_epochs=1.0, cycle_boundaries=()), workdir)
    model, variables, _ = checkpoint.load_model(workdir)
    written = grow.interpolate_checkpoint(workdir, output)
    grown_model, grown_variables, grown = checkpoint.load_model(output)
    assert grown_model.stage_sizes == (4,) and grown_model.step_size == 0.5
    assert grown.grown_from["step"] == 8 == written.step
    expected_model, expected = multilevel.interpolate_model(model, variables)
    assert expected_model == grown_model
    chex.assert_trees_all_equal(jax.device_get(grown_variables), jax.device_get(expected))
    with pytest.raises(checkpoint.CheckpointError, match="already holds checkpoints"):
        grow.interpolate_checkpoint(workdir, output)
    # Training in the grown folder is refused with what the folder is; nothing moves.
    before = _files_under(output)
    with pytest.raises(
        checkpoint.CheckpointMismatchError,
        match=r"holds a model-only checkpoint written by mlres_jax.grow "
        r"from .* \(step 8, rule 'paper'\): step 8, 4 blocks, "
        r"h = 0.5, width 2",
    ) as error:
        train.train_and_evaluate(_config(data_dir, num_epochs=1.0, cycle_boundaries=()), output)
    assert len(str(error.value)) < 600
    assert _files_under(output) == [name for name in before]


@pytest.mark.parametrize("ahead", [True, False])
def test_compile_ahead_gives_the_same_run(data_dir, reference, tmp_path, caplog, ahead):
    workdir = str(tmp_path)
    with caplog.at_level("INFO"):
        train.train_and_evaluate(_config(data_dir, compile_ahead=ahead), workdir)
    # Ahead, the 4- and 8-block steps were compiled in the background during
    # the cycle before; either way the run is the same as the reference
    # (default config), bitwise.
    compiled_ahead = re.findall(r"Compiled \d+ ahead in [\d.]+ s; waited [\d.]+ s", caplog.text)
    assert len(compiled_ahead) == (2 if ahead else 0)
    _assert_same_run(workdir, reference)


def test_scanned_layout_trains_grows_and_resumes_like_the_unrolled_run(
    data_dir, reference, tmp_path
):
    workdir = str(tmp_path)
    config = _config(data_dir, scan_blocks=True)
    train.train_and_evaluate(config, workdir)
    metadata = checkpoint.Checkpointer(workdir, create=False).read_metadata(16)
    assert metadata.scan_blocks and metadata.stage_sizes == (4,)
    # Resume in the middle of the last cycle: the scanned checkpoint restores.
    _drop_checkpoints_after(workdir, 18)
    os.remove(os.path.join(workdir, "summary.json"))
    train.train_and_evaluate(config, workdir)
    # load_model gives the unrolled layout, comparable with the unrolled run.
    variables, metadata, summary = _final(workdir)
    ref_variables, _, ref_summary = reference
    assert metadata.step == 24
    chex.assert_trees_all_close(variables, ref_variables, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        [r["test_loss"] for r in summary["history"]],
        [r["test_loss"] for r in ref_summary["history"]],
        rtol=1e-5,
    )
