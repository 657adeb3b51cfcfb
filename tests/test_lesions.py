"""Tests of the lesion surgery (`mlres_jax.lesions`, paper Sec. 3.3)."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlres_jax import lesions, models
from tests.networks import IMAGE_SHAPE, fresh_shapes, random_variables, tiny_model, zero_residual

# --- Lesions: removing a block -----------------------------------------------


@pytest.mark.parametrize("stage_index,block_index", [(1, 1), (1, 0)])
def test_removed_block_tree_matches_model_with_shorter_stage(stage_index, block_index):
    model = tiny_model((2, 3, 2))
    variables = random_variables(model)
    short_model, short = lesions.lesion(model, variables, stage_index, block_index)
    assert short_model.stage_sizes == (2, 2, 2)
    plain_shorter = fresh_shapes(tiny_model((2, 2, 2)))
    assert jax.tree.structure(short) == jax.tree.structure(plain_shorter)
    fresh = fresh_shapes(short_model)
    chex.assert_trees_all_equal_shapes_and_dtypes(short, fresh)
    # Later blocks moved up one place and were renumbered.
    for collection in ("params", "batch_stats"):
        old, new = variables[collection]["stage2"], short[collection]["stage2"]
        kept = [b for b in (1, 2, 3) if b != block_index + 1]
        for new_number, old_number in enumerate(kept, start=1):
            chex.assert_trees_all_equal(new[f"block{new_number}"], old[f"block{old_number}"])
        chex.assert_trees_all_equal(short[collection]["stage3"], variables[collection]["stage3"])


def test_removing_downsampling_block_keeps_only_the_shortcut():
    model = tiny_model((2, 3, 2))
    short_model = lesions.lesioned_model(model, 1, 0)
    assert short_model.shortcut_only_stages == (1,)
    # The new first block of stage 2 takes 4 channels, not 2, and keeps the size.
    fresh = fresh_shapes(short_model)
    chex.assert_shape(fresh["params"]["stage2"]["block1"]["conv1"]["kernel"], (3, 3, 4, 4))
    # A block that does not downsample leaves the shortcut set alone, also
    # the new first block of a stage that already lost its downsampling block.
    assert lesions.lesioned_model(model, 1, 2).shortcut_only_stages == ()
    assert lesions.lesioned_model(model, 0, 0).shortcut_only_stages == ()
    assert lesions.lesioned_model(short_model, 1, 0).shortcut_only_stages == (1,)
    assert lesions.lesioned_model(short_model, 2, 0).shortcut_only_stages == (1, 2)


@pytest.mark.parametrize("stage_index,block_index", [(0, 0), (0, 1), (1, 0), (1, 2), (2, 0)])
def test_lesion_forward_equals_full_model_with_zero_residual(stage_index, block_index):
    model = tiny_model((2, 3, 2), step_size=0.5)
    variables = random_variables(model)
    images = jax.random.normal(jax.random.key(3), (4, *IMAGE_SHAPE))
    zeroed = zero_residual(variables, stage_index, block_index)
    expected = model.apply(zeroed, images)
    short_model, short = lesions.lesion(model, variables, stage_index, block_index)
    got = short_model.apply(short, images)
    chex.assert_trees_all_close(got, expected, atol=1e-6, rtol=1e-6)
    # The block mattered, so the check above is not vacuous.
    assert not np.allclose(got, model.apply(variables, images), atol=1e-4)


def test_removing_the_only_block_of_a_stage():
    model = tiny_model((1, 1, 2))
    variables = random_variables(model)
    short_model, short = lesions.lesion(model, variables, 1, 0)
    assert short_model.stage_sizes == (1, 0, 2)
    assert "stage2" not in short["params"]
    fresh = fresh_shapes(short_model)
    chex.assert_trees_all_equal_shapes_and_dtypes(short, fresh)
    images = jax.random.normal(jax.random.key(3), (2, *IMAGE_SHAPE))
    chex.assert_trees_all_close(
        short_model.apply(short, images),
        model.apply(zero_residual(variables, 1, 0), images),
        atol=1e-6,
        rtol=1e-6,
    )


def test_bad_lesion_arguments_raise():
    model = tiny_model((2, 3, 2))
    variables = random_variables(model)
    with pytest.raises(ValueError, match="stage2 has 3 blocks; block index 3"):
        lesions.remove_block(variables, 1, 3)
    with pytest.raises(ValueError, match="no stage4"):
        lesions.remove_block(variables, 3, 0)
    with pytest.raises(ValueError, match="stage 3 has 2 blocks"):
        lesions.lesioned_model(model, 2, 5)
    with pytest.raises(ValueError, match="shortcut_only_stages holds 0"):
        models.ResNet((2, 2), width=2, shortcut_only_stages=(0,)).init(
            jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE))
        )


def test_lesion_leaves_input_unchanged():
    model = tiny_model((2, 3, 2))
    variables = random_variables(model)
    before = jax.device_get(variables)
    lesions.lesion(model, variables, 1, 1)
    lesions.permute_blocks(variables, 1, (0, 2, 1))
    chex.assert_trees_all_equal(jax.device_get(variables), before)


# --- Lesions: shuffling --------------------------------------------------------


def _fingerprint(block):
    return tuple(float(jnp.sum(x)) for x in jax.tree.leaves(block))


def test_shuffle_is_a_permutation_of_the_blocks():
    model = tiny_model((2, 3, 2))
    variables = random_variables(model)
    order = (0, 2, 1)
    shuffled = lesions.permute_blocks(variables, 1, order)
    assert jax.tree.structure(shuffled) == jax.tree.structure(variables)
    for collection in ("params", "batch_stats"):
        old, new = variables[collection]["stage2"], shuffled[collection]["stage2"]
        for i, source in enumerate(order):
            chex.assert_trees_all_equal(new[f"block{i + 1}"], old[f"block{source + 1}"])
        # The same multiset of blocks, and not the same order.
        assert collections.Counter(map(_fingerprint, new.values())) == collections.Counter(
            map(_fingerprint, old.values())
        )
        assert [_fingerprint(new[f"block{i}"]) for i in range(1, 4)] != [
            _fingerprint(old[f"block{i}"]) for i in range(1, 4)
        ]
        chex.assert_trees_all_equal(shuffled[collection]["stage1"], variables[collection]["stage1"])
    chex.assert_shape(model.apply(shuffled, jnp.ones((1, *IMAGE_SHAPE))), (1, 3))


def test_permutation_maps_new_block_i_to_old_block_order_i():
    # A labelled tree: any network tree works, no model needed.
    tree = {
        "params": {
            "stage1": {f"block{b}": {"w": np.array(b)} for b in range(1, 6)},
            "head": {"w": np.array(0)},
        },
        "step": np.array(7),
    }
    shuffled = lesions.permute_blocks(tree, 0, (0, 3, 1, 4, 2))
    assert [int(shuffled["params"]["stage1"][f"block{b}"]["w"]) for b in range(1, 6)] == [
        1,
        4,
        2,
        5,
        3,
    ]
    assert int(shuffled["step"]) == 7 and int(shuffled["params"]["head"]["w"]) == 0
    removed = lesions.remove_block(tree, 0, 1)
    assert [int(removed["params"]["stage1"][f"block{b}"]["w"]) for b in range(1, 5)] == [1, 3, 4, 5]


def test_random_block_permutation_keeps_first_block_and_moves_others():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        order = lesions.random_block_permutation(rng, 4)
        assert order[0] == 0 and sorted(order) == [0, 1, 2, 3]
        assert order != (0, 1, 2, 3)
        seen.add(order)
    assert len(seen) == 5  # every non-identity order of blocks 2..4 occurs
    with pytest.raises(ValueError, match="at least 3 blocks"):
        lesions.random_block_permutation(rng, 2)


@pytest.mark.parametrize("order", [(1, 0, 2), (0, 1, 1), (0, 1)])
def test_bad_permutation_raises(order):
    variables = random_variables(tiny_model((2, 3, 2)))
    with pytest.raises(ValueError, match="keeps the first block first"):
        lesions.permute_blocks(variables, 1, order)
