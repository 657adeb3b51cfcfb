"""Checkpoints of a run whose network changes depth, with orbax-checkpoint.

Each checkpoint is one orbax step folder ``<workdir>/checkpoints/<step>`` with
two items: ``state``, the whole train state (parameters, batch-norm
statistics, optimizer state, step, running metric sums), and ``meta``, a JSON
document (`CheckpointMetadata`) that says how to rebuild the network of that
depth (stage sizes, step size h, width, classes, image shape), which cycle it
belongs to, the run's config and the history so far. Restoring reads ``meta``
first, builds the abstract state of that depth and restores into it, as
init2winit's checkpoints do for trees whose shape changes.

orbax writes each step into a temporary folder and renames it when complete,
so a save killed half-way never replaces a good checkpoint; a checkpoint that
is unreadable anyway (a truncated file) is skipped in favour of the previous
one, with a warning. The temporary folder of a save that failed is removed at
once, and one left by a killed run is removed by orbax when the run's
`Checkpointer` opens the folder again (``cleanup_tmp_directories``): the
workdir's lock (`mlres_jax.workdir.hold`) makes that safe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mlres_jax import errors, files, models, multilevel

CHECKPOINT_FOLDER = "checkpoints"
# Where unreadable checkpoints are moved, beside CHECKPOINT_FOLDER.
UNREADABLE_FOLDER = "unreadable_checkpoints"
# Version of `CheckpointMetadata`'s JSON; a checkpoint of another version is
# refused with a message rather than misread.
METADATA_FORMAT = 2

# What a checkpoint holds: the whole train state of a run, or only a model's
# variables (written by `save_model`, e.g. by ``mlres_jax.grow``).
TRAIN_STATE = "train_state"
MODEL = "model"

# Config fields a resumed run may change: they do not change the model, the
# data order, the optimisation or the schedule. The number of devices is one
# of them: a checkpoint holds global arrays, whatever devices wrote it.
SAFE_TO_CHANGE = frozenset(
    {
        "log_every_steps",
        "progress_bar",
        "eval_batch_size",
        "eval_every_epochs",
        "checkpoint_every_steps",
        "checkpoints_to_keep",
        "data_dir",
        "fashion_mnist_dir",
        "num_devices",
        "growth_train_examples",
        "compile_ahead",
    }
)

# Config fields added after checkpoint metadata format 2 came in, with the
# value that gives the behaviour of a run written before the field existed.
# Add a field here when it is added to configs/default.py.
FIELDS_ADDED = {
    "num_devices": -1,  # data parallelism: every device
    "growth_train_examples": 2000,  # the jump at a growth, measured
    "init_from": "",  # start from a checkpoint: no
    "scan_blocks": False,  # blocks unrolled
    "compute_dtype": "float32",
    "compile_ahead": False,  # compiled when a cycle starts
}


# What orbax writes beyond the arrays' bytes, measured on checkpoints of
# train states of 37 to 981 arrays (widths 2 to 32, 1 to 60 blocks; ext4 and
# tmpfs, allocated blocks): about 100 KiB per checkpoint (about 25 small
# files, each taking whole blocks) and 0.9 to 1.6 KiB per array (its entries
# in _METADATA, _sharding, array_metadatas and the OCDBT manifest, and its
# zarr metadata), e.g. 0.65 MiB for the 388 KB state of 405 arrays of a
# width-4 8-8-8 network. The data are zstd-compressed, which saves little on
# trained float32 values, so the arrays count with their whole size.
_ORBAX_BYTES_PER_CHECKPOINT = 128 * 2**10
_ORBAX_BYTES_PER_ARRAY = 2 * 2**10
# The metadata JSON (`CheckpointMetadata`): the config, and about 200 bytes
# per evaluation record and 600 per cycle or growth record (measured).
_METADATA_BYTES = 4 * 2**10
_METADATA_BYTES_PER_RECORD = 2**10


def estimated_bytes(abstract_state: Any, num_records: int) -> int:
    """Disk space one checkpoint takes, an upper bound measured on orbax's output.

    Args:
      abstract_state: the train state, or its ``jax.eval_shape``.
      num_records: evaluation, cycle and growth records its metadata will
        hold at most.

    Returns:
      Bytes: the arrays' bytes, orbax's metadata per array and per
      checkpoint (measured: see the constants above), and the JSON metadata.
    """
    leaves = jax.tree.leaves(abstract_state)
    array_bytes = sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves)
    return (
        array_bytes
        + _ORBAX_BYTES_PER_ARRAY * len(leaves)
        + _ORBAX_BYTES_PER_CHECKPOINT
        + _METADATA_BYTES
        + _METADATA_BYTES_PER_RECORD * num_records
    )


class CheckpointError(errors.UserError):
    """A checkpoint cannot be written, read or used for this run."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint holds something other than what the caller expects.

    A run of another config (in a field that matters), another network or
    tree structure, or a model-only checkpoint where a train state is
    expected. Not damage: nothing is moved or changed.
    """


class _Unreadable(Exception):
    """A checkpoint that cannot be read (damage), as opposed to a mismatch."""


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """What a checkpoint says about itself, stored as JSON beside the state.

    The one description of a checkpoint: training writes it, and resuming,
    ``mlres_jax.grow`` and ``mlres_jax.analyze`` read it.

    Attributes:
      step: global step (0-based count of steps taken) of the checkpoint.
      dataset: the data set's name (``datasets.DATASETS``).
      width: filters of the first stage.
      num_classes: outputs of the network's head.
      image_shape: (H, W, C) of the images the network takes.
      stage_sizes: blocks per stage of the saved network.
      step_size: its step size h (paper Eq. 2).
      scan_blocks: whether its parameters are in the scanned layout
        (`models.ResNet.scan_blocks`).
      cycle: 1-based cycle the checkpoint belongs to.
      epoch: ``step / steps_per_epoch`` (a float; None where unknown).
      config: the run's resolved config as a dict.
      history: the evaluation records so far (as in ``summary.json``).
      cycle_records: the records of the cycles finished so far.
      growths: the records of the growths so far, with their jumps.
      stopwatch: `stopwatch.Stopwatch` readings of the current cycle, s.
      kind: `TRAIN_STATE` (a run's whole train state) or `MODEL` (variables
        only, as written by `save_model`).
      grown_from: for a `MODEL` written by ``mlres_jax.grow``: the
        ``workdir``, ``step`` and ``rule`` it was interpolated from.
    """

    step: int
    dataset: str
    width: int
    num_classes: int
    image_shape: tuple[int, ...]
    stage_sizes: tuple[int, ...]
    step_size: float
    cycle: int
    epoch: float | None
    config: dict
    history: list = dataclasses.field(default_factory=list)
    cycle_records: list = dataclasses.field(default_factory=list)
    growths: list = dataclasses.field(default_factory=list)
    stopwatch: dict = dataclasses.field(default_factory=dict)
    kind: str = TRAIN_STATE
    grown_from: dict | None = None
    scan_blocks: bool = False

    def model(self) -> models.ResNet:
        """The network this checkpoint holds the variables of (in their layout)."""
        return models.ResNet(
            stage_sizes=tuple(self.stage_sizes),
            width=self.width,
            num_classes=self.num_classes,
            step_size=self.step_size,
            scan_blocks=self.scan_blocks,
        )

    def to_json(self) -> dict:
        """A strictly valid JSON dict (`files.json_compatible`), with the format version."""
        return files.json_compatible(dict(dataclasses.asdict(self), format=METADATA_FORMAT))

    @classmethod
    def from_json(cls, data: dict, where: str = "") -> CheckpointMetadata:
        """Reads `to_json`'s output.

        Raises:
          CheckpointError: for another format version or missing fields,
            naming ``where`` (e.g. the checkpoint's folder).
        """
        data = dict(data)
        version = data.pop("format", None)
        if version != METADATA_FORMAT:
            raise CheckpointError(
                f"the checkpoint {where} has metadata format {version!r}, but "
                f"this version of mlres_jax reads format {METADATA_FORMAT}; use "
                "the mlres_jax version that wrote it, or start a new run"
            )
        fields = dataclasses.fields(cls)
        names = {field.name for field in fields}
        missing = sorted(
            field.name
            for field in fields
            if field.name not in data
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        )
        if missing:
            raise CheckpointError(f"the checkpoint metadata {where} lacks {missing}")
        known = {k: v for k, v in data.items() if k in names}
        return cls(
            **dict(
                known,
                image_shape=tuple(known["image_shape"]),
                stage_sizes=tuple(known["stage_sizes"]),
            )
        )


def config_differences(
    saved: dict, current: dict, ignore: Collection[str] = SAFE_TO_CHANGE
) -> list[str]:
    """Fields (outside ``ignore``) whose values differ, as messages.

    Args:
      saved: a config as a checkpoint's metadata or a ``summary.json`` stores
        it; fields it lacks because they were added later count with their
        `FIELDS_ADDED` value.
      current: this run's resolved config as a dict.
      ignore: fields that may differ (default `SAFE_TO_CHANGE`: those a run
        may resume with changed).

    Returns:
      One ``"field: was X, now Y"`` line per differing field, sorted.
    """

    def normal(value):
        return list(value) if isinstance(value, tuple) else value

    # A run written before a field existed behaved as FIELDS_ADDED says.
    saved = {**FIELDS_ADDED, **saved}
    lines = []
    for field in sorted(set(saved) | set(current)):
        if field in ignore:
            continue
        old, new = normal(saved.get(field)), normal(current.get(field))
        if old != new:
            lines.append(f"{field}: was {old!r}, now {new!r}")
    return lines


def checkpoint_dir(workdir: str) -> str:
    """``<workdir>/checkpoints``, absolute."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_FOLDER)


def tree_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"params/stage1/block1/conv1/kernel": (shape, dtype), ...}`` of a tree.

    Works alike on arrays, ``jax.ShapeDtypeStruct`` trees and orbax's stored
    tree metadata, so that a stored structure can be compared with a target.
    """
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): (
            tuple(leaf.shape),
            str(jax.numpy.dtype(leaf.dtype)),
        )
        for path, leaf in jax.tree.flatten_with_path(tree)[0]
    }


def describe_tree(shapes: dict) -> str:
    """A short description of a tree from `tree_shapes`: its network, if it has one."""
    blocks = {}
    for path, (shape, _) in shapes.items():
        parts = path.split("/")
        if len(parts) > 2 and parts[0] == "params" and multilevel.is_stage_key(parts[1]):
            stage = blocks.setdefault(int(parts[1][5:]), {})
            # The scanned layout stacks blocks 2..n along the leading axis.
            stage[parts[2]] = shape[0] if parts[2] == models.SCANNED_BLOCKS else 1
    if not blocks:
        return f"a tree of {len(shapes)} arrays"
    sizes = [sum(blocks.get(i, {}).values()) for i in range(1, max(blocks) + 1)]
    stem = shapes.get("params/stem/kernel")
    width = f" of width {stem[0][-1]}" if stem else ""
    return f"a network of {models.format_stage_sizes(sizes)} blocks{width} ({len(shapes)} arrays)"


def _differences(stored: dict, expected: dict, limit: int = 4) -> str:
    lines = []
    for path in sorted(set(stored) | set(expected)):
        if stored.get(path) != expected.get(path):
            lines.append(
                f"{path}: checkpoint {stored.get(path, 'missing')}, "
                f"expected {expected.get(path, 'missing')}"
            )
    if not lines:
        return ""
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return " (" + "; ".join(lines[:limit]) + more + ")"


def format_network(metadata: CheckpointMetadata) -> str:
    """``"4-4-4 blocks, h = 0.5, width 8"``."""
    return (
        f"{models.format_stage_sizes(metadata.stage_sizes)} blocks, "
        f"h = {metadata.step_size:g}, width {metadata.width}"
    )


def _model_only_message(directory: str, metadata: CheckpointMetadata) -> str:
    source = metadata.grown_from
    origin = (
        f" written by mlres_jax.grow from {source['workdir']} (step "
        f"{source['step']}, rule {source['rule']!r})"
        if source
        else ""
    )
    return (
        f"{directory} holds a model-only checkpoint{origin}: step {metadata.step}, "
        f"{format_network(metadata)}. It has no optimizer state, history or "
        "cycle, so a run cannot resume from it. Read it with "
        "checkpoint.load_model or 'python -m mlres_jax.analyze', and train "
        "in another --workdir."
    )


class Checkpointer:
    """Saves and restores the train state of one workdir.

    Use it as a context manager (``with Checkpointer(workdir) as c:``) or
    call `close`.

    Args:
      workdir: the run's folder; checkpoints go to ``workdir/checkpoints``.
      max_to_keep: number of most recent checkpoints kept on disk.
      create: True for the folder's one writer (the holder of its lock,
        `mlres_jax.workdir.hold`): creates the folder if missing and removes
        the temporary folders of unfinished saves. False for reading, e.g. a
        folder another run writes: nothing is created or removed.
    """

    def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True):
        self.directory = checkpoint_dir(workdir)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=create,
                cleanup_tmp_directories=create,
                # Synchronous: the train step donates its state's buffers.
                enable_async_checkpointing=False,
            ),
            # Handlers named up front, so that a stored tree's structure can
            # be read (`item_metadata`) before anything is restored.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, state: Any, metadata: CheckpointMetadata) -> None:
        """Writes ``state`` and ``metadata`` as checkpoint ``metadata.step``, atomically.

        Raises:
          CheckpointError: if the write fails (disk full, permissions); the
            earlier checkpoints stay as they were, the unfinished save's
            temporary folder is removed, and the message names the newest
            complete checkpoint and how to resume (here or elsewhere).
        """
        step = metadata.step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata.to_json())
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as error:  # orbax raises many types for I/O errors.
            removed = self._remove_unfinished_saves()
            self._manager.reload()
            kept = [s for s in self.all_steps() if s != step]
            workdir = os.path.dirname(self.directory)
            newest = (
                f"the newest complete checkpoint is step {kept[-1]}, from which it "
                "resumes (the steps after it are trained again)"
                if kept
                else "no checkpoint is complete yet, so it starts afresh"
            )
            raise CheckpointError(
                f"saving the checkpoint of step {step} in {self.directory} failed "
                f"({errors.one_line(error)}). The run stops here"
                + (f" ({', '.join(removed)}, the unfinished save, was removed)" if removed else "")
                + f"; {newest}. Make room in (or permission for) {workdir} and run the "
                "same command again, or copy that folder to another disk and run the same "
                f"command on the copy. Earlier checkpoints are kept: steps {kept}"
            ) from error

    def _remove_unfinished_saves(self) -> list[str]:
        """Removes the temporary folders of saves that did not finish; returns their names.

        Only for the folder's one writer (``create=True``), which saved last.
        """
        names = [os.path.basename(path) for path in unfinished_saves(self.directory)]
        for name in names:
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        return names

    def read_metadata(self, step: int) -> CheckpointMetadata:
        """The metadata of checkpoint ``step``.

        Raises:
          CheckpointError: for metadata of another format version.
          Exception: orbax's, if the JSON cannot be read.
        """
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return CheckpointMetadata.from_json(
            restored["meta"], os.path.join(self.directory, str(step))
        )

    def restore_latest(
        self, abstract_state_fn: Callable[[CheckpointMetadata], Any]
    ) -> tuple[Any, CheckpointMetadata] | None:
        """Restores the newest readable train-state checkpoint.

        A checkpoint is restored only into the structure it was saved with:
        its stored tree (names, shapes, dtypes) is compared with the target
        first. A checkpoint that cannot be read at all (damaged, truncated)
        is skipped, with a warning, for the one before, and set aside in
        ``<workdir>/unreadable_checkpoints/``; a readable one that holds
        something else is an error, and nothing is moved.

        Args:
          abstract_state_fn: maps a checkpoint's metadata to the abstract
            state (``jax.eval_shape`` of a fresh state) of that depth; it may
            raise `CheckpointMismatchError`.

        Returns:
          ``(state, metadata)``, or None if there is no checkpoint.

        Raises:
          CheckpointMismatchError: if the newest readable checkpoint holds
            another structure than ``abstract_state_fn`` gives, or only a
            model (``kind == MODEL``, e.g. written by ``mlres_jax.grow``).
          CheckpointError: for metadata of another format version, or if
            checkpoints exist but none can be read.
        """
        failures = []
        for step in reversed(self.all_steps()):
            try:
                state, metadata = self._restore_step(step, abstract_state_fn)
            except _Unreadable as error:
                failures.append(str(error))
                logging.warning("%s; falling back to the previous checkpoint", error)
                continue
            if failures:
                logging.warning("Restored the checkpoint of step %d instead", step)
                self._set_aside_steps_after(step)
            return state, metadata
        if failures:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: " + "; ".join(failures)
            )
        return None

    def _restore_step(self, step: int, abstract_state_fn):
        metadata = self._unless_damaged(step, lambda: self.read_metadata(step))
        if metadata.kind != TRAIN_STATE:
            raise CheckpointMismatchError(_model_only_message(self.directory, metadata))
        target = abstract_state_fn(metadata)
        stored = self._unless_damaged(
            step, lambda: tree_shapes(self._manager.item_metadata(step)["state"])
        )
        expected = tree_shapes(target)
        if stored != expected:
            raise CheckpointMismatchError(
                f"the checkpoint of step {step} in {self.directory} holds "
                f"{describe_tree(stored)}, but {describe_tree(expected)} was expected"
                f"{_differences(stored, expected)}. It is readable and was left "
                "as it is: restore it into its own structure (its metadata says "
                f"{format_network(metadata)}), or use another folder."
            )
        state = self._unless_damaged(
            step,
            lambda: jax.block_until_ready(
                self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
                )["state"]
            ),
        )
        return state, metadata

    @staticmethod
    def _unless_damaged(step: int, read: Callable[[], Any]) -> Any:
        """``read()``, with any error but a `CheckpointError` reported as damage."""
        try:
            result = read()
        except CheckpointError:
            raise
        except Exception as error:  # orbax raises many types for damaged files
            raise _Unreadable(
                f"checkpoint of step {step} is unreadable ({errors.one_line(error)})"
            ) from error
        if result is None:
            raise _Unreadable(f"checkpoint of step {step} is unreadable (no tree metadata)")
        return result

    def _set_aside_steps_after(self, step: int) -> None:
        """Moves unreadable checkpoints newer than ``step`` out of the way.

        They go to ``<workdir>/unreadable_checkpoints/<step>`` (kept for
        inspection, never deleted), so that training can save those steps
        again.
        """
        aside = os.path.join(os.path.dirname(self.directory), UNREADABLE_FOLDER)
        for bad in [s for s in self.all_steps() if s > step]:
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, str(bad))
            if os.path.exists(target):
                target += f".{len(os.listdir(aside))}"
            os.replace(os.path.join(self.directory, str(bad)), target)
            logging.warning("Moved the unreadable checkpoint of step %d to %s", bad, target)
        self._manager.reload()

    def restore_variables(self, step: int) -> tuple[dict, CheckpointMetadata]:
        """Restores the model variables of the checkpoint of ``step``, without a target.

        Args:
          step: which checkpoint (one of `all_steps`; `load_model` checks it).

        Returns:
          ``({"params", "batch_stats"}`` on this process's first device,
          metadata)``, whatever the devices that wrote the checkpoint.

        Raises:
          CheckpointError: if it is unreadable.
        """
        try:
            metadata = self.read_metadata(step)
            # A target on this process's first device: the checkpoint may have
            # been written by another number of devices or processes.
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                self._manager.item_metadata(step)["state"].tree,
            )
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(
                f"checkpoint of step {step} in {self.directory} is unreadable "
                f"({errors.one_line(error)})"
            ) from error
        tree = restored["state"]
        return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, metadata

    def close(self) -> None:
        """Releases orbax's resources (thread pools)."""
        self._manager.close()


