"""Tests of the cycle plan, the restarting schedule and the cost model (`mlres_jax.plan`)."""

import math

import numpy as np
import pytest

from mlres_jax import plan

# --- The schedule (paper Eq. 9, Sec. 5.2) ------------------------------------

ETA_MAX, ETA_MIN = 0.5, 0.001


def _paper_plan(**changes):
    """Paper Sec. 5.2: ResNet-50-i, 160 epochs, cycles restarted at 60 and 110; ``changes``."""
    fields = dict(
        stage_sizes=(2, 2, 2),
        step_size=1.0,
        num_epochs=160,
        cycle_boundaries=(60, 110),
        steps_per_epoch=500,
        multilevel=True,
    )
    return plan.plan_cycles(**{**fields, **changes})


def _eq9(t_cur, t_total):
    return ETA_MIN + 0.5 * (ETA_MAX - ETA_MIN) * (1 + math.cos(math.pi * t_cur / t_total))


def test_paper_cycle_plan():
    cycles = _paper_plan()
    assert [c.stage_sizes for c in cycles] == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert [c.step_size for c in cycles] == [1.0, 0.5, 0.25]
    assert [c.first_step for c in cycles] == [0, 30_000, 55_000]
    assert [c.num_steps for c in cycles] == [30_000, 25_000, 25_000]
    baseline = _paper_plan(stage_sizes=(8, 8, 8), multilevel=False)
    assert {c.stage_sizes for c in baseline} == {(8, 8, 8)}
    assert [c.first_step for c in baseline] == [0, 30_000, 55_000]


def test_cycle_networks_double_the_blocks_and_halve_h():
    # Paper Table 1: ResNet-50-i is 2-2-2 -> 4-4-4 -> 8-8-8 with h 1 -> 1/2 -> 1/4.
    assert plan.cycle_networks((2, 2, 2), 1.0, 3) == [
        ((2, 2, 2), 1.0),
        ((4, 4, 4), 0.5),
        ((8, 8, 8), 0.25),
    ]
    assert plan.cycle_networks((5, 3), 0.5, 2) == [((5, 3), 0.5), ((10, 6), 0.25)]
    assert plan.cycle_networks((8, 8, 8), 1.0, 3, multilevel=False) == [((8, 8, 8), 1.0)] * 3


def test_cycle_without_steps_raises():
    with pytest.raises(ValueError, match="cycle 2 would have 0 steps"):
        _paper_plan(num_epochs=3, cycle_boundaries=(1.0, 1.0), steps_per_epoch=4)


def test_learning_rate_restarts_follow_eq9():
    cycles = _paper_plan(steps_per_epoch=1)
    schedule = plan.learning_rate_schedule(cycles, ETA_MAX, ETA_MIN)
    expected = {
        0: ETA_MAX,  # start of cycle 1
        30: _eq9(30, 60),  # midpoint of cycle 1 = (max + min) / 2
        59: _eq9(59, 60),  # last step of cycle 1
        60: ETA_MAX,  # restart: start of cycle 2
        85: _eq9(25, 50),  # midpoint of cycle 2
        110: ETA_MAX,  # start of cycle 3
        135: _eq9(25, 50),  # midpoint of cycle 3
        160: ETA_MIN,  # end of cycle 3: T_cur = T
    }
    assert expected[30] == pytest.approx((ETA_MAX + ETA_MIN) / 2)
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, rel=1e-5), step
    # Annealing within a cycle is monotone.
    values = np.array([float(schedule(s)) for s in range(60, 110)])
    assert np.all(np.diff(values) < 0)


# --- Paper Sec. 4.2, Table 2 --------------------------------------------------


@pytest.mark.parametrize("k,percent", [(0, 0), (1, 25), (2, 42), (3, 53), (4, 61), (5, 67)])
def test_theoretical_time_saved_matches_table2(k, percent):
    assert round(100 * plan.theoretical_time_saved(k)) == percent


def test_theoretical_time_saved_equals_cost_model_for_equal_cycles():
    for k in range(6):
        ratio = plan.theoretical_cost_ratio([1.0] * (k + 1))
        assert 1 - ratio == pytest.approx(plan.theoretical_time_saved(k))


def test_paper_unequal_split_cost_ratio():
    # Paper Sec. 4.2 with the 60/50/50 split of Sec. 5.2: (60/4 + 50/2 + 50) / 160.
    assert plan.theoretical_cost_ratio([60, 50, 50]) == pytest.approx(0.5625)
    assert plan.cycle_epochs(160, (60, 110)) == [60, 50, 50]


def test_theoretical_time_saved_rejects_negative():
    with pytest.raises(ValueError, match="num_interpolations"):
        plan.theoretical_time_saved(-1)
