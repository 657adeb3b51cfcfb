"""The multi-level method's tree surgery: growing a network, and shrinking it back.

Everything here is pure: functions of pytrees, no I/O. A reader who wants to
know how a network is deepened (interpolated) opens this file.

* `interpolate` doubles every stage's blocks (prolongation) under a named
  growth rule of `GROWTH_RULES` (the paper's, Sec. 4.1, Fig. 5, App. B, is
  the default); `interpolate_model` also returns the next model with h halved.
* `coarsen` is its inverse (restriction, as in multigrid): it keeps the old
  blocks of each stage and undoes the rule's scaling; `coarsen_model` also
  returns the model with h doubled.
* `grow_optimizer_state` carries an optimizer state through a growth under
  one of `MOMENTUM_POLICIES`.

**Rules.** A rule says, for a stage of n blocks, how each of the 2n new
blocks is made (`NewBlock`; `interpolate` refuses a rule that would read a
block the stage does not have, such as the second block of a one-block
stage): from which old blocks (a copy, or a weighted average; or from a
fresh initialisation of the grown network where no old block has its
shapes), with what factor on its residual module's output G, and whether
it is one of the old blocks at its new place or an inserted one. Every block
computes ``Y_{j+1} = S(Y_j) + h * G(Y_j)`` and G ends in a linear layer (this
project's ``conv2``), so scaling that layer's kernel scales G. The step size
h halves at every growth, so a block kept at its place contributes half of
what it did unless its G is doubled.

**Layouts.** Trees are recognised by names, not by position. By default a
*network tree* is a mapping with keys ``stage1``, ``stage2``, ... whose
values are mappings with keys ``block1``, ``block2``, ... (`STAGES`, the
naming of `mlres_jax.models`). Model variables ``{"params": ...,
"batch_stats": ...}``, a bare ``params`` tree and optimizer states whose
momentum mirrors ``params`` all contain such trees, so one `interpolate`
serves for all of them. Other networks say where their blocks are with a
`KeyLayout`, e.g. `flax_examples_layout` for the flat ``ResNetBlock_0``,
``ResNetBlock_1``, ... of flax's example ResNets, or a `ListLayout` for
Flax NNX models, whose ``nnx.List`` of blocks is a mapping ``0, 1, ...`` in
``nnx.state(model)`` (`BONSAI_RESNET`, `transformer_layout`; an
``nnx.State`` comes back as one, for ``nnx.update`` into the deeper model).
A layout also says which leaves of a block its residual output is linear
in, whether the first block of a stage is a transition (App. B: a
transformer's stack has none), and whether the network has an explicit h
(without one, the grown blocks keep a full step: see docs/nnx.md). A tree
in which the layout finds no stage is refused, as is a stage whose blocks
do not match it and a residual-output leaf that no block of the tree has
(so batch statistics, which have none, are grown with the parameters): the
rules, their inverses and the momentum policies are one implementation for
all layouts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mlres_jax import models

_STAGE_KEY = re.compile(r"^stage(\d+)$")
_BLOCK_KEY = re.compile(r"^block(\d+)$")

# ---------------------------------------------------------------------------
# Rules: how the 2n blocks of a grown stage are made from its n blocks.


@dataclasses.dataclass(frozen=True)
class NewBlock:
    """How one block of a grown stage is made.

    Attributes:
      sources: ``((old_index, weight), ...)``, 0-based: the block is the
        weighted sum of these old blocks' subtrees (parameters, batch-norm
        statistics, momentum alike); one source of weight 1 is a copy. No
        source, ``()``: the block is taken from a fresh initialisation of the
        grown network (`interpolate`'s ``initial``), as where a stage's only
        block is a transition and no old block has the shapes it needs.
      residual_scale: factor on the residual module's output G (applied to
        the layout's ``residual_output`` leaves, e.g. ``conv2/kernel``).
      inserted: False for an old block at its new place, True for a new one.
    """

    sources: tuple[tuple[int, float], ...]
    residual_scale: float = 1.0
    inserted: bool = False


def _check_stage(num_blocks: int, rule: str, layout: str = "the layout") -> None:
    """Refuses a stage too short for a rule, where its first block is a transition.

    Args:
      layout: how the message names the layout (its ``first_block_is_transition``
        is True: the callers check a stage only then).
    """
    if num_blocks < 2:
        raise ValueError(
            f"the {rule!r} growth rule needs at least 2 blocks in a stage whose first block "
            f"is a transition, got a stage of {num_blocks}: {layout} has "
            "first_block_is_transition=True, so the block inserted after the first is made "
            "from the second, whose entries and shapes the later blocks share (paper App. B); "
            f"the rules {rules_growing_one_block_stages()} grow a one-block stage; "
            "a network whose blocks are all alike takes a layout with "
            "first_block_is_transition=False"
        )


def rules_growing_one_block_stages() -> list[str]:
    """The names of the `GROWTH_RULES` for which `grows_one_block_stages`, sorted."""
    return sorted(name for name in GROWTH_RULES if grows_one_block_stages(name))


def grows_one_block_stages(rule: str) -> bool:
    """Whether ``rule`` grows a stage whose only block is a transition (e.g. of 1-1-1).

    Such a rule makes the inserted block from nothing (`NewBlock` without
    sources) rather than from a second block; `interpolate` then needs the
    grown network freshly initialised (its ``initial``).

    Raises:
      ValueError: for an unknown rule.
    """
    blocks = _rule(rule)(1, first_is_transition=True, step_size_halved=True)
    return all(index < 1 for block in blocks for index, _ in block.sources)


def _copy(index: int, scale: float = 1.0, inserted: bool = False) -> NewBlock:
    return NewBlock(((index, 1.0),), scale, inserted)


def paper_prolongation_sources(num_blocks: int) -> list[int]:
    """Which old block each new block copies under the paper's rule (0-based).

    ``[b1, b2, b3] -> [b1, b2, b2, b2, b3, b3]``: a copy after every old
    block, the one after the first (downsampling) block a copy of the second
    (paper Sec. 4.1, App. B).

    Raises:
      ValueError: for ``num_blocks < 2`` (no second block to copy).
    """
    _check_stage(num_blocks, "paper", "multilevel.STAGES")
    return _paper_sources(num_blocks)


def _paper_sources(num_blocks: int, first_is_transition: bool = True) -> list[int]:
    return [source for i in range(num_blocks) for source in (i, _after(i, first_is_transition))]


def _after(index: int, first_is_transition: bool) -> int:
    """The old block a copy inserted after block ``index`` is made from (App. B)."""
    return 1 if index == 0 and first_is_transition else index


def paper_rule(
    num_blocks: int, *, first_is_transition: bool = True, step_size_halved: bool = True
) -> list[NewBlock]:
    """The paper's interpolation (Chang et al. 2018, Sec. 4.1, Fig. 5, App. B).

    A copy is inserted after every block; after the first (downsampling)
    block, a copy of the second. Not function-preserving: with h halved, in
    ``[b1, b2, b3] -> [b1, b2, b2, b2, b3, b3]`` the downsampling block b1
    contributes half of what it did, b2 one and a half times, b3 the same
    (to first order). Preserves the multiset of trained blocks.

    Args:
      num_blocks: blocks of the stage.
      first_is_transition: whether the stage's first block differs from the
        rest (App. B); without one, ``[b1, b2, b3] -> [b1, b1, b2, b2, b3,
        b3]``, staged training's interleaved copy (Shen et al., 2022).
      step_size_halved: whether the grown network's h is half the old one;
        copies are copies either way (without h to halve, every block
        contributes a full step: b1 once, b2 three times, b3 twice).
    """
    del step_size_halved  # a copy is a copy
    return [
        _copy(source, inserted=bool(position % 2))
        for position, source in enumerate(_paper_sources(num_blocks, first_is_transition))
    ]


def identity_rule(
    num_blocks: int, *, first_is_transition: bool = True, step_size_halved: bool = True
) -> list[NewBlock]:
    """Zero-residual inserted blocks, old residuals kept: exactly function-preserving.

    Every old block keeps its place and its contribution h G: with h halved
    its residual module's output is doubled (h/2 * 2G = hG), with h kept
    (``step_size_halved=False``, a network without an explicit h) it is
    left as it is; every inserted block is made like the paper's (a copy of
    the block before it, of the second after a transition first block) but
    with a zero residual output, so it is the identity. In eval mode the
    network computes exactly what it did (to float rounding).

    A stage of one block that is a transition (``[b1] -> [b1, new]``, as in
    a 1-1-1 network) has no block of the shapes the inserted one needs: it
    is a freshly initialised block (`interpolate`'s ``initial``) with a zero
    residual output, the identity as well; b1 keeps its contribution.
    Source: Net2Net's identity layers (Chen, Goodfellow, Shlens, ICLR 2016)
    and LLaMA-Pro's zero-initialised inserted blocks (Wu et al., 2024).
    """
    kept = 2.0 if step_size_halved else 1.0
    if num_blocks == 1 and first_is_transition:
        return [_copy(0, kept), NewBlock((), 0.0, inserted=True)]
    return [
        NewBlock(block.sources, 0.0 if block.inserted else kept, block.inserted)
        for block in paper_rule(num_blocks, first_is_transition=first_is_transition)
    ]


def transition_keeping_rule(
    num_blocks: int, *, first_is_transition: bool = True, step_size_halved: bool = True
) -> list[NewBlock]:
    """The paper's copies, each old block's total contribution kept (to first order).

    Old block i appears c_i times in the grown stage (the paper's pattern:
    c = 1 for the downsampling block, 3 for the second, 2 for the rest), each
    with h/2; scaling every copy's residual output by 2 / c_i keeps
    c_i * (h/2) * (2/c_i) G_i = h G_i, the downsampling block's included.
    With h kept (``step_size_halved=False``) the factor is 1 / c_i; a stage
    without a transition block has c_i = 2 for every block. A stage of one
    block that is a transition grows as under `identity_rule` (c_1 = 1: b1
    keeps its contribution with the factor 2, and the inserted block, which
    no old block has the shapes for, is a fresh one with a zero residual
    output).
    Source: this project, as the first-order correction of the paper's rule.
    """
    if num_blocks == 1 and first_is_transition:
        return identity_rule(1, step_size_halved=step_size_halved)
    blocks = paper_rule(num_blocks, first_is_transition=first_is_transition)
    counts = np.bincount([b.sources[0][0] for b in blocks], minlength=num_blocks)
    kept = 2.0 if step_size_halved else 1.0
    return [NewBlock(b.sources, kept / int(counts[b.sources[0][0]]), b.inserted) for b in blocks]


def linear_rule(
    num_blocks: int, *, first_is_transition: bool = True, step_size_halved: bool = True
) -> list[NewBlock]:
    """Linear prolongation: an inserted block is the average of its two neighbours.

    ``[b1, b2, b3] -> [b1, b2, b2, (b2+b3)/2, b3, b3]``: the block between
    b_i and b_(i+1) is their average; the last one copies the last block,
    and the one after the first (downsampling) block copies the second, whose
    shapes it needs (without a transition block it is (b1+b2)/2). With the
    parameters read as a function of time t = j*h, this samples their linear
    interpolant at twice the rate, as multigrid methods prolong layer-parallel
    ResNets (Günther et al., "Layer-parallel training of deep residual neural
    networks", SIMODS 2020; torchbraid). Preserves, to first order, the
    contribution of every interior block (with h halved; without an h to
    halve, the same copies and averages each take a full step).
    """
    del step_size_halved  # copies and averages either way
    new = []
    for i in range(num_blocks):
        new.append(_copy(i))
        if i == num_blocks - 1 or (i == 0 and first_is_transition):
            new.append(_copy(_after(i, first_is_transition), inserted=True))
        else:
            new.append(NewBlock(((i, 0.5), (i + 1, 0.5)), 1.0, True))
    return new


def appended_rule(
    num_blocks: int, *, first_is_transition: bool = True, step_size_halved: bool = True
) -> list[NewBlock]:
    """Progressive stacking: the stage's copies go after its old blocks.

    ``[b1, b2, b3] -> [b1, b2, b3, b2, b2, b3]``: the stage followed by a copy
    of itself, the first (downsampling) block's copy replaced by the
    second's (without a transition block: ``[b1, b2, b3, b1, b2, b3]``).
    The same blocks as the paper's rule, in another order.
    Source: progressive stacking of BERT (Gong et al., ICML 2019).
    """
    del step_size_halved  # a copy is a copy
    return [_copy(i) for i in range(num_blocks)] + [
        _copy(_after(i, first_is_transition), inserted=True) for i in range(num_blocks)
    ]


# Growth rules by name. Add a rule here to make it available everywhere
# (config.interpolation_rule, mlres_jax.grow --rule, benchmarks.study). A rule
# is called as ``rule(num_blocks, first_is_transition=..., step_size_halved=...)``
# with the layout's `first_block_is_transition` and `explicit_step_size`.
GROWTH_RULES: dict[str, Callable[..., list[NewBlock]]] = {
    "paper": paper_rule,
    "identity": identity_rule,
    "transition_keeping": transition_keeping_rule,
    "linear": linear_rule,
    "appended": appended_rule,
}

# What happens to the optimizer's per-block state (SGD momentum) at a growth.
MOMENTUM_POLICIES = {
    "interpolate": "carried through the rule, exactly as the parameters",
    "reset": "zeroed for every block",
    "zero_inserted": "carried for the old blocks, zero for the inserted ones",
}


def _rule(name: str) -> Callable[[int], list[NewBlock]]:
    if name not in GROWTH_RULES:
        raise ValueError(
            f"unknown interpolation rule {name!r}; known rules: {sorted(GROWTH_RULES)}"
        )
    return GROWTH_RULES[name]


# ---------------------------------------------------------------------------
# Layouts: where a network tree keeps its blocks.


def _residual_output_names(value) -> tuple[str, ...]:
    """A layout's ``residual_output`` as a tuple of leaf paths; one string is one path.

    Every layout constructor (`StageLayout`, `KeyLayout`, `ListLayout` and the
    functions that build them) takes the leaves a block's residual output is
    linear in as a sequence of paths inside the block, keys joined by "/"
    (``("mlp/fc2/kernel", "mlp/fc2/bias")``), or as one path
    (``"conv2/kernel"``): a string is one name, never its characters.

    Raises:
      TypeError: for a value that is neither a string nor a sequence of strings.
      ValueError: for no name, or an empty one.
    """
    allowed = (
        "a leaf path inside a block ('conv2/kernel') or a sequence of them "
        "(('mlp/fc2/kernel', 'mlp/fc2/bias'))"
    )
    if isinstance(value, str):
        names = (value,)
    elif isinstance(value, Sequence):
        names = tuple(value)
    else:
        raise TypeError(
            f"residual_output must be {allowed}: got {value!r}, of type {type(value).__name__}"
        )
    wrong = next((name for name in names if not isinstance(name, str)), None)
    if wrong is not None:
        raise TypeError(
            f"residual_output must be {allowed}: got {value!r}, whose entry "
            f"{wrong!r} is not a string but of type {type(wrong).__name__}"
        )
    if not names:
        raise ValueError(
            f"residual_output names no leaf: got {value!r}; it must be {allowed}: "
            "without one, no rule can scale the residual output"
        )
    if "" in names:
        raise ValueError(f"residual_output has an empty name: got {value!r}; it must be {allowed}")
    return names


class Layout(Protocol):
    """Finds the blocks of a network tree and puts new ones in their place.

    Attributes:
      label: how error messages name the layout (e.g. ``"multilevel.STAGES"``).
      looks_for: what the layout looks for in a tree, for the error that
        says it found nothing.
      residual_output: the leaves, by path inside a block (keys joined by
        "/"), that the block's residual output G is linear in; the rules'
        factors scale these. Every constructor takes one path as a string
        or a sequence of them (`_residual_output_names`).
      first_block_is_transition: whether the first block of every stage has
        other shapes than the rest (a downsampling block, paper App. B); the
        rules then make the block inserted after it from the second.
      explicit_step_size: whether the network multiplies every residual
        output by a step size h that is halved at each growth (paper
        Sec. 4.1); False for a network without one, whose grown blocks each
        keep a full step (the rules' factors are chosen for that).
    """

    label: str
    looks_for: str
    residual_output: tuple[str, ...]
    first_block_is_transition: bool
    explicit_step_size: bool

    def is_network(self, node: Any) -> bool:
        """Whether ``node`` is a network tree of this layout (cheap: names only)."""

    def read(self, node: Any) -> tuple[list[list[Any]], Any]:
        """``(stages of block subtrees, what write needs besides)`` of a network tree."""

    def write(self, stages: list[list[Any]], others: Any) -> dict:
        """The network tree with ``stages`` (lists of block subtrees) in it."""

    def stage_names(self, node: Any) -> list[str]:
        """The names of ``read``'s stages in ``node``, in its order, for messages."""


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
                "expected only keys 'block1', 'block2', ..."
            )
        numbers.append(int(match.group(1)))
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        raise ValueError(
            f"{stage_name} has blocks {sorted(numbers)}; expected block1.."
            f"block{len(numbers)} without gaps"
        )
    return [stage[models.block_name(i)] for i in range(len(numbers))]


def is_stage_key(key: Any) -> bool:
    """Whether ``key`` names a stage (``stage1``, ``stage2``, ...)."""
    return isinstance(key, str) and _STAGE_KEY.match(key) is not None


def _stage_keys(node: Mapping) -> list[str]:
    """The ``stageN`` keys of ``node`` in stage order (stage10 after stage9)."""
    return sorted(
        (k for k in node if is_stage_key(k)), key=lambda k: int(_STAGE_KEY.match(k).group(1))
    )


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """This project's naming: ``stageN/blockM``, each stage a mapping of its blocks.

    The first block of every stage downsamples (a transition, App. B), and
    `models.ResNet` multiplies every residual output by its explicit step
    size h, which `interpolate_model` halves.

    Attributes:
      residual_output: the leaves, by path inside a block, that the residual
        module's output G is linear in (``conv2/kernel``: G ends in conv2,
        which has no bias).
      label: how error messages name the layout.

    Raises:
      TypeError, ValueError: for a ``residual_output`` that is not one leaf
        path or a sequence of them (`_residual_output_names`).
    """

    residual_output: tuple[str, ...] = ("conv2/kernel",)
    label: str = dataclasses.field(default="multilevel.STAGES", compare=False)
    looks_for: ClassVar[str] = (
        "keys 'stage1', 'stage2', ... holding blocks 'block1', 'block2', ... (models.ResNet)"
    )
    first_block_is_transition: ClassVar[bool] = True
    explicit_step_size: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "residual_output", _residual_output_names(self.residual_output))

    def is_network(self, node) -> bool:
        return isinstance(node, Mapping) and any(is_stage_key(k) for k in node)

    def stage_names(self, node):
        return _stage_keys(node)

    def read(self, node):
        keys = _stage_keys(node)
        return (
            [ordered_blocks(k, node[k]) for k in keys],
            {k: v for k, v in node.items() if not is_stage_key(k)},
        )

    def write(self, stages, others):
        return {
            **others,
            **{
                models.stage_name(s): {
                    models.block_name(b): block for b, block in enumerate(blocks)
                }
                for s, blocks in enumerate(stages)
            },
        }


STAGES = StageLayout()


@dataclasses.dataclass(frozen=True)
class ScannedStageLayout(StageLayout):
    """The scanned layout of `models.ResNet(scan_blocks=True)`.

    Each stage keeps its first block apart (``block1``) and blocks 2..n
    stacked along a leading axis under ``blocks/residual``; `read` unstacks
    them into a list of ordinary blocks and `write` stacks them back, so
    every rule and `coarsen` work on this layout as on `STAGES`.
    """

    label: str = dataclasses.field(default="multilevel.SCANNED", compare=False)
    looks_for: ClassVar[str] = (
        f"keys 'stage1', 'stage2', ... holding 'block1' and "
        f"'{models.SCANNED_BLOCKS}/{models.SCANNED_MODULE}' "
        "(models.ResNet(scan_blocks=True))"
    )

    def read(self, node):
        stages = []
        for key in _stage_keys(node):
            stage = node[key]
            if set(stage) - {"block1", models.SCANNED_BLOCKS} or "block1" not in stage:
                raise ValueError(
                    f"{key} has entries {sorted(stage)}; the scanned layout keeps "
                    f"'block1' and '{models.SCANNED_BLOCKS}' (blocks 2.. stacked)"
                )
            blocks = [stage["block1"]]
            if models.SCANNED_BLOCKS in stage:
                stacked = stage[models.SCANNED_BLOCKS][models.SCANNED_MODULE]
                count = jax.tree.leaves(stacked)[0].shape[0]
                blocks += [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(count)]
            stages.append(blocks)
        return stages, {k: v for k, v in node.items() if not is_stage_key(k)}

    def write(self, stages, others):
        result = dict(others)
        for s, blocks in enumerate(stages):
            stage = {"block1": blocks[0]}
            if len(blocks) > 1:
                stage[models.SCANNED_BLOCKS] = {
                    models.SCANNED_MODULE: jax.tree.map(lambda *xs: jnp.stack(xs), *blocks[1:])
                }
            result[models.stage_name(s)] = stage
        return result


SCANNED = ScannedStageLayout()


def layout_of(scan_blocks: bool) -> StageLayout:
    """`SCANNED` for ``models.ResNet(scan_blocks=True)``, else `STAGES`."""
    return SCANNED if scan_blocks else STAGES


def convert_layout(tree, source: Layout, target: Layout):
    """``tree``'s network trees, read in ``source``'s layout and written in ``target``'s.

    E.g. ``convert_layout(variables, STAGES, SCANNED)`` gives the variables
    of ``models.ResNet(scan_blocks=True)``; everything outside the stages is
    kept. A pure function, like big_vision's pyloop_to_scan / scan_to_pyloop.
    """
    return map_network_trees(lambda node: target.write(*source.read(node)), tree, source)


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """Blocks as keys directly under one mapping, located by a function.

    For networks that name blocks the framework's way, e.g. flax's examples:
    ``params = {"conv_init", "bn_init", "ResNetBlock_0", ..., "Dense_0"}``.

    Attributes:
      locate: ``key -> (stage, block)`` (0-based) for a block's key, None
        for any other key.
      name: ``(stage, block, stage_sizes) -> key`` for the grown (or
        coarsened) tree of ``stage_sizes``.
      residual_output: the leaves, by path inside a block, that the residual
        module's output is linear in.
      first_block_is_transition: whether the first block of every stage has
        other shapes than the rest (App. B); required, by keyword, as in
        `ListLayout`.
      explicit_step_size: whether the network has a step size h that the
        caller halves at each growth; flax's examples have none.
      label: how error messages name the layout.
      looks_for: what ``locate`` recognises, for error messages.

    Raises:
      TypeError, ValueError: for a ``residual_output`` that is not one leaf
        path or a sequence of them (`_residual_output_names`).
    """

    locate: Callable[[str], tuple[int, int] | None]
    name: Callable[[int, int, Sequence[int]], str]
    residual_output: tuple[str, ...]
    _: dataclasses.KW_ONLY
    first_block_is_transition: bool
    explicit_step_size: bool = False
    label: str = dataclasses.field(default="KeyLayout", compare=False)
    looks_for: str = dataclasses.field(
        default="keys that its locate function places in a stage", compare=False
    )

    def __post_init__(self):
        object.__setattr__(self, "residual_output", _residual_output_names(self.residual_output))

    def is_network(self, node) -> bool:
        return isinstance(node, Mapping) and any(
            isinstance(key, str) and self.locate(key) is not None for key in node
        )

    def read(self, node):
        found = {key: self.locate(key) for key in node if isinstance(key, str)}
        found = {key: where for key, where in found.items() if where is not None}
        num_stages = 1 + max(stage for stage, _ in found.values())
        stages = [[] for _ in range(num_stages)]
        for key, (stage, block) in sorted(found.items(), key=lambda item: item[1]):
            if block != len(stages[stage]):
                raise ValueError(
                    f"block {key!r} is block {block} of stage {stage}, "
                    f"but the stage has {len(stages[stage])} blocks before it"
                )
            stages[stage].append(node[key])
        return stages, {k: v for k, v in node.items() if k not in found}

    def write(self, stages, others):
        sizes = [len(blocks) for blocks in stages]
        return {
            **others,
            **{
                self.name(s, b, sizes): block
                for s, blocks in enumerate(stages)
                for b, block in enumerate(blocks)
            },
        }

    def stage_names(self, node):
        return [models.stage_name(s) for s in range(len(self.read(node)[0]))]


def flax_examples_layout(
    stage_sizes: Sequence[int],
    prefix: str = "ResNetBlock_",
    residual_output: str | Sequence[str] = ("BatchNorm_1/scale", "BatchNorm_1/bias"),
    explicit_step_size: bool = False,
) -> KeyLayout:
    """The layout of flax's example ResNets: blocks ``ResNetBlock_0..`` numbered through all stages.

    Their block is ``conv -> norm -> act -> conv -> norm`` plus the input
    (a projection where the shape changes), so the residual output is linear
    in the last norm's scale and bias (``BatchNorm_1``). They have no step
    size h: the grown network keeps every block's full step, and the
    identity rule leaves the old blocks' residual outputs as they are.

    Args:
      stage_sizes: blocks per stage of the tree to grow (or coarsen), e.g.
        ``(2, 2, 2, 2)`` for ResNet-18, or `stage_sizes_from_widths`.
      prefix: the blocks' name before their number.
      residual_output: leaves the residual output is linear in (one path, or
        a sequence of them).
      explicit_step_size: True for a variant that multiplies every residual
        output by a step size h, which the caller halves at each growth.

    Raises:
      TypeError, ValueError: for a ``residual_output`` that is not one leaf
        path or a sequence of them (`_residual_output_names`).
    """
    starts = np.cumsum([0, *stage_sizes])

    def locate(key):
        if not key.startswith(prefix) or not key[len(prefix) :].isdigit():
            return None
        index = int(key[len(prefix) :])
        if index >= starts[-1]:
            raise ValueError(
                f"{key!r} is beyond the {starts[-1]} blocks of stage sizes {tuple(stage_sizes)}"
            )
        stage = int(np.searchsorted(starts, index, side="right") - 1)
        return stage, index - int(starts[stage])

    def name(stage, block, sizes):
        return f"{prefix}{sum(sizes[:stage]) + block}"

    last = f"{prefix}{int(starts[-1]) - 1}"
    return KeyLayout(
        locate,
        name,
        residual_output,
        first_block_is_transition=True,
        explicit_step_size=explicit_step_size,
        label=f"flax_examples_layout({tuple(stage_sizes)})",
        looks_for=f"keys {prefix}0 .. {last} (stage sizes {tuple(stage_sizes)})",
    )


def stage_sizes_from_widths(params: Mapping, prefix: str = "ResNetBlock_") -> tuple[int, ...]:
    """Stage sizes of a flat-named network, from where its blocks change width.

    A block starts a new stage where the input channels of its first
    convolution kernel (by name) differ from the output channels of its
    last, i.e. where the stride and the width change, as in flax's example
    ResNets; the first block starts the first stage.

    Args:
      params: the ``params`` tree holding ``{prefix}0``, ``{prefix}1``, ...

    Raises:
      ValueError: if no block is found, or a block has no 4-D kernel.
    """
    numbers = sorted(
        int(k[len(prefix) :]) for k in params if k.startswith(prefix) and k[len(prefix) :].isdigit()
    )
    if not numbers:
        raise ValueError(f"no block named {prefix}0, {prefix}1, ... in {sorted(params)}")
    sizes = []
    for number in numbers:
        leaves = sorted(
            (jax.tree_util.keystr(path), leaf.shape)
            for path, leaf in jax.tree.flatten_with_path(params[f"{prefix}{number}"])[0]
            if len(leaf.shape) == 4
        )
        if not leaves:
            raise ValueError(f"{prefix}{number} has no convolution kernel")
        changes_width = leaves[0][1][2] != leaves[-1][1][3]
        if not sizes or changes_width:
            sizes.append(0)
        sizes[-1] += 1
    return tuple(sizes)


def _list_position(key) -> int | None:
    """The position an ``nnx.List`` key stands for: 0, 1, ... (or "0", "1", ... restored)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def _natural_order(path: str) -> list:
    """Sort key that puts ``layer10`` after ``layer9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


@dataclasses.dataclass(frozen=True)
class ListLayout:
    """Blocks in a list per stage, as Flax NNX keeps an ``nnx.List``: ``layer1/blocks/0/...``.

    In ``nnx.state(model)`` (and in an optimizer state that mirrors it) an
    ``nnx.List`` of blocks is a mapping with integer keys 0, 1, ...; a stage
    is such a mapping at a path, from the network tree, that ``stages``
    matches. The network tree is the mapping that holds the stages: the
    model's state, or the momentum that mirrors it inside an optimizer
    state. Its other entries (stem, embeddings, final norm, head) are kept.
    An ``nnx.State`` comes back as an ``nnx.State``, ready for
    ``nnx.update`` into a freshly built deeper model.

    Attributes:
      stages: regular expression that the path of each stage's list, from the
        network tree with keys joined by "/", matches in full: e.g.
        ``r"layer\\d+/blocks"`` for ``self.layer1.blocks``, ``"blocks"`` for
        one ``self.blocks``.
      residual_output: the leaves, by path inside a block, that the block's
        residual output is linear in (a last norm's scale and bias, or the
        output projections of a transformer block's attention and MLP).
      first_block_is_transition: whether the first block of every stage has
        other shapes than the rest (paper App. B); False: every block has the
        same entries and shapes, and none is treated as a transition.
        Required, by keyword: a default would be wrong without a word for
        one kind of network (True makes a transformer's block 0 a
        transition: the block inserted after it a copy of block 1, block 0
        not checked against the others, a one-block stack refused; False
        misses a transition block that has the others' shapes).
      explicit_step_size: whether the network multiplies every residual
        output by a step size h that the caller halves when it builds the
        grown network; False for a network without one.
      label: how error messages name the layout.

    Raises:
      TypeError, ValueError: for a ``residual_output`` that is not one leaf
        path or a sequence of them (`_residual_output_names`).
    """

    stages: str
    residual_output: tuple[str, ...]
    _: dataclasses.KW_ONLY
    first_block_is_transition: bool
    explicit_step_size: bool = False
    label: str = dataclasses.field(default="ListLayout", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "residual_output", _residual_output_names(self.residual_output))

    @property
    def looks_for(self) -> str:
        return (
            f"lists of blocks (keys 0, 1, ... as nnx.List keeps them) at paths matching "
            f"{self.stages!r}"
        )

    def _stage_paths(self, node, prefix=()) -> list[tuple]:
        """Key paths (through mappings only) from ``node`` to its stages' lists."""
        paths = []
        for key, value in node.items():
            if not isinstance(value, Mapping):
                continue
            path = (*prefix, key)
            if re.fullmatch(self.stages, "/".join(map(str, path))):
                paths.append(path)
            else:
                paths += self._stage_paths(value, path)
        return paths

    def is_network(self, node) -> bool:
        return isinstance(node, Mapping) and bool(self._stage_paths(_plain(node)))

    def stage_names(self, node):
        return ["/".join(map(str, path)) for path in self._sorted_paths(node)]

    def _sorted_paths(self, node):
        return sorted(self._stage_paths(node), key=lambda p: _natural_order("/".join(map(str, p))))

    def read(self, node):
        stages, key_types = [], []
        for path in self._sorted_paths(node):
            stage = node
            for key in path:
                stage = stage[key]
            positions = [_list_position(key) for key in stage]
            if None in positions or sorted(positions) != list(range(len(stage))):
                raise ValueError(
                    f"{'/'.join(map(str, path))!r} is not a list of blocks: its keys are "
                    f"{sorted(stage, key=str)}, not 0, 1, ... as an nnx.List's"
                )
            stages.append([stage[key] for key in sorted(stage, key=_list_position)])
            key_types.append(type(next(iter(stage))) if stage else int)
        return stages, (node, self._sorted_paths(node), key_types)

    def write(self, stages, others):
        node, paths, key_types = others
        for path, blocks, key_type in zip(paths, stages, key_types):
            node = _replace_at(node, path, {key_type(i): block for i, block in enumerate(blocks)})
        return node


def _replace_at(node: Mapping, path: tuple, value) -> dict:
    """A copy of ``node`` with ``value`` at ``path`` (plain dicts along it)."""
    head, *rest = path
    return {**node, head: _replace_at(node[head], tuple(rest), value) if rest else value}


# A ResNet written as jax-ml/bonsai writes one in Flax NNX
# (``bonsai/models/resnet/modeling.py``): every stage ``self.layer{i}`` keeps its
# blocks in ``self.blocks = nnx.List()``, so the state has
# ``layer{i}/blocks/{j}/conv{k}/kernel`` and ``.../bn{k}/{scale,bias,mean,var}``.
# The first block of a stage downsamples (it holds a ``downsample`` module): a
# transition block as in the paper's App. B. Its bottleneck block ends in ``bn2``
# before the sum, so the residual output is linear in ``bn2``'s scale and bias
# (for a basic block of two convolutions: ``dataclasses.replace(BONSAI_RESNET,
# residual_output=("bn1/scale", "bn1/bias"))``). It has no step size h.
BONSAI_RESNET = ListLayout(
    r"layer\d+/blocks",
    ("bn2/scale", "bn2/bias"),
    first_block_is_transition=True,
    label="BONSAI_RESNET",
)


def transformer_layout(
    residual_output: str | Sequence[str],
    blocks: str = "blocks",
    *,
    explicit_step_size: bool = False,
) -> ListLayout:
    """The layout of a transformer whose blocks sit in one ``nnx.List`` (one stage).

    Every block has the same entries and shapes: no block is a transition,
    so the paper's App. B case does not apply (a copy after every block is a
    copy of that block, and a stack of one block can grow). For a pre-norm
    block ``x + attention(norm1(x))``, then ``x + mlp(norm2(x))``, the
    residual output is linear in the output projections of both branches.

    Args:
      residual_output: leaves, by path inside a block, of the last linear map
        of every residual branch, e.g. ``("attention/out/kernel",
        "attention/out/bias", "mlp/output/kernel", "mlp/output/bias")`` (a
        string is one leaf).
      blocks: the key of the list of blocks in the model's state (a regular
        expression for its path, e.g. ``"decoder/layers"``).
      explicit_step_size: True if the block multiplies both branches by a
        step size h (a residual scale) that the caller halves at each growth.

    Raises:
      TypeError, ValueError: as `ListLayout`, for a bad ``residual_output``.
    """
    return ListLayout(
        blocks,
        residual_output,
        first_block_is_transition=False,
        explicit_step_size=explicit_step_size,
        label="transformer_layout()",
    )


def map_network_trees(fn: Callable[[Mapping], Any], tree, layout: Layout = STAGES):
    """Applies ``fn`` to every network tree of ``layout`` in ``tree``.

    Leaves outside network trees are returned unchanged. E.g.
    ``map_network_trees(lambda t: jax.tree.map(jnp.zeros_like, t),
    opt_state)`` zeroes an optimizer's momentum but keeps its step count.
    """
    return jax.tree.map(
        lambda node: fn(node) if layout.is_network(node) else node, tree, is_leaf=layout.is_network
    )


# ---------------------------------------------------------------------------
# Growing and shrinking.


def _plain(node: Mapping) -> Mapping:
    """The plain dict inside an ``nnx.State`` (which keeps nested plain dicts), else ``node``."""
    return node.raw_mapping if isinstance(node, nnx.State) else node


def _like(node: Mapping, result: dict) -> Mapping:
    """``result`` as the mapping type of ``node``: an ``nnx.State`` stays one."""
    return nnx.State(result) if isinstance(node, nnx.State) else result


def _leaf_name(path) -> str:
    """A leaf's path inside a block, keys joined by "/" (``conv2/kernel``).

    Attribute keys are left out: an ``nnx.Variable`` keeps its array in
    ``.value``, so ``bn2/scale`` names the array of the ``nnx.Param`` there.
    """
    return "/".join(
        str(getattr(key, "key", getattr(key, "idx", "")))
        for key in path
        if not isinstance(key, jax.tree_util.GetAttrKey)
    )


def _is_residual_output(name: str, residual_output: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("/" + p) for p in residual_output)


def _scale_residual(block, scale: float, residual_output: tuple[str, ...]):
    if scale == 1.0:
        return block

    def scaled(path, leaf):
        matches = _is_residual_output(_leaf_name(path), residual_output)
        return (leaf * scale).astype(leaf.dtype) if matches else leaf

    return jax.tree.map_with_path(scaled, block)


def _make_block(
    old_blocks, new_block: NewBlock, position: int, used: set, layout: Layout, zero: bool, fresh
):
    """Block ``position`` of a grown stage; ``fresh()``: the grown stage freshly initialised."""
    if not new_block.sources:
        block = fresh()[position]
    elif len(new_block.sources) == 1 and new_block.sources[0][1] == 1.0:
        first = new_block.sources[0][0]
        block = old_blocks[first]
        if first in used:  # each new block owns its buffers (a donated state
            block = jax.tree.map(jnp.copy, block)  # holds none twice)
        used.add(first)
    else:
        parts = [old_blocks[i] for i, _ in new_block.sources]
        if (
            len({jax.tree.structure(p) for p in parts}) > 1
            or len({tuple(x.shape for x in jax.tree.leaves(p)) for p in parts}) > 1
        ):
            raise ValueError(
                f"cannot average blocks {[i for i, _ in new_block.sources]}: their shapes differ"
            )
        weights = [w for _, w in new_block.sources]
        block = jax.tree.map(
            lambda *xs: sum(w * x for w, x in zip(weights, xs)).astype(xs[0].dtype), *parts
        )
    block = _scale_residual(block, new_block.residual_scale, layout.residual_output)
    if zero and new_block.inserted:
        block = jax.tree.map(jnp.zeros_like, block)
    return block


def _new_blocks(
    make: Callable[..., list[NewBlock]], num_blocks: int, layout: Layout
) -> list[NewBlock]:
    return make(
        num_blocks,
        first_is_transition=layout.first_block_is_transition,
        step_size_halved=layout.explicit_step_size,
    )


def _shapes(block) -> dict[str, tuple]:
    return {
        _leaf_name(path): tuple(np.shape(leaf))
        for path, leaf in jax.tree.flatten_with_path(block)[0]
    }


def _first_few(names, count: int = 4) -> str:
    names = sorted(names)
    return str(names[:count])[:-1] + (", ...]" if len(names) > count else "]")


def _check_blocks(layout: Layout, stage: str, blocks: list) -> None:
    """Refuses a stage whose blocks do not have the shapes the layout expects.

    Every block but a transition one (the first, where the layout has one)
    must have the entries and shapes of the others.

    Raises:
      ValueError: naming the stage, the block and what differs.
    """
    start = 1 if layout.first_block_is_transition else 0
    expected = (
        "every block after the first (the stage's transition block, paper App. B) "
        "to have the same entries and shapes"
        if start
        else "every block to have the same entries and shapes (no block is a transition)"
    )
    reference = _shapes(blocks[start]) if len(blocks) > start else {}
    for index in range(start + 1, len(blocks)):
        shapes = _shapes(blocks[index])
        if shapes == reference:
            continue
        if set(shapes) != set(reference):
            detail = (
                f"has entries {_first_few(set(shapes) - set(reference))} that block {start} has not"
                if set(shapes) - set(reference)
                else f"lacks entries {_first_few(set(reference) - set(shapes))} of block {start}"
            )
        else:
            name = next(n for n in sorted(shapes) if shapes[n] != reference[n])
            detail = f"has {name!r} of shape {shapes[name]}, block {start} {reference[name]}"
        raise ValueError(
            f"stage {stage!r} does not match the layout: its block "
            f"{index} (0-based) {detail}; the layout expects {expected}"
        )


def _leaf_names(block) -> list[str]:
    """The paths of ``block``'s leaves; optax's ``MaskedNode`` counts as one.

    A masked optimizer state (``optax.masked``, ``optax.multi_transform``)
    keeps a ``MaskedNode`` where it tracks no state for a parameter: the
    leaf is there, without an array.
    """
    flat, _ = jax.tree.flatten_with_path(
        block, is_leaf=lambda node: isinstance(node, optax.MaskedNode)
    )
    return [_leaf_name(path) for path, _ in flat]


def _leaves_near(names: list[str], entry: str) -> str:
    """What a block has in place of the leaf ``entry``, for messages.

    Its leaves under ``entry``'s module (``down`` for ``down/w``, then the
    modules above it), else its leaves of ``entry``'s kind (``kernel``),
    else its first leaves.
    """
    modules = entry.split("/")[:-1]
    for depth in range(len(modules), 0, -1):
        module = "/".join(modules[:depth])
        near = [n for n in names if f"/{module}/" in f"/{n}"]
        if near:
            return f"under {module!r}: {_first_few(near, 8)}"
    kind = entry.rsplit("/", 1)[-1]
    alike = [n for n in names if n.rsplit("/", 1)[-1] == kind]
    if alike:
        return f"named {kind!r}: {_first_few(alike, 8)}"
    return f"the leaves {_first_few(names, 8)}"


_RESIDUAL_OUTPUT_HINT = (
    "pass residual_output= the paths, inside a block, of the leaves the "
    "block's residual output is linear in"
)


def _residual_output_found(layout: Layout, stages: list[tuple[str, list]]) -> set[str]:
    """The names of ``layout.residual_output`` that the blocks of one network tree have.

    A network tree has each name in every block of every stage, or in none:
    a tree may lack a name (batch-norm statistics have no kernels), but then
    no block has it. `_rewrite_stages` refuses a name that no network tree
    of the call has.

    Args:
      stages: ``(stage name, blocks)`` of the network tree.

    Raises:
      ValueError: for a name that some block has and another lacks, naming
        both blocks and what the lacking one has instead.
    """
    blocks = [
        (stage, index, _leaf_names(block))
        for stage, stage_blocks in stages
        for index, block in enumerate(stage_blocks)
    ]
    found = set()
    for entry in layout.residual_output:
        has = [any(_is_residual_output(n, (entry,)) for n in names) for _, _, names in blocks]
        if not any(has):
            continue
        if not all(has):
            stage, index, names = blocks[has.index(False)]
            other_stage, other_index, _ = blocks[has.index(True)]
            raise ValueError(
                f"block {index} (0-based) of stage {stage!r} has no leaf {entry!r}, which the "
                f"layout names as part of the residual output and block {other_index} of stage "
                f"{other_stage!r} has; it has, {_leaves_near(names, entry)}; "
                f"{_RESIDUAL_OUTPUT_HINT}"
            )
        found.add(entry)
    return found


def _top_level_keys(tree) -> str:
    """The keys at the top of ``tree`` (and one level below), for error messages."""

    def keys(node):
        names = sorted((repr(k) for k in node), key=_natural_order)
        return "[" + ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") + "]"

    if isinstance(tree, Mapping):
        below = "; ".join(
            f"under {k!r}: {keys(v)}" for k, v in tree.items() if isinstance(v, Mapping)
        )
        return keys(tree) + (f" ({below})" if below else "")
    if isinstance(tree, (tuple, list)):
        return f"none: it is a {type(tree).__name__} of {[type(entry).__name__ for entry in tree]}"
    return f"none: it is a {type(tree).__name__}"


