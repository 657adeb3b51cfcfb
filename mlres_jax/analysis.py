"""The paper's dynamical-systems analyses: lesions, norms, figures.

A block computes ``Y_{j+1} = S(Y_j) + h * F(Y_j)`` and its residual module
output is ``G(Y_j) = h * F(Y_j)`` (paper Sec. 3.1, Eq. 2). This module holds

* **lesions** (paper Sec. 3.3, after Veit et al. 2016), pure functions on
  variables pytrees: `remove_block` with `lesioned_model` (or both at once,
  `lesion`) and `permute_blocks` with `random_block_permutation`;
* **norms**: `block_norms` gives, per block, the mean over a data set of the
  per-example L2 norms ||Y_j|| and ||F(Y_j)|| (and ||G(Y_j)|| = h·||F(Y_j)||),
  the numbers behind the paper's Fig. 3 (gamma), Fig. 4 and Fig. 7 (App. C);
* **evaluation** of lesions: `error_rate`, `removal_errors`, `shuffle_errors`;
* **figures** built as matplotlib ``Figure`` objects (Agg canvas, no pyplot
  state): `norms_figure`, `gamma_figure`, `lesion_figure`,
  `F_against_time_figure`, `training_curves_figure`;
* `plot_training_curves`, which the training loop calls at the end of a run
  (files are written atomically by `mlres_jax.files`).

Indices in arguments are 0-based (``stage_index``, ``block_index``); names
and records for people (CSV, plots) are 1-based like the parameter names
``stage2/block3`` and the paper's figures. The command line is
`mlres_jax.analyze`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlres_jax import files, input_pipeline, models, multilevel

# ---------------------------------------------------------------------------
# Lesions (paper Sec. 3.3): pure tree surgery.


def _check_block(tree_stage: Mapping, stage_key: str, block_index: int) -> list:
    blocks = multilevel.ordered_blocks(stage_key, tree_stage)
    if not 0 <= block_index < len(blocks):
        raise ValueError(
            f"{stage_key} has {len(blocks)} blocks; block index {block_index} "
            f"(0-based) is out of range")
    return blocks


def _edit_stage(tree, stage_index: int, edit: Callable[[str, Mapping], dict | None]):
    """Replaces stage ``stage_index`` of every network tree by ``edit``'s result.

    ``edit`` returning None drops the stage's entry (a stage without blocks
    has no variables, so a fresh model's tree has no entry for it either).
    """
    stage_key = models.stage_name(stage_index)

    def edit_network(network: Mapping) -> dict:
        if stage_key not in network:
            raise ValueError(f"the tree has no {stage_key}; stages: "
                             f"{sorted(k for k in network if multilevel.is_stage_key(k))}")
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
        kept = blocks[:block_index] + blocks[block_index + 1:]
        if not kept:
            return None
        return {models.block_name(i): block for i, block in enumerate(kept)}

    return _edit_stage(tree, stage_index, edit)


def is_downsampling_block(model: models.ResNet, stage_index: int,
                          block_index: int) -> bool:
    """Whether the block halves the spatial size and doubles the channels.

    True for the first block of every stage but the first (paper Sec. 5.1),
    unless a lesion already removed that stage's downsampling block.
    """
    return (block_index == 0 and stage_index > 0
            and stage_index not in tuple(model.shortcut_only_stages))


def lesioned_model(model: models.ResNet, stage_index: int,
                   block_index: int) -> models.ResNet:
    """The network that runs ``remove_block(variables, stage_index, block_index)``.

    The stage is one block shorter. If the removed block downsampled, the
    stage is added to ``shortcut_only_stages``: it downsamples by the
    parameter-free shortcut S alone ("option A", Veit et al. 2016).

    Raises:
      ValueError: for a stage or block that does not exist.
    """
    sizes = list(model.stage_sizes)
    if not 0 <= stage_index < len(sizes):
        raise ValueError(f"the model has {len(sizes)} stages; stage index "
                         f"{stage_index} (0-based) is out of range")
    if not 0 <= block_index < sizes[stage_index]:
        raise ValueError(
            f"stage {stage_index + 1} has {sizes[stage_index]} blocks; block "
            f"index {block_index} (0-based) is out of range")
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
    return (lesioned_model(model, stage_index, block_index),
            remove_block(variables, stage_index, block_index))


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
                f"of {stage_key} that keeps the first block first")
        return {models.block_name(i): blocks[source]
                for i, source in enumerate(permutation)}

    return _edit_stage(tree, stage_index, edit)


def random_block_permutation(rng: np.random.Generator,
                             num_blocks: int) -> tuple[int, ...]:
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
            "first (downsampling) block first; need at least 3 blocks")
    while True:
        rest = tuple(int(i) for i in 1 + rng.permutation(num_blocks - 1))
        if rest != tuple(range(1, num_blocks)):
            return (0, *rest)


# ---------------------------------------------------------------------------
# Norms (paper Sec. 3.2, 3.3, App. C).


def l2_norm_per_example(x: jax.Array) -> jax.Array:
    """L2 norm of each example over its whole feature map (SPEC §6).

    Args:
      x: float[N, H, W, C].

    Returns:
      float32[N], ``sqrt(sum over H, W, C of x^2)``.
    """
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2, 3)))


def _block_keys(model: models.ResNet) -> list[tuple[str, str]]:
    return [(models.stage_name(s), models.block_name(j))
            for s, n in enumerate(model.stage_sizes) for j in range(n)]


@functools.partial(jax.jit, static_argnames="model")
def _norm_sums(variables, images, mask, *, model):
    """Sums over the real examples of ||Y_j|| and ||F(Y_j)||, float32[d] each."""
    _, state = model.apply(variables, input_pipeline.preprocess_for_eval(images),
                           train=False, mutable=[models.INTERMEDIATES])
    sown = state[models.INTERMEDIATES]
    weight = mask.astype(jnp.float32)
    input_norms = jnp.stack([l2_norm_per_example(sown[s][b]["block_input"][0])
                             for s, b in _block_keys(model)])
    F_norms = jnp.stack([l2_norm_per_example(sown[s][b]["F"][0])
                         for s, b in _block_keys(model)])
    return input_norms @ weight, F_norms @ weight


@dataclasses.dataclass(frozen=True, eq=False)
class BlockNorms:
    """Per-block norms of one network, each the mean over a data set.

    Blocks are numbered through all stages, j = 0 .. d - 1 (d = number of
    blocks), stage by stage.

    Attributes:
      stage_sizes: blocks per stage of the network.
      step_size: its step size h.
      input_norm: float64[d], mean ||Y_j|| of the block inputs.
      F_norm: float64[d], mean ||F(Y_j)|| (the residual module before h).
      num_examples: examples averaged over.
    """

    stage_sizes: tuple[int, ...]
    step_size: float
    input_norm: np.ndarray
    F_norm: np.ndarray
    num_examples: int

    @property
    def num_blocks(self) -> int:
        """d, the number of residual blocks."""
        return int(sum(self.stage_sizes))

    @property
    def G_norm(self) -> np.ndarray:
        """float64[d], mean ||G(Y_j)|| = h·||F(Y_j)|| (paper Eq. 5)."""
        return abs(self.step_size) * self.F_norm

    @property
    def gamma(self) -> float:
        """gamma = mean_j ||G(Y_j)|| over the d blocks (paper Sec. 3.2, Fig. 3)."""
        return float(np.mean(self.G_norm))

    @property
    def stage_index(self) -> np.ndarray:
        """int[d], 0-based stage of each block."""
        return np.repeat(np.arange(len(self.stage_sizes)), self.stage_sizes)

    @property
    def block_index(self) -> np.ndarray:
        """int[d], 0-based position of each block within its stage."""
        return np.concatenate([np.arange(n) for n in self.stage_sizes]).astype(int)

    @property
    def first_in_stage(self) -> np.ndarray:
        """bool[d], True for the first block of each stage."""
        return self.block_index == 0

    @property
    def time(self) -> np.ndarray:
        """float64[d], conceptual time t_j = j·h of each block input (App. C)."""
        return np.arange(self.num_blocks) * self.step_size

    def ratio_summary(self) -> dict[str, float]:
        """Mean of ||G(Y_j)|| / ||Y_j|| over first blocks and over the rest.

        The paper's Fig. 4 claim (Sec. 3.3): G is small compared with Y except
        at the first block of each stage. The ratio is of the per-block means.
        """
        ratio = self.G_norm / self.input_norm
        first = self.first_in_stage
        return {"first_blocks": float(np.mean(ratio[first])),
                "other_blocks": (float(np.mean(ratio[~first])) if np.any(~first)
                                 else float("nan"))}

    def records(self) -> list[dict]:
        """One row per block for a CSV: 1-based stage and block numbers."""
        return [{
            "block": j + 1, "stage": int(s) + 1, "block_in_stage": int(b) + 1,
            "first_in_stage": bool(b == 0), "t": float(t),
            "input_norm": float(y), "F_norm": float(f), "G_norm": float(g),
            "G_over_input": float(g / y),
        } for j, (s, b, t, y, f, g) in enumerate(zip(
            self.stage_index, self.block_index, self.time, self.input_norm,
            self.F_norm, self.G_norm))]


def block_norms(model: models.ResNet, variables, images: np.ndarray, *,
                batch_size: int) -> BlockNorms:
    """Per-block mean norms ||Y_j|| and ||F(Y_j)|| over a data set at test time.

    Each example's norm is over its whole feature map (H·W·C), then averaged
    over the examples (SPEC §6). Images are standardised as in evaluation; the
    batch norms use their running averages.

    Args:
      model: the network.
      variables: its ``{"params", "batch_stats"}``.
      images: uint8[N, H, W, C] raw images (e.g. the test split), N >= 1.
      batch_size: examples per forward pass; the last batch is padded and
        masked.

    Returns:
      `BlockNorms` of the network.
    """
    labels = np.zeros((len(images),), np.int32)
    input_sum = F_sum = 0.0
    for batch_images, _, mask in input_pipeline.eval_batches(images, labels, batch_size):
        sums = jax.device_get(_norm_sums(variables, batch_images, mask, model=model))
        input_sum = input_sum + sums[0].astype(np.float64)
        F_sum = F_sum + sums[1].astype(np.float64)
    count = len(images)
    return BlockNorms(stage_sizes=tuple(model.stage_sizes),
                      step_size=float(model.step_size),
                      input_norm=np.asarray(input_sum) / count,
                      F_norm=np.asarray(F_sum) / count, num_examples=count)


# ---------------------------------------------------------------------------
# Evaluation of lesions (paper Sec. 3.3).


@functools.partial(jax.jit, static_argnames="model")
def _error_count(variables, images, labels, mask, *, model):
    logits = model.apply(variables, input_pipeline.preprocess_for_eval(images),
                         train=False)
    return jnp.sum((jnp.argmax(logits, -1) != labels) & mask)


def error_rate(model: models.ResNet, variables, images: np.ndarray,
               labels: np.ndarray, *, batch_size: int) -> float:
    """Fraction of ``images`` misclassified (batch norms at running averages).

    Compiles once per distinct model and variable shapes (jit cache), so
    every lesion of a non-first block of a stage reuses one executable.

    Args:
      model, variables: the network.
      images: uint8[N, H, W, C]; labels: int[N]; N >= 1.
      batch_size: examples per forward pass.

    Returns:
      Test error in [0, 1].
    """
    wrong = 0
    for batch in input_pipeline.eval_batches(images, labels, batch_size):
        wrong += int(_error_count(variables, *batch, model=model))
    return wrong / len(images)


def removal_errors(model: models.ResNet, variables, images: np.ndarray,
                   labels: np.ndarray, *, batch_size: int) -> list[dict]:
    """Test error with each single block removed (`lesion`), for every block.

    Returns:
      One record per block, in order: ``block`` (1-based through all
      stages), ``stage``, ``block_in_stage`` (1-based), ``downsampling``
      (bool) and ``test_error`` (fraction).
    """
    records = []
    number = 0
    for s, n in enumerate(model.stage_sizes):
        for j in range(n):
            number += 1
            lesioned, lesioned_variables = lesion(model, variables, s, j)
            records.append({
                "block": number, "stage": s + 1, "block_in_stage": j + 1,
                "downsampling": is_downsampling_block(model, s, j),
                "test_error": error_rate(lesioned, lesioned_variables, images,
                                         labels, batch_size=batch_size),
            })
    return records


def shuffle_errors(model: models.ResNet, variables, images: np.ndarray,
                   labels: np.ndarray, *, batch_size: int, num_shuffles: int,
                   seed: int) -> list[dict]:
    """Test error after random shuffles of the blocks within each stage.

    For every stage of at least 3 blocks, ``num_shuffles`` random orders
    (`random_block_permutation`; the first block stays first) are each
    evaluated with the other stages intact. Stages of fewer blocks have no
    such shuffle and are skipped.

    Returns:
      One record per shuffle: ``stage`` (1-based), ``shuffle`` (1-based),
      ``order`` (the 1-based old block numbers in their new order, as a
      space-separated string), ``blocks_moved`` and ``test_error``.
    """
    rng = np.random.default_rng(seed)
    records = []
    for s, n in enumerate(model.stage_sizes):
        if n < 3:
            continue
        for k in range(num_shuffles):
            order = random_block_permutation(rng, n)
            shuffled = permute_blocks(variables, s, order)
            records.append({
                "stage": s + 1, "shuffle": k + 1,
                "order": " ".join(str(i + 1) for i in order),
                "blocks_moved": sum(i != source for i, source in enumerate(order)),
                "test_error": error_rate(model, shuffled, images, labels,
                                         batch_size=batch_size),
            })
    return records


# ---------------------------------------------------------------------------
# Figures. Each function builds a Figure with an Agg canvas; `save_figure`
# writes it.

_FIRST_BLOCK_STYLE = dict(marker="o", s=90, facecolors="none", edgecolors="black",
                          linewidths=1.5, zorder=3)


def _new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _legend_below(figure: Figure, axes, columns: int = 3) -> None:
    """One legend under the plot, clear of the curves and the stage labels."""
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center",
                  ncol=min(columns, len(labels)), fontsize=8)


def _mark_stage_starts(axes, block_numbers, first_in_stage) -> None:
    for k, x in enumerate(np.asarray(block_numbers)[np.asarray(first_in_stage)]):
        axes.axvline(x, color="grey", linestyle=":", linewidth=1)
        axes.annotate(f"stage {k + 1}", (x, 1.0), xycoords=("data", "axes fraction"),
                      xytext=(3, -12), textcoords="offset points", fontsize=8,
                      color="grey")


def norms_figure(norms: BlockNorms, title: str = "") -> Figure:
    """Paper Fig. 4: ||Y_j|| and ||G(Y_j)|| of each block at test time.

    The first block of each stage is circled and starts a dotted line.
    """
    figure = _new_figure()
    axes = figure.add_subplot()
    blocks = np.arange(1, norms.num_blocks + 1)
    axes.plot(blocks, norms.input_norm, "-s", markersize=4,
              label=r"input $\|Y_j\|$")
    axes.plot(blocks, norms.G_norm, "-^", markersize=4,
              label=r"residual module $\|G(Y_j)\| = h\,\|F(Y_j)\|$")
    first = norms.first_in_stage
    for values, label in ((norms.input_norm, "first block of a stage"),
                          (norms.G_norm, None)):
        axes.scatter(blocks[first], values[first], label=label, **_FIRST_BLOCK_STYLE)
    _mark_stage_starts(axes, blocks, first)
    axes.set_xlabel("residual block j (numbered through all stages)")
    axes.set_ylabel(f"L2 norm per example, mean over {norms.num_examples} test images")
    axes.set_ylim(bottom=0)
    axes.set_title(title or "Norms of the input and output of the residual modules")
    _legend_below(figure, axes)
    return figure


def gamma_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """Paper Fig. 3: gamma = mean_j ||G(Y_j)|| against the number of blocks d.

    Args:
      records: each with ``num_blocks`` (d), ``gamma`` and ``label`` (points
        with one label share a colour). A least-squares fit c/d is drawn
        dashed (paper Eq. 5 predicts gamma proportional to 1/d).
    """
    figure = _new_figure()
    axes = figure.add_subplot()
    d = np.array([r["num_blocks"] for r in records], float)
    gamma = np.array([r["gamma"] for r in records], float)
    for label in dict.fromkeys(r["label"] for r in records):
        pick = np.array([r["label"] == label for r in records])
        axes.plot(d[pick], gamma[pick], "o", markersize=7, label=label)
    if len(records):
        c = float(np.sum(gamma / d) / np.sum(1 / d**2))
        grid = np.linspace(d.min() * 0.8, d.max() * 1.2, 200)
        axes.plot(grid, c / grid, "--", color="grey",
                  label=f"least-squares fit c/d, c = {c:.3g}")
    axes.set_xlabel("number of residual blocks d")
    axes.set_ylabel(r"$\gamma$ = mean$_j$ $\|G(Y_j)\|$ over blocks and test images")
    axes.set_title("Average norm of the residual modules against depth")
    axes.legend(loc="best", fontsize=8)
    return figure


def lesion_figure(removals: Sequence[Mapping[str, Any]],
                  shuffles: Sequence[Mapping[str, Any]],
                  baseline_error: float, title: str = "") -> Figure:
    """Paper Sec. 3.3: test error after removing one block, and after shuffles.

    Left: error per removed block, downsampling blocks in another colour;
    right: error of each random shuffle per stage. Both show the intact
    network's error as a horizontal line. Errors in percent.
    """
    figure = _new_figure(11.0, 4.5)
    left, right = figure.subplots(1, 2, sharey=True,
                                  gridspec_kw={"width_ratios": [3, 1]})
    blocks = np.array([r["block"] for r in removals])
    errors = 100 * np.array([r["test_error"] for r in removals], float)
    down = np.array([bool(r["downsampling"]) for r in removals])
    left.plot(blocks[~down], errors[~down], "o", color="tab:blue",
              label="block removed")
    left.plot(blocks[down], errors[down], "D", color="tab:red", markersize=7,
              label="downsampling block removed (shortcut S kept)")
    left.axhline(100 * baseline_error, color="black", linestyle="--",
                 label=f"no lesion ({100 * baseline_error:.2f} %)")
    first = np.array([r["block_in_stage"] == 1 for r in removals])
    _mark_stage_starts(left, blocks - 0.5, first)
    left.set_xlabel("removed residual block j (numbered through all stages)")
    left.set_ylabel("test error (%)")
    left.set_title(title or "Removing one residual block")
    if shuffles:
        stages = np.array([r["stage"] for r in shuffles])
        right.plot(stages, 100 * np.array([r["test_error"] for r in shuffles]),
                   "o", color="tab:green", alpha=0.7, label="one random shuffle")
    else:
        right.text(0.5, 0.5, "no stage has 3 or more blocks", ha="center",
                   va="center", transform=right.transAxes, fontsize=8)
    right.axhline(100 * baseline_error, color="black", linestyle="--")
    right.set_xlabel("shuffled stage (blocks 2.. reordered)")
    num_stages = max((r["stage"] for r in removals), default=1)
    right.set_xticks(range(1, num_stages + 1))
    right.set_xlim(0.5, num_stages + 0.5)
    right.set_title("Shuffles within a stage")
    handles, labels = left.get_legend_handles_labels()
    extra_handles, extra_labels = right.get_legend_handles_labels()
    figure.legend(handles + extra_handles, labels + extra_labels,
                  loc="outside lower center", ncol=4, fontsize=8)
    return figure


def F_against_time_figure(curves: Sequence[tuple[str, BlockNorms]]) -> Figure:
    """Paper App. C, Fig. 7: ||F(Y_j)|| against conceptual time t_j = j·h.

    Args:
      curves: ``(label, norms)`` per network; the first block of each stage
        is circled.
    """
    figure = _new_figure()
    axes = figure.add_subplot()
    for i, (label, norms) in enumerate(curves):
        line, = axes.plot(norms.time, norms.F_norm, "-", marker=".", label=label)
        first = norms.first_in_stage
        axes.scatter(norms.time[first], norms.F_norm[first],
                     label="first block of a stage" if i == 0 else None,
                     **_FIRST_BLOCK_STYLE)
    axes.set_xlabel(r"conceptual time $t_j = j\,h$ (block index j from 0)")
    axes.set_ylabel(r"$\|F(Y_j)\|$ per example, mean over test images")
    axes.set_ylim(bottom=0)
    axes.set_title("Residual function F along the time interval")
    _legend_below(figure, axes, columns=2)
    return figure


def training_curves_figure(history: Sequence[Mapping[str, Any]],
                           cycle_boundaries: Sequence[float]) -> Figure:
    """Paper Fig. 6: train and test error per epoch, cycle boundaries marked.

    Args:
      history: evaluation records with ``epoch``, ``train_error`` and
        ``test_error`` (fractions), as in ``summary.json``.
      cycle_boundaries: epochs at which cycles 2, 3, ... start (interpolations
        of a multi-level run, learning-rate restarts of a fixed-depth one).

    Raises:
      ValueError: for an empty history.
    """
    if not history:
        raise ValueError("the history has no evaluations to plot")
    figure = _new_figure()
    axes = figure.add_subplot()
    epochs = [r["epoch"] for r in history]
    axes.plot(epochs, [100 * r["train_error"] for r in history], "-o",
              markersize=3, label="train error")
    axes.plot(epochs, [100 * r["test_error"] for r in history], "-s",
              markersize=3, label="test error")
    for k, epoch in enumerate(cycle_boundaries):
        axes.axvline(epoch, color="grey", linestyle="--", linewidth=1,
                     label="cycle boundary" if k == 0 else None)
    for k, epoch in enumerate([0.0, *cycle_boundaries]):
        axes.annotate(f"cycle {k + 1}", (epoch, 1.0), xycoords=("data", "axes fraction"),
                      xytext=(3, -12), textcoords="offset points", fontsize=8,
                      color="grey")
    axes.set_xlim(left=0)
    axes.set_xlabel("epoch")
    axes.set_ylabel("error (%)")
    axes.set_title("Train and test error across cycles")
    axes.legend(loc="best", fontsize=8)
    return figure


# ---------------------------------------------------------------------------
# Files (written atomically by `mlres_jax.files`).


def plot_training_curves(history: Sequence[Mapping[str, Any]],
                         cycle_boundaries: Sequence[float], path: str) -> None:
    """Writes the training curves (paper Fig. 6) of a run as a PNG.

    Args:
      history: ``summary.json``'s ``history`` records (``epoch``,
        ``train_error``, ``test_error`` as fractions).
      cycle_boundaries: epochs at which cycles 2, 3, ... start.
      path: output file, e.g. ``<workdir>/training_curves.png``; written
        atomically.

    Raises:
      ValueError: for an empty history.
      OSError: if ``path`` cannot be written.
    """
    files.save_figure(training_curves_figure(history, cycle_boundaries), path)
