"""Tests of the residual norms and lesion errors (`mlres_jax.measurements`)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlres_jax import input_pipeline, lesions, measurements, models
from tests.networks import (
    IMAGE_SHAPE,
    fresh_shapes,
    random_images,
    random_variables,
    tiny_model,
    zero_all_residuals,
    zero_residual,
)

# --- Norms ---------------------------------------------------------------------


def test_zero_residuals_give_zero_residual_norms():
    model = tiny_model((2, 3, 2), step_size=0.5)
    variables = zero_all_residuals(random_variables(model))
    norms = measurements.block_norms(model, variables, random_images(5), batch_size=2)
    assert norms.num_blocks == 7 and norms.num_examples == 5
    np.testing.assert_array_equal(norms.F_norm, np.zeros(7))
    np.testing.assert_array_equal(norms.G_norm, np.zeros(7))
    assert norms.gamma == 0.0
    assert np.all(norms.input_norm > 0)
    # With G = 0 the identity blocks pass Y on unchanged: equal input norms
    # within a stage after its first block.
    np.testing.assert_allclose(norms.input_norm[3], norms.input_norm[4], rtol=1e-6)


def test_norms_equal_hand_composition_of_two_blocks():
    h = 0.5
    model = models.ResNet((2,), width=2, num_classes=3, step_size=h)
    variables = random_variables(model)
    images = random_images(5)
    norms = measurements.block_norms(model, variables, images, batch_size=2)  # padded last batch
    params, stats = variables["params"], variables["batch_stats"]
    x = input_pipeline.preprocess_for_eval(images)
    y0 = jax.lax.conv_general_dilated(
        x, params["stem"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

    def F(block, y):
        return models.ResidualModule(2).apply(
            {"params": params["stage1"][block], "batch_stats": stats["stage1"][block]},
            y,
            train=False,
        )

    f0 = F("block1", y0)
    y1 = y0 + h * f0
    f1 = F("block2", y1)

    def mean_norm(a):
        return np.mean(np.linalg.norm(np.asarray(a).reshape(len(a), -1), axis=1))

    np.testing.assert_allclose(norms.input_norm, [mean_norm(y0), mean_norm(y1)], rtol=1e-5)
    np.testing.assert_allclose(norms.F_norm, [mean_norm(f0), mean_norm(f1)], rtol=1e-5)
    np.testing.assert_allclose(norms.G_norm, [h * mean_norm(f0), h * mean_norm(f1)], rtol=1e-5)
    assert norms.gamma == pytest.approx(h * (mean_norm(f0) + mean_norm(f1)) / 2, rel=1e-5)


def test_block_norms_derived_quantities():
    norms = measurements.BlockNorms(
        stage_sizes=(2, 2),
        step_size=0.5,
        input_norm=np.array([1.0, 2.0, 4.0, 8.0]),
        F_norm=np.array([2.0, 2.0, 2.0, 2.0]),
        num_examples=10,
    )
    np.testing.assert_array_equal(norms.G_norm, [1, 1, 1, 1])
    np.testing.assert_array_equal(norms.time, [0, 0.5, 1.0, 1.5])
    np.testing.assert_array_equal(norms.first_in_stage, [True, False, True, False])
    np.testing.assert_array_equal(norms.stage_index, [0, 0, 1, 1])
    assert norms.gamma == 1.0
    # G/Y = 1, 0.5, 0.25, 0.125: first blocks 1 and 0.25, the rest 0.5 and 0.125.
    assert norms.ratio_summary() == {"first_blocks": 0.625, "other_blocks": 0.3125}
    rows = norms.records()
    assert rows[2] == {
        "block": 3,
        "stage": 2,
        "block_in_stage": 1,
        "first_in_stage": True,
        "t": 1.0,
        "input_norm": 4.0,
        "F_norm": 2.0,
        "G_norm": 1.0,
        "G_over_input": 0.25,
    }


def test_intermediates_are_sown_only_on_request():
    model = tiny_model((2, 3, 2))
    variables = random_variables(model)
    assert set(fresh_shapes(model)) == {"params", "batch_stats"}
    images = jnp.ones((1, *IMAGE_SHAPE))
    assert isinstance(model.apply(variables, images), jax.Array)
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert set(updates) == {"batch_stats"}
    _, sown = model.apply(variables, images, mutable=[models.INTERMEDIATES])
    block = sown[models.INTERMEDIATES]["stage2"]["block1"]
    chex.assert_shape(block["block_input"][0], (1, 8, 8, 2))
    chex.assert_shape(block["F"][0], (1, 4, 4, 4))


# --- Evaluation of lesions -----------------------------------------------------


def test_error_rate_counts_every_example_once():
    model = tiny_model((2, 3, 2))
    variables = random_variables(model)
    images, labels = random_images(7), np.arange(7, dtype=np.int32) % 3
    logits = model.apply(variables, input_pipeline.preprocess_for_eval(images))
    expected = np.mean(np.argmax(logits, -1) != labels)
    assert measurements.error_rate(model, variables, images, labels, batch_size=3) == pytest.approx(
        expected
    )


def test_removal_errors_cover_every_block_and_match_zero_residual():
    model = tiny_model((2, 3, 2))
    variables = zero_residual(random_variables(model), 1, 1)
    images, labels = random_images(12), np.arange(12, dtype=np.int32) % 3
    baseline = measurements.error_rate(model, variables, images, labels, batch_size=5)
    records = measurements.removal_errors(model, variables, images, labels, batch_size=5)
    assert [(r["stage"], r["block_in_stage"]) for r in records] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
        (2, 3),
        (3, 1),
        (3, 2),
    ]
    assert [r["block"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["downsampling"] for r in records] == [False, False, True, False, False, True, False]
    # Stage 2, block 2 has G = 0: removing it changes nothing.
    assert records[3]["test_error"] == baseline


def test_shuffle_errors_skip_short_stages():
    model = tiny_model((2, 3, 2))
    variables = random_variables(model)
    images, labels = random_images(6), np.arange(6, dtype=np.int32) % 3
    records = measurements.shuffle_errors(
        model, variables, images, labels, batch_size=6, num_shuffles=2, seed=0
    )
    assert [(r["stage"], r["shuffle"]) for r in records] == [(2, 1), (2, 2)]
    assert all(r["order"] == "1 3 2" and r["blocks_moved"] == 2 for r in records)
    shuffled = lesions.permute_blocks(variables, 1, (0, 2, 1))
    assert records[0]["test_error"] == measurements.error_rate(
        model, shuffled, images, labels, batch_size=6
    )
