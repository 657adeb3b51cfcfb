"""Training and evaluation of a multi-level (or fixed-depth) run.

`train_and_evaluate` reads like the method: prepare the run, restore it or
start it, then for each cycle of `plan.plan_cycles` grow the network if
the cycle is deeper (interpolation of the whole train state, h halved; paper
Sec. 4.1), train the cycle under one cosine cycle of the learning rate
(paper Eq. 9) and record it; finally write ``summary.json``.

Each phase is a top-level function below it that takes the `Loop` and the
cycle. `Run` holds what is fixed for the whole run, `Progress` what changes
(the train state, the history, the stopwatch of the current cycle) and what a
checkpoint restores; `Loop` holds both and the run's long-lived parts (the
checkpointer, the stop agreement, the step compiler, the training data),
opened in one place in `train_and_evaluate`.

Side effects of training live here: logging, the progress bar, TensorBoard
events, checkpoints (through `mlres_jax.checkpoint`) and ``summary.json``.
The train state and the jitted steps are in `mlres_jax.steps`, the records
and the table in `mlres_jax.reporting`; the model and the tree surgery are
pure and live in `mlres_jax.models` and `mlres_jax.multilevel`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from mlres_jax import (
    checkpoint,
    configuration,
    cpu_backend,
    datasets,
    errors,
    events,
    files,
    input_pipeline,
    models,
    multilevel,
    parallel,
    plan,
    reporting,
    steps,
    stopping,
    stopwatch,
)
from mlres_jax import (
    workdir as workdirs,
)

SUMMARY_FILE = "summary.json"


class NonFiniteLossError(errors.UserError, RuntimeError):
    """Training produced a non-finite loss, gradient or update."""


@dataclasses.dataclass(frozen=True)
class Run:
    """The parts of a run that are fixed from its start (`prepare_run`).

    Attributes:
      config: the resolved config (``configs/default.py`` documents it).
      workdir: folder for checkpoints, events and ``summary.json``.
      data: the whole data set in host memory.
      cycles: the plan of cycles (`plan.plan_cycles`).
      steps_per_epoch: training steps per epoch.
      eval_every_steps: steps between evaluations on the test split.
      schedule: learning rate as a function of the global step.
      optimizer: SGD with momentum and weight decay over ``schedule``.
      init_rng: PRNG key of the initial parameters.
      augment_rng: PRNG key of the augmentation (folded with the step).
      mesh: the devices of all processes, one ``"data"`` axis
        (`parallel.make_mesh`).
      initial_variables: with ``config.init_from``, the variables (unrolled
        layout) of the checkpoint the run starts from, read by `check_config`;
        else None.
    """

    config: ml_collections.ConfigDict
    workdir: str
    data: datasets.DataSet
    cycles: tuple[plan.Cycle, ...]
    steps_per_epoch: int
    eval_every_steps: int
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    init_rng: jax.Array
    augment_rng: jax.Array
    mesh: parallel.Mesh
    initial_variables: dict | None = None

    @property
    def is_main(self) -> bool:
        """Whether this process writes the logs, events, ``summary.json`` and lock."""
        return parallel.is_main_process()

    def model(self, stage_sizes, step_size: float) -> models.ResNet:
        """The network of the given depth and step size h, in the config's layout and dtype.

        The one place where a run's backend chooses the model's convolution
        (`cpu_backend.scanned_conv`).
        """
        return models.ResNet(
            stage_sizes=tuple(stage_sizes),
            width=self.config.width,
            num_classes=self.data.info.num_classes,
            step_size=step_size,
            scan_blocks=self.config.scan_blocks,
            dtype=jnp.dtype(self.config.compute_dtype),
            scanned_conv=cpu_backend.scanned_conv(),
        )

    def fresh_state(self, cycle: plan.Cycle) -> steps.TrainState:
        """A freshly initialised train state of the cycle's network.

        A growth takes from it only the blocks its rule makes from nothing
        (a one-block stage, `multilevel.grows_one_block_stages`); its key is
        the initial parameters' folded with the cycle's index.
        """
        return steps.create_train_state(
            jax.random.fold_in(self.init_rng, cycle.index),
            self.model(cycle.stage_sizes, cycle.step_size),
            self.optimizer,
            self.data.info.image_shape,
        )

    @property
    def layout(self) -> multilevel.StageLayout:
        """How the parameters keep their blocks (`multilevel.layout_of`)."""
        return multilevel.layout_of(self.config.scan_blocks)

    def epoch(self, step: int) -> float:
        """``step`` (global, 0-based count of steps taken) in epochs."""
        return step / self.steps_per_epoch


@dataclasses.dataclass
class Progress:
    """What changes during a run; all of it but ``writer`` is in every checkpoint.

    Attributes:
      state: the train state, None before the first cycle starts.
      stage_sizes: blocks per stage of ``state``'s network.
      step: global steps taken.
      history: evaluation records (`reporting.evaluation_record`).
      cycle_records: records of the finished cycles (`reporting.cycle_record`).
      growths: records of the growths so far (`reporting.growth_record`).
      stopwatch: times of the current cycle.
      writer: the TensorBoard event writer.
    """

    state: steps.TrainState | None = None
    stage_sizes: tuple[int, ...] | None = None
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    cycle_records: list = dataclasses.field(default_factory=list)
    growths: list = dataclasses.field(default_factory=list)
    stopwatch: stopwatch.Stopwatch | None = None
    writer: Any = None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every cycle of a run and evaluates on the whole test split.

    If ``workdir`` holds checkpoints of the same run, training resumes from
    the newest readable one and ends with the same result as an
    uninterrupted run; if the run is complete, its summary is returned
    (a missing or damaged ``summary.json`` is written again from the last
    checkpoint).

    Args:
      config: see ``configs/default.py``; validated first.
      workdir: folder for checkpoints, TensorBoard events and
        ``summary.json``; created (and removed again if the run fails
        before it started training).

    Returns:
      The summary written to ``workdir/summary.json``
      (`reporting.run_summary`).

    Every error a user can cause is an `errors.UserError` with a message
    that says what to do; the cheap ones come before any work.

    Raises:
      configuration.ConfigError: for a field with a value not allowed, or a
        cycle that rounds to zero steps on the data found.
      datasets.DataSetError: if the data set is missing or damaged.
      workdir.WorkdirBusyError: if another process is writing to ``workdir``.
      workdir.WorkdirStorageError: if a folder or file the run writes
        cannot be written, or its file system has no room for the
        checkpoints (before any work).
      checkpoint.CheckpointMismatchError: if the workdir's checkpoints are of a
        run with another model or schedule, or its newest readable checkpoint
        holds another structure, or only a model (a ``mlres_jax.grow`` output).
      checkpoint.CheckpointError: if a checkpoint cannot be written (naming
        the newest complete one) or none of the existing ones can be read.
      NonFiniteLossError: if the loss or a gradient stops being finite.
      stopping.Interrupted: on SIGINT or SIGTERM, after saving a checkpoint.
      OSError: if ``workdir`` cannot be written.
    """
    start = time.perf_counter()
    config, mesh, initial_variables = check_config(config)
    with _hold_workdir(workdir, config) as holding:
        run = prepare_run(config, workdir, mesh, initial_variables)
        with contextlib.ExitStack() as contexts:
            checkpointer = contexts.enter_context(
                checkpoint.Checkpointer(workdir, config.checkpoints_to_keep)
            )
            progress = restore_or_start(run, checkpointer)
            if progress.step == run.cycles[-1].end_step:
                summary = _finished_summary(run)
                if summary is not None:
                    return summary  # else it is rebuilt from the checkpoint below
            progress.writer = contexts.enter_context(_open_event_writer(run, progress))
            request = contexts.enter_context(stopping.StopRequest(checkpointer.directory))
            contexts.enter_context(_peer_loss_reported(request))
            request.steps_done = progress.step
            train_data = parallel.put_replicated(
                (run.data.train_images, run.data.train_labels), run.mesh
            )
            holding.recorded = True  # from here on the workdir is kept
            compiler = contexts.enter_context(
                steps.StepCompiler(
                    run.model,
                    ahead=run.config.compile_ahead,
                    optimizer=run.optimizer,
                    train_images=train_data[0],
                    train_labels=train_data[1],
                    rng=run.augment_rng,
                    batch_size=run.config.batch_size,
                    eval_batch_size=run.config.eval_batch_size,  # fitted to the test split
                    crop_padding=run.config.crop_padding,
                    mesh=run.mesh,
                )
            )
            loop = Loop(
                run, progress, checkpointer, stopping.StopAgreement(request), compiler, train_data
            )
            for cycle in run.cycles:
                if cycle.end_step <= progress.step:
                    continue  # finished before the restored checkpoint
                stop_if_requested(loop, cycle)
                enter_cycle(loop, cycle)
                train_cycle(loop, cycle, cycle_steps(loop, cycle))
                finish_cycle(loop, cycle)
        return write_summary(run, progress, time.perf_counter() - start)


