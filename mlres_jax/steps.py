"""The train state and the jitted train and eval steps, for any depth.

JAX and no files. `train` drives these functions; the analyses and the
benchmarks build and compile the same steps through the same builders
(`make_train_step`, `make_eval_step`, `compile_steps`), so what they measure
is what training runs. `StepCompiler` compiles each network's steps once, the
next one ahead in a background thread (it logs when a run waits for it).

* `TrainState` holds everything that changes during training;
  `create_train_state` makes a fresh one and `interpolate_train_state` carries
  one into the next, deeper network (paper Sec. 4.1).
* `train_step` is one SGD step on a mini-batch gathered from the training set
  on the device and augmented there (paper App. A); `eval_step` sums loss and
  errors over a padded batch; `evaluate` runs it over a whole split.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from mlres_jax import input_pipeline, models, multilevel, parallel

# The running train metrics are summed over two windows: since the last
# logged point ("log", every `log_every_steps`) and since the last
# evaluation ("eval"). Both live in the train state, so a resumed run
# reports the same numbers as one that never stopped.
METRIC_WINDOWS = ("log", "eval")
METRIC_NAMES = ("loss", "accuracy", "count")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: int32[] global step (0-based count of steps taken).
      params: trainable parameters (``models.ResNet`` names).
      batch_stats: batch-norm running statistics, same names.
      opt_state: optax state; its momentum mirrors ``params``.
      metric_sums: per window of `METRIC_WINDOWS`, float32[] sums of
        ``loss``, ``accuracy`` and ``count`` over the steps since the window
        was last read (`take_metric_means`).
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
        """``{"params", "batch_stats"}``, what ``model.apply`` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and weight decay (paper Sec. 5.2).

    Weight decay is added to the gradient of every parameter before the
    momentum (L2 regularisation, as ``torch.optim.SGD(weight_decay=...)``).

    Args:
      config: with ``momentum`` and ``weight_decay``.
      schedule: learning rate as a function of the global step.
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum),
    )


def zero_metric_sums() -> dict:
    """Zero sums for every window: ``{window: {name: float32[]}}``."""
    return {
        window: {name: jnp.zeros((), jnp.float32) for name in METRIC_NAMES}
        for window in METRIC_WINDOWS
    }


def create_train_state(
    rng: jax.Array,
    model: models.ResNet,
    optimizer: optax.GradientTransformation,
    image_shape: tuple[int, ...],
) -> TrainState:
    """A fresh train state at step 0 for ``model`` and images of ``image_shape`` (H, W, C).

    A scanned model (``scan_blocks``) gets the unrolled model's initial
    variables in its layout, so that the layout does not change the run.
    """
    variables = models.init_variables(model.clone(scan_blocks=False), rng, image_shape)
    if model.scan_blocks:
        variables = multilevel.convert_layout(variables, multilevel.STAGES, multilevel.SCANNED)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
        metric_sums=zero_metric_sums(),
        nonfinite_step=jnp.array(-1, jnp.int32),
    )


