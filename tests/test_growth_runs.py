"""Growth in a run: the measured jump, and runs that start from a (grown) checkpoint."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from mlres_jax import checkpoint, configuration, reporting, train
from tests import fake_data
from tests.test_checkpoint import _config
from tests.test_events import scalar_steps


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return fake_data.write_fashion_mnist(str(tmp_path_factory.mktemp("fmnist")))


@pytest.mark.parametrize("rule", ["identity", "paper"])
def test_each_growth_records_its_jump(data_dir, tmp_path, rule):
    workdir = str(tmp_path)
    summary = train.train_and_evaluate(
        _config(data_dir, interpolation_rule=rule, growth_train_examples=40), workdir
    )
    growths = summary["growths"]
    assert [(g["step"], g["from_stage_sizes"], g["to_stage_sizes"]) for g in growths] == [
        (8, [2], [4]),
        (16, [4], [8]),
    ]
    history = {r["step"]: r for r in summary["history"]}
    for growth in growths:
        assert growth["rule"] == rule and growth["momentum"] == "interpolate"
        # Before: the cycle end's evaluation, the same parameters.
        assert growth["before"]["test_loss"] == history[growth["step"]]["test_loss"]
    jumps = np.array([[g["jump"]["test_loss"], g["jump"]["train_loss"]] for g in growths])
    if rule == "identity":  # function-preserving: no jump but float rounding
        np.testing.assert_allclose(jumps, 0.0, atol=1e-4)
    else:  # the paper's rule changes the function
        assert np.abs(jumps).max() > 1e-3
    events = scalar_steps(workdir)
    assert events["growth/test_loss_jump"] == [8, 16]
    assert events["growth/train_error_jump"] == [8, 16]
    assert "growth at step 8 (2 -> 4, " + rule in reporting.summary_table(summary)
    with open(os.path.join(workdir, "summary.json")) as handle:
        assert json.load(handle)["growths"] == growths


@pytest.mark.parametrize("rule", ["identity", "transition_keeping"])
def test_a_run_from_one_block_per_stage_grows_without_a_jump(data_dir, tmp_path, rule):
    # 1 -> 2 -> 4 blocks: the first growth inserts a fresh zero-residual block
    # after the one (transition) block; both rules keep the function there.
    summary = train.train_and_evaluate(
        _config(
            data_dir,
            stage_sizes=(1,),
            step_size=2.0,
            interpolation_rule=rule,
            growth_train_examples=40,
        ),
        str(tmp_path),
    )
    growths = summary["growths"]
    assert [(g["from_stage_sizes"], g["to_stage_sizes"]) for g in growths] == [
        ([1], [2]),
        ([2], [4]),
    ]
    assert [c["step_size"] for c in summary["cycles"]] == [2.0, 1.0, 0.5]
    np.testing.assert_allclose(growths[0]["jump"]["test_loss"], 0.0, atol=1e-4)
    if rule == "identity":
        np.testing.assert_allclose(growths[1]["jump"]["test_loss"], 0.0, atol=1e-4)
    assert np.isfinite(summary["totals"]["final_test_error"])


def test_a_run_starts_from_a_grown_checkpoint(data_dir, tmp_path):
    from mlres_jax import grow  # pylint: disable=import-outside-toplevel

    single = dict(num_epochs=1.0, cycle_boundaries=())
    source, grown = str(tmp_path / "source"), str(tmp_path / "grown")
    train.train_and_evaluate(_config(data_dir, **single), source)
    grow.interpolate_checkpoint(source, grown, rule="identity")
    _, grown_variables, _ = checkpoint.load_model(grown)
    workdir = str(tmp_path / "run")
    # The config says 2 blocks and h = 1; the grown checkpoint's 4 and 0.5 win.
    summary = train.train_and_evaluate(
        _config(
            data_dir, init_from=grown, learning_rate_max=1e-9, learning_rate_min=1e-9, **single
        ),
        workdir,
    )
    (cycle,) = summary["cycles"]
    assert cycle["stage_sizes"] == [4] and cycle["step_size"] == 0.5
    assert list(summary["config"]["stage_sizes"]) == [4]
    assert summary["config"]["init_from"] == grown
    # With a learning rate of 1e-9 the parameters are the grown ones, to rounding.
    _, variables, _ = checkpoint.load_model(workdir)
    chex.assert_trees_all_close(
        jax.device_get(variables["params"]), jax.device_get(grown_variables["params"]), atol=1e-6
    )


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(width=4), r"width \(checkpoint 2, config 4\)"),
        (dict(dataset="cifar10"), r"dataset \(checkpoint 'fashion_mnist', config 'cifar10'\)"),
        (dict(dataset="cifar10", width=4), r"dataset .* and width \(checkpoint 2, config 4\)"),
    ],
)
def test_a_checkpoint_of_another_network_or_data_set_is_refused(
    data_dir, tmp_path, changes, message
):
    source = str(tmp_path / "source")
    train.train_and_evaluate(_config(data_dir, num_epochs=1.0, cycle_boundaries=()), source)
    with pytest.raises(
        configuration.ConfigError, match=rf"^config\.init_from = .* is not allowed: .*{message}"
    ):
        train.train_and_evaluate(
            _config(data_dir, init_from=source, **changes), str(tmp_path / "run")
        )
    assert not os.path.exists(tmp_path / "run")


def test_init_from_a_folder_without_checkpoints_is_refused(data_dir, tmp_path):
    with pytest.raises(configuration.ConfigError, match="there is no checkpoint in"):
        train.train_and_evaluate(
            _config(data_dir, init_from=str(tmp_path / "nothing")), str(tmp_path / "run")
        )