def _finds_network(tree, layout: Layout) -> bool:
    return any(layout.is_network(node) for node in jax.tree.leaves(tree, is_leaf=layout.is_network))


def _refuse_nnx_objects(tree, action: str) -> None:
    """Refuses an ``nnx.Module`` or ``nnx.Optimizer`` where its ``nnx.State`` belongs.

    Flax NNX objects are pytrees, so without this an ``nnx.Optimizer`` came
    back as one, and the next ``nnx.update`` failed inside flax.

    Raises:
      TypeError: naming where the object is, its kind, and what to pass.
    """
    flat, _ = jax.tree.flatten_with_path(tree, is_leaf=lambda node: isinstance(node, nnx.Pytree))
    for path, node in flat:
        if not isinstance(node, nnx.Pytree):
            continue
        kind, name = (
            (f"nnx.Optimizer object ({type(node).__name__})", "optimizer")
            if isinstance(node, nnx.Optimizer)
            else (f"nnx.Module object ({type(node).__name__})", "model")
            if isinstance(node, nnx.Module)
            else (f"nnx.Pytree object ({type(node).__name__})", "object")
        )
        where = f"the tree at {jax.tree_util.keystr(path)}" if path else "the tree"
        depth = "shallower" if action == "coarsen" else "deeper"
        raise TypeError(
            f"cannot {action}: {where} is an {kind}, not a state; pass "
            f"nnx.state({name}) and load the result into the {depth} {name} with "
            "nnx.update"
        )