def unfinished_saves(directory: str) -> list[str]:
    """Temporary folders of saves that did not finish in a checkpoint folder (orbax's).

    Args:
      directory: a ``<workdir>/checkpoints`` folder (`checkpoint_dir`).

    Returns:
      Their paths, sorted; [] if there is no such folder.
    """
    if not os.path.isdir(directory):
        return []
    return sorted(str(temporary.get()) for temporary in ocp.utils.tmp_checkpoints(directory))


def list_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in ``<workdir>/checkpoints``; [] if none."""
    return complete_steps(checkpoint_dir(workdir))


def complete_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in a checkpoint folder, ascending; [] if none.

    Read from the folder alone (orbax's ``utils.checkpoint_steps``: a save in
    progress is a temporary folder until it is complete), so that one process
    of a multi-process run, or a signal handler, may call it: opening a
    ``CheckpointManager`` is a step all processes must take together.
    """
    return sorted(ocp.utils.checkpoint_steps(directory))


# Reading a folder that another run may be writing: that run deletes its
# oldest checkpoint after each save (config.checkpoints_to_keep), possibly
# while it is read. Reads are made from a private copy, and made again (of
# the newest checkpoint) when the one read was deleted meanwhile.
_READ_ATTEMPTS = 5
_DELETION_SECONDS = 0.2  # lets a deletion in progress finish before looking


