"""Tests of interpolation, the cycle plan, the schedule and the cost model."""

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlres_jax import models, multilevel, steps


def _variables(stage_sizes, width=4, image_shape=(8, 8, 3)):
    model = models.ResNet(stage_sizes, width=width, num_classes=5)
    return model, models.init_variables(model, jax.random.key(0), image_shape)


def _label_blocks(tree):
    """Sets every leaf of stage s, block b to the number 100 * s + b."""

    def label(stage_key, stage):
        s = int(stage_key[len("stage") :])

        def fill(block, value):
            return jax.tree.map(lambda x: jnp.full_like(x, value), block)

        return {bk: fill(block, 100 * s + int(bk[len("block") :])) for bk, block in stage.items()}

    return multilevel.map_network_trees(
        lambda net: {k: (label(k, v) if k.startswith("stage") else v) for k, v in net.items()}, tree
    )


def _block_labels(tree, stage):
    """The label of each block of ``stage`` in order, checking all leaves agree."""
    stage_tree = tree[f"stage{stage}"]
    labels = []
    for b in range(1, len(stage_tree) + 1):
        values = {float(x.ravel()[0]) for x in jax.tree.leaves(stage_tree[f"block{b}"])}
        assert len(values) == 1
        labels.append(int(values.pop()) - 100 * stage)
    return labels


@pytest.mark.parametrize("stage_sizes", [(2, 2, 2), (3, 2, 4), (5, 5, 5)])
def test_interpolation_matches_fresh_deeper_model(stage_sizes):
    model, variables = _variables(stage_sizes)
    deeper_model, deeper = multilevel.interpolate_model(model, variables)
    assert deeper_model.stage_sizes == tuple(2 * n for n in stage_sizes)
    assert deeper_model.step_size == model.step_size / 2
    _, fresh = _variables(deeper_model.stage_sizes)
    assert jax.tree.structure(deeper) == jax.tree.structure(fresh)
    chex.assert_trees_all_equal_shapes_and_dtypes(deeper, fresh)
    # The deeper variables run in the deeper model.
    logits = deeper_model.apply(deeper, jnp.ones((2, 8, 8, 3)))
    chex.assert_shape(logits, (2, 5))
    chex.assert_tree_all_finite(logits)


def test_paper_copy_pattern_in_every_stage_including_batch_stats():
    _, variables = _variables((3, 3, 3))
    deeper = multilevel.interpolate(_label_blocks(variables))
    for collection in ("params", "batch_stats"):
        for stage in (1, 2, 3):
            # Paper App. B: [b1, b2, b3] -> [b1, b2, b2, b2, b3, b3].
            assert _block_labels(deeper[collection], stage) == [1, 2, 2, 2, 3, 3]


def test_uneven_stage_sizes_each_follow_the_rule():
    _, variables = _variables((2, 4, 3))
    deeper = multilevel.interpolate(_label_blocks(variables))["params"]
    assert _block_labels(deeper, 1) == [1, 2, 2, 2]
    assert _block_labels(deeper, 2) == [1, 2, 2, 2, 3, 3, 4, 4]
    assert _block_labels(deeper, 3) == [1, 2, 2, 2, 3, 3]


def test_copies_are_equal_values_in_distinct_buffers():
    _, variables = _variables((2, 2, 2))
    deeper = multilevel.interpolate(variables)["params"]["stage2"]
    chex.assert_trees_all_equal(deeper["block2"], deeper["block3"], deeper["block4"])
    kernels = [deeper[f"block{b}"]["conv1"]["kernel"] for b in (2, 3, 4)]
    pointers = {k.unsafe_buffer_pointer() for k in kernels}
    assert len(pointers) == 3


def test_stem_final_norm_and_head_unchanged():
    _, variables = _variables((2, 2, 2))
    deeper = multilevel.interpolate(variables)
    for key in ("stem", "final_norm", "head"):
        chex.assert_trees_all_equal(deeper["params"][key], variables["params"][key])


def test_one_block_stage_raises_clear_error():
    _, variables = _variables((2, 1, 2))
    with pytest.raises(ValueError, match=r"stage2.*at least 2 blocks.*second"):
        multilevel.interpolate(variables)


def test_unknown_rule_raises():
    _, variables = _variables((2, 2, 2))
    with pytest.raises(ValueError, match="unknown interpolation rule 'nearest'.*paper"):
        multilevel.interpolate(variables, rule="nearest")


def test_input_tree_is_left_unchanged():
    _, variables = _variables((2, 3, 2))
    before = copy.deepcopy(jax.device_get(variables))
    structure = jax.tree.structure(variables)
    multilevel.interpolate(variables)
    assert jax.tree.structure(variables) == structure
    chex.assert_trees_all_equal(jax.device_get(variables), before)


@pytest.mark.parametrize("policy", ["interpolate", "reset"])
def test_momentum_at_interpolation(policy):
    model, variables = _variables((2, 2, 2))
    tx = steps.create_optimizer(
        _Config(weight_decay=2e-4, momentum=0.9), optax.constant_schedule(0.1)
    )
    state = steps.create_train_state(jax.random.key(0), model, tx, (8, 8, 3))
    # Give the momentum known values: one step's trace is the gradient-like
    # tree, here simply labelled by block.
    trace = _label_blocks(state.params)
    opt_state = (state.opt_state[0], (optax.TraceState(trace=trace), state.opt_state[1][1]))
    count_before = int(optax.tree_utils.tree_get(opt_state, "count"))
    state = state.replace(opt_state=opt_state)
    deeper = steps.interpolate_train_state(state, "paper", policy)
    new_trace = deeper.opt_state[1][0].trace
    _, fresh = _variables((4, 4, 4))
    chex.assert_trees_all_equal_shapes(new_trace, fresh["params"])
    if policy == "interpolate":
        assert _block_labels(new_trace, 2) == [1, 2, 2, 2]
    else:
        for leaf in jax.tree.leaves(new_trace):
            assert not np.any(np.asarray(leaf))
    assert int(optax.tree_utils.tree_get(deeper.opt_state, "count")) == count_before


class _Config(dict):
    __getattr__ = dict.__getitem__