@dataclasses.dataclass(frozen=True)
class _Network:
    """A network tree of a layout, read and checked: what `_rewrite_stages` rewrites."""

    node: Mapping  # the network tree (fresh containers), an nnx.State or a plain mapping
    stage_names: list[str]
    stages: list[list[Any]]
    others: Any  # what layout.write needs besides the stages
    residual_output_found: set[str]  # the names of layout.residual_output its blocks have


def _read_network(node, layout: Layout, action: str) -> _Network:
    # Fresh containers: nnx Variables are mutable, the result shares none with the input.
    node = jax.tree.map(lambda leaf: leaf, node)
    plain = _plain(node)
    try:
        stages, others = layout.read(plain)
        names = layout.stage_names(plain)
        for name, blocks in zip(names, stages):
            _check_blocks(layout, name, blocks)
        found = _residual_output_found(layout, list(zip(names, stages)))
    except ValueError as error:
        raise ValueError(f"cannot {action} under {layout.label}: {error}") from None
    return _Network(node, names, stages, others, found)


def _rewrite_stages(tree, layout: Layout, rewrite: Callable[..., list], action: str, initial=None):
    """``tree`` with every stage's blocks replaced by ``rewrite(stage_name, blocks, fresh)``.

    ``fresh()`` returns the same stage's blocks in the network tree at the
    same place of ``initial`` (a tree like the result, or a function of no
    arguments returning one, called at most once, when first needed).

    Every network tree is read and checked before any is rewritten. The
    residual-output names are checked over all of them together: one tree
    may lack a name (batch statistics have no kernels), but every name must
    be in some network tree of ``tree``, else a misspelt name would leave
    the residual output unscaled (the identity rule no identity).

    Raises:
      ValueError: if the layout finds no stage in ``tree``, cannot read a
        network tree, a stage does not match it (`_check_blocks`), a
        residual-output name is in some blocks of a network tree but not in
        all (`_residual_output_found`), or in no network tree of ``tree``.
      TypeError: for an ``nnx.Module`` or ``nnx.Optimizer`` in ``tree``
        (`_refuse_nnx_objects`).
    """
    _refuse_nnx_objects(tree, action)
    read_initial = {}

    def fresh_stage(position: int, stage: str, grown_blocks: int) -> list:
        if not read_initial:
            if initial is None:
                raise ValueError(
                    f"cannot {action} {stage} ({layout.label}): the rule makes a block from "
                    "nothing (the stage has no block of its shapes: its one block is a "
                    "transition), so it needs initial=, the grown network freshly "
                    "initialised (e.g. the deeper model's init), to take that block from"
                )
            fresh_tree = initial() if callable(initial) else initial
            fresh_leaves = jax.tree.flatten(fresh_tree, is_leaf=layout.is_network)[0]
            read_initial.update(
                (index, node) for index, node in enumerate(fresh_leaves) if layout.is_network(node)
            )
        node = read_initial.get(position)
        network = node and _read_network(node, layout, f"read initial= to {action}")
        blocks = network and dict(zip(network.stage_names, network.stages)).get(stage)
        if blocks is None or len(blocks) != grown_blocks:
            raise ValueError(
                f"cannot {action} {stage} ({layout.label}): initial= has no network tree "
                "like the result at "
                f"the same place with {grown_blocks} blocks in {stage} (found "
                f"{'none' if blocks is None else len(blocks)}); pass the grown network's "
                "freshly initialised tree, of the same structure as the result"
            )
        return blocks

    leaves, treedef = jax.tree.flatten(tree, is_leaf=layout.is_network)
    networks = {
        position: _read_network(node, layout, action)
        for position, node in enumerate(leaves)
        if layout.is_network(node)
    }
    if not networks:
        raise ValueError(
            f"cannot {action}: {layout.label} finds no stage of blocks in the tree; it looks "
            f"for {layout.looks_for}; the tree's top-level keys are {_top_level_keys(tree)}"
        )
    found = set().union(*(network.residual_output_found for network in networks.values()))
    missing = [entry for entry in layout.residual_output if entry not in found]
    if missing:
        # Show the block with the most leaves (the parameters' rather than the statistics').
        stage, index, names = max(
            (
                (stage, index, _leaf_names(block))
                for network in networks.values()
                for stage, blocks in zip(network.stage_names, network.stages)
                for index, block in enumerate(blocks)
            ),
            key=lambda shown: len(shown[2]),
        )
        near = {}  # what the block has instead: the names it stands for
        for entry in missing:
            near.setdefault(_leaves_near(names, entry), []).append(repr(entry))
        raise ValueError(
            f"cannot {action} under {layout.label}: no block of the tree has "
            f"{' or '.join(map(repr, missing))}, which the layout names as part of the residual "
            f"output; block {index} (0-based) of stage {stage!r} has, "
            + "; ".join(f"for {' and '.join(entries)}, {what}" for what, entries in near.items())
            + f"; {_RESIDUAL_OUTPUT_HINT} (a tree that holds none of them, such as batch "
            "statistics alone, is grown in one call together with the parameters)"
        )
    for position, network in networks.items():
        leaves[position] = _like(
            network.node,
            layout.write(
                [
                    rewrite(
                        name,
                        blocks,
                        lambda grown, position=position, name=name: fresh_stage(
                            position, name, grown
                        ),
                    )
                    for name, blocks in zip(network.stage_names, network.stages)
                ],
                network.others,
            ),
        )
    return jax.tree.unflatten(treedef, leaves)


