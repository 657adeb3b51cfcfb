"""The multi-level method: interpolation of a network's pytree and the cycle plan.

Everything here is pure: functions of pytrees and numbers, no I/O.

* `interpolate` doubles every stage's blocks (prolongation, paper Sec. 4.1,
  Fig. 5, App. B); `deepen` also returns the next model with h halved.
* `coarsen` is its inverse (restriction, as in multigrid): it keeps every other
  block of each stage; `restrict` also returns the model with h doubled.
* `plan_cycles` lays out the cycles of a run (paper Table 1, Sec. 5.2) and
  `learning_rate_schedule` builds the cosine learning rate that restarts at
  every cycle (SGDR, paper Eq. 9) from optax.
* `theoretical_time_saved` and `theoretical_cost_ratio` are the paper's
  Sec. 4.2 cost model (Table 2).

Trees are recognised by names, not by position: a *network tree* is any
mapping with keys ``stage1``, ``stage2``, ... whose values are mappings with
keys ``block1``, ``block2``, ... (`mlres_jax.models` names them so). Model
variables ``{"params": ..., "batch_stats": ...}``, a bare ``params`` tree and
optimizer states whose momentum mirrors ``params`` all contain such trees, so
the one `interpolate` serves for all of them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from mlres_jax import models

_STAGE_KEY = re.compile(r"^stage(\d+)$")
_BLOCK_KEY = re.compile(r"^block(\d+)$")


def _is_network_tree(node: Any) -> bool:
    return isinstance(node, Mapping) and any(
        isinstance(k, str) and _STAGE_KEY.match(k) for k in node)


def ordered_blocks(stage_name: str, stage: Mapping) -> list:
    """The block subtrees of one stage in order ``block1, block2, ...``.

    Raises:
      ValueError: for a key that is not a block name, or gaps in the numbers.
    """
    numbers = []
    for key in stage:
        match = _BLOCK_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            raise ValueError(
                f"{stage_name} has an entry {key!r} that is not a block; "
                "expected only keys 'block1', 'block2', ...")
        numbers.append(int(match.group(1)))
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        raise ValueError(
            f"{stage_name} has blocks {sorted(numbers)}; expected block1.."
            f"block{len(numbers)} without gaps")
    return [stage[models.block_name(i)] for i in range(len(numbers))]


def is_stage_key(key: Any) -> bool:
    """Whether ``key`` names a stage (``stage1``, ``stage2``, ...)."""
    return isinstance(key, str) and _STAGE_KEY.match(key) is not None


def paper_prolongation_sources(num_blocks: int) -> list[int]:
    """Which old block each new block copies, under the paper's rule.

    A new block is inserted after every old block as its copy, except that the
    block inserted after the first (downsampling) block copies the *second* old
    block, because the first has other shapes (paper Sec. 4.1, App. B). For
    ``[b1, b2, b3]`` the result is ``[b1, b2, b2, b2, b3, b3]``.

    Args:
      num_blocks: blocks in the stage before interpolation, >= 2.

    Returns:
      0-based indices into the old blocks, length ``2 * num_blocks``.

    Raises:
      ValueError: for ``num_blocks < 2`` (no second block to copy).
    """
    if num_blocks < 2:
        raise ValueError(
            f"the paper's interpolation rule needs at least 2 blocks per "
            f"stage, got a stage of {num_blocks}: the block inserted after the "
            "first (downsampling) block is a copy of the second block, since "
            "the first block's shapes differ from the rest (paper App. B)")
    sources = []
    for i in range(num_blocks):
        sources += [i, i if i > 0 else 1]
    return sources


# Interpolation rules: name -> function from the old stage size to the copy
# sources of the new blocks. Add a rule here to make it available everywhere.
INTERPOLATION_RULES: dict[str, Callable[[int], list[int]]] = {
    "paper": paper_prolongation_sources,
}


def _copy_subtree(tree):
    # Each new block owns its buffers, so a donated train state never holds
    # the same buffer twice.
    return jax.tree_util.tree_map(jnp.copy, tree)


def _interpolate_network_tree(tree: Mapping, rule: str) -> dict:
    sources_fn = INTERPOLATION_RULES[rule]
    result = {}
    for key, node in tree.items():
        if isinstance(key, str) and _STAGE_KEY.match(key):
            blocks = ordered_blocks(key, node)
            try:
                sources = sources_fn(len(blocks))
            except ValueError as error:
                raise ValueError(f"cannot interpolate {key}: {error}") from None
            seen = set()
            stage = {}
            for new_index, old_index in enumerate(sources):
                block = blocks[old_index]
                stage[models.block_name(new_index)] = (
                    _copy_subtree(block) if old_index in seen else block)
                seen.add(old_index)
            result[key] = stage
        else:
            result[key] = node
    return result


def interpolate(tree, rule: str = "paper"):
    """Interpolates (prolongs) a network to twice the blocks in every stage.

    Paper Sec. 4.1, Fig. 5 and App. B: every stage of n blocks
    becomes a stage of 2n blocks; all stages at once; stem, final norm and
    head unchanged. Under ``rule="paper"`` the new block after each old block is
    its copy, except after the first block, which gets a copy of the second:
    ``[b1, b2, b3] -> [b1, b2, b2, b2, b3, b3]``. Parameters, batch-norm
    running statistics and anything else stored per block are copied alike.

    The caller halves the step size h (see `deepen`).

    Args:
      tree: any pytree containing network trees: model variables
        ``{"params": ..., "batch_stats": ...}``, a ``params`` tree, or an
        optimizer state whose momentum mirrors ``params`` (this is how the
        training loop carries momentum across an interpolation). Leaves
        outside network trees (e.g. an optimizer step count) pass unchanged.
      rule: a key of `INTERPOLATION_RULES`.

    Returns:
      A new pytree with the tree structure and shapes of the same variables
      of a fresh model with doubled stage sizes. The input is not modified.

    Raises:
      ValueError: for an unknown rule, a stage of one block under the paper
        rule, or stage contents not named ``block1..blockN``.
    """
    if rule not in INTERPOLATION_RULES:
        raise ValueError(
            f"unknown interpolation rule {rule!r}; known rules: "
            f"{sorted(INTERPOLATION_RULES)}")
    return map_network_trees(
        lambda node: _interpolate_network_tree(node, rule), tree)


def map_network_trees(fn: Callable[[Mapping], Any], tree):
    """Applies ``fn`` to every network tree (mapping of ``stageN``) in ``tree``.

    Leaves outside network trees are returned unchanged. E.g.
    ``map_network_trees(lambda t: jax.tree_util.tree_map(jnp.zeros_like, t),
    opt_state)`` zeroes an optimizer's momentum but keeps its step count.
    """
    return jax.tree_util.tree_map(
        lambda node: fn(node) if _is_network_tree(node) else node,
        tree, is_leaf=_is_network_tree)


def interpolated_model(model: models.ResNet) -> models.ResNet:
    """The model after one interpolation: stage sizes doubled, h halved (Sec. 4.1)."""
    return model.clone(
        stage_sizes=tuple(2 * n for n in model.stage_sizes),
        step_size=model.step_size / 2)


def deepen(model: models.ResNet, variables, rule: str = "paper"):
    """Interpolates ``variables`` and returns them with the matching model.

    Args:
      model: the current network.
      variables: its ``{"params", "batch_stats"}`` pytree.
      rule: interpolation rule, see `interpolate`.

    Returns:
      ``(deeper_model, deeper_variables)``: stage sizes doubled, h halved.

    Raises:
      ValueError: as `interpolate`.
    """
    return interpolated_model(model), interpolate(variables, rule)


# ---------------------------------------------------------------------------
# Coarsening (restriction): the inverse of interpolation.


def _coarsen_network_tree(tree: Mapping) -> dict:
    result = {}
    for key, node in tree.items():
        if is_stage_key(key):
            blocks = ordered_blocks(key, node)
            if len(blocks) % 2:
                raise ValueError(
                    f"cannot coarsen {key}: it has {len(blocks)} blocks, and "
                    "coarsening keeps blocks 1, 3, 5, ... of an even number of "
                    "blocks (the inverse of interpolation, which doubles them)")
            result[key] = {models.block_name(i): blocks[2 * i]
                           for i in range(len(blocks) // 2)}
        else:
            result[key] = node
    return result


def coarsen(tree):
    """Coarsens (restricts) a network to half the blocks in every stage.

    The inverse of `interpolate` (multigrid restriction, paper
    Sec. 4): every stage of 2n blocks keeps its blocks at 0-based positions
    0, 2, 4, ..., 2n - 2 and becomes a stage of n blocks, renumbered
    ``block1..blockn``; stem, final norm and head are unchanged. Under the
    paper's rule ``[b1, b2, b3] -> [b1, b2, b2, b2, b3, b3]`` these positions
    hold ``b1, b2, b3``, so ``coarsen(interpolate(tree))`` equals ``tree``
    exactly. Parameters, batch-norm statistics and anything else stored per
    block are kept alike; the kept leaves are the input's arrays (not copies).

    The caller doubles the step size h (see `restrict`).

    Args:
      tree: any pytree containing network trees (see `interpolate`).

    Returns:
      A new pytree with the tree structure and shapes of the same variables
      of a fresh model with halved stage sizes. The input is not modified.

    Raises:
      ValueError: for a stage with an odd number of blocks, or stage contents
        not named ``block1..blockN``.
    """
    return map_network_trees(_coarsen_network_tree, tree)


def coarsened_model(model: models.ResNet) -> models.ResNet:
    """The model after one coarsening: stage sizes halved, h doubled.

    Raises:
      ValueError: for an odd stage size.
    """
    odd = [n for n in model.stage_sizes if n % 2]
    if odd:
        raise ValueError(
            f"cannot coarsen stage sizes {tuple(model.stage_sizes)}: every "
            f"stage needs an even number of blocks")
    return model.clone(
        stage_sizes=tuple(n // 2 for n in model.stage_sizes),
        step_size=model.step_size * 2)


def restrict(model: models.ResNet, variables):
    """Coarsens ``variables`` and returns them with the matching model.

    The inverse of `deepen`: ``restrict(*deepen(model, variables))`` gives back
    ``model`` and ``variables``.

    Args:
      model: the current network.
      variables: its ``{"params", "batch_stats"}`` pytree.

    Returns:
      ``(coarser_model, coarser_variables)``: stage sizes halved, h doubled.

    Raises:
      ValueError: as `coarsen`.
    """
    return coarsened_model(model), coarsen(variables)


# ---------------------------------------------------------------------------
# Cycles and the learning-rate schedule.


@dataclasses.dataclass(frozen=True)
class Cycle:
    """One training cycle: a fixed network trained under one cosine annealing.

    Attributes:
      index: 0-based cycle number.
      stage_sizes: blocks per stage during this cycle.
      step_size: the explicit step size h during this cycle.
      first_step: global step (0-based) at which the cycle starts.
      num_steps: training steps in the cycle.
    """

    index: int
    stage_sizes: tuple[int, ...]
    step_size: float
    first_step: int
    num_steps: int

    @property
    def end_step(self) -> int:
        """Global step one past the cycle's last step."""
        return self.first_step + self.num_steps


