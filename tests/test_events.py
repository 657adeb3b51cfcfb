"""TensorBoard event files that agree with the checkpoints (`mlres_jax.events`).

The event files are read as TensorBoard reads them (its ``EventAccumulator``),
so what is checked is what a user sees.
"""

import glob
import os

from tensorboard.backend.event_processing import event_accumulator
from tensorboardX import SummaryWriter

from mlres_jax import events

EVENT_FILES = "events.out.tfevents.*"


def scalar_steps(folder):
    """{tag: [step, ...]} of every scalar TensorBoard shows for the folder, in step order."""
    accumulator = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.SCALARS: 0}
    )
    accumulator.Reload()
    return {
        tag: [event.step for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def _write(folder, steps):
    with SummaryWriter(logdir=folder) as writer:
        for step in steps:
            writer.add_scalar("train/loss", 1.0 / step, step)


def test_a_resumed_run_shows_each_step_once_after_a_torn_record(tmp_path):
    folder = str(tmp_path)
    _write(folder, range(1, 11))  # a run that got to step 10, then was killed
    (path,) = glob.glob(os.path.join(folder, EVENT_FILES))
    with open(path, "ab") as handle:  # killed in the middle of writing a record
        handle.write(b"\x20\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    assert scalar_steps(folder) == {"train/loss": list(range(1, 11))}
    # Resuming from the checkpoint of step 6: steps 7..12 are written again.
    with events.EventWriter(folder, resume_step=6) as writer:
        for step in range(7, 13):
            writer.add_scalar("train/loss", 2.0 / step, step)
    assert scalar_steps(folder) == {"train/loss": list(range(1, 13))}  # each step once
    accumulator = event_accumulator.EventAccumulator(folder)
    accumulator.Reload()
    # Steps 7..12 show the resumed run's values (2 / step), not the first run's (1 / step).
    for event in accumulator.Scalars("train/loss"):
        assert abs(event.value - (2.0 if event.step > 6 else 1.0) / event.step) < 1e-6


def test_without_the_purge_step_a_resumed_run_would_show_steps_twice(tmp_path):
    # What the purge step prevents: the same resume with a plain writer.
    folder = str(tmp_path)
    _write(folder, range(1, 11))
    with SummaryWriter(logdir=folder, filename_suffix=".second") as writer:
        for step in range(7, 13):
            writer.add_scalar("train/loss", 2.0 / step, step)
    assert scalar_steps(folder)["train/loss"] == [*range(1, 11), *range(7, 13)]


def test_a_new_run_writes_no_purge(tmp_path):
    with events.EventWriter(str(tmp_path), resume_step=None) as writer:
        writer.add_scalar("train/loss", 1.0, 1)
    assert scalar_steps(str(tmp_path)) == {"train/loss": [1]}


def test_a_writer_that_does_not_write_creates_nothing(tmp_path):
    # The writer of every process but the main one, also when resuming.
    folder = tmp_path / "run"
    with events.EventWriter(str(folder), resume_step=6, write=False) as writer:
        writer.add_scalar("train/loss", 1.0, 7)
        writer.add_text("config", "x", 0)
        writer.flush()
    assert not folder.exists()


def test_every_event_is_on_disk_after_a_flush(tmp_path):
    # Training flushes right before each checkpoint; a run killed after it must
    # find every event written before (tensorboardX's SummaryWriter kept them in
    # a queue for its thread: after its flush, the last 1-8 of the 200 losses and
    # the test error were not in the file, in five tries).
    writer = events.EventWriter(str(tmp_path))
    for step in range(1, 201):
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.add_scalar("test/error", 0.5, 200)
    writer.flush()
    assert scalar_steps(tmp_path) == {"train/loss": list(range(1, 201)), "test/error": [200]}
    writer.close()