@dataclasses.dataclass
class Loop:
    """A run's long-lived parts, opened in `train_and_evaluate`; every phase takes it.

    Attributes:
      run: what is fixed for the whole run.
      progress: what changes, and what a checkpoint restores.
      checkpointer: the run's checkpoints.
      stop: the processes' agreement on a stop (SIGINT, SIGTERM).
      compiler: the compiled steps of each network.
      train_data: the training images and labels, replicated on the mesh.
    """

    run: Run
    progress: Progress
    checkpointer: checkpoint.Checkpointer
    stop: stopping.StopAgreement
    compiler: steps.StepCompiler
    train_data: tuple[jax.Array, jax.Array]


@contextlib.contextmanager
def _peer_loss_reported(request: stopping.StopRequest):
    """With several processes, a failed step, save or collective is reported as a lost peer.

    JAX raises its runtime error in the processes that are left when a
    collective's peer is gone (on the CPU at once; on GPUs the collective may
    instead hang, which `stopping.StopAgreement` watches for); a checkpoint
    save fails with the same text.
    """
    try:
        yield
    except Exception as error:  # pylint: disable=broad-except
        if jax.process_count() == 1 or not stopping.is_collective_failure(error):
            raise
        raise stopping.peer_lost(error, request) from error


# ---------------------------------------------------------------------------
# Setting up, restoring, starting.