def cycle_start_steps(cycle_boundaries: Sequence[float], steps_per_epoch: int) -> list[int]:
    """Global steps at which cycles 2, 3, ... start: ``round(epoch * steps_per_epoch)``."""
    return [round(epoch * steps_per_epoch) for epoch in cycle_boundaries]


def plan_cycles(
    *,
    stage_sizes: Sequence[int],
    step_size: float,
    num_epochs: float,
    cycle_boundaries: Sequence[float],
    steps_per_epoch: int,
    multilevel: bool,
) -> list[Cycle]:
    """Lays out the cycles of a run (paper Table 1 and Sec. 5.2).

    Args:
      stage_sizes: blocks per stage of the first cycle's model.
      step_size: h of the first cycle's model.
      num_epochs: length of the whole run in epochs (160 in the paper).
      cycle_boundaries: epochs at which a new cycle starts, increasing, inside
        ``(0, num_epochs)`` (the paper: 60 and 110). Fractional epochs allowed.
      steps_per_epoch: training steps per epoch.
      multilevel: if True, the network is interpolated at every boundary
        (stage sizes doubled, h halved); if False the depth stays fixed and
        only the learning rate restarts (the paper's first- and last-cycle
        baselines).

    Returns:
      One `Cycle` per cycle, covering steps ``0 .. round(num_epochs *
      steps_per_epoch)`` without gap.

    Raises:
      ValueError: if a cycle would have no steps.
    """
    total = round(num_epochs * steps_per_epoch)
    starts = [0, *cycle_start_steps(cycle_boundaries, steps_per_epoch)]
    ends = starts[1:] + [total]
    cycles = []
    sizes, h = tuple(stage_sizes), float(step_size)
    for index, (start, end) in enumerate(zip(starts, ends)):
        if end <= start:
            edges = [0.0, *cycle_boundaries, num_epochs]
            raise ValueError(
                f"cycle {index + 1} would have {max(0, end - start)} steps: epochs "
                f"{edges[index]:g} to {edges[index + 1]:g} round to steps {start}.."
                f"{end} at {steps_per_epoch} steps per epoch, and every cycle needs "
                f"at least one step")
        cycles.append(Cycle(index, sizes, h, start, end - start))
        if multilevel:
            sizes, h = tuple(2 * n for n in sizes), h / 2
    return cycles


