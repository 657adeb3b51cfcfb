"""Lesions of a trained network (paper Sec. 3.3, after Veit et al. 2016): pure tree surgery.

Removing a block skips one time step of the forward-Euler discretisation; a
random order of a stage's blocks tests whether the steps are interchangeable.
Like `mlres_jax.multilevel`, these are pure functions of variables pytrees
(params, batch-norm statistics, anything stored per block) and models; they
work on every network tree in the pytree (`multilevel.map_network_trees`).

* `remove_block` with `lesioned_model` (or both at once, `lesion`);
* `permute_blocks` with `random_block_permutation`.

Indices in arguments are 0-based (``stage_index``, ``block_index``); the
names they address are 1-based like ``stage2/block3`` and the paper's figures.
`mlres_jax.measurements` evaluates lesioned networks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from mlres_jax import models, multilevel


def _check_block(tree_stage: Mapping, stage_key: str, block_index: int) -> list:
    blocks = multilevel.ordered_blocks(stage_key, tree_stage)
    if not 0 <= block_index < len(blocks):
        raise ValueError(
            f"{stage_key} has {len(blocks)} blocks; block index {block_index} "
            f"(0-based) is out of range"
        )
    return blocks


def _edit_stage(tree, stage_index: int, edit: Callable[[str, Mapping], dict | None]):
    """Replaces stage ``stage_index`` of every network tree by ``edit``'s result.

    ``edit`` returning None drops the stage's entry (a stage without blocks
    has no variables, so a fresh model's tree has no entry for it either).
    """
    stage_key = models.stage_name(stage_index)

    def edit_network(network: Mapping) -> dict:
        if stage_key not in network:
            raise ValueError(
                f"the tree has no {stage_key}; stages: "
                f"{sorted(k for k in network if multilevel.is_stage_key(k))}"
            )
        result = {}
        for key, node in network.items():
            if key == stage_key:
                node = edit(key, node)
                if node is None:
                    continue
            result[key] = node
        return result

    return multilevel.map_network_trees(edit_network, tree)


def remove_block(tree, stage_index: int, block_index: int):
    """Removes one block of one stage: the lesion of paper Sec. 3.3.

    In the dynamical-systems view this skips one time step: the later blocks
    of the stage move up one place and are renumbered (``block4`` becomes
    ``block3``). Parameters and batch-norm statistics are edited alike; every
    network tree in ``tree`` (see `multilevel.interpolate`) is edited.

    Removing the first (downsampling) block of stage 2 or 3 leaves the stage
    to downsample by the parameter-free shortcut S alone, as Veit et al.
    (2016) do; the model that runs the result says so (`lesioned_model`).

    Args:
      tree: a pytree containing network trees, e.g. ``{"params",
        "batch_stats"}``.
      stage_index: 0-based stage.
      block_index: 0-based block within the stage.

    Returns:
      A new pytree; the input is not modified. If the stage had one block,
      its entry is dropped (a stage without blocks has no variables).

    Raises:
      ValueError: for a stage or block that does not exist.
    """

    def edit(stage_key, stage):
        blocks = _check_block(stage, stage_key, block_index)
        kept = blocks[:block_index] + blocks[block_index + 1 :]
        if not kept:
            return None
        return {models.block_name(i): block for i, block in enumerate(kept)}

    return _edit_stage(tree, stage_index, edit)


def is_downsampling_block(model: models.ResNet, stage_index: int, block_index: int) -> bool:
    """Whether the block halves the spatial size and doubles the channels.

    True for the first block of every stage but the first (paper Sec. 5.1),
    unless a lesion already removed that stage's downsampling block.
    """
    return (
        block_index == 0
        and stage_index > 0
        and stage_index not in tuple(model.shortcut_only_stages)
    )


def lesioned_model(model: models.ResNet, stage_index: int, block_index: int) -> models.ResNet:
    """The network that runs ``remove_block(variables, stage_index, block_index)``.

    The stage is one block shorter. If the removed block downsampled, the
    stage is added to ``shortcut_only_stages``: it downsamples by the
    parameter-free shortcut S alone ("option A", Veit et al. 2016).

    Raises:
      ValueError: for a stage or block that does not exist.
    """
    sizes = list(model.stage_sizes)
    if not 0 <= stage_index < len(sizes):
        raise ValueError(
            f"the model has {len(sizes)} stages; stage index "
            f"{stage_index} (0-based) is out of range"
        )
    if not 0 <= block_index < sizes[stage_index]:
        raise ValueError(
            f"stage {stage_index + 1} has {sizes[stage_index]} blocks; block "
            f"index {block_index} (0-based) is out of range"
        )
    shortcut_only = tuple(model.shortcut_only_stages)
    if is_downsampling_block(model, stage_index, block_index):
        shortcut_only = tuple(sorted((*shortcut_only, stage_index)))
    sizes[stage_index] -= 1
    return model.clone(stage_sizes=tuple(sizes), shortcut_only_stages=shortcut_only)


def lesion(model: models.ResNet, variables, stage_index: int, block_index: int):
    """`remove_block` and `lesioned_model` together.

    Returns:
      ``(lesioned_model, lesioned_variables)``. Its forward pass equals the
      full model's with block ``block_index``'s residual module output
      G(Y_j) set to zero (Y_{j+1} = S(Y_j)).
    """
    return (
        lesioned_model(model, stage_index, block_index),
        remove_block(variables, stage_index, block_index),
    )


def permute_blocks(tree, stage_index: int, permutation: Sequence[int]):
    """Reorders the blocks of one stage (the shuffle of paper Sec. 3.3).

    The new block i is the old block ``permutation[i]``. The first block of a
    stage keeps its place: in stages 2 and 3 it downsamples and has other
    shapes than the rest, so it cannot move, and for stage 1 the same rule is
    kept so all stages are shuffled alike. Only blocks 2.. are permuted.

    Args:
      tree: a pytree containing network trees.
      stage_index: 0-based stage.
      permutation: a permutation of ``range(num_blocks)`` with
        ``permutation[0] == 0``.

    Returns:
      A new pytree with the same structure and shapes; the input is not
      modified.

    Raises:
      ValueError: if ``permutation`` is not such a permutation.
    """
    permutation = [int(i) for i in permutation]

    def edit(stage_key, stage):
        blocks = multilevel.ordered_blocks(stage_key, stage)
        if sorted(permutation) != list(range(len(blocks))) or permutation[0] != 0:
            raise ValueError(
                f"{permutation} is not a permutation of the {len(blocks)} blocks "
                f"of {stage_key} that keeps the first block first"
            )
        return {models.block_name(i): blocks[source] for i, source in enumerate(permutation)}

    return _edit_stage(tree, stage_index, edit)


def random_block_permutation(rng: np.random.Generator, num_blocks: int) -> tuple[int, ...]:
    """A random order of a stage's blocks for `permute_blocks`.

    Block 0 stays first; blocks 1.. are permuted uniformly at random among
    the orders other than the identity.

    Args:
      rng: numpy generator (e.g. ``np.random.default_rng(seed)``).
      num_blocks: blocks in the stage, >= 3 (with fewer there is no other
        order that keeps the first block first).

    Returns:
      0-based indices, length ``num_blocks``, starting with 0.

    Raises:
      ValueError: for ``num_blocks < 3``.
    """
    if num_blocks < 3:
        raise ValueError(
            f"a stage of {num_blocks} blocks has no shuffle that keeps the "
            "first (downsampling) block first; need at least 3 blocks"
        )
    while True:
        rest = tuple(int(i) for i in 1 + rng.permutation(num_blocks - 1))
        if rest != tuple(range(1, num_blocks)):
            return (0, *rest)