def interpolate(
    tree,
    rule: str = "paper",
    layout: Layout = STAGES,
    *,
    zero_inserted: bool = False,
    initial=None,
):
    """Interpolates (prolongs) a network to twice the blocks in every stage.

    Every stage of n blocks becomes a stage of 2n blocks made by ``rule``
    (`GROWTH_RULES`); all stages at once; everything outside the stages
    (stem, final norm, head) unchanged. Under ``rule="paper"`` (paper
    Sec. 4.1, Fig. 5, App. B) ``[b1, b2, b3] -> [b1, b2, b2, b2, b3, b3]``.
    Parameters, batch-norm running statistics and anything else stored per
    block are made alike; residual scales apply to ``layout.residual_output``
    leaves only (parameters and the momentum that mirrors them).

    Where the layout has an explicit step size (``layout.explicit_step_size``,
    as `STAGES`), the caller halves h (see `interpolate_model`); where it has none, the
    grown blocks keep a full step and the rules' factors are chosen for that
    (e.g. identity leaves old blocks as they are; see docs/nnx.md).

    Args:
      tree: any pytree containing network trees: model variables
        ``{"params": ..., "batch_stats": ...}``, a ``params`` tree, an
        ``nnx.State`` (``nnx.state(model)``, not the model), or an optimizer
        state whose momentum mirrors the parameters. Leaves outside network
        trees (e.g. an optimizer step count) pass unchanged.
      rule: a key of `GROWTH_RULES`.
      layout: where the blocks are (`STAGES`, `SCANNED`, a `KeyLayout`, a
        `ListLayout` for Flax NNX models).
      zero_inserted: make the inserted blocks zero (the momentum policy
        ``"zero_inserted"``).
      initial: needed only where ``rule`` makes a block from nothing (a
        stage of one block that is a transition, under a rule for which
        `grows_one_block_stages`): a tree of the same structure as the
        result, freshly initialised (for variables, the deeper model's
        ``init``; for an optimizer state, the optimizer's ``init`` of those
        parameters), or a function of no arguments that returns one (called
        only if needed). Such a block is taken from it, its residual output
        scaled by the rule (zero: the identity).

    Returns:
      A new pytree with the tree structure and shapes of the same variables
      of a fresh model with doubled stage sizes (an ``nnx.State`` stays one).
      The input is not modified.

    Raises:
      ValueError: for an unknown rule; a tree in which the layout finds no
        stage (the message names the layout, what it looks for and the
        tree's top-level keys); a stage whose blocks do not match the layout
        (other entries or shapes); a ``layout.residual_output`` name that
        no block of ``tree`` has (a tree may lack one only where another
        network tree in it has it: grow batch statistics together with the
        parameters), or that some blocks of a network tree have and others
        lack; a stage of one block where the first block is a transition,
        under a rule that cannot grow it, or without ``initial``; an
        ``initial`` without the grown stage at the same place; blocks that
        the layout cannot read.
      TypeError: for an ``nnx.Module`` or ``nnx.Optimizer`` where its
        ``nnx.state(...)`` belongs (the message says what to pass).
    """
    make = _rule(rule)

    def grow(stage, blocks, fresh_stage):
        new_blocks = _new_blocks(make, len(blocks), layout)
        if any(i >= len(blocks) for b in new_blocks for i, _ in b.sources):
            try:
                _check_stage(len(blocks), rule)
            except ValueError as error:
                raise ValueError(f"cannot interpolate {stage} ({layout.label}): {error}") from None
        used = set()
        return [
            _make_block(
                blocks,
                b,
                position,
                used,
                layout,
                zero_inserted,
                lambda: fresh_stage(len(new_blocks)),
            )
            for position, b in enumerate(new_blocks)
        ]

    return _rewrite_stages(tree, layout, grow, "interpolate", initial)