def check_config(
    config: ml_collections.ConfigDict,
) -> tuple[ml_collections.ConfigDict, parallel.Mesh, dict | None]:
    """Everything a user can get wrong, checked in seconds before any work.

    The config's fields (`configuration.resolve`), the ``init_from``
    checkpoint (read whole here, once, before the workdir is made: its
    network sets the run's, `configuration.start_from`), the data set's
    presence and the readability of its headers
    (`datasets.check_available`), the fields that depend on its size,
    such as a cycle that rounds to zero steps
    (`configuration.check_against_data`), and the devices: the mesh of
    ``num_devices`` must split both batch sizes evenly.

    Returns:
      The resolved config, the device mesh (`parallel.make_mesh`) and the
      ``init_from`` checkpoint's variables (None without ``init_from``).

    Raises:
      configuration.ConfigError, datasets.DataSetError, errors.UserError,
      checkpoint.CheckpointError (an unreadable ``init_from`` checkpoint).
    """
    config = configuration.resolve(config)
    initial_variables = None
    if config.init_from:
        metadata, initial_variables = _read_init_from(config.init_from)
        config = configuration.start_from(config, metadata)
    num_train = datasets.check_available(
        config.dataset, data_dir=config.data_dir, fashion_mnist_dir=config.fashion_mnist_dir
    )
    configuration.check_against_data(config, num_train)
    mesh = parallel.make_mesh(config.num_devices)
    for field in ("batch_size", "eval_batch_size"):
        parallel.check_batch_divides(field, config[field], mesh)
    return config, mesh, initial_variables


def _read_init_from(folder: str) -> tuple[checkpoint.CheckpointMetadata, dict]:
    """The metadata and variables of the latest checkpoint in ``folder`` (``config.init_from``).

    One checkpoint, read from a private copy (`checkpoint.load_model`): the
    run that writes ``folder`` may be saving and deleting checkpoints meanwhile.
    """
    if not checkpoint.list_steps(folder):
        raise configuration.ConfigError(
            f"config.init_from = {folder!r} is not allowed: there is no checkpoint in "
            f"{checkpoint.checkpoint_dir(folder)} (give a run's folder, or the output of "
            "python -m mlres_jax.grow)"
        )
    _, variables, metadata = checkpoint.load_model(folder)
    logging.info(
        "config.init_from: the checkpoint of step %d in %s (%s)",
        metadata.step,
        folder,
        checkpoint.format_network(metadata),
    )
    return metadata, variables


