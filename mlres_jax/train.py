"""Training and evaluation of a multi-level (or fixed-depth) run.

`train_and_evaluate` runs the cycles of `multilevel.plan_cycles`: it trains
each cycle's network under one cosine cycle of the learning rate, and at a
cycle boundary of a multi-level run interpolates the whole train state
(parameters, batch-norm statistics, momentum) into the next, deeper network
with h halved. The train step is compiled once per depth.

Side effects (logging, progress bar, TensorBoard events, checkpoints through
`checkpoint`, ``summary.json`` and the training-curves PNG) live here; the
model and the tree surgery are pure and live in `models` and `multilevel`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from mlres_jax import analysis, checkpoint, configuration, files, input_pipeline, models, multilevel


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: int32[] global step (0-based count of steps taken).
      params: trainable parameters (``models.ResNet`` names).
      batch_stats: batch-norm running statistics, same names.
      opt_state: optax state; its momentum mirrors ``params``.
      metric_sums: float32[] sums of ``loss``, ``accuracy`` and ``count``
        over the steps since the last evaluation (kept in the state so that a
        resumed run reports the same train metrics).
      nonfinite_step: int32[] the first step whose loss, gradient or update
        was not finite, or -1. Such a step leaves the state unchanged.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    metric_sums: dict
    nonfinite_step: jax.Array

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_model(config: ml_collections.ConfigDict, cycle: multilevel.Cycle,
                 num_classes: int) -> models.ResNet:
    """The network trained during ``cycle``."""
    return models.ResNet(stage_sizes=cycle.stage_sizes, width=config.width,
                         num_classes=num_classes, step_size=cycle.step_size)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and weight decay (paper Sec. 5.2).

    Weight decay is added to the gradient of every parameter before the
    momentum (L2 regularisation, as ``torch.optim.SGD(weight_decay=...)``).
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum),
    )


def create_train_state(rng: jax.Array, model: models.ResNet,
                       tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...]) -> TrainState:
    """A fresh train state at step 0."""
    variables = models.init_variables(model, rng, image_shape)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        metric_sums=zero_metric_sums(),
        nonfinite_step=jnp.array(-1, jnp.int32),
    )


def zero_metric_sums() -> dict:
    return {name: jnp.zeros((), jnp.float32) for name in ("loss", "accuracy", "count")}


def interpolate_train_state(state: TrainState, rule: str,
                            momentum_at_interpolation: str) -> TrainState:
    """Interpolates a train state to the next depth (paper Sec. 4.1).

    Parameters and batch-norm statistics go through `multilevel.interpolate`.
    The momentum is, by ``momentum_at_interpolation``, either interpolated
    the same way (``'interpolate'``, the default: each new block starts with
    the velocity of the block it copies) or zeroed (``'reset'``). The
    optimizer's step count is kept, so the global learning-rate schedule goes
    on; its restart comes from the schedule's cycle boundary.
    """
    opt_state = multilevel.interpolate(state.opt_state, rule)
    if momentum_at_interpolation == "reset":
        opt_state = multilevel.map_network_trees(
            lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree), opt_state)
    return state.replace(
        params=multilevel.interpolate(state.params, rule),
        batch_stats=multilevel.interpolate(state.batch_stats, rule),
        opt_state=opt_state,
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross entropy: float[B, K], int[B] -> float[B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, train_images: jax.Array,
               train_labels: jax.Array, batch_indices: jax.Array,
               base_rng: jax.Array, *, model: models.ResNet,
               tx: optax.GradientTransformation, crop_padding: int):
    """One SGD step on the mini-batch ``batch_indices`` of the training set.

    Args:
      state: the train state.
      train_images: uint8[N, H, W, C], the whole training set on device.
      train_labels: int32[N].
      batch_indices: int32[B], the examples of this step.
      base_rng: PRNG key of the run; this step's augmentation uses
        ``fold_in(base_rng, step)``.
      model, tx, crop_padding: bound with ``functools.partial``.

    Returns:
      ``(new_state, metrics)``, metrics float32 scalars ``loss`` (without
      weight decay) and ``accuracy`` of the mini-batch. If the loss, a
      gradient or an update is not finite, the returned state is the input
      state with ``nonfinite_step`` set (if not set already).
    """
    rng = jax.random.fold_in(base_rng, state.step)
    images = input_pipeline.preprocess_for_train(
        rng, train_images[batch_indices], crop_padding)
    labels = train_labels[batch_indices]

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images,
            train=True, mutable=["batch_stats"])
        return cross_entropy_loss(logits, labels).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss,
               "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    sums = {"loss": loss, "accuracy": metrics["accuracy"], "count": 1.0}
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, param_updates),
        batch_stats=updates["batch_stats"],
        opt_state=opt_state,
        metric_sums=jax.tree_util.tree_map(jnp.add, state.metric_sums, sums),
    )
    finite = jax.tree_util.tree_reduce(
        jnp.logical_and,
        jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)),
                               (loss, grads, param_updates, updates["batch_stats"])))
    failed = state.replace(nonfinite_step=jnp.where(
        state.nonfinite_step < 0, state.step, state.nonfinite_step))
    # A cond, not a tree-wide jnp.where: the select over every buffer makes
    # XLA's CPU compile several times slower (13 s against 3 s at 4-4-4).
    new_state = jax.lax.cond(finite, lambda: new_state, lambda: failed)
    return new_state, metrics


def eval_step(variables, images: jax.Array, labels: jax.Array,
              mask: jax.Array, *, model: models.ResNet) -> dict:
    """Sums of loss and errors over the real (``mask``) examples of a batch.

    Args:
      variables: ``params`` and ``batch_stats``.
      images: uint8[B, H, W, C]; labels: int32[B]; mask: bool[B].

    Returns:
      float32 scalars ``loss_sum``, ``error_count``, ``count``.
    """
    logits = model.apply(variables, input_pipeline.preprocess_for_eval(images),
                         train=False)
    wrong = (jnp.argmax(logits, -1) != labels) & mask
    return {
        "loss_sum": jnp.sum(jnp.where(mask, cross_entropy_loss(logits, labels), 0.0)),
        "error_count": jnp.sum(wrong.astype(jnp.float32)),
        "count": jnp.sum(mask.astype(jnp.float32)),
    }


def evaluate(compiled_eval_step, variables, images: np.ndarray,
             labels: np.ndarray, batch_size: int) -> dict[str, float]:
    """Test loss and error (fraction) over every example of ``images``."""
    totals = None
    for batch in input_pipeline.eval_batches(images, labels, batch_size):
        sums = compiled_eval_step(variables, *batch)
        totals = sums if totals is None else jax.tree_util.tree_map(
            jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"loss": float(totals["loss_sum"]) / count,
            "error": float(totals["error_count"]) / count,
            "count": int(count)}


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss, gradient or update."""