def interpolate_train_state(
    state: TrainState,
    rule: str,
    momentum_at_interpolation: str,
    layout: multilevel.Layout = multilevel.STAGES,
    initial: Callable[[], TrainState] | None = None,
) -> TrainState:
    """Grows a train state to the next depth (paper Sec. 4.1) under ``rule``.

    Parameters and batch-norm statistics go through `multilevel.interpolate`
    (together: the residual-output leaves it checks are in the parameters);
    the optimizer state through `multilevel.grow_optimizer_state` under the
    ``momentum_at_interpolation`` policy (`multilevel.MOMENTUM_POLICIES`:
    ``'interpolate'``, the default, carries the momentum through the same
    rule; ``'reset'`` zeroes it; ``'zero_inserted'`` zeroes it for the
    inserted blocks only). The optimizer's step count is kept, so the global
    learning-rate schedule goes on; its restart comes from the schedule's
    cycle boundary. ``layout`` is the parameters' (`multilevel.SCANNED` for a
    scanned model). ``initial`` returns a fresh train state of the deeper
    model; it is called only where the rule makes a block from nothing (a
    one-block stage, `multilevel.grows_one_block_stages`), whose parameters,
    statistics and (zero) momentum it gives.

    Raises:
      ValueError: for an unknown rule or policy, or a network the rule cannot
        interpolate (`multilevel.interpolate`).
    """
    fresh = functools.cache(initial) if initial else None
    variables = multilevel.interpolate(
        {"params": state.params, "batch_stats": state.batch_stats},
        rule,
        layout,
        initial=fresh and (lambda: {"params": fresh().params, "batch_stats": fresh().batch_stats}),
    )
    return state.replace(
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=multilevel.grow_optimizer_state(
            state.opt_state,
            rule,
            momentum_at_interpolation,
            layout,
            initial=fresh and (lambda: fresh().opt_state),
        ),
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross entropy: float[B, K], int[B] -> float[B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# The phases of a train step, in order. `train_step` runs them all; with
# ``last_phase`` it stops after that one (``benchmarks.step_cost`` times each
# prefix of the real step: what one phase adds is a difference of two).
TRAIN_STEP_PHASES = ("gather", "augment", "forward", "backward", "update", "check")


def _cut_short(state: TrainState, *values):
    """What a step stopped before its update returns: the step counted, and a
    scalar that depends on every one of ``values`` (so that none is compiled away)."""
    total = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(values))
    return state.replace(step=state.step + 1), {"loss": total}


def train_step(
    state: TrainState,
    train_images: jax.Array,
    train_labels: jax.Array,
    batch_indices: jax.Array,
    base_rng: jax.Array,
    *,
    model: models.ResNet,
    optimizer: optax.GradientTransformation,
    crop_padding: int,
    last_phase: str = "check",
):
    """One SGD step on the mini-batch ``batch_indices`` of the training set.

    Its phases (`TRAIN_STEP_PHASES`): gather the mini-batch from the training
    set on the device; augment it (paper App. A); the forward pass and the
    loss; the backward pass; the SGD update; the check that everything is
    finite, with the running metric sums.

    Args:
      state: the train state.
      train_images: uint8[N, H, W, C], the whole training set on device.
      train_labels: int32[N].
      batch_indices: int32[B], the examples of this step.
      base_rng: PRNG key of the run; this step's augmentation uses
        ``fold_in(base_rng, step)``.
      model, optimizer, crop_padding: bound by `make_train_step`.
      last_phase: the phase after which the step stops (a benchmark's
        option); ``"check"``, the default, is the whole step. Stopped before
        ``"update"``, it returns the state with only its step count moved on
        and ``{"loss": a sum of what it computed}``; after ``"update"``, the
        updated state without the check and the metric sums.

    Returns:
      ``(new_state, metrics)``, metrics float32 scalars ``loss`` (without
      weight decay) and ``accuracy`` of the mini-batch. If the loss, a
      gradient or an update is not finite, the returned state is the input
      state with ``nonfinite_step`` set (if not set already).
    """
    rng = jax.random.fold_in(base_rng, state.step)
    images = train_images[batch_indices]
    if last_phase != "gather":
        images = input_pipeline.preprocess_for_train(rng, images, crop_padding)
    labels = train_labels[batch_indices]
    if last_phase in ("gather", "augment"):
        return _cut_short(state, images, labels)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return cross_entropy_loss(logits, labels).mean(), (logits, updates)

    if last_phase == "forward":
        return _cut_short(state, loss_fn(state.params))
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if last_phase == "backward":
        return _cut_short(state, loss, grads, updates)
    param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    updated = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, param_updates),
        batch_stats=updates["batch_stats"],
        opt_state=opt_state,
    )
    if last_phase == "update":
        return updated, metrics
    step_sums = dict(metrics, count=1.0)
    new_state = updated.replace(
        metric_sums={
            window: jax.tree.map(jnp.add, sums, step_sums)
            for window, sums in state.metric_sums.items()
        }
    )
    finite = jax.tree.reduce(
        jnp.logical_and,
        jax.tree.map(
            lambda x: jnp.all(jnp.isfinite(x)), (loss, grads, param_updates, updates["batch_stats"])
        ),
    )
    failed = state.replace(
        nonfinite_step=jnp.where(state.nonfinite_step < 0, state.step, state.nonfinite_step)
    )
    # A cond, not a tree-wide jnp.where: the select over every buffer makes
    # XLA's CPU compile several times slower (13 s against 3 s at 4-4-4).
    new_state = jax.lax.cond(finite, lambda: new_state, lambda: failed)
    return new_state, metrics