def prepare_run(
    config: ml_collections.ConfigDict,
    workdir: str,
    mesh: parallel.Mesh,
    initial_variables: dict | None = None,
) -> Run:
    """Loads the data and plans the cycles of a checked config (`check_config`).

    The evaluation batch is fitted to the test split found
    (`_with_fitted_eval_batch`).

    Args:
      config, mesh, initial_variables: as `check_config` returns them.
      workdir: the run's folder.

    Raises:
      datasets.DataSetError: if a file turns out to be damaged.
    """
    logging.info("Loading %s ...", config.dataset)
    data = datasets.load(
        config.dataset, data_dir=config.data_dir, fashion_mnist_dir=config.fashion_mnist_dir
    )
    config = _with_fitted_eval_batch(config, len(data.test_labels), mesh)
    num_train = len(data.train_labels)
    steps_per_epoch = num_train // config.batch_size
    cycles = tuple(plan.plan_cycles_of_config(config, steps_per_epoch))
    schedule = plan.learning_rate_schedule(
        cycles, config.learning_rate_max, config.learning_rate_min
    )
    init_rng, augment_rng = jax.random.split(jax.random.key(config.seed))
    augment_rng = parallel.put_replicated(augment_rng, mesh)
    run = Run(
        config=config,
        workdir=workdir,
        data=data,
        cycles=cycles,
        mesh=mesh,
        steps_per_epoch=steps_per_epoch,
        eval_every_steps=max(1, round(config.eval_every_epochs * steps_per_epoch)),
        schedule=schedule,
        optimizer=steps.create_optimizer(config, schedule),
        init_rng=init_rng,
        augment_rng=augment_rng,
        initial_variables=initial_variables,
    )
    logging.info("Running on %s", parallel.describe_environment(parallel.environment()))
    logging.info(
        "Data parallel over %d %s device(s) of %d process(es): %d examples per device per step",
        mesh.devices.size,
        jax.devices()[0].platform,
        jax.process_count(),
        config.batch_size // mesh.devices.size,
    )
    logging.info(
        "%s: %d train / %d test examples, batch %d, %d steps per epoch; %d cycle(s): %s",
        config.dataset,
        num_train,
        len(data.test_labels),
        config.batch_size,
        steps_per_epoch,
        len(cycles),
        ", ".join(
            f"{models.format_stage_sizes(c.stage_sizes)} h={c.step_size:g} for {c.num_steps} steps"
            for c in cycles
        ),
    )
    return run


def _with_fitted_eval_batch(
    config: ml_collections.ConfigDict, num_test: int, mesh: parallel.Mesh
) -> ml_collections.ConfigDict:
    """The config with ``eval_batch_size`` no larger than the test split needs.

    The one place where the run's evaluation batch is set: every evaluation
    of the run (the compiled eval step, the growths' train subset) uses it.
    See `input_pipeline.fitted_eval_batch_size`.
    """
    fitted = input_pipeline.fitted_eval_batch_size(
        config.eval_batch_size, num_test, mesh.devices.size
    )
    if fitted == config.eval_batch_size:
        return config
    logging.info(
        "config.eval_batch_size = %d is more than the %d test images need: "
        "evaluating in batches of %d",
        config.eval_batch_size,
        num_test,
        fitted,
    )
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval_batch_size = fitted
    return config


def restore_or_start(run: Run, checkpointer: checkpoint.Checkpointer) -> Progress:
    """The progress of the newest readable checkpoint, or of a new run.

    Raises:
      checkpoint.CheckpointMismatchError: if the checkpoint's config differs in a
        field that matters (`checkpoint.config_differences`).
      checkpoint.CheckpointError: if checkpoints exist but none is readable.
    """

    def abstract_state(metadata: checkpoint.CheckpointMetadata):
        differences = checkpoint.config_differences(metadata.config, run.config.to_dict())
        if differences:
            raise checkpoint.CheckpointMismatchError(
                f"cannot resume from the checkpoint of step {metadata.step} in "
                f"{run.workdir}: the config differs in "
                + "; ".join(differences)
                + ". Use another --workdir, or the checkpoint's values."
            )
        shapes = jax.eval_shape(
            lambda: steps.create_train_state(
                run.init_rng, metadata.model(), run.optimizer, run.data.info.image_shape
            )
        )
        # Restored replicated on this run's mesh, whatever the devices that wrote it.
        whole = parallel.replicated(run.mesh)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), shapes
        )

    restored = checkpointer.restore_latest(abstract_state)
    if restored is None:
        return Progress()
    state, metadata = restored
    logging.info(
        "Resumed from the checkpoint of step %d: cycle %d (%s blocks), epoch %.2f",
        metadata.step,
        metadata.cycle,
        models.format_stage_sizes(metadata.stage_sizes),
        run.epoch(metadata.step),
    )
    return Progress(
        state=state,
        stage_sizes=tuple(metadata.stage_sizes),
        step=metadata.step,
        history=list(metadata.history),
        cycle_records=list(metadata.cycle_records),
        growths=list(metadata.growths),
        stopwatch=stopwatch.Stopwatch(metadata.stopwatch),
    )


