"""Figures of the paper's analyses and of a run's training curves.

Each ``*_figure`` function builds a matplotlib ``Figure`` on an Agg canvas
(no pyplot state) from numbers that `mlres_jax.measurements` or a run's
history provide; `mlres_jax.files.save_figure` writes it atomically.

* `norms_figure`: paper Fig. 4, ||Y_j|| and ||G(Y_j)|| per block;
* `gamma_figure`: paper Fig. 3, gamma against the number of blocks d;
* `lesion_figure`: paper Sec. 3.3, test error after lesions;
* `F_against_time_figure`: paper App. C, Fig. 7;
* `training_curves_figure` and `plot_training_curves`: paper Fig. 6.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mlres_jax import files
from mlres_jax.measurements import BlockNorms

_FIRST_BLOCK_STYLE = dict(
    marker="o", s=90, facecolors="none", edgecolors="black", linewidths=1.5, zorder=3
)


def _new_figure(width: float = 7.0, height: float = 4.5) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _legend_below(figure: Figure, axes, columns: int = 3) -> None:
    """One legend under the plot, clear of the curves and the stage labels."""
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(
        handles, labels, loc="outside lower center", ncol=min(columns, len(labels)), fontsize=8
    )


def _label_at_top(axes, x: float, text: str) -> None:
    """A small grey label just inside the top of the axes, right of data position ``x``."""
    axes.annotate(
        text,
        (x, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, -12),
        textcoords="offset points",
        fontsize=8,
        color="grey",
    )


def _mark_stage_starts(axes, block_numbers, first_in_stage) -> None:
    for k, x in enumerate(np.asarray(block_numbers)[np.asarray(first_in_stage)]):
        axes.axvline(x, color="grey", linestyle=":", linewidth=1)
        _label_at_top(axes, x, f"stage {k + 1}")


def norms_figure(norms: BlockNorms, title: str = "") -> Figure:
    """Paper Fig. 4: ||Y_j|| and ||G(Y_j)|| of each block at test time.

    The first block of each stage is circled and starts a dotted line.
    """
    figure = _new_figure()
    axes = figure.add_subplot()
    blocks = np.arange(1, norms.num_blocks + 1)
    axes.plot(blocks, norms.input_norm, "-s", markersize=4, label=r"input $\|Y_j\|$")
    axes.plot(
        blocks,
        norms.G_norm,
        "-^",
        markersize=4,
        label=r"residual module $\|G(Y_j)\| = h\,\|F(Y_j)\|$",
    )
    first = norms.first_in_stage
    for values, label in ((norms.input_norm, "first block of a stage"), (norms.G_norm, None)):
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
        axes.plot(grid, c / grid, "--", color="grey", label=f"least-squares fit c/d, c = {c:.3g}")
    axes.set_xlabel("number of residual blocks d")
    axes.set_ylabel(r"$\gamma$ = mean$_j$ $\|G(Y_j)\|$ over blocks and test images")
    axes.set_title("Average norm of the residual modules against depth")
    axes.legend(loc="best", fontsize=8)
    return figure


def lesion_figure(
    removals: Sequence[Mapping[str, Any]],
    shuffles: Sequence[Mapping[str, Any]],
    baseline_error: float,
    title: str = "",
) -> Figure:
    """Paper Sec. 3.3: test error after removing one block, and after shuffles.

    Left: error per removed block, downsampling blocks in another colour;
    right: error of each random shuffle per stage. Both show the intact
    network's error as a horizontal line. Errors in percent.
    """
    figure = _new_figure(11.0, 4.5)
    left, right = figure.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    blocks = np.array([r["block"] for r in removals])
    errors = 100 * np.array([r["test_error"] for r in removals], float)
    down = np.array([bool(r["downsampling"]) for r in removals])
    left.plot(blocks[~down], errors[~down], "o", color="tab:blue", label="block removed")
    left.plot(
        blocks[down],
        errors[down],
        "D",
        color="tab:red",
        markersize=7,
        label="downsampling block removed (shortcut S kept)",
    )
    left.axhline(
        100 * baseline_error,
        color="black",
        linestyle="--",
        label=f"no lesion ({100 * baseline_error:.2f} %)",
    )
    first = np.array([r["block_in_stage"] == 1 for r in removals])
    _mark_stage_starts(left, blocks - 0.5, first)
    left.set_xlabel("removed residual block j (numbered through all stages)")
    left.set_ylabel("test error (%)")
    left.set_title(title or "Removing one residual block")
    if shuffles:
        stages = np.array([r["stage"] for r in shuffles])
        right.plot(
            stages,
            100 * np.array([r["test_error"] for r in shuffles]),
            "o",
            color="tab:green",
            alpha=0.7,
            label="one random shuffle",
        )
    else:
        right.text(
            0.5,
            0.5,
            "no stage has 3 or more blocks",
            ha="center",
            va="center",
            transform=right.transAxes,
            fontsize=8,
        )
    right.axhline(100 * baseline_error, color="black", linestyle="--")
    right.set_xlabel("shuffled stage (blocks 2.. reordered)")
    num_stages = max((r["stage"] for r in removals), default=1)
    right.set_xticks(range(1, num_stages + 1))
    right.set_xlim(0.5, num_stages + 0.5)
    right.set_title("Shuffles within a stage")
    handles, labels = left.get_legend_handles_labels()
    extra_handles, extra_labels = right.get_legend_handles_labels()
    figure.legend(
        handles + extra_handles,
        labels + extra_labels,
        loc="outside lower center",
        ncol=4,
        fontsize=8,
    )
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
        (line,) = axes.plot(norms.time, norms.F_norm, "-", marker=".", label=label)
        first = norms.first_in_stage
        axes.scatter(
            norms.time[first],
            norms.F_norm[first],
            label="first block of a stage" if i == 0 else None,
            **_FIRST_BLOCK_STYLE,
        )
    axes.set_xlabel(r"conceptual time $t_j = j\,h$ (block index j from 0)")
    axes.set_ylabel(r"$\|F(Y_j)\|$ per example, mean over test images")
    axes.set_ylim(bottom=0)
    axes.set_title("Residual function F along the time interval")
    _legend_below(figure, axes, columns=2)
    return figure


def training_curves_figure(
    history: Sequence[Mapping[str, Any]], cycle_boundaries: Sequence[float]
) -> Figure:
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
    axes.plot(
        epochs, [100 * r["train_error"] for r in history], "-o", markersize=3, label="train error"
    )
    axes.plot(
        epochs, [100 * r["test_error"] for r in history], "-s", markersize=3, label="test error"
    )
    for k, epoch in enumerate(cycle_boundaries):
        axes.axvline(
            epoch,
            color="grey",
            linestyle="--",
            linewidth=1,
            label="cycle boundary" if k == 0 else None,
        )
    for k, epoch in enumerate([0.0, *cycle_boundaries]):
        _label_at_top(axes, epoch, f"cycle {k + 1}")
    axes.set_xlim(left=0)
    axes.set_xlabel("epoch")
    axes.set_ylabel("error (%)")
    axes.set_title("Train and test error across cycles")
    axes.legend(loc="best", fontsize=8)
    return figure


def plot_training_curves(
    history: Sequence[Mapping[str, Any]], cycle_boundaries: Sequence[float], path: str
) -> None:
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