def take_metric_means(state: TrainState, window: str) -> tuple[TrainState, dict]:
    """Reads and resets one window of the running train metrics.

    Args:
      state: the train state.
      window: one of `METRIC_WINDOWS`.

    Returns:
      ``(state with that window zeroed, {"loss", "error"})``: the means over
      the window's steps as Python floats (``error`` = 1 - accuracy); both
      NaN if the window has no steps.
    """
    sums = jax.device_get(state.metric_sums[window])
    count = float(sums["count"])
    means = (
        {"loss": float(sums["loss"] / count), "error": float(1 - sums["accuracy"] / count)}
        if count
        else {"loss": float("nan"), "error": float("nan")}
    )
    # zeros_like keeps each sum's placement (replicated over the mesh).
    zeros = jax.tree.map(jnp.zeros_like, state.metric_sums[window])
    return state.replace(metric_sums=dict(state.metric_sums, **{window: zeros})), means


def eval_step(
    variables, images: jax.Array, labels: jax.Array, mask: jax.Array, *, model: models.ResNet
) -> dict:
    """Sums of loss and errors over the real (``mask``) examples of a batch.

    Args:
      variables: ``params`` and ``batch_stats``.
      images: uint8[B, H, W, C]; labels: int32[B]; mask: bool[B].
      model: bound by `make_eval_step`.

    Returns:
      float32 scalars ``loss_sum``, ``error_count``, ``count``.
    """
    logits = model.apply(variables, input_pipeline.preprocess_for_eval(images), train=False)
    wrong = (jnp.argmax(logits, -1) != labels) & mask
    return {
        "loss_sum": jnp.sum(jnp.where(mask, cross_entropy_loss(logits, labels), 0.0)),
        "error_count": jnp.sum(wrong.astype(jnp.float32)),
        "count": jnp.sum(mask.astype(jnp.float32)),
    }


def evaluate(
    eval_fn: Callable,
    variables,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    mesh: Mesh | None = None,
) -> dict[str, float]:
    """Loss and error over every example of ``images`` (batch norms at running averages).

    The one evaluation loop of the project: training, the lesion analyses
    and the benchmarks all evaluate through it.

    Args:
      eval_fn: `eval_step` of the model, jitted (`make_eval_step`) or
        compiled (`compile_steps`) for batches of ``batch_size``.
      variables: the model's ``{"params", "batch_stats"}``.
      images: uint8[N, H, W, C], N >= 1; labels: int[N].
      batch_size: examples per batch; the last batch is padded and masked.
      mesh: the mesh ``eval_fn`` was made for, if any: each batch is then
        split over its devices (each process puts only its own part).

    Returns:
      ``loss`` (mean cross entropy), ``error`` (fraction misclassified) and
      ``count`` (N).
    """
    totals = None
    for batch in input_pipeline.eval_batches(images, labels, batch_size):
        if mesh is not None:
            batch = parallel.shard_batch(batch, mesh)
        sums = eval_fn(variables, *batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "loss": float(totals["loss_sum"]) / count,
        "error": float(totals["error_count"]) / count,
        "count": int(count),
    }