def cosine_cycle_schedule(
    num_steps: int, learning_rate_max: float, learning_rate_min: float
) -> optax.Schedule:
    """One cycle of paper Eq. 9 as an optax schedule of the step in the cycle.

    ``eta(t) = eta_min + (eta_max - eta_min) * (1 + cos(pi * t / T)) / 2``
    with ``T = num_steps``: eta_max at t = 0, eta_min at t = T.
    """
    return optax.cosine_decay_schedule(
        init_value=learning_rate_max,
        decay_steps=num_steps,
        alpha=learning_rate_min / learning_rate_max,
    )


def learning_rate_schedule(
    cycles: Sequence[Cycle], learning_rate_max: float, learning_rate_min: float
) -> optax.Schedule:
    """Cosine annealing restarted at every cycle (SGDR; paper Eq. 9, Sec. 5.2).

    Args:
      cycles: from `plan_cycles`.
      learning_rate_max: eta_max (paper: 0.5).
      learning_rate_min: eta_min (paper: 0.001).

    Returns:
      An optax schedule of the global step (0-based).
    """
    return optax.join_schedules(
        [cosine_cycle_schedule(c.num_steps, learning_rate_max, learning_rate_min)
         for c in cycles],
        boundaries=[c.first_step for c in cycles[1:]],
    )