def _compile(fn, *args):
    """AOT-compiles ``fn`` for ``args``; returns (executable, seconds)."""
    start = time.perf_counter()
    executable = fn.lower(*args).compile()
    return executable, time.perf_counter() - start


def compile_step_functions(model, tx, config, state, train_images, train_labels, rng,
                           image_shape):
    """Compiles the train and eval steps for ``model``'s depth.

    Returns:
      ``(train_executable, eval_executable, compile_seconds)``.
    """
    train_fn = jax.jit(functools.partial(
        train_step, model=model, tx=tx, crop_padding=config.crop_padding),
        donate_argnums=0)
    indices = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
    compiled_train, train_seconds = _compile(
        train_fn, state, train_images, train_labels, indices, rng)
    eval_fn = jax.jit(functools.partial(eval_step, model=model))
    batch = config.eval_batch_size
    compiled_eval, eval_seconds = _compile(
        eval_fn, state.variables,
        jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.bool_))
    return compiled_train, compiled_eval, train_seconds + eval_seconds


def summary_table(summary: dict) -> str:
    """A plain-text table of a run's cycles and totals, for stdout."""
    header = (f"{'cycle':>5} {'blocks':>10} {'h':>7} {'params':>10} {'epochs':>7} "
              f"{'steps':>7} {'compile s':>9} {'train s':>8} {'eval s':>7} "
              f"{'train loss':>10} {'test error':>10}")
    lines = [header, "-" * len(header)]
    for c in summary["cycles"]:
        lines.append(
            f"{c['cycle']:>5} {models.format_stage_sizes(c['stage_sizes']):>10} "
            f"{c['step_size']:>7.4g} {c['num_params']:>10,} {c['epochs']:>7.4g} "
            f"{c['steps']:>7} {c['compile_seconds']:>9.1f} "
            f"{c['train_seconds']:>8.1f} {c['eval_seconds']:>7.1f} "
            f"{c['final_train_loss']:>10.4f} {100 * c['test_error']:>9.2f}%")
    t = summary["totals"]
    lines.append("-" * len(header))
    lines.append(
        f"total: {t['steps']} steps, train {t['train_seconds']:.1f} s "
        f"(compile {t['compile_seconds']:.1f} s), eval {t['eval_seconds']:.1f} s, "
        f"wall {t['wall_seconds']:.1f} s; final test error "
        f"{100 * t['final_test_error']:.2f}% ({t['test_examples']} examples)")
    return "\n".join(lines)


