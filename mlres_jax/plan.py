"""The plan of a run: its cycles, the restarting cosine learning rate, the cost model.

Pure functions of numbers (no trees, no I/O):

* `plan_cycles` lays out the cycles of a run (paper Table 1, Sec. 5.2): when
  each starts, how many steps it has, the stage sizes and step size h of its
  network (`cycle_networks`, the one place where the blocks double);
* `learning_rate_schedule` builds the cosine learning rate that restarts at
  every cycle (SGDR, paper Eq. 9) from optax;
* `theoretical_time_saved` and `theoretical_cost_ratio` are the paper's
  Sec. 4.2 cost model (Table 2).

How the network grows from one cycle to the next is `mlres_jax.multilevel`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import optax

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


def cycle_networks(
    stage_sizes: Sequence[int], step_size: float, num_cycles: int, multilevel: bool = True
) -> list[tuple[tuple[int, ...], float]]:
    """Blocks per stage and step size h of each cycle's network (paper Table 1).

    Args:
      stage_sizes: blocks per stage of the first cycle's network.
      step_size: its h.
      num_cycles: number of cycles, >= 1.
      multilevel: whether the network is interpolated at every cycle boundary
        (blocks doubled and h halved, paper Sec. 4.1); if False, every cycle
        keeps the first cycle's network.

    Returns:
      ``[(stage_sizes, h), ...]``, one per cycle; ``(2, 2, 2), 1.0, 3`` gives
      2-2-2 with h = 1, 4-4-4 with h = 0.5, 8-8-8 with h = 0.25.
    """
    sizes, h = tuple(int(n) for n in stage_sizes), float(step_size)
    networks = []
    for _ in range(num_cycles):
        networks.append((sizes, h))
        if multilevel:
            sizes, h = tuple(2 * n for n in sizes), h / 2
    return networks


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
    networks = cycle_networks(stage_sizes, step_size, len(starts), multilevel)
    for index, (start, end, (sizes, h)) in enumerate(zip(starts, ends, networks)):
        if end <= start:
            edges = [0.0, *cycle_boundaries, num_epochs]
            raise ValueError(
                f"cycle {index + 1} would have {max(0, end - start)} steps: epochs "
                f"{edges[index]:g} to {edges[index + 1]:g} round to steps {start}.."
                f"{end} at {steps_per_epoch} steps per epoch, and every cycle needs "
                f"at least one step"
            )
        cycles.append(Cycle(index, sizes, h, start, end - start))
    return cycles


def plan_cycles_of_config(config, steps_per_epoch: int) -> list[Cycle]:
    """`plan_cycles` with a run config's ``stage_sizes``, ``step_size``, ``num_epochs``,
    ``cycle_boundaries`` and ``multilevel`` (``configs/default.py``).

    Raises:
      ValueError: if a cycle would have no steps.
    """
    return plan_cycles(
        stage_sizes=config.stage_sizes,
        step_size=config.step_size,
        num_epochs=config.num_epochs,
        cycle_boundaries=config.cycle_boundaries,
        steps_per_epoch=steps_per_epoch,
        multilevel=config.multilevel,
    )


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
        [cosine_cycle_schedule(c.num_steps, learning_rate_max, learning_rate_min) for c in cycles],
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