def coarsen(tree, rule: str = "paper", layout: Layout = STAGES):
    """Coarsens (restricts) a network to half the blocks in every stage: `interpolate`'s inverse.

    Every stage of 2n blocks keeps the blocks that ``rule`` leaves at their
    new place (the non-inserted ones: positions 0, 2, 4, ... for the paper's
    rule, the first n for ``appended``) and divides their residual output by
    the rule's factor, so ``coarsen(interpolate(tree, rule), rule)`` is
    ``tree`` (exactly, or to float rounding where a factor is not a power of
    2). On a network that was not grown this way it is the multigrid
    restriction. Kept leaves are the input's arrays.

    Where the layout has an explicit step size, the caller doubles h (see
    `coarsen_model`).

    Raises:
      ValueError: for a stage with an odd number of blocks (no rule makes
        one), a rule that does not keep an old block as a scaled copy of
        itself (its old block cannot be recovered; none of `GROWTH_RULES`),
        or as `interpolate` for a tree in which the layout finds no stage or
        a stage that does not match it.
      TypeError: as `interpolate`, for an ``nnx.Module`` instead of its state.
    """
    make = _rule(rule)

    def shrink(stage, blocks, _):
        if len(blocks) % 2:
            raise ValueError(
                f"cannot coarsen {stage}: it has {len(blocks)} blocks, and every growth "
                f"rule doubles a stage, so only an even number can be halved ({layout.label})"
            )
        old = {}
        for position, block in enumerate(_new_blocks(make, len(blocks) // 2, layout)):
            if block.inserted:
                continue
            (source, weight), *rest = block.sources
            if rest or weight != 1.0 or block.residual_scale == 0.0:
                raise ValueError(
                    f"cannot coarsen under the {rule!r} rule: it does not keep old "
                    f"block {source + 1} as a scaled copy of itself, so that block "
                    "cannot be recovered"
                )
            old[source] = _scale_residual(
                blocks[position], 1.0 / block.residual_scale, layout.residual_output
            )
        return [old[i] for i in range(len(blocks) // 2)]

    return _rewrite_stages(tree, layout, shrink, "coarsen")


def grow_optimizer_state(
    opt_state, rule: str, policy: str, layout: Layout = STAGES, *, initial=None
):
    """The optimizer state of the grown network under a `MOMENTUM_POLICIES` policy.

    The per-block state (SGD momentum, which mirrors the parameters) is
    ``"interpolate"``: carried through ``rule`` exactly as the parameters
    (each new block starts with the velocity of the blocks it is made from,
    scaled as its parameters are); ``"reset"``: zeroed everywhere;
    ``"zero_inserted"``: carried for the old blocks, zero for the inserted.
    Anything outside the network trees (e.g. the step count, so that the
    global learning-rate schedule goes on) is kept. ``opt_state`` is an
    optax state, or ``nnx.state(optimizer)`` of an ``nnx.Optimizer`` (load
    the result into the grown network's optimizer with ``nnx.update``). A
    state without per-parameter arrays (plain SGD: step counts at most) is
    returned as it is. A block the rule makes from nothing takes its state
    from ``initial`` (the optimizer's ``init`` of the grown parameters, or a
    function returning it: zero momentum), as `interpolate`.

    Raises:
      ValueError: for an unknown policy; a state that holds per-parameter
        arrays in which the layout finds no stage; or as `interpolate`.
      TypeError: for the ``nnx.Optimizer`` itself instead of
        ``nnx.state(optimizer)``.
    """
    if policy not in MOMENTUM_POLICIES:
        raise ValueError(f"unknown momentum policy {policy!r}; known: {sorted(MOMENTUM_POLICIES)}")
    _refuse_nnx_objects(opt_state, "grow the optimizer state")
    if not _finds_network(opt_state, layout) and all(
        np.ndim(leaf) == 0 for leaf in jax.tree.leaves(opt_state)
    ):
        return opt_state
    grown = interpolate(
        opt_state, rule, layout, zero_inserted=policy == "zero_inserted", initial=initial
    )
    if policy == "reset":
        grown = map_network_trees(lambda t: jax.tree.map(jnp.zeros_like, t), grown, layout)
    return grown


def interpolated_model(model: models.ResNet) -> models.ResNet:
    """The model after one interpolation: stage sizes doubled, h halved (Sec. 4.1)."""
    return model.clone(
        stage_sizes=tuple(2 * n for n in model.stage_sizes), step_size=model.step_size / 2
    )


def interpolate_model(model: models.ResNet, variables, rule: str = "paper", *, initial=None):
    """Interpolates ``variables`` under ``rule`` and returns them with the matching model.

    Args:
      initial: the deeper model's fresh variables, or a function of the
        deeper model returning them; used only for a block the rule makes
        from nothing (a one-block stage: `interpolate`).

    Returns:
      ``(deeper_model, deeper_variables)``: stage sizes doubled, h halved.

    Raises:
      ValueError: as `interpolate`.
    """
    deeper = interpolated_model(model)
    fresh = (lambda: initial(deeper)) if callable(initial) else initial
    return deeper, interpolate(variables, rule, layout_of(model.scan_blocks), initial=fresh)


def coarsened_model(model: models.ResNet) -> models.ResNet:
    """The model after one coarsening: stage sizes halved, h doubled.

    Raises:
      ValueError: for an odd stage size.
    """
    if any(n % 2 for n in model.stage_sizes):
        raise ValueError(
            f"cannot coarsen stage sizes {tuple(model.stage_sizes)}: every "
            "stage needs an even number of blocks"
        )
    return model.clone(
        stage_sizes=tuple(n // 2 for n in model.stage_sizes), step_size=model.step_size * 2
    )


def coarsen_model(model: models.ResNet, variables, rule: str = "paper"):
    """Coarsens ``variables`` and returns them with the matching model.

    The inverse of `interpolate_model`: ``coarsen_model(*interpolate_model(
    model, variables, rule), rule)`` gives back ``model`` and ``variables``.

    Raises:
      ValueError: as `coarsen`.
    """
    return coarsened_model(model), coarsen(variables, rule, layout_of(model.scan_blocks))


__all__ = [
    "GROWTH_RULES",
    "KeyLayout",
    "Layout",
    "ListLayout",
    "MOMENTUM_POLICIES",
    "NewBlock",
    "transformer_layout",
    "BONSAI_RESNET",
    "SCANNED",
    "STAGES",
    "ScannedStageLayout",
    "StageLayout",
    "convert_layout",
    "layout_of",
    "appended_rule",
    "coarsen",
    "coarsen_model",
    "coarsened_model",
    "flax_examples_layout",
    "grow_optimizer_state",
    "grows_one_block_stages",
    "rules_growing_one_block_stages",
    "identity_rule",
    "interpolate",
    "interpolate_model",
    "interpolated_model",
    "is_stage_key",
    "linear_rule",
    "map_network_trees",
    "ordered_blocks",
    "paper_prolongation_sources",
    "paper_rule",
    "stage_sizes_from_widths",
    "transition_keeping_rule",
]