# ---------------------------------------------------------------------------
# Builders: the jitted steps of one depth, and their ahead-of-time compilation.


def make_train_step(
    model: models.ResNet,
    optimizer: optax.GradientTransformation,
    crop_padding: int,
    mesh: Mesh | None = None,
    last_phase: str = "check",
) -> Callable:
    """`train_step` for ``model``, jitted, donating the train state (argument 0).

    ``last_phase`` (`TRAIN_STEP_PHASES`) stops the step early (see `train_step`);
    the default is the whole step, as training runs it.

    With a ``mesh`` (`parallel.make_mesh`) the step is one SPMD program over
    its devices: the state, the training set and the key replicated, the
    batch indices split over the ``"data"`` axis, so each device gathers,
    augments and runs its part of the global batch; batch-norm statistics
    and the loss are means over the global batch.
    """
    if last_phase not in TRAIN_STEP_PHASES:
        raise ValueError(f"last_phase {last_phase!r} is not one of {TRAIN_STEP_PHASES}")
    step = functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        crop_padding=crop_padding,
        last_phase=last_phase,
    )
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    whole, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(
        step,
        donate_argnums=0,
        in_shardings=(whole, whole, whole, split, whole),
        out_shardings=(whole, whole),
    )


@functools.lru_cache(maxsize=64)
def make_eval_step(model: models.ResNet, mesh: Mesh | None = None) -> Callable:
    """`eval_step` for ``model``, jitted; one function per distinct model and mesh.

    Equal models (same stage sizes, h, width, lesioned stages) share the
    function and with it jit's cache of compiled executables. With a
    ``mesh``, the variables are replicated and the batch is split over its
    ``"data"`` axis.
    """
    step = functools.partial(eval_step, model=model)
    if mesh is None:
        return jax.jit(step)
    whole, split = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step, in_shardings=(whole, split, split, split), out_shardings=whole)


