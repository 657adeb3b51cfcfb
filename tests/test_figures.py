"""Tests of the figures (`mlres_jax.figures`) and the files they are written to."""

import os

import numpy as np
import pytest

from mlres_jax import figures, files, measurements

# --- Figures and files ---------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as handle:
        data = handle.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_training_curves_writes_png_atomically(tmp_path):
    history = [
        {
            "epoch": e,
            "step": 10 * e,
            "cycle": 1 + (e > 2) + (e > 4),
            "train_loss": 1.0 / e,
            "train_error": 0.5 / e,
            "test_loss": 1.1 / e,
            "test_error": 0.6 / e,
            "learning_rate": 0.1,
        }
        for e in range(1, 7)
    ]
    path = tmp_path / "training_curves.png"
    figures.plot_training_curves(history, [3.0, 5.0], str(path))
    assert_png(path)
    assert os.listdir(tmp_path) == ["training_curves.png"]  # no temporary file left
    with pytest.raises(ValueError, match="no evaluations"):
        figures.plot_training_curves([], [3.0], str(tmp_path / "empty.png"))
    assert os.listdir(tmp_path) == ["training_curves.png"]


def test_figures_and_tables_are_written(tmp_path):
    norms = measurements.BlockNorms(
        stage_sizes=(2, 3),
        step_size=0.5,
        input_norm=np.arange(1.0, 6.0),
        F_norm=np.ones(5),
        num_examples=4,
    )
    removals = [
        {
            "block": j,
            "stage": 1 + (j > 2),
            "block_in_stage": j if j <= 2 else j - 2,
            "downsampling": j == 3,
            "test_error": 0.1 + 0.01 * j,
        }
        for j in range(1, 6)
    ]
    shuffles = [{"stage": 2, "shuffle": 1, "order": "1 3 2", "blocks_moved": 2, "test_error": 0.12}]
    built = {
        "norms.png": figures.norms_figure(norms),
        "gamma.png": figures.gamma_figure(
            [
                {"num_blocks": 5, "gamma": 1.0, "label": "a"},
                {"num_blocks": 10, "gamma": 0.5, "label": "b"},
            ]
        ),
        "lesion.png": figures.lesion_figure(removals, shuffles, 0.1),
        "lesion_no_shuffles.png": figures.lesion_figure(removals, [], 0.1),
        "step_size.png": figures.F_against_time_figure([("h = 0.5", norms)]),
    }
    for name, figure in built.items():
        files.save_figure(figure, str(tmp_path / name))
        assert_png(tmp_path / name)
    files.write_csv(str(tmp_path / "norms.csv"), norms.records())
    lines = (tmp_path / "norms.csv").read_text().splitlines()
    assert lines[0].startswith("block,stage,block_in_stage,first_in_stage,t,")
    assert len(lines) == 6
    files.write_json(str(tmp_path / "x.json"), {"gamma": norms.gamma})
    assert (tmp_path / "x.json").read_text() == '{\n  "gamma": 0.5\n}'