def _restore_from_copy(workdir: str, step: int) -> tuple[dict, CheckpointMetadata] | None:
    """`Checkpointer.restore_variables` of checkpoint ``step``, read from a private copy.

    orbax never changes a finished checkpoint's files, so a copy that
    completes, of a checkpoint that still exists afterwards, is that
    checkpoint whole: nothing another run does to the folder meanwhile
    (deleting this checkpoint, saving others) reaches the reading.

    Returns:
      ``(variables, metadata)``, or None if the checkpoint was deleted while
      it was copied or read.

    Raises:
      CheckpointError: if it cannot be read although it is still there.
    """
    source = os.path.join(checkpoint_dir(workdir), str(step))
    with tempfile.TemporaryDirectory(prefix="mlres_jax_checkpoint_") as copy:
        try:
            shutil.copytree(source, os.path.join(copy, CHECKPOINT_FOLDER, str(step)))
            with Checkpointer(copy, create=False) as checkpointer:
                return checkpointer.restore_variables(step)
        except Exception as error:  # copying: OSError, shutil.Error; orbax: many
            time.sleep(_DELETION_SECONDS)
            if os.path.isdir(source) and step in list_steps(workdir):
                if isinstance(error, CheckpointError):
                    raise CheckpointError(
                        str(error).replace(
                            os.path.join(copy, CHECKPOINT_FOLDER), checkpoint_dir(workdir)
                        )
                    ) from None
                raise CheckpointError(
                    f"checkpoint of step {step} in {checkpoint_dir(workdir)} "
                    f"cannot be read ({errors.one_line(error)})"
                ) from None
            return None