def compile_ahead(fn, *args) -> tuple[Callable, float]:
    """Compiles jitted ``fn`` for ``args`` (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      ``(executable, seconds)``: tracing, lowering and XLA compilation, wall
      clock.
    """
    start = time.perf_counter()
    executable = fn.lower(*args).compile()
    return executable, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The train and eval step of one depth, compiled.

    Attributes:
      train: ``(state, train_images, train_labels, batch_indices, rng) ->
        (state, metrics)``; donates the state.
      evaluate: ``(variables, images, labels, mask) -> sums`` for batches of
        the eval batch size (see `evaluate`).
      compile_seconds: wall time of both compilations.
    """

    train: Callable
    evaluate: Callable
    compile_seconds: float


def compile_steps(
    model: models.ResNet,
    optimizer: optax.GradientTransformation,
    *,
    state,
    train_images,
    train_labels,
    rng,
    batch_size: int,
    eval_batch_size: int,
    crop_padding: int,
    mesh: Mesh | None = None,
) -> CompiledSteps:
    """Compiles the train and eval steps of ``model``'s depth (for ``mesh``, if given).

    Only shapes matter: ``state``, ``train_images``, ``train_labels`` and
    ``rng`` may be arrays or ``jax.ShapeDtypeStruct`` trees (e.g.
    ``jax.eval_shape`` of the interpolated state).

    Args:
      model, optimizer: the network and SGD of the cycle.
      state: the cycle's `TrainState` (or its shapes).
      train_images: uint8[N, H, W, C]; train_labels: int32[N].
      rng: the augmentation PRNG key.
      batch_size: examples per train step; eval_batch_size: per eval batch.
      crop_padding: pixels of zero padding for the random crop.
      mesh: the devices (`make_train_step`, `make_eval_step`).
    """
    indices = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    train, train_seconds = compile_ahead(
        make_train_step(model, optimizer, crop_padding, mesh),
        state,
        train_images,
        train_labels,
        indices,
        rng,
    )
    image_shape = tuple(train_images.shape[1:])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    evaluate_compiled, eval_seconds = compile_ahead(
        make_eval_step(model, mesh),
        variables,
        jax.ShapeDtypeStruct((eval_batch_size, *image_shape), jnp.uint8),
        jax.ShapeDtypeStruct((eval_batch_size,), jnp.int32),
        jax.ShapeDtypeStruct((eval_batch_size,), jnp.bool_),
    )
    return CompiledSteps(train, evaluate_compiled, train_seconds + eval_seconds)


class StepCompiler:
    """The compiled train and eval steps of each network of a run, compiled once each.

    A network is anything with ``stage_sizes`` and ``step_size`` (a
    `plan.Cycle`). With ``ahead``, `compile_ahead` compiles a network's
    steps in a background thread from the shapes alone (e.g. `jax.eval_shape`
    of the interpolated state), so that a growth waits only for what is left
    of that compilation. Use it as a context manager: leaving it waits for a
    compilation in flight (XLA cannot abandon one).

    Args:
      model_for: ``(stage_sizes, step_size) -> models.ResNet``.
      ahead: whether `compile_ahead` compiles (``config.compile_ahead``).
      **options: the rest of `compile_steps`' arguments but ``state``
        (optimizer, train images and labels, rng, batch sizes, crop
        padding, mesh).
    """

    def __init__(self, model_for: Callable[..., models.ResNet], *, ahead: bool, **options):
        self._model_for, self._options = model_for, options
        self._compiled, self._pending = {}, {}
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, "compile_ahead") if ahead else None
        )

    def __enter__(self) -> StepCompiler:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._executor is None:
            return
        running = [key for key, future in self._pending.items() if future.running()]
        if running:
            logging.info(
                "Waiting for the ahead compilation of %s to finish",
                models.format_stage_sizes(running[0][0]),
            )
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _compile(self, network, state) -> CompiledSteps:
        model = self._model_for(network.stage_sizes, network.step_size)
        return compile_steps(model, state=state, **self._options)

    def steps_for(self, network, state) -> CompiledSteps:
        """The network's steps: compiled before, waited for, or compiled now for ``state``."""
        key = (network.stage_sizes, network.step_size)
        if key in self._compiled:
            return self._compiled[key]
        if key not in self._pending:
            self._compiled[key] = self._compile(network, state)
            return self._compiled[key]
        start = time.perf_counter()
        if not self._pending[key].done():
            logging.info(
                "Waiting for the ahead compilation of %s",
                models.format_stage_sizes(network.stage_sizes),
            )
        self._compiled[key] = self._pending.pop(key).result()
        logging.info(
            "Compiled %s ahead in %.1f s; waited %.1f s",
            models.format_stage_sizes(network.stage_sizes),
            self._compiled[key].compile_seconds,
            time.perf_counter() - start,
        )
        return self._compiled[key]

    def compile_ahead(self, network, state_shapes: Callable[[], Any]) -> None:
        """Starts compiling ``network``'s steps in the background, unless off or done.

        Args:
          state_shapes: returns the network's train state shapes (called
            only when the compilation starts).
        """
        key = (network.stage_sizes, network.step_size)
        if self._executor is None or key in self._compiled or key in self._pending:
            return
        self._pending[key] = self._executor.submit(self._compile, network, state_shapes())

    def eval_step_for(self, network) -> Callable:
        """The network's compiled eval step if its steps are compiled, else a jitted one.

        A run resumed at a cycle boundary has not compiled the finished
        cycle's steps; evaluating it once does not need its train step.
        """
        compiled = self._compiled.get((network.stage_sizes, network.step_size))
        if compiled is not None:
            return compiled.evaluate
        return make_eval_step(
            self._model_for(network.stage_sizes, network.step_size), self._options.get("mesh")
        )
