"""Tests of coarsening (restriction), the inverse of interpolation (multigrid restriction)."""

import chex
import jax
import jax.numpy as jnp
import pytest

from mlres_jax import models, multilevel


def _variables(stage_sizes, width=2, step_size=1.0):
    model = models.ResNet(stage_sizes, width=width, num_classes=3, step_size=step_size)
    return model, models.init_variables(model, jax.random.key(0), (8, 8, 3))


def _distinct_blocks(variables):
    """Gives every leaf a different value, so a wrong block choice shows."""
    leaves, treedef = jax.tree.flatten(variables)
    return jax.tree.unflatten(treedef, [leaf + i for i, leaf in enumerate(leaves)])


@pytest.mark.parametrize("stage_sizes", [(2, 2, 2), (3, 2, 4)])
def test_coarsen_inverts_interpolate_exactly(stage_sizes):
    model, variables = _variables(stage_sizes)
    variables = _distinct_blocks(variables)
    chex.assert_trees_all_equal(multilevel.coarsen(multilevel.interpolate(variables)), variables)
    back_model, back = multilevel.coarsen_model(*multilevel.interpolate_model(model, variables))
    assert back_model == model
    chex.assert_trees_all_equal(back, variables)


def test_coarsen_keeps_blocks_one_three_five():
    _, variables = _variables((2, 6, 4))
    variables = _distinct_blocks(variables)
    coarse = multilevel.coarsen(variables)
    for collection in ("params", "batch_stats"):
        stage = variables[collection]["stage2"]
        assert set(coarse[collection]["stage2"]) == {"block1", "block2", "block3"}
        for new, old in ((1, 1), (2, 3), (3, 5)):
            chex.assert_trees_all_equal(
                coarse[collection]["stage2"][f"block{new}"], stage[f"block{old}"]
            )
        chex.assert_trees_all_equal(
            coarse[collection]["stage1"]["block1"], variables[collection]["stage1"]["block1"]
        )
    chex.assert_trees_all_equal(coarse["params"]["head"], variables["params"]["head"])


def test_coarsened_tree_runs_in_coarsened_model():
    model, variables = _variables((2, 2, 4), step_size=0.5)
    coarse_model, coarse = multilevel.coarsen_model(model, variables)
    assert coarse_model.stage_sizes == (1, 1, 2)
    assert coarse_model.step_size == 1.0
    fresh = jax.eval_shape(lambda: coarse_model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    assert jax.tree.structure(coarse) == jax.tree.structure(fresh)
    chex.assert_trees_all_equal_shapes_and_dtypes(coarse, fresh)
    chex.assert_shape(coarse_model.apply(coarse, jnp.ones((2, 8, 8, 3))), (2, 3))


def test_odd_stage_size_raises():
    model, variables = _variables((2, 3, 2))
    with pytest.raises(ValueError, match=r"cannot coarsen stage2: it has 3 blocks"):
        multilevel.coarsen(variables)
    with pytest.raises(ValueError, match=r"even number"):
        multilevel.coarsened_model(model)