def enter_cycle(loop: Loop, cycle: plan.Cycle) -> None:
    """Makes the train state the cycle's: fresh, interpolated, or as restored.

    A cycle that starts (rather than resumes) gets a new stopwatch, so that
    initialisation and interpolation count as its training time.
    """
    run, progress = loop.run, loop.progress
    if progress.step <= cycle.first_step:
        progress.stopwatch = stopwatch.Stopwatch()
    if progress.state is None:
        progress.state = parallel.put_replicated(_initial_state(run, cycle), run.mesh)
    elif progress.stage_sizes != cycle.stage_sizes:
        interpolate_and_measure(loop, cycle)
    progress.stage_sizes = cycle.stage_sizes


def cycle_steps(loop: Loop, cycle: plan.Cycle) -> steps.CompiledSteps:
    """The cycle's compiled steps; then the next deeper cycle's start compiling ahead.

    The time the cycle waits for its steps is booked as compiling on its
    stopwatch. The next cycle's steps are compiled from the shapes of the
    state it will have (`jax.eval_shape` of the interpolation).
    """
    run, state = loop.run, loop.progress.state
    start = time.perf_counter()
    compiled = loop.compiler.steps_for(cycle, state)
    loop.progress.stopwatch.add_compile_seconds(time.perf_counter() - start)
    following = run.cycles[cycle.index + 1 : cycle.index + 2]
    if following:
        after = following[0]
        grows = after.stage_sizes != cycle.stage_sizes
        loop.compiler.compile_ahead(
            after,
            lambda: jax.eval_shape(lambda s: grown_state(run, s, after) if grows else s, state),
        )
    return compiled


def grown_state(run: Run, state: steps.TrainState, cycle: plan.Cycle) -> steps.TrainState:
    """``state`` interpolated into ``cycle``'s network under the config's rule and policy."""
    return steps.interpolate_train_state(
        state,
        run.config.interpolation_rule,
        run.config.momentum_at_interpolation,
        run.layout,
        initial=lambda: run.fresh_state(cycle),
    )


def _initial_state(run: Run, cycle: plan.Cycle) -> steps.TrainState:
    """A fresh train state; with ``config.init_from``, that checkpoint's variables in it."""
    model = run.model(cycle.stage_sizes, cycle.step_size)
    state = steps.create_train_state(run.init_rng, model, run.optimizer, run.data.info.image_shape)
    if run.initial_variables is None:
        return state
    logging.info("Starting from the checkpoint read from %s", run.config.init_from)
    variables = multilevel.convert_layout(run.initial_variables, multilevel.STAGES, run.layout)
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"])


def interpolate_and_measure(loop: Loop, cycle: plan.Cycle) -> None:
    """Interpolates the train state into the cycle's deeper network, measuring the jump.

    The train state goes through `steps.interpolate_train_state` under
    ``config.interpolation_rule`` and ``config.momentum_at_interpolation``.
    Just before and just after (same parameters otherwise), the network is
    evaluated on the test split and on the first ``growth_train_examples``
    training images; the differences are the growth's jump in loss and
    error, recorded in ``progress.growths``, the TensorBoard events and the
    summary. The test split before the growth is the cycle end's evaluation.
    Both evaluations use the eval steps the loop's compiler holds; waiting
    for the deeper network's steps counts as compiling (`cycle_steps`).
    """
    run, progress = loop.run, loop.progress
    previous = run.cycles[cycle.index - 1]
    with progress.stopwatch.pause(stopwatch.EVAL):
        before = _growth_evaluation(
            run,
            loop.compiler.eval_step_for(previous),
            progress.state.variables,
            test=progress.history[-1],
        )
    # Replicated in, replicated out: every leaf is an old leaf, a copy of one,
    # or made on the devices from old leaves, so `put_replicated` moves nothing.
    progress.state = parallel.put_replicated(grown_state(run, progress.state, cycle), run.mesh)
    evaluate = cycle_steps(loop, cycle).evaluate
    with progress.stopwatch.pause(stopwatch.EVAL):
        after = _growth_evaluation(run, evaluate, progress.state.variables)
    record = reporting.growth_record(
        cycle=cycle,
        step=progress.step,
        from_stage_sizes=previous.stage_sizes,
        rule=run.config.interpolation_rule,
        momentum=run.config.momentum_at_interpolation,
        before=before,
        after=after,
    )
    progress.growths.append(record)
    for name, value in record["jump"].items():
        if value is not None:
            progress.writer.add_scalar(f"growth/{name}_jump", value, progress.step)
    logging.info(
        "Interpolated %s -> %s blocks, h = %g (%s rule): %s",
        models.format_stage_sizes(previous.stage_sizes),
        models.format_stage_sizes(cycle.stage_sizes),
        cycle.step_size,
        run.config.interpolation_rule,
        reporting.growth_line(record),
    )