def _checkpoint_bytes(config, cycles, num_classes, image_shape) -> int:
    """Disk space the checkpoints of the deepest network will take, roughly."""
    model = models.ResNet(cycles[-1].stage_sizes, width=config.width,
                          num_classes=num_classes)
    shapes = jax.eval_shape(lambda: models.init_variables(
        model, jax.random.PRNGKey(0), image_shape))
    state_bytes = 4 * (2 * models.count_parameters(shapes["params"])
                       + models.count_parameters(shapes["batch_stats"]))
    return (config.checkpoints_to_keep + 1) * state_bytes + 2**20


def _raise_if_nonfinite(state: TrainState, cycle: multilevel.Cycle,
                        steps_per_epoch: int, checkpointer) -> None:
    bad = int(state.nonfinite_step)
    if bad < 0:
        return
    kept = checkpointer.all_steps()
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {bad} (cycle {cycle.index + 1}, "
        f"epoch {bad / steps_per_epoch:.2f}); training stopped. "
        + (f"The last good checkpoint, step {kept[-1]}, is kept in "
           f"{checkpointer.directory}." if kept else "No checkpoint was written yet."))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every cycle of a run and evaluates on the whole test split.

    If ``workdir`` holds checkpoints of the same run, training resumes from
    the newest readable one and ends with the same result as an
    uninterrupted run.

    Args:
      config: see ``configs/default.py``; validated first.
      workdir: folder for checkpoints, TensorBoard events and
        ``summary.json``; created.

    Returns:
      The summary written to ``workdir/summary.json`` (training curves go to
      ``workdir/training_curves.png``): per cycle the stage
      sizes, h, parameter count, epochs, steps, compile/train/eval seconds
      (wall clock; train includes compile), final train loss and test error;
      the totals; and the history of evaluations.

    Raises:
      configuration.ConfigError: for a field with a value not allowed.
      input_pipeline.DataSetUnavailableError: if the data set is missing.
      checkpoint.ConfigMismatchError: if the workdir's checkpoints are of a
        run with another model or schedule.
      checkpoint.CheckpointError: if a checkpoint cannot be written or none
        of the existing ones can be read.
      NonFiniteLossError: if the loss or a gradient stops being finite.
      OSError: if ``workdir`` cannot be written.
    """
    run_start = time.perf_counter()
    config = configuration.resolve(config)
    input_pipeline.check_available(config.dataset, data_dir=config.data_dir,
                                   fashion_mnist_dir=config.fashion_mnist_dir)
    checkpoint.check_writable(workdir)

    logging.info("Loading %s ...", config.dataset)
    data = input_pipeline.load(config.dataset, data_dir=config.data_dir,
                               fashion_mnist_dir=config.fashion_mnist_dir)
    info = data.info
    num_train = len(data.train_labels)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise configuration.ConfigError(
            f"config.batch_size = {config.batch_size} is larger than the "
            f"{num_train} training examples found for {config.dataset}")
    cycles = multilevel.plan_cycles(
        stage_sizes=config.stage_sizes, step_size=config.step_size,
        num_epochs=config.num_epochs, cycle_boundaries=config.cycle_boundaries,
        steps_per_epoch=steps_per_epoch, multilevel=config.multilevel)
    checkpoint.check_free_space(workdir, _checkpoint_bytes(
        config, cycles, info.num_classes, info.image_shape))
    schedule = multilevel.learning_rate_schedule(
        cycles, config.learning_rate_max, config.learning_rate_min)
    tx = create_optimizer(config, schedule)
    eval_every_steps = max(1, round(config.eval_every_epochs * steps_per_epoch))
    logging.info(
        "%s: %d train / %d test examples, batch %d, %d steps per epoch; "
        "%d cycles: %s", config.dataset, num_train, len(data.test_labels),
        config.batch_size, steps_per_epoch, len(cycles),
        ", ".join(f"{models.format_stage_sizes(c.stage_sizes)} h={c.step_size:g} for "
                  f"{c.num_steps} steps" for c in cycles))

    init_rng, augment_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def abstract_state(meta: dict):
        differences = checkpoint.config_differences(meta["config"], config.to_dict())
        if differences:
            raise checkpoint.ConfigMismatchError(
                f"cannot resume from the checkpoint of step {meta['step']} in "
                f"{workdir}: the config differs in " + "; ".join(differences)
                + ". Use another --workdir, or the checkpoint's values.")
        return jax.eval_shape(lambda: create_train_state(
            init_rng, checkpoint.model_from_meta(meta), tx, info.image_shape))

    checkpointer = checkpoint.Checkpointer(workdir, config.checkpoints_to_keep)
    restored = checkpointer.restore_latest(abstract_state)
    state, state_sizes, step = None, None, 0
    history, cycle_records = [], []
    elapsed = {"train_seconds": 0.0, "eval_seconds": 0.0, "compile_seconds": 0.0}
    if restored is not None:
        state, meta = restored
        state_sizes, step = tuple(meta["stage_sizes"]), meta["step"]
        history, cycle_records = meta["history"], meta["cycle_records"]
        elapsed = meta["cycle_elapsed"]
        logging.info("Resumed from the checkpoint of step %d: cycle %d (%s blocks), "
                     "epoch %.2f", step, meta["cycle"], models.format_stage_sizes(state_sizes),
                     step / steps_per_epoch)
        summary_path = os.path.join(workdir, "summary.json")
        if step == cycles[-1].end_step and os.path.exists(summary_path):
            logging.info("The run in %s is already complete; nothing to do. Its "
                         "summary: %s", workdir, summary_path)
            checkpointer.close()
            with open(summary_path) as handle:
                summary = json.load(handle)
            print(summary_table(summary), flush=True)
            return summary

    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    writer = SummaryWriter(logdir=workdir)
    writer.add_text("config", f"```\n{config}\n```", step)
    train_images = jax.device_put(data.train_images)
    train_labels = jax.device_put(data.train_labels)
    compiled = {}

    for cycle in cycles:
        if cycle.end_step <= step:
            continue  # finished before the restored checkpoint
        if step > cycle.first_step:
            timers = dict(elapsed)
        else:
            timers = {"train_seconds": 0.0, "eval_seconds": 0.0, "compile_seconds": 0.0}
        segment_start = time.perf_counter()
        segment_eval = 0.0
        model = create_model(config, cycle, info.num_classes)
        if state is None:
            state = create_train_state(init_rng, model, tx, info.image_shape)
        elif state_sizes != cycle.stage_sizes:
            state = interpolate_train_state(
                state, config.interpolation_rule, config.momentum_at_interpolation)
            logging.info("Interpolated %s -> %s blocks, h = %g",
                         models.format_stage_sizes(state_sizes), models.format_stage_sizes(cycle.stage_sizes),
                         cycle.step_size)
        state_sizes = cycle.stage_sizes
        key = (cycle.stage_sizes, cycle.step_size)
        if key not in compiled:
            compiled[key] = compile_step_functions(
                model, tx, config, state, train_images, train_labels, augment_rng,
                info.image_shape)
            timers["compile_seconds"] += compiled[key][2]
        compiled_train, compiled_eval, _ = compiled[key]
        num_params = models.count_parameters(state.params)

        def current_timers():
            return {"train_seconds": timers["train_seconds"] + time.perf_counter()
                    - segment_start - segment_eval,
                    "eval_seconds": timers["eval_seconds"] + segment_eval,
                    "compile_seconds": timers["compile_seconds"]}

        def save(at_step):
            _raise_if_nonfinite(state, cycle, steps_per_epoch, checkpointer)
            checkpointer.save(at_step, state, {
                "dataset": config.dataset, "width": config.width,
                "num_classes": info.num_classes, "image_shape": list(info.image_shape),
                "stage_sizes": list(cycle.stage_sizes), "step_size": cycle.step_size,
                "cycle": cycle.index + 1, "epoch": at_step / steps_per_epoch,
                "config": config.to_dict(), "history": history,
                "cycle_records": cycle_records, "cycle_elapsed": current_timers()})

        window, order, order_epoch = [], None, None
        bar = tqdm.tqdm(
            total=cycle.num_steps, initial=step - cycle.first_step if step > cycle.first_step else 0,
            disable=not config.progress_bar, unit="step",
            desc=f"cycle {cycle.index + 1}/{len(cycles)} "
                 f"{models.format_stage_sizes(cycle.stage_sizes)} h={cycle.step_size:g}")
        for step in range(max(step, cycle.first_step), cycle.end_step):
            epoch, position = divmod(step, steps_per_epoch)
            if order_epoch != epoch:
                order = jax.device_put(input_pipeline.train_batch_indices(
                    num_train, config.batch_size, config.seed, epoch).astype(np.int32))
                order_epoch = epoch
            state, metrics = compiled_train(
                state, train_images, train_labels, order[position], augment_rng)
            window.append(metrics)
            bar.update(1)
            done = step + 1
            if done % config.log_every_steps == 0:
                _raise_if_nonfinite(state, cycle, steps_per_epoch, checkpointer)
                means = jax.device_get(jax.tree_util.tree_map(
                    lambda *x: jnp.mean(jnp.stack(x)), *window))
                window = []
                for name, value in means.items():
                    writer.add_scalar(f"train/{name}", float(value), done)
                writer.add_scalar("train/learning_rate", float(schedule(step)), done)
                bar.set_postfix(loss=f"{float(means['loss']):.3f}",
                                acc=f"{float(means['accuracy']):.3f}")
            if done % eval_every_steps == 0 or done == cycle.end_step:
                _raise_if_nonfinite(state, cycle, steps_per_epoch, checkpointer)
                eval_start = time.perf_counter()
                test = evaluate(compiled_eval, state.variables, data.test_images,
                                data.test_labels, config.eval_batch_size)
                segment_eval += time.perf_counter() - eval_start
                sums = jax.device_get(state.metric_sums)
                state = state.replace(metric_sums=zero_metric_sums())
                record = {
                    "epoch": done / steps_per_epoch, "step": done,
                    "cycle": cycle.index + 1,
                    "train_loss": float(sums["loss"] / sums["count"]),
                    "train_error": float(1 - sums["accuracy"] / sums["count"]),
                    "test_loss": test["loss"], "test_error": test["error"],
                    "learning_rate": float(schedule(step)),
                }
                history.append(record)
                for name in ("test_error", "test_loss", "train_error"):
                    writer.add_scalar(name.replace("_", "/", 1), record[name], done)
                bar.write(
                    f"epoch {record['epoch']:.2f} (cycle {cycle.index + 1}, "
                    f"{models.format_stage_sizes(cycle.stage_sizes)}): train loss "
                    f"{record['train_loss']:.4f} error {100 * record['train_error']:.2f}%"
                    f" | test loss {test['loss']:.4f} error {100 * test['error']:.2f}%")
            if done % config.checkpoint_every_steps == 0 and done != cycle.end_step:
                save(done)
        step = cycle.end_step
        bar.close()
        final = history[-1]
        cycle_records.append({
            "cycle": cycle.index + 1,
            "stage_sizes": list(cycle.stage_sizes),
            "depth": models.depth(cycle.stage_sizes),
            "step_size": cycle.step_size,
            "num_params": num_params,
            "epochs": cycle.num_steps / steps_per_epoch,
            "steps": cycle.num_steps,
            **current_timers(),
            "final_train_loss": final["train_loss"],
            "final_train_error": final["train_error"],
            "test_loss": final["test_loss"],
            "test_error": final["test_error"],
        })
        save(cycle.end_step)
        writer.flush()

    writer.close()
    checkpointer.close()
    summary = _summary(config, data, steps_per_epoch, cycles, cycle_records, history,
                       time.perf_counter() - run_start)
    files.write_json(os.path.join(workdir, "summary.json"), summary)
    analysis.plot_training_curves(history, config.cycle_boundaries,
                                  os.path.join(workdir, "training_curves.png"))
    print(summary_table(summary), flush=True)
    return summary


def _summary(config, data, steps_per_epoch, cycles, cycle_records, history,
             wall_seconds) -> dict:
    lengths = [c.num_steps for c in cycles]
    return {
        "config": config.to_dict(),
        "dataset": {"name": config.dataset, "train_examples": len(data.train_labels),
                    "test_examples": len(data.test_labels),
                    "steps_per_epoch": steps_per_epoch},
        "cycles": cycle_records,
        "totals": {
            "steps": cycles[-1].end_step,
            "train_seconds": sum(c["train_seconds"] for c in cycle_records),
            "compile_seconds": sum(c["compile_seconds"] for c in cycle_records),
            "eval_seconds": sum(c["eval_seconds"] for c in cycle_records),
            # Of this invocation (a resumed run counts from its restart).
            "wall_seconds": wall_seconds,
            "final_test_error": cycle_records[-1]["test_error"],
            "final_test_accuracy": 1 - cycle_records[-1]["test_error"],
            "test_examples": len(data.test_labels),
            "num_params_first_cycle": cycle_records[0]["num_params"],
            "num_params_last_cycle": cycle_records[-1]["num_params"],
            "theoretical_cost_ratio": (multilevel.theoretical_cost_ratio(lengths)
                                       if config.multilevel else 1.0),
        },
        "history": history,
    }
