"""Tests of config validation and of the command line's error handling."""

import importlib
import os
import subprocess
import sys

import pytest

from mlres_jax import configuration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = {
    # name: (width, first-cycle blocks per stage, multilevel) — paper Tables 3, 4.
    "resnet14": (16, 2, False),
    "resnet32": (16, 5, False),
    "resnet50": (16, 8, False),
    "resnet50i": (16, 2, True),
    "resnet122": (16, 20, False),
    "resnet122i": (16, 5, True),
    "wrn14": (32, 2, False),
    "wrn32": (32, 5, False),
    "wrn50": (32, 8, False),
    "wrn50i": (32, 2, True),
    "wrn122": (32, 20, False),
    "wrn122i": (32, 5, True),
}


def _config(name):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_resolve_to_paper_settings(name):
    width, blocks, multilevel = PAPER_CONFIGS[name]
    config = configuration.resolve(_config(name))
    assert (config.width, config.stage_sizes, config.multilevel) == (
        width,
        (blocks,) * 3,
        multilevel,
    )
    # Paper Sec. 5.2: 160 epochs, cycles restart at 60 and 110, eta 0.5 -> 0.001,
    # SGD momentum 0.9, weight decay 2e-4, batch 100 on CIFAR.
    assert config.num_epochs == 160
    assert config.cycle_boundaries == (60.0, 110.0)
    assert (config.learning_rate_max, config.learning_rate_min) == (0.5, 0.001)
    assert (config.momentum, config.weight_decay) == (0.9, 2e-4)
    assert config.batch_size == 100
    assert config.crop_padding == 4
    # The 122-layer models train scanned (docs/paper-scale.md), the others unrolled.
    assert config.scan_blocks == name.startswith(("resnet122", "wrn122"))


def test_stl10_derives_paper_batch_size_and_padding():
    config = _config("resnet50i")
    config.dataset = "stl10"
    resolved = configuration.resolve(config)
    assert (resolved.batch_size, resolved.crop_padding) == (32, 12)
    assert config.batch_size == -1  # the input config is not changed


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dataset", "imagenet", r"config.dataset = 'imagenet'.*cifar10"),
        ("stage_sizes", (2, 0, 2), r"config.stage_sizes = \(2, 0, 2\).*integers >= 1"),
        ("stage_sizes", (2, 1, 2), r"config.stage_sizes.*at least 2 blocks"),
        ("step_size", -1.0, r"config.step_size = -1.0.*> 0"),
        ("learning_rate_max", 0.0, r"config.learning_rate_max = 0.0.*> 0"),
        ("learning_rate_min", 0.9, r"config.learning_rate_min = 0.9.*learning_rate_max"),
        ("cycle_boundaries", (60.0, 170.0), r"config.cycle_boundaries.*inside \(0, num_epochs"),
        ("cycle_boundaries", (110.0, 60.0), r"config.cycle_boundaries.*increase"),
        ("batch_size", 0, r"config.batch_size = 0.*integer > 0"),
        ("batch_size", 60_000, r"config.batch_size = 60000.*50000 training examples"),
        ("interpolation_rule", "nearest", r"config.interpolation_rule = 'nearest'.*paper"),
        ("momentum_at_interpolation", "keep", r"momentum_at_interpolation.*'reset'"),
        ("crop_padding", 40, r"config.crop_padding = 40"),
        ("momentum", 1.5, r"config.momentum = 1.5.*\[0, 1\)"),
        ("num_devices", 0, r"config.num_devices = 0.*-1 \(every device\)"),
        ("growth_train_examples", -5, r"config.growth_train_examples = -5.*integer >= 0"),
        ("init_from", None, r"config.init_from = None.*a folder"),
        ("compute_dtype", "float16", r"config.compute_dtype = 'float16'.*'bfloat16'"),
    ],
)
def test_bad_values_name_field_value_and_allowed(field, value, message):
    config = _config("resnet50i")
    config[field] = value
    with pytest.raises(configuration.ConfigError, match=message):
        configuration.resolve(config)


def test_one_block_stages_grow_under_the_rules_that_can():
    config = _config("resnet50i")
    config.stage_sizes = (1, 1, 1)
    with pytest.raises(
        configuration.ConfigError,
        match=r"config.stage_sizes = \(1, 1, 1\).*'paper' growth rule.*the rules "
        r"\['identity', 'transition_keeping'\] grow a stage of one block",
    ):
        configuration.resolve(config)
    for rule in ("identity", "transition_keeping"):
        config.interpolation_rule = rule
        assert configuration.resolve(config).stage_sizes == (1, 1, 1)