def _growth_evaluation(run: Run, evaluate, variables, test: dict | None = None) -> dict:
    """Test and train-subset loss and error under ``evaluate`` (test ones from ``test``)."""
    batch = run.config.eval_batch_size
    if test is None:
        test = {
            f"test_{k}": v
            for k, v in steps.evaluate(
                evaluate, variables, run.data.test_images, run.data.test_labels, batch, run.mesh
            ).items()
            if k != "count"
        }
    count = min(run.config.growth_train_examples, len(run.data.train_labels))
    train = (
        steps.evaluate(
            evaluate,
            variables,
            run.data.train_images[:count],
            run.data.train_labels[:count],
            batch,
            run.mesh,
        )
        if count
        else {"loss": None, "error": None}
    )
    return {
        "test_loss": test["test_loss"],
        "test_error": test["test_error"],
        "train_loss": train["loss"],
        "train_error": train["error"],
    }


# ---------------------------------------------------------------------------
# One cycle.


def train_cycle(loop: Loop, cycle: plan.Cycle, compiled: steps.CompiledSteps) -> None:
    """Trains the cycle's remaining steps, logging, evaluating and saving on schedule.

    The data order and the augmentation depend only on the seed and the
    step, so a resumed cycle continues exactly where it stopped. Before each
    step every process asks whether to stop (`stop_if_requested`).

    The host runs at most one step ahead of the devices: after queueing a
    step it waits for the one before to finish. So a stop requested while a
    step runs lands at most two steps later (that step and the one queued
    behind it), whatever ``log_every_steps`` is, and the devices never wait
    for the host.
    """
    run, progress, stop = loop.run, loop.progress, loop.stop
    config = run.config
    previous_metrics = None
    with _progress_bar(run, cycle, progress.step) as bar:
        order_epoch, order = None, None
        for step in range(max(progress.step, cycle.first_step), cycle.end_step):
            stop_if_requested(loop, cycle)
            epoch, position = divmod(step, run.steps_per_epoch)
            if order_epoch != epoch:
                order_epoch, order = (
                    epoch,
                    input_pipeline.train_batch_indices(
                        len(run.data.train_labels), config.batch_size, config.seed, epoch
                    ).astype(np.int32),
                )
            progress.state, metrics = compiled.train(
                progress.state,
                *loop.train_data,
                parallel.shard_batch(order[position], run.mesh),
                run.augment_rng,
            )
            if previous_metrics is not None:
                stop.wait_for_step(previous_metrics, steps_done=step)
            previous_metrics = metrics
            progress.step = done = step + 1
            bar.update(1)
            if done % config.log_every_steps == 0:
                log_train_metrics(loop, cycle, bar)
            if done % run.eval_every_steps == 0 or done == cycle.end_step:
                evaluate_and_record(loop, cycle, compiled, bar)
                stop.request.steps_done = done  # the evaluation waited for the step
            if done % config.checkpoint_every_steps == 0 and done != cycle.end_step:
                save_checkpoint(loop, cycle)
    stop.request.steps_done = progress.step


def log_train_metrics(loop: Loop, cycle: plan.Cycle, bar) -> None:
    """Writes the mean train loss and error since the last log, and the learning rate."""
    run, progress = loop.run, loop.progress
    check_finite(loop, cycle)
    progress.state, means = steps.take_metric_means(progress.state, "log")
    step = progress.step
    progress.writer.add_scalar("train/loss", means["loss"], step)
    progress.writer.add_scalar("train/accuracy", 1 - means["error"], step)
    progress.writer.add_scalar("train/learning_rate", float(run.schedule(step - 1)), step)
    bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{1 - means['error']:.3f}")


def evaluate_and_record(loop: Loop, cycle: plan.Cycle, compiled: steps.CompiledSteps, bar) -> None:
    """Evaluates on the whole test split and appends the record to the history."""
    run, progress = loop.run, loop.progress
    check_finite(loop, cycle)
    with progress.stopwatch.pause(stopwatch.EVAL):
        test = steps.evaluate(
            compiled.evaluate,
            progress.state.variables,
            run.data.test_images,
            run.data.test_labels,
            run.config.eval_batch_size,
            run.mesh,
        )
    progress.state, train = steps.take_metric_means(progress.state, "eval")
    record = reporting.evaluation_record(
        step=progress.step,
        steps_per_epoch=run.steps_per_epoch,
        cycle=cycle,
        train=train,
        test=test,
        learning_rate=run.schedule(progress.step - 1),
    )
    progress.history.append(record)
    for name in ("test_error", "test_loss", "train_error"):
        progress.writer.add_scalar(name.replace("_", "/", 1), record[name], progress.step)
    if run.is_main:
        bar.write(reporting.evaluation_line(record, cycle.stage_sizes))


