"""A short multi-level run end to end on tensorflow-datasets mock data."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from configs import default
from mlres_jax import models, train

NUM_EXAMPLES = 40  # mock examples per split


@pytest.fixture(scope="module")
def mock_run(tmp_path_factory):
    config = default.get_config()
    config.dataset = "cifar10"
    config.width = 4
    config.stage_sizes = (2, 2, 2)
    config.multilevel = True
    config.batch_size = 8  # 5 steps per epoch
    config.num_epochs = 3.0
    config.cycle_boundaries = (1.0, 2.0)
    config.eval_batch_size = 16  # 40 = 16 + 16 + 8: the last batch is padded
    config.log_every_steps = 2
    config.progress_bar = False
    workdir = str(tmp_path_factory.mktemp("mock_run"))
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        summary = train.train_and_evaluate(config, workdir)
    return config, workdir, summary


def test_cycles_deepen_and_halve_step_size(mock_run):
    _, _, summary = mock_run
    cycles = summary["cycles"]
    assert [c["stage_sizes"] for c in cycles] == [[2, 2, 2], [4, 4, 4], [8, 8, 8]]
    assert [c["step_size"] for c in cycles] == [1.0, 0.5, 0.25]
    assert [c["steps"] for c in cycles] == [5, 5, 5]
    assert summary["totals"]["steps"] == 15


def test_parameter_counts_are_those_of_each_depth(mock_run):
    _, _, summary = mock_run
    for cycle in summary["cycles"]:
        model = models.ResNet(tuple(cycle["stage_sizes"]), width=4, num_classes=10)
        shapes = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        )
        assert cycle["num_params"] == models.count_parameters(shapes["params"])


def test_evaluation_covers_every_test_example(mock_run):
    _, _, summary = mock_run
    assert summary["totals"]["test_examples"] == NUM_EXAMPLES
    for record in summary["history"]:
        # Errors are multiples of 1/40: each of the 40 examples counted once.
        assert record["test_error"] * NUM_EXAMPLES == pytest.approx(
            round(record["test_error"] * NUM_EXAMPLES), abs=1e-6
        )


def test_history_has_one_evaluation_per_epoch_with_restarted_learning_rate(mock_run):
    _, _, summary = mock_run
    history = summary["history"]
    assert [r["epoch"] for r in history] == [1.0, 2.0, 3.0]
    assert [r["cycle"] for r in history] == [1, 2, 3]
    # Each record's learning rate is Eq. 9 at the cycle's last step (T_cur = 4
    # of T = 5): the same value in every cycle because the schedule restarts.
    rates = [r["learning_rate"] for r in history]
    assert rates[0] == pytest.approx(rates[1]) and rates[1] == pytest.approx(rates[2])
    for record in history:
        for key in ("train_loss", "test_loss"):
            assert record[key] == record[key] and record[key] < 1e3  # finite


def test_summary_json_and_tensorboard_events_written(mock_run):
    _, workdir, summary = mock_run
    with open(os.path.join(workdir, "summary.json")) as handle:
        on_disk = json.load(handle)
    assert on_disk["totals"]["final_test_error"] == summary["totals"]["final_test_error"]
    assert on_disk["totals"]["theoretical_cost_ratio"] == pytest.approx((1 / 4 + 1 / 2 + 1) / 3)
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    assert not glob.glob(os.path.join(workdir, "*.tmp"))


def test_cycle_times_count_the_cycle_end_checkpoint(mock_run):
    _, _, summary = mock_run
    # This run saves only at its cycle ends (every 1000 steps otherwise); each
    # cycle's record counts that save (it was 0.0 when the record was taken
    # before the save).
    for cycle in summary["cycles"]:
        assert cycle["checkpoint_seconds"] > 0