def load_model(workdir: str, step: int | None = None):
    """The network and variables of a run's checkpoint (for analyses, growing, ``init_from``).

    The run may still be writing the folder: the checkpoint is read from a
    private copy, and if that run deletes it meanwhile (it keeps only its
    newest ``checkpoints_to_keep``), the newest one is read instead (a
    requested ``step`` that is gone is refused).

    Args:
      workdir: the run's folder (holding ``checkpoints/``).
      step: which checkpoint; the latest if None.

    Returns:
      ``(model, variables, metadata)``: a `models.ResNet` of the checkpoint's
      depth and step size h, ``{"params", "batch_stats"}`` as jax arrays, and
      the checkpoint's `CheckpointMetadata`. The model and the variables are
      in the unrolled layout (``stageN/blockM``) whatever the run's, converted
      from the scanned one where needed (`multilevel.convert_layout`).

    Raises:
      CheckpointError: if there is no such readable checkpoint, or the run
        writing the folder deleted ``_READ_ATTEMPTS`` checkpoints in turn
        while they were read.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoints in {directory}")
    for attempt in range(1, _READ_ATTEMPTS + 1):
        try:
            steps = list_steps(workdir)
        except FileNotFoundError:  # a checkpoint deleted while it was listed
            steps = None
        if not steps:  # None, or none between a deletion and a rename
            if steps is not None and attempt == _READ_ATTEMPTS:
                raise CheckpointError(f"no checkpoint in {directory}")
            time.sleep(_DELETION_SECONDS)
            continue
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {directory}; steps: {steps}")
        chosen = steps[-1] if step is None else step
        restored = _restore_from_copy(workdir, chosen)
        if restored is not None:
            break
        logging.info(
            "The checkpoint of step %d in %s was deleted while it was read (the "
            "run writing there saved a newer one)",
            chosen,
            directory,
        )
    else:
        raise CheckpointError(
            f"the checkpoints in {directory} were deleted while they were read, "
            f"{_READ_ATTEMPTS} in turn: the run writing there replaces them faster than "
            "they can be copied. Read them after it stops, or from a copy of a checkpoint."
        )
    variables, metadata = restored
    variables = multilevel.convert_layout(
        jax.tree.map(jax.numpy.asarray, variables),
        multilevel.layout_of(metadata.scan_blocks),
        multilevel.STAGES,
    )
    return metadata.model().clone(scan_blocks=False), variables, metadata


def save_model(workdir: str, variables: dict, metadata: CheckpointMetadata) -> None:
    """Writes a model-only checkpoint (kind `MODEL`) that `load_model` reads.

    Used by the offline interpolation command (``mlres_jax.grow``).

    Args:
      workdir: folder to write ``checkpoints/<metadata.step>`` into.
      variables: ``{"params", "batch_stats"}``.
      metadata: its description; saved with ``kind = MODEL``.
    """
    with Checkpointer(workdir, max_to_keep=1) as checkpointer:
        checkpointer.save(
            jax.tree.map(np.asarray, variables), dataclasses.replace(metadata, kind=MODEL)
        )