# ---------------------------------------------------------------------------
# Paper Sec. 4.2: the cost model.


def theoretical_cost_ratio(cycle_lengths: Sequence[float]) -> float:
    """Cost of a multi-level run relative to the last-cycle model (Sec. 4.2).

    A cycle's cost is proportional to its length times its depth, and the
    depth halves going back one cycle. For the paper's 60/50/50 epochs:
    ``(60/4 + 50/2 + 50) / 160 = 0.5625``.

    Args:
      cycle_lengths: length of each cycle (epochs or steps), first to last.

    Returns:
      The ratio in (0, 1].
    """
    last = len(cycle_lengths) - 1
    cost = sum(length / 2 ** (last - i) for i, length in enumerate(cycle_lengths))
    return cost / sum(cycle_lengths)


def theoretical_time_saved(num_interpolations: int) -> float:
    """Fraction of training time saved with k interpolations of equal cycles.

    Paper Sec. 4.2 and Table 2: ``1 - (2^(k+1) - 1) / (2^k (k + 1))``, i.e.
    0, 0.25, 0.42, 0.53, 0.61, 0.67 for k = 0..5.

    Raises:
      ValueError: for negative k.
    """
    k = num_interpolations
    if k < 0 or int(k) != k:
        raise ValueError(f"num_interpolations must be an integer >= 0, got {k!r}")
    return 1 - (2 ** (k + 1) - 1) / (2**k * (k + 1))


def cycle_epochs(num_epochs: float, cycle_boundaries: Sequence[float]) -> list[float]:
    """Lengths in epochs of the cycles delimited by ``cycle_boundaries``."""
    edges = [0.0, *cycle_boundaries, num_epochs]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


__all__ = [
    "Cycle", "INTERPOLATION_RULES", "coarsen", "coarsened_model",
    "cosine_cycle_schedule", "cycle_epochs", "cycle_start_steps", "deepen",
    "interpolate", "interpolated_model", "is_stage_key",
    "learning_rate_schedule", "map_network_trees", "ordered_blocks",
    "paper_prolongation_sources", "plan_cycles", "restrict",
    "theoretical_cost_ratio", "theoretical_time_saved",
]
