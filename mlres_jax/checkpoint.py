"""Checkpoints of a run whose network changes depth, with orbax-checkpoint.

Each checkpoint is one orbax step folder ``<workdir>/checkpoints/<step>`` with
two items: ``state``, the whole train state (parameters, batch-norm
statistics, optimizer state, step, running metric sums), and ``meta``, a JSON
document that says how to rebuild the network of that depth (stage sizes,
step size h, width, classes, image shape), which cycle it belongs to, the
run's config and the history so far. Restoring reads ``meta`` first, builds
the abstract state of that depth and restores into it (the pattern of
STYLE.md's init2winit note).

orbax writes each step into a temporary folder and renames it when complete,
so a save killed half-way never replaces a good checkpoint; a checkpoint that
is unreadable anyway (a truncated file) is skipped in favour of the previous
one, with a warning.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mlres_jax import models

CHECKPOINT_FOLDER = "checkpoints"
META_FORMAT = 1

# Config fields a resumed run may change: they do not change the model, the
# data order, the optimisation or the schedule.
SAFE_TO_CHANGE = frozenset({
    "log_every_steps", "progress_bar", "eval_batch_size", "eval_every_epochs",
    "checkpoint_every_steps", "checkpoints_to_keep", "data_dir",
    "fashion_mnist_dir",
})


class CheckpointError(Exception):
    """A checkpoint cannot be written, read or used for this run."""


class ConfigMismatchError(CheckpointError):
    """The run's config differs from the checkpoint's in a field that matters."""


def config_differences(saved: dict, current: dict) -> list[str]:
    """Fields (outside `SAFE_TO_CHANGE`) whose values differ, as messages.

    Args:
      saved: the checkpoint's config as a dict.
      current: this run's resolved config as a dict.

    Returns:
      One ``"field: checkpoint X, now Y"`` line per differing field, sorted.
    """
    def normal(value):
        return list(value) if isinstance(value, tuple) else value

    lines = []
    for field in sorted(set(saved) | set(current)):
        if field in SAFE_TO_CHANGE:
            continue
        old, new = normal(saved.get(field)), normal(current.get(field))
        if old != new:
            lines.append(f"{field}: checkpoint {old!r}, now {new!r}")
    return lines


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_FOLDER)


def model_from_meta(meta: dict) -> models.ResNet:
    """The network a checkpoint's ``meta`` describes."""
    return models.ResNet(stage_sizes=tuple(meta["stage_sizes"]),
                         width=meta["width"], num_classes=meta["num_classes"],
                         step_size=meta["step_size"])


