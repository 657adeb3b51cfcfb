"""Tests of the analyses' command line (`mlres_jax.analyze`)."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from mlres_jax import analyze, checkpoint, models
from tests import fake_data
from tests.test_figures import assert_png

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- The commands (mlres_jax.analyze) ----------------------------------------


@pytest.fixture(scope="module")
def trained_workdirs(tmp_path_factory):
    """Checkpoints of 2-3-2 (h = 1), 2-2-2 (h = 0.5) and 1-1-1 blocks, and fake test data."""
    root = tmp_path_factory.mktemp("runs")
    data = fake_data.write_fashion_mnist(str(root / "data"), num_train=4, num_test=9)
    workdirs = []
    for name, sizes, h in (
        ("shallow", (2, 3, 2), 1.0),
        ("deep", (2, 2, 2), 0.5),
        ("single", (1, 1, 1), 1.0),
    ):
        model = models.ResNet(sizes, width=2, num_classes=10, step_size=h)
        variables = models.init_variables(model, jax.random.key(0), (28, 28, 1))
        checkpoint.save_model(
            str(root / name),
            variables,
            checkpoint.CheckpointMetadata(
                step=7,
                dataset="fashion_mnist",
                width=2,
                num_classes=10,
                image_shape=(28, 28, 1),
                stage_sizes=sizes,
                step_size=h,
                cycle=1,
                epoch=None,
                config={"fashion_mnist_dir": data, "data_dir": None, "eval_batch_size": 4},
            ),
        )
        workdirs.append(str(root / name))
    return workdirs


def test_commands_write_plots_and_numbers(trained_workdirs, tmp_path):
    shallow, deep, _ = trained_workdirs
    options = analyze.Options(output_dir=str(tmp_path), num_shuffles=2)
    assert analyze.resolve_checkpoints([shallow, deep], "all") == [(shallow, 7), (deep, 7)]
    summary = analyze.run_norms(analyze.resolve_checkpoints([shallow], "7"), options)
    assert summary["num_examples"] == 9 and summary["stage_sizes"] == [2, 3, 2]
    lesion = analyze.run_lesion([(shallow, 7)], options)
    assert lesion["error_increase_removing_downsampling_block"]["count"] == 2
    assert lesion["error_increase_removing_other_block"]["count"] == 5
    assert list(lesion["error_increase_shuffling_stage"]) == ["2"]
    gamma = analyze.run_gamma([(shallow, 7), (deep, 7)], options)
    assert [r["num_blocks"] for r in gamma] == [7, 6]
    rows = analyze.run_step_size([(shallow, 7), (deep, 7)], options)
    assert len(rows) == 13 and rows[-1]["t"] == 5 * 0.5
    with open(os.path.join(shallow, "summary.json"), "w") as handle:
        json.dump(
            {
                "config": {"cycle_boundaries": [1.0]},
                "history": [
                    {"epoch": 1.0, "train_error": 0.5, "test_error": 0.6},
                    {"epoch": 2.0, "train_error": 0.4, "test_error": 0.5},
                ],
            },
            handle,
        )
    analyze.run_curves([shallow], options)
    for name in ("norms", "lesion", "gamma", "step_size", "training_curves"):
        assert_png(tmp_path / f"{name}.png")
    removal_rows = (tmp_path / "lesion_removals.csv").read_text().splitlines()
    assert removal_rows[0] == "block,stage,block_in_stage,downsampling,test_error"
    assert len(removal_rows) == 8
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_norms_of_one_block_per_stage_write_strict_json(trained_workdirs, tmp_path):
    # Every block is the first of its stage: there is no "other blocks" ratio.
    summary = analyze.run_norms(
        [(trained_workdirs[2], 7)], analyze.Options(output_dir=str(tmp_path))
    )
    assert summary["G_over_input_other_blocks"] is None

    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(tmp_path / "norms.json") as handle:
        on_disk = json.loads(handle.read(), parse_constant=reject)
    assert on_disk["G_over_input_other_blocks"] is None
    assert on_disk["G_over_input_first_blocks"] > 0 and on_disk["stage_sizes"] == [1, 1, 1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["norms", "--workdir=/nonexistent/run"], "workdir '/nonexistent/run' does not exist"),
        (["curves", "--workdir={tmp}"], "no summary.json in"),
        (["lesion", "--workdir={shallow}", "--steps=8"], r"no checkpoint of step\(s\) \[8\]"),
    ],
)
def test_command_bad_input_is_one_line(args, message, trained_workdirs, tmp_path):
    args = [a.format(tmp=tmp_path, shallow=trained_workdirs[0]) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "mlres_jax.analyze", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match("error: .*" + message, lines[0]), result.stderr
