"""TensorBoard event files that agree with the checkpoints (`mlres_jax.events`)."""

import collections
import glob
import os

from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event

from mlres_jax import events


def scalar_steps(folder):
    """{tag: [step, ...]} of every scalar in the folder's event files, in file order."""
    steps = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, events.EVENT_FILE_PATTERN))):
        for record in events.read_records(path):
            event = Event.FromString(record)
            for value in event.summary.value:
                steps[value.tag].append(event.step)
    return dict(steps)


def _write(folder, steps):
    with SummaryWriter(logdir=folder) as writer:
        for step in steps:
            writer.add_scalar("train/loss", 1.0 / step, step)


def test_resume_drops_later_events_and_a_torn_record(tmp_path):
    folder = str(tmp_path)
    _write(folder, range(1, 11))  # a run that got to step 10, then was killed
    (path,) = glob.glob(os.path.join(folder, events.EVENT_FILE_PATTERN))
    with open(path, "ab") as handle:  # killed in the middle of writing a record
        handle.write(b"\x20\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    assert scalar_steps(folder) == {"train/loss": list(range(1, 11))}
    # Resuming from the checkpoint of step 6: steps 7..10 will be trained again.
    writer = events.open_writer(folder, resume_step=6)
    for step in range(7, 13):
        writer.add_scalar("train/loss", 1.0 / step, step)
    writer.close()
    assert scalar_steps(folder) == {"train/loss": list(range(1, 13))}  # each step once
    # The rewritten file holds whole records only.
    assert os.path.getsize(path) == sum(len(events._framed(r))  # pylint: disable=protected-access
                                        for r in events.read_records(path))


def test_a_new_run_and_a_clean_resume_change_nothing(tmp_path):
    folder = str(tmp_path)
    _write(folder, range(1, 5))
    (path,) = glob.glob(os.path.join(folder, events.EVENT_FILE_PATTERN))
    before = open(path, "rb").read()
    assert events.drop_events_after(folder, 4) == 0
    assert open(path, "rb").read() == before
    assert events.drop_events_after(folder, 2) == 2
    assert scalar_steps(folder) == {"train/loss": [1, 2]}