def test_one_block_stage_is_fine_without_interpolation():
    config = _config("resnet14")
    config.stage_sizes = (1, 1, 1)
    assert configuration.resolve(config).stage_sizes == (1, 1, 1)


def _resolved(**fields):
    config = _config("fashion_mnist")
    config.update(fields)
    return configuration.resolve(config)


@pytest.mark.parametrize(
    "num_train,fields,field,message",
    [
        # 20 steps per epoch: epoch 1.02 rounds to step 20, the boundary before it.
        (
            2000,
            dict(num_epochs=2.0, cycle_boundaries=(1.0, 1.02)),
            "cycle_boundaries",
            r"cycle 2 would have 0 steps: epochs 1 to 1.02 round to steps 20..20",
        ),
        # The last cycle: 1.99 and 2.0 both round to step 40.
        (
            2000,
            dict(num_epochs=2.0, cycle_boundaries=(1.0, 1.99)),
            "cycle_boundaries",
            r"cycle 3 would have 0 steps",
        ),
        # The first cycle: 0.02 epochs of 20 steps round to step 0.
        (
            2000,
            dict(num_epochs=2.0, cycle_boundaries=(0.02, 1.0)),
            "cycle_boundaries",
            r"cycle 1 would have 0 steps",
        ),
        # One cycle, no boundary: the run itself rounds to zero steps (3 per epoch).
        (
            300,
            dict(num_epochs=0.1, cycle_boundaries=()),
            "num_epochs",
            r"cycle 1 would have 0 steps",
        ),
        (64, dict(batch_size=100), "batch_size", r"must not exceed the 64 training examples"),
    ],
)
def test_plans_that_do_not_fit_the_data_are_config_errors(num_train, fields, field, message):
    config = _resolved(**fields)
    with pytest.raises(configuration.ConfigError, match=rf"^config\.{field} = .*{message}"):
        configuration.check_against_data(config, num_train)


def test_a_plan_that_fits_passes():
    configuration.check_against_data(
        _resolved(num_epochs=2.0, cycle_boundaries=(1.0, 1.05)), 2000
    )  # 20, 21, 40


def _run_main(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "mlres_jax.main", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_missing_dataset_gives_message_not_traceback(tmp_path):
    result = _run_main(
        "--config=configs/wrn122i.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data_dir={tmp_path / 'no_data'}",
    )
    assert result.returncode != 0
    assert "cifar10" in result.stderr and "tfds build" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing before the message: no tfds warning, no JAX backend probing.
    assert result.stderr.startswith("error: Data set 'cifar10'"), result.stderr


def test_cli_bad_config_value_gives_message_not_traceback(tmp_path):
    result = _run_main(
        "--config=configs/fashion_mnist.py",
        f"--workdir={tmp_path}",
        "--config.learning_rate_max=-0.5",
    )
    assert result.returncode != 0
    assert "config.learning_rate_max = -0.5" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unknown_config_field_gives_message_not_traceback(tmp_path):
    # A regression: ml_collections raised during flag parsing, before main().
    result = _run_main(
        "--config=configs/fashion_mnist.py", f"--workdir={tmp_path}", "--config.batchsize=10"
    )
    assert result.returncode == 2
    assert "the config has no field 'batchsize'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_cycle_without_steps_is_one_line_before_loading_data(tmp_path):
    from tests import fake_data  # pylint: disable=import-outside-toplevel

    data = fake_data.write_fashion_mnist(str(tmp_path / "data"), num_train=2000, num_test=10)
    result = _run_main(
        "--config=configs/fashion_mnist.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.fashion_mnist_dir={data}",
        "--config.num_epochs=2.0",
        "--config.cycle_boundaries=(1.0,1.02)",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: config.cycle_boundaries = (1.0, 1.02) is not allowed")
    assert "2000 training examples" in lines[0] and "cycle 2 would have 0 steps" in lines[0]
    assert not os.path.exists(tmp_path / "run")  # refused before the workdir was made


def test_cli_damaged_data_file_is_one_line(tmp_path):
    from tests import fake_data  # pylint: disable=import-outside-toplevel

    data = fake_data.write_fashion_mnist(str(tmp_path / "data"))
    open(os.path.join(data, "train-images-idx3-ubyte.gz"), "wb").close()  # empty
    result = _run_main(
        "--config=configs/fashion_mnist.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.fashion_mnist_dir={data}",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: Data set 'fashion_mnist' in ")
    assert "train-images-idx3-ubyte.gz: bad IDX magic number" in lines[0]