def finish_cycle(loop: Loop, cycle: plan.Cycle) -> None:
    """Records the finished cycle and saves its last checkpoint.

    The record goes into that checkpoint, so it is made before the save; its
    times are then brought up to date, the last save's included (a run that
    resumes from this checkpoint has the record without that save's time).
    """
    run, progress = loop.run, loop.progress
    progress.cycle_records.append(
        reporting.cycle_record(
            cycle,
            num_params=models.count_parameters(progress.state.params),
            steps_per_epoch=run.steps_per_epoch,
            seconds=progress.stopwatch.to_dict(),
            last_evaluation=progress.history[-1],
        )
    )
    save_checkpoint(loop, cycle)
    progress.cycle_records[-1].update(
        {name: progress.stopwatch.to_dict()[name] for name in stopwatch.ACTIVITIES}
    )
    progress.writer.flush()


def save_checkpoint(loop: Loop, cycle: plan.Cycle) -> None:
    """Saves the train state and the progress as the checkpoint of the step reached."""
    run, progress = loop.run, loop.progress
    check_finite(loop, cycle)
    info = run.data.info
    metadata = checkpoint.CheckpointMetadata(
        step=progress.step,
        dataset=run.config.dataset,
        width=run.config.width,
        num_classes=info.num_classes,
        image_shape=info.image_shape,
        stage_sizes=cycle.stage_sizes,
        step_size=cycle.step_size,
        scan_blocks=run.config.scan_blocks,
        cycle=cycle.index + 1,
        epoch=run.epoch(progress.step),
        config=run.config.to_dict(),
        history=progress.history,
        cycle_records=progress.cycle_records,
        growths=progress.growths,
        stopwatch=progress.stopwatch.to_dict(),
    )
    with progress.stopwatch.pause(stopwatch.CHECKPOINT):
        progress.writer.flush()  # the events up to a checkpoint are on disk with it
        loop.checkpointer.save(progress.state, metadata)


def stop_with_checkpoint(loop: Loop, cycle: plan.Cycle, signal_number: int, name: str) -> None:
    """Saves the step reached (unless it is saved already) and stops the run.

    Called between two steps, where the train state is complete, by every
    process at the same step (`stopping.StopAgreement`).

    Args:
      signal_number: the exit status is 128 + it.
      name: the signal(s) and who received them (`StopAgreement.describe_signals`).

    Raises:
      stopping.Interrupted: always, saying where the run stopped and how to
        resume; the same message on every process.
    """
    run, progress, checkpointer = loop.run, loop.progress, loop.checkpointer
    if progress.state is None:
        raise stopping.Interrupted(
            f"stopped by {name} before the first step; nothing was trained, "
            "and the next run starts afresh",
            signal_number,
        )
    if progress.step not in checkpointer.all_steps():
        save_checkpoint(loop, cycle)
    progress.writer.flush()
    saved = checkpointer.read_metadata(progress.step)  # at a boundary: the cycle before
    raise stopping.Interrupted(
        f"stopped by {name} at step {progress.step} "
        f"(epoch {run.epoch(progress.step):.2f}); the checkpoint of step {progress.step} "
        f"(cycle {saved.cycle}, {models.format_stage_sizes(saved.stage_sizes)} blocks) is "
        f"in {checkpointer.directory}. To resume, run the same command again.",
        signal_number,
    )


def stop_if_requested(loop: Loop, cycle: plan.Cycle) -> None:
    """`stop_with_checkpoint` if any process asked to stop; called between cycles and steps."""
    signal_number = loop.stop.should_stop()
    if signal_number is not None:
        stop_with_checkpoint(loop, cycle, signal_number, loop.stop.describe_signals())


def check_finite(loop: Loop, cycle: plan.Cycle) -> None:
    """Stops the run if a step so far had a non-finite loss, gradient or update.

    Raises:
      NonFiniteLossError: naming the step, the cycle and the last good
        checkpoint (which the step did not touch: it was not applied).
    """
    bad = int(loop.progress.state.nonfinite_step)
    if bad < 0:
        return
    run, checkpointer = loop.run, loop.checkpointer
    kept = checkpointer.all_steps()
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {bad} (cycle {cycle.index + 1}, "
        f"epoch {run.epoch(bad):.2f}); training stopped. "
        + (
            f"The last good checkpoint, step {kept[-1]}, is kept in {checkpointer.directory}."
            if kept
            else "No checkpoint was written yet."
        )
    )


