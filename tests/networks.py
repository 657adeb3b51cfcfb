"""Tiny networks, random variables and images for the tests of the analyses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlres_jax import models

IMAGE_SHAPE = (8, 8, 3)


def tiny_model(stage_sizes, step_size=1.0, width=2):
    return models.ResNet(stage_sizes, width=width, num_classes=3, step_size=step_size)


def fresh_shapes(model):
    """The variables' shapes of a fresh ``model``, without compiling anything."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE))))


@functools.cache
def random_variables(model, seed=0):
    """Fresh variables with random batch-norm statistics and offsets.

    Cached: the functions under test are pure (test_lesion_leaves_input_unchanged).
    """
    variables = models.init_variables(model, jax.random.key(seed), IMAGE_SHAPE)
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # Positive perturbations keep the variances positive.
    leaves = [x + 0.1 * jnp.abs(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


def random_images(n, seed=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)


def zero_residual(variables, stage_index, block_index):
    """Zeroes block j's last conv kernel: then G(Y_j) = 0 exactly (no bias)."""
    params = jax.tree.map(lambda x: x, variables["params"])  # shallow copy
    stage = dict(params[models.stage_name(stage_index)])
    block = dict(stage[models.block_name(block_index)])
    block["conv2"] = {"kernel": jnp.zeros_like(block["conv2"]["kernel"])}
    stage[models.block_name(block_index)] = block
    params = dict(params, **{models.stage_name(stage_index): stage})
    return dict(variables, params=params)


def zero_all_residuals(variables):
    def zero(path, x):
        names = [getattr(p, "key", None) for p in path]
        return jnp.zeros_like(x) if "conv2" in names else x

    return dict(variables, params=jax.tree.map_with_path(zero, variables["params"]))


def one_block_stage_refusal(stage: str, label: str, rule: str) -> str:
    """What `multilevel.interpolate` says of a stage of one transition block (App. B).

    The rules that grow a one-block stage (identity, transition_keeping) need
    ``initial=``, the others refuse.
    """
    if rule in ("identity", "transition_keeping"):  # it can, given the fresh block to take
        return (
            f"cannot interpolate {stage} ({label}): the rule makes a block from nothing "
            "(the stage has no block of its shapes: its one block is a transition), so it "
            "needs initial=, the grown network freshly initialised (e.g. the deeper model's "
            "init), to take that block from"
        )
    return (
        f"cannot interpolate {stage} ({label}): the {rule!r} growth rule needs at least 2 "
        "blocks in a stage whose first block is a transition, got a stage of 1: the layout has "
        "first_block_is_transition=True, so the block inserted after the first is made from the "
        "second, whose entries and shapes the later blocks share (paper App. B); the rules "
        "['identity', 'transition_keeping'] grow a one-block stage; a network "
        "whose blocks are all alike takes a layout with first_block_is_transition=False"
    )
