"""Tests of the train state's metric windows (`mlres_jax.steps`) and the stopwatch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlres_jax import input_pipeline, models, steps, stopwatch


class _Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stopwatch_books_paused_time_to_its_activity():
    clock = _Clock()
    watch = stopwatch.Stopwatch(clock=clock)
    clock.now += 10  # 10 s training
    with watch.pause(stopwatch.EVAL):
        clock.now += 3  # 3 s evaluating
    clock.now += 5  # 5 s training
    with watch.pause(stopwatch.CHECKPOINT):
        clock.now += 2  # 2 s saving
    watch.add_compile_seconds(4.0)  # compiling happened within the training time
    clock.now += 1
    assert watch.to_dict() == {
        stopwatch.TRAIN: 16.0,
        stopwatch.COMPILE: 4.0,
        stopwatch.EVAL: 3.0,
        stopwatch.CHECKPOINT: 2.0,
    }
    with pytest.raises(ValueError, match="pauses for"):
        with watch.pause(stopwatch.TRAIN):
            pass


def test_stopwatch_continues_from_saved_readings():
    clock = _Clock()
    saved = {stopwatch.TRAIN: 7.0, stopwatch.EVAL: 1.5}  # an older checkpoint's readings
    watch = stopwatch.Stopwatch(saved, clock=clock)
    clock.now += 2
    readings = watch.to_dict()
    assert readings[stopwatch.TRAIN] == 9.0 and readings[stopwatch.EVAL] == 1.5
    assert readings[stopwatch.COMPILE] == 0.0 and readings[stopwatch.CHECKPOINT] == 0.0


def _state_and_step():
    model = models.ResNet((1,), width=2, num_classes=3)
    optimizer = optax.sgd(0.1)
    state = steps.create_train_state(jax.random.key(0), model, optimizer, (8, 8, 1))
    step = steps.make_train_step(model, optimizer, crop_padding=0)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8))
    labels = jnp.asarray(np.arange(6, dtype=np.int32) % 3)
    return state, step, images, labels


def test_metric_windows_sum_every_step_and_reset_separately():
    state, step, images, labels = _state_and_step()
    losses, accuracies = [], []
    for i in range(3):
        state, metrics = step(
            state, images, labels, jnp.arange(2 * (i % 3), 2 * (i % 3) + 2), jax.random.key(1)
        )
        losses.append(float(metrics["loss"]))
        accuracies.append(float(metrics["accuracy"]))
        if i == 1:  # a log point after two steps
            state, logged = steps.take_metric_means(state, "log")
            assert logged["loss"] == pytest.approx(np.mean(losses), rel=1e-6)
            assert logged["error"] == pytest.approx(1 - np.mean(accuracies), abs=1e-6)
    # The eval window still holds all three steps; the log window only the last.
    state, evaluated = steps.take_metric_means(state, "eval")
    assert evaluated["loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert float(state.metric_sums["log"]["count"]) == 1.0
    chex.assert_trees_all_equal(
        state.metric_sums["eval"], {name: jnp.zeros((), jnp.float32) for name in steps.METRIC_NAMES}
    )
    _, empty = steps.take_metric_means(state, "eval")
    assert np.isnan(empty["loss"]) and np.isnan(empty["error"])


def test_evaluate_counts_each_example_once_with_padded_batches():
    state, _, images, labels = _state_and_step()
    model = models.ResNet((1,), width=2, num_classes=3)
    result = steps.evaluate(
        steps.make_eval_step(model),
        state.variables,
        np.asarray(images),
        np.asarray(labels),
        batch_size=4,
    )
    logits = model.apply(state.variables, input_pipeline.preprocess_for_eval(images))
    expected_error = float(np.mean(np.argmax(logits, -1) != np.asarray(labels)))
    expected_loss = float(np.mean(steps.cross_entropy_loss(logits, labels)))
    assert result["count"] == 6
    assert result["error"] == pytest.approx(expected_error)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_bfloat16_training_tracks_float32_with_float32_state():
    model = models.ResNet((2, 2), width=8, num_classes=3)
    optimizer = optax.sgd(0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, (48, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 3, 48).astype(np.int32)
    for i, label in enumerate(labels):  # a learnable signal: a bright column per class
        images[i, :, 2 * label, 0] = 250
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    losses, states = {}, {}
    for dtype in (jnp.float32, jnp.bfloat16):
        net = model.clone(dtype=dtype)
        state = steps.create_train_state(jax.random.key(0), net, optimizer, (8, 8, 1))
        step = steps.make_train_step(net, optimizer, crop_padding=0)
        losses[dtype] = []
        for k in range(12):
            state, metrics = step(
                state,
                images,
                labels,
                jnp.arange(8 * (k % 6), 8 * (k % 6) + 8),
                jax.random.key(1),
            )
            losses[dtype].append(float(metrics["loss"]))
        states[dtype] = state
    # Parameters, statistics and momentum stay float32 under bfloat16 compute.
    for leaf in jax.tree.leaves(
        (
            states[jnp.bfloat16].params,
            states[jnp.bfloat16].batch_stats,
            states[jnp.bfloat16].opt_state,
        )
    ):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    # Tolerance: bfloat16 rounds each value to 2^-8 (0.4 %) relative; through
    # a dozen layers and 12 steps at learning rate 0.05 the per-step losses
    # stayed within 3.3 % of float32's (measured; 0.03 % at the first step),
    # so 5 % is allowed, and both learn (the loss falls by more than a third).
    np.testing.assert_allclose(losses[jnp.bfloat16], losses[jnp.float32], rtol=0.05)
    # ... and bfloat16 was really used: the losses are not float32's.
    assert max(abs(a - b) for a, b in zip(losses[jnp.bfloat16], losses[jnp.float32])) > 1e-6
    assert losses[jnp.float32][-1] < 0.67 * losses[jnp.float32][0]
    params = [jax.tree.leaves(states[d].params) for d in (jnp.float32, jnp.bfloat16)]
    # The parameters drift further apart than the losses show (measured: by
    # 5.2 % of the largest parameter after 12 steps); 10 % is allowed.
    scale = max(float(jnp.max(jnp.abs(x))) for x in params[0])
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*params)) < 0.10 * scale


def test_a_step_stopped_after_a_phase_is_a_prefix_of_the_real_step():
    # benchmarks.step_cost times these prefixes; each must do what it says.
    state, full_step, images, labels = _state_and_step()
    model = models.ResNet((1,), width=2, num_classes=3)
    optimizer = optax.sgd(0.1)
    args = (images, labels, jnp.arange(2), jax.random.key(1))
    full, metrics = full_step(jax.tree.map(jnp.copy, state), *args)
    for phase in steps.TRAIN_STEP_PHASES[:4]:  # before the update: parameters kept
        step = steps.make_train_step(model, optimizer, crop_padding=0, last_phase=phase)
        stopped, result = step(jax.tree.map(jnp.copy, state), *args)
        assert int(stopped.step) == 1 and np.isfinite(float(result["loss"]))
        chex.assert_trees_all_equal(stopped.params, state.params)
    # Stopped after the update: the real step's parameters, no metric sums.
    step = steps.make_train_step(model, optimizer, crop_padding=0, last_phase="update")
    updated, result = step(jax.tree.map(jnp.copy, state), *args)
    chex.assert_trees_all_close(updated.params, full.params)
    assert float(result["loss"]) == float(metrics["loss"])
    assert float(updated.metric_sums["eval"]["count"]) == 0.0
    assert float(full.metric_sums["eval"]["count"]) == 1.0
    with pytest.raises(ValueError, match="last_phase 'all'"):
        steps.make_train_step(model, optimizer, crop_padding=0, last_phase="all")