# ---------------------------------------------------------------------------
# Finishing, and small helpers.


def write_summary(run: Run, progress: Progress, wall_seconds: float) -> dict:
    """Writes ``summary.json`` (atomically) and returns it."""
    summary = reporting.run_summary(
        config=run.config.to_dict(),
        dataset={
            "name": run.config.dataset,
            "train_examples": len(run.data.train_labels),
            "test_examples": len(run.data.test_labels),
            "steps_per_epoch": run.steps_per_epoch,
        },
        cycles=run.cycles,
        cycle_records=progress.cycle_records,
        growths=progress.growths,
        history=progress.history,
        wall_seconds=wall_seconds,
        environment=parallel.environment(),
    )
    if run.is_main:
        files.write_json(_summary_path(run), summary)
    return summary


def _hold_workdir(workdir: str, config: ml_collections.ConfigDict):
    """The workdir's lock (`workdir.hold`), taken by the main process for all of them.

    It also checks, before any work, that every path the run writes there
    can be written and that its checkpoints fit.
    """
    if not parallel.is_main_process():
        return contextlib.nullcontext(workdirs.Holding())
    return workdirs.hold(
        workdir,
        files=(SUMMARY_FILE,),
        checkpoint_bytes=_checkpoint_bytes(config),
        checkpoints_to_keep=config.checkpoints_to_keep,
    )


def _summary_path(run: Run) -> str:
    return os.path.join(run.workdir, SUMMARY_FILE)


def _finished_summary(run: Run) -> dict | None:
    """The summary of a run that is complete, or None if it has to be (re)written.

    A missing or damaged ``summary.json`` (`reporting.read_summary`) is
    rebuilt from the last checkpoint, which holds the whole history: the
    caller goes on as if the run had just finished its last cycle.
    """
    try:
        summary = reporting.read_summary(_summary_path(run))
    except reporting.SummaryError as error:
        if os.path.lexists(_summary_path(run)):
            logging.warning("%s; rewriting it from the last checkpoint", error)
        return None
    logging.info(
        "The run in %s is already complete; nothing to do. Its summary: %s",
        run.workdir,
        _summary_path(run),
    )
    return summary


def _open_event_writer(run: Run, progress: Progress):
    """The TensorBoard writer; a resumed run's files keep no event after its checkpoint.

    Only the main process writes events; the others get a writer that drops them.
    """
    resumed = progress.state is not None
    writer = events.EventWriter(run.workdir, progress.step if resumed else None, run.is_main)
    if not resumed and run.is_main:
        writer.add_text("config", f"```\n{run.config}\n```", 0)
    return writer


def _progress_bar(run: Run, cycle: plan.Cycle, step: int):
    """A tqdm bar over the cycle's steps; off when stderr is not a terminal."""
    return tqdm.tqdm(
        total=cycle.num_steps,
        initial=max(0, step - cycle.first_step),
        disable=not (run.config.progress_bar and run.is_main and sys.stderr.isatty()),
        unit="step",
        desc=f"cycle {cycle.index + 1}/{len(run.cycles)} "
        f"{models.format_stage_sizes(cycle.stage_sizes)} h={cycle.step_size:g}",
    )


def _checkpoint_bytes(config: ml_collections.ConfigDict) -> int:
    """Disk space of one checkpoint of the run's deepest network (`checkpoint.estimated_bytes`).

    From a checked config alone (`check_config`), before any data is loaded:
    the deepest network has the stage sizes doubled at every growth (paper
    Sec. 4.1); the metadata holds at most one evaluation per
    ``eval_every_epochs`` and per cycle end, one record per cycle and growth.
    """
    info = datasets.DATASETS[config.dataset]
    cycles = len(config.cycle_boundaries) + 1
    deepest, _ = plan.cycle_networks(
        config.stage_sizes, config.step_size, cycles, config.multilevel
    )[-1]
    model = models.ResNet(
        stage_sizes=deepest,
        width=config.width,
        num_classes=info.num_classes,
        scan_blocks=config.scan_blocks,
    )
    shapes = jax.eval_shape(
        lambda: steps.create_train_state(
            jax.random.key(0),
            model,
            steps.create_optimizer(config, lambda step: 0.0),
            info.image_shape,
        )
    )
    records = math.ceil(config.num_epochs / config.eval_every_epochs) + 3 * cycles
    return checkpoint.estimated_bytes(shapes, records)
