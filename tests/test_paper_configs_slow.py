"""Every paper config runs a few steps of every cycle (slow: `make test-slow`).

Each config of paper Tables 3 and 4 is pointed at a small Fashion-MNIST-format
data set with overrides that shorten the run to 2 steps per cycle but keep
its model (width, stage sizes, multi-level or not) and its three cycles.
"""

import importlib

import pytest

from mlres_jax import train
from tests import fake_data
from tests.test_configuration import PAPER_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_runs_every_cycle(name, tmp_path):
    width, blocks, multilevel = PAPER_CONFIGS[name]
    config = importlib.import_module(f"configs.{name}").get_config()
    config.dataset = "fashion_mnist"
    config.fashion_mnist_dir = fake_data.write_fashion_mnist(
        str(tmp_path / "data"), num_train=64, num_test=20
    )
    config.batch_size = 32  # 2 steps per epoch
    config.num_epochs = 3.0
    config.cycle_boundaries = (1.0, 2.0)
    config.progress_bar = False
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    expected = [[blocks * (2**i if multilevel else 1)] * 3 for i in range(3)]
    assert [c["stage_sizes"] for c in summary["cycles"]] == expected
    assert [c["steps"] for c in summary["cycles"]] == [2, 2, 2]
    assert summary["totals"]["test_examples"] == 20