class Checkpointer:
    """Saves and restores the train state of one workdir.

    Args:
      workdir: the run's folder; checkpoints go to ``workdir/checkpoints``.
      max_to_keep: number of most recent checkpoints kept on disk.
      create: create the folder if missing (False for read-only use).
    """

    def __init__(self, workdir: str, max_to_keep: int = 3, create: bool = True):
        self.directory = checkpoint_dir(workdir)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=create,
                # Synchronous: the train step donates its state's buffers.
                enable_async_checkpointing=False),
            item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes ``state`` and ``meta`` as checkpoint ``step``, atomically.

        Raises:
          CheckpointError: if the write fails (disk full, permissions); the
            earlier checkpoints stay as they were.
        """
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(dict(meta, format=META_FORMAT, step=step))),
                force=True)
            self._manager.wait_until_finished()
        except Exception as error:  # orbax raises many types for I/O errors.
            kept = [s for s in self.all_steps() if s != step]
            raise CheckpointError(
                f"saving the checkpoint of step {step} in {self.directory} "
                f"failed: {error}. Earlier checkpoints are kept: steps {kept}"
            ) from error

    def read_meta(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_latest(
        self, abstract_state_fn: Callable[[dict], Any]
    ) -> tuple[Any, dict] | None:
        """Restores the newest readable checkpoint.

        Args:
          abstract_state_fn: maps a checkpoint's ``meta`` to the abstract
            state (``jax.eval_shape`` of a fresh state) of that depth.

        Returns:
          ``(state, meta)``, or None if there is no checkpoint. A checkpoint
          that cannot be read is skipped, with a warning, for the one before.

        Raises:
          CheckpointError: if checkpoints exist but none can be read.
        """
        steps = self.all_steps()
        failures = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
                target = abstract_state_fn(meta)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))
                state = restored["state"]
                jax.block_until_ready(state)
            except ConfigMismatchError:
                raise
            except Exception as error:  # a damaged checkpoint: try the previous one.
                message = f"checkpoint of step {step} is unreadable ({type(error).__name__}: {error})"
                failures.append(message)
                logging.warning("%s; falling back to the previous checkpoint", message)
                continue
            if failures:
                logging.warning("Restored the checkpoint of step %d instead", step)
                self._set_aside_steps_after(step)
            return state, meta
        if failures:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}: " + "; ".join(failures))
        return None

    def _set_aside_steps_after(self, step: int) -> None:
        """Moves unreadable checkpoints newer than ``step`` out of the way.

        They go to ``<workdir>/unreadable_checkpoints/<step>`` (kept for
        inspection, never deleted), so that training can save those steps
        again.
        """
        aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
        for bad in [s for s in self.all_steps() if s > step]:
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, str(bad))
            if os.path.exists(target):
                target += f".{len(os.listdir(aside))}"
            os.replace(os.path.join(self.directory, str(bad)), target)
            logging.warning("Moved the unreadable checkpoint of step %d to %s", bad, target)
        self._manager.reload()

    def restore_raw(self, step: int | None = None) -> tuple[dict, dict]:
        """Restores a checkpoint as plain nested dicts, without a target.

        Returns:
          ``(state_tree, meta)``.

        Raises:
          CheckpointError: if there is no such checkpoint or it is unreadable.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint of step {step} in {self.directory}; steps: {steps}")
        try:
            meta = self.read_meta(step)
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore()))
        except Exception as error:
            raise CheckpointError(
                f"checkpoint of step {step} in {self.directory} is unreadable: "
                f"{error}") from error
        return restored["state"], meta

    def close(self) -> None:
        self._manager.close()


def load_model(workdir: str, step: int | None = None):
    """The network and variables of a run's checkpoint (for analyses).

    Args:
      workdir: the run's folder (holding ``checkpoints/``).
      step: which checkpoint; the latest if None.

    Returns:
      ``(model, variables, meta)``: a `models.ResNet` of the checkpoint's
      depth and step size h, ``{"params", "batch_stats"}`` as jax arrays, and
      the checkpoint's metadata (``stage_sizes``, ``step_size``, ``width``,
      ``dataset``, ``cycle``, ``step``, ``config``, ...).

    Raises:
      CheckpointError: if there is no readable checkpoint.
    """
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise CheckpointError(f"no checkpoints in {checkpoint_dir(workdir)}")
    checkpointer = Checkpointer(workdir, create=False)
    try:
        tree, meta = checkpointer.restore_raw(step)
    finally:
        checkpointer.close()
    variables = jax.tree_util.tree_map(
        jax.numpy.asarray, {"params": tree["params"], "batch_stats": tree["batch_stats"]})
    return model_from_meta(meta), variables, meta


def save_model(workdir: str, variables: dict, meta: dict, step: int = 0) -> None:
    """Writes a model-only checkpoint that `load_model` reads.

    Used by the offline interpolation command (``mlres_jax.grow``).
    """
    checkpointer = Checkpointer(workdir, max_to_keep=1)
    try:
        checkpointer.save(step, jax.tree_util.tree_map(np.asarray, variables), meta)
    finally:
        checkpointer.close()


def check_writable(workdir: str) -> None:
    """Fails early if ``workdir`` cannot be created and written.

    Raises:
      OSError: naming the folder and what is wrong.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "wb") as handle:
            handle.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise OSError(f"workdir {workdir!r} is not writable: {error}") from None


def check_free_space(workdir: str, needed_bytes: int) -> None:
    """Fails early if ``workdir`` has less than ``needed_bytes`` free.

    Raises:
      OSError: naming the folder, the free and the needed space.
    """
    free = shutil.disk_usage(workdir).free
    if free < needed_bytes:
        raise OSError(
            f"workdir {workdir!r} has {free / 2**20:.1f} MiB free, but the "
            f"checkpoints of this run need about {needed_bytes / 2**20:.1f} MiB")
