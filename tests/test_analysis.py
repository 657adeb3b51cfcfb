"""Tests of the lesions, norms, lesion evaluation and figures (`mlres_jax.analysis`)."""

import collections
import functools
import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlres_jax import analysis, files, input_pipeline, models

IMAGE_SHAPE = (8, 8, 3)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(stage_sizes, step_size=1.0, width=2):
    return models.ResNet(stage_sizes, width=width, num_classes=3, step_size=step_size)


def _shapes(model):
    """The variables' shapes of a fresh ``model``, without compiling anything."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE))))


@functools.lru_cache(maxsize=None)
def _variables(model, seed=0):
    """Fresh variables with random batch-norm statistics and offsets.

    Cached: the functions under test are pure (test_lesion_leaves_input_unchanged).
    """
    variables = models.init_variables(model, jax.random.PRNGKey(seed), IMAGE_SHAPE)
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    # Positive perturbations keep the variances positive.
    leaves = [x + 0.1 * jnp.abs(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _images(n, seed=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)


def _zero_residual(variables, stage_index, block_index):
    """Zeroes block j's last conv kernel: then G(Y_j) = 0 exactly (no bias)."""
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])  # shallow copy
    stage = dict(params[models.stage_name(stage_index)])
    block = dict(stage[models.block_name(block_index)])
    block["conv2"] = {"kernel": jnp.zeros_like(block["conv2"]["kernel"])}
    stage[models.block_name(block_index)] = block
    params = dict(params, **{models.stage_name(stage_index): stage})
    return dict(variables, params=params)


def _zero_all_residuals(variables):
    def zero(path, x):
        names = [getattr(p, "key", None) for p in path]
        return jnp.zeros_like(x) if "conv2" in names else x
    return dict(variables, params=jax.tree_util.tree_map_with_path(zero, variables["params"]))


# --- Lesions: removing a block -----------------------------------------------

@pytest.mark.parametrize("stage_index,block_index", [(1, 1), (1, 0)])
def test_removed_block_tree_matches_model_with_shorter_stage(stage_index, block_index):
    model = _model((2, 3, 2))
    variables = _variables(model)
    short_model, short = analysis.lesion(model, variables, stage_index, block_index)
    assert short_model.stage_sizes == (2, 2, 2)
    plain_shorter = _shapes(_model((2, 2, 2)))
    assert jax.tree_util.tree_structure(short) == jax.tree_util.tree_structure(plain_shorter)
    fresh = _shapes(short_model)
    chex.assert_trees_all_equal_shapes_and_dtypes(short, fresh)
    # Later blocks moved up one place and were renumbered.
    for collection in ("params", "batch_stats"):
        old, new = variables[collection]["stage2"], short[collection]["stage2"]
        kept = [b for b in (1, 2, 3) if b != block_index + 1]
        for new_number, old_number in enumerate(kept, start=1):
            chex.assert_trees_all_equal(new[f"block{new_number}"], old[f"block{old_number}"])
        chex.assert_trees_all_equal(short[collection]["stage3"], variables[collection]["stage3"])


def test_removing_downsampling_block_keeps_only_the_shortcut():
    model = _model((2, 3, 2))
    short_model = analysis.lesioned_model(model, 1, 0)
    assert short_model.shortcut_only_stages == (1,)
    # The new first block of stage 2 takes 4 channels, not 2, and keeps the size.
    fresh = _shapes(short_model)
    chex.assert_shape(fresh["params"]["stage2"]["block1"]["conv1"]["kernel"], (3, 3, 4, 4))
    # A block that does not downsample leaves the shortcut set alone, also
    # the new first block of a stage that already lost its downsampling block.
    assert analysis.lesioned_model(model, 1, 2).shortcut_only_stages == ()
    assert analysis.lesioned_model(model, 0, 0).shortcut_only_stages == ()
    assert analysis.lesioned_model(short_model, 1, 0).shortcut_only_stages == (1,)
    assert analysis.lesioned_model(short_model, 2, 0).shortcut_only_stages == (1, 2)


@pytest.mark.parametrize("stage_index,block_index",
                         [(0, 0), (0, 1), (1, 0), (1, 2), (2, 0)])
def test_lesion_forward_equals_full_model_with_zero_residual(stage_index, block_index):
    model = _model((2, 3, 2), step_size=0.5)
    variables = _variables(model)
    images = jax.random.normal(jax.random.PRNGKey(3), (4, *IMAGE_SHAPE))
    zeroed = _zero_residual(variables, stage_index, block_index)
    expected = model.apply(zeroed, images)
    short_model, short = analysis.lesion(model, variables, stage_index, block_index)
    got = short_model.apply(short, images)
    chex.assert_trees_all_close(got, expected, atol=1e-6, rtol=1e-6)
    # The block mattered, so the check above is not vacuous.
    assert not np.allclose(got, model.apply(variables, images), atol=1e-4)


def test_removing_the_only_block_of_a_stage():
    model = _model((1, 1, 2))
    variables = _variables(model)
    short_model, short = analysis.lesion(model, variables, 1, 0)
    assert short_model.stage_sizes == (1, 0, 2)
    assert "stage2" not in short["params"]
    fresh = _shapes(short_model)
    chex.assert_trees_all_equal_shapes_and_dtypes(short, fresh)
    images = jax.random.normal(jax.random.PRNGKey(3), (2, *IMAGE_SHAPE))
    chex.assert_trees_all_close(short_model.apply(short, images),
                                model.apply(_zero_residual(variables, 1, 0), images),
                                atol=1e-6, rtol=1e-6)


def test_bad_lesion_arguments_raise():
    model = _model((2, 3, 2))
    variables = _variables(model)
    with pytest.raises(ValueError, match="stage2 has 3 blocks; block index 3"):
        analysis.remove_block(variables, 1, 3)
    with pytest.raises(ValueError, match="no stage4"):
        analysis.remove_block(variables, 3, 0)
    with pytest.raises(ValueError, match="stage 3 has 2 blocks"):
        analysis.lesioned_model(model, 2, 5)
    with pytest.raises(ValueError, match="shortcut_only_stages holds 0"):
        models.ResNet((2, 2), width=2, shortcut_only_stages=(0,)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))


def test_lesion_leaves_input_unchanged():
    model = _model((2, 3, 2))
    variables = _variables(model)
    before = jax.device_get(variables)
    analysis.lesion(model, variables, 1, 1)
    analysis.permute_blocks(variables, 1, (0, 2, 1))
    chex.assert_trees_all_equal(jax.device_get(variables), before)


# --- Lesions: shuffling --------------------------------------------------------

def _fingerprint(block):
    return tuple(float(jnp.sum(x)) for x in jax.tree_util.tree_leaves(block))


def test_shuffle_is_a_permutation_of_the_blocks():
    model = _model((2, 3, 2))
    variables = _variables(model)
    order = (0, 2, 1)
    shuffled = analysis.permute_blocks(variables, 1, order)
    assert jax.tree_util.tree_structure(shuffled) == jax.tree_util.tree_structure(variables)
    for collection in ("params", "batch_stats"):
        old, new = variables[collection]["stage2"], shuffled[collection]["stage2"]
        for i, source in enumerate(order):
            chex.assert_trees_all_equal(new[f"block{i + 1}"], old[f"block{source + 1}"])
        # The same multiset of blocks, and not the same order.
        assert (collections.Counter(map(_fingerprint, new.values()))
                == collections.Counter(map(_fingerprint, old.values())))
        assert [_fingerprint(new[f"block{i}"]) for i in range(1, 4)] != \
               [_fingerprint(old[f"block{i}"]) for i in range(1, 4)]
        chex.assert_trees_all_equal(shuffled[collection]["stage1"], variables[collection]["stage1"])
    chex.assert_shape(model.apply(shuffled, jnp.ones((1, *IMAGE_SHAPE))), (1, 3))


def test_permutation_maps_new_block_i_to_old_block_order_i():
    # A labelled tree: any network tree works, no model needed.
    tree = {"params": {"stage1": {f"block{b}": {"w": np.array(b)} for b in range(1, 6)},
                       "head": {"w": np.array(0)}},
            "step": np.array(7)}
    shuffled = analysis.permute_blocks(tree, 0, (0, 3, 1, 4, 2))
    assert [int(shuffled["params"]["stage1"][f"block{b}"]["w"]) for b in range(1, 6)] == [
        1, 4, 2, 5, 3]
    assert int(shuffled["step"]) == 7 and int(shuffled["params"]["head"]["w"]) == 0
    removed = analysis.remove_block(tree, 0, 1)
    assert [int(removed["params"]["stage1"][f"block{b}"]["w"]) for b in range(1, 5)] == [
        1, 3, 4, 5]


def test_random_block_permutation_keeps_first_block_and_moves_others():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        order = analysis.random_block_permutation(rng, 4)
        assert order[0] == 0 and sorted(order) == [0, 1, 2, 3]
        assert order != (0, 1, 2, 3)
        seen.add(order)
    assert len(seen) == 5  # every non-identity order of blocks 2..4 occurs
    with pytest.raises(ValueError, match="at least 3 blocks"):
        analysis.random_block_permutation(rng, 2)


@pytest.mark.parametrize("order", [(1, 0, 2), (0, 1, 1), (0, 1)])
def test_bad_permutation_raises(order):
    variables = _variables(_model((2, 3, 2)))
    with pytest.raises(ValueError, match="keeps the first block first"):
        analysis.permute_blocks(variables, 1, order)


# --- Norms ---------------------------------------------------------------------

def test_zero_residuals_give_zero_residual_norms():
    model = _model((2, 3, 2), step_size=0.5)
    variables = _zero_all_residuals(_variables(model))
    norms = analysis.block_norms(model, variables, _images(5), batch_size=2)
    assert norms.num_blocks == 7 and norms.num_examples == 5
    np.testing.assert_array_equal(norms.F_norm, np.zeros(7))
    np.testing.assert_array_equal(norms.G_norm, np.zeros(7))
    assert norms.gamma == 0.0
    assert np.all(norms.input_norm > 0)
    # With G = 0 the identity blocks pass Y on unchanged: equal input norms
    # within a stage after its first block.
    np.testing.assert_allclose(norms.input_norm[3], norms.input_norm[4], rtol=1e-6)


def test_norms_equal_hand_composition_of_two_blocks():
    h = 0.5
    model = models.ResNet((2,), width=2, num_classes=3, step_size=h)
    variables = _variables(model)
    images = _images(5)
    norms = analysis.block_norms(model, variables, images, batch_size=2)  # padded last batch
    params, stats = variables["params"], variables["batch_stats"]
    x = input_pipeline.preprocess_for_eval(images)
    y0 = jax.lax.conv_general_dilated(x, params["stem"]["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def F(block, y):
        return models.ResidualModule(2).apply(
            {"params": params["stage1"][block], "batch_stats": stats["stage1"][block]},
            y, train=False)

    f0 = F("block1", y0)
    y1 = y0 + h * f0
    f1 = F("block2", y1)

    def mean_norm(a):
        return np.mean(np.linalg.norm(np.asarray(a).reshape(len(a), -1), axis=1))

    np.testing.assert_allclose(norms.input_norm, [mean_norm(y0), mean_norm(y1)], rtol=1e-5)
    np.testing.assert_allclose(norms.F_norm, [mean_norm(f0), mean_norm(f1)], rtol=1e-5)
    np.testing.assert_allclose(norms.G_norm, [h * mean_norm(f0), h * mean_norm(f1)], rtol=1e-5)
    assert norms.gamma == pytest.approx(h * (mean_norm(f0) + mean_norm(f1)) / 2, rel=1e-5)


def test_block_norms_derived_quantities():
    norms = analysis.BlockNorms(stage_sizes=(2, 2), step_size=0.5,
                                input_norm=np.array([1.0, 2.0, 4.0, 8.0]),
                                F_norm=np.array([2.0, 2.0, 2.0, 2.0]), num_examples=10)
    np.testing.assert_array_equal(norms.G_norm, [1, 1, 1, 1])
    np.testing.assert_array_equal(norms.time, [0, 0.5, 1.0, 1.5])
    np.testing.assert_array_equal(norms.first_in_stage, [True, False, True, False])
    np.testing.assert_array_equal(norms.stage_index, [0, 0, 1, 1])
    assert norms.gamma == 1.0
    # G/Y = 1, 0.5, 0.25, 0.125: first blocks 1 and 0.25, the rest 0.5 and 0.125.
    assert norms.ratio_summary() == {"first_blocks": 0.625, "other_blocks": 0.3125}
    rows = norms.records()
    assert rows[2] == {"block": 3, "stage": 2, "block_in_stage": 1, "first_in_stage": True,
                       "t": 1.0, "input_norm": 4.0, "F_norm": 2.0, "G_norm": 1.0,
                       "G_over_input": 0.25}


def test_intermediates_are_sown_only_on_request():
    model = _model((2, 3, 2))
    variables = _variables(model)
    assert set(_shapes(model)) == {"params", "batch_stats"}
    images = jnp.ones((1, *IMAGE_SHAPE))
    assert isinstance(model.apply(variables, images), jax.Array)
    _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert set(updates) == {"batch_stats"}
    _, sown = model.apply(variables, images, mutable=[models.INTERMEDIATES])
    block = sown[models.INTERMEDIATES]["stage2"]["block1"]
    chex.assert_shape(block["block_input"][0], (1, 8, 8, 2))
    chex.assert_shape(block["F"][0], (1, 4, 4, 4))


# --- Evaluation of lesions -----------------------------------------------------

def test_error_rate_counts_every_example_once():
    model = _model((2, 3, 2))
    variables = _variables(model)
    images, labels = _images(7), np.arange(7, dtype=np.int32) % 3
    logits = model.apply(variables, input_pipeline.preprocess_for_eval(images))
    expected = np.mean(np.argmax(logits, -1) != labels)
    assert analysis.error_rate(model, variables, images, labels, batch_size=3) == \
        pytest.approx(expected)


def test_removal_errors_cover_every_block_and_match_zero_residual():
    model = _model((2, 3, 2))
    variables = _zero_residual(_variables(model), 1, 1)
    images, labels = _images(12), np.arange(12, dtype=np.int32) % 3
    baseline = analysis.error_rate(model, variables, images, labels, batch_size=5)
    records = analysis.removal_errors(model, variables, images, labels, batch_size=5)
    assert [(r["stage"], r["block_in_stage"]) for r in records] == [
        (1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2)]
    assert [r["block"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["downsampling"] for r in records] == [
        False, False, True, False, False, True, False]
    # Stage 2, block 2 has G = 0: removing it changes nothing.
    assert records[3]["test_error"] == baseline


def test_shuffle_errors_skip_short_stages():
    model = _model((2, 3, 2))
    variables = _variables(model)
    images, labels = _images(6), np.arange(6, dtype=np.int32) % 3
    records = analysis.shuffle_errors(model, variables, images, labels, batch_size=6,
                                      num_shuffles=2, seed=0)
    assert [(r["stage"], r["shuffle"]) for r in records] == [(2, 1), (2, 2)]
    assert all(r["order"] == "1 3 2" and r["blocks_moved"] == 2 for r in records)
    shuffled = analysis.permute_blocks(variables, 1, (0, 2, 1))
    assert records[0]["test_error"] == analysis.error_rate(
        model, shuffled, images, labels, batch_size=6)


# --- Figures and files ---------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    with open(path, "rb") as handle:
        data = handle.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_training_curves_writes_png_atomically(tmp_path):
    history = [{"epoch": e, "step": 10 * e, "cycle": 1 + (e > 2) + (e > 4),
                "train_loss": 1.0 / e, "train_error": 0.5 / e, "test_loss": 1.1 / e,
                "test_error": 0.6 / e, "learning_rate": 0.1} for e in range(1, 7)]
    path = tmp_path / "training_curves.png"
    analysis.plot_training_curves(history, [3.0, 5.0], str(path))
    _assert_png(path)
    assert os.listdir(tmp_path) == ["training_curves.png"]  # no temporary file left
    with pytest.raises(ValueError, match="no evaluations"):
        analysis.plot_training_curves([], [3.0], str(tmp_path / "empty.png"))
    assert os.listdir(tmp_path) == ["training_curves.png"]


def test_figures_and_tables_are_written(tmp_path):
    norms = analysis.BlockNorms(stage_sizes=(2, 3), step_size=0.5,
                                input_norm=np.arange(1.0, 6.0), F_norm=np.ones(5),
                                num_examples=4)
    removals = [{"block": j, "stage": 1 + (j > 2), "block_in_stage": j if j <= 2 else j - 2,
                 "downsampling": j == 3, "test_error": 0.1 + 0.01 * j} for j in range(1, 6)]
    shuffles = [{"stage": 2, "shuffle": 1, "order": "1 3 2", "blocks_moved": 2,
                 "test_error": 0.12}]
    figures = {
        "norms.png": analysis.norms_figure(norms),
        "gamma.png": analysis.gamma_figure([
            {"num_blocks": 5, "gamma": 1.0, "label": "a"},
            {"num_blocks": 10, "gamma": 0.5, "label": "b"}]),
        "lesion.png": analysis.lesion_figure(removals, shuffles, 0.1),
        "lesion_no_shuffles.png": analysis.lesion_figure(removals, [], 0.1),
        "step_size.png": analysis.F_against_time_figure([("h = 0.5", norms)]),
    }
    for name, figure in figures.items():
        files.save_figure(figure, str(tmp_path / name))
        _assert_png(tmp_path / name)
    files.write_csv(str(tmp_path / "norms.csv"), norms.records())
    lines = (tmp_path / "norms.csv").read_text().splitlines()
    assert lines[0].startswith("block,stage,block_in_stage,first_in_stage,t,")
    assert len(lines) == 6
    files.write_json(str(tmp_path / "x.json"), {"gamma": norms.gamma})
    assert (tmp_path / "x.json").read_text() == '{\n  "gamma": 0.5\n}'


# --- The commands (mlres_jax.analyze) ----------------------------------------

@pytest.fixture(scope="module")
def trained_workdirs(tmp_path_factory):
    """Two checkpoints (2-3-2, h = 1 and 2-2-2, h = 0.5) and fake test data."""
    from mlres_jax import checkpoint  # the lead's module; imports orbax
    from tests import fake_data
    root = tmp_path_factory.mktemp("runs")
    data = fake_data.write_fashion_mnist(str(root / "data"), num_train=4, num_test=9)
    workdirs = []
    for name, sizes, h in (("shallow", (2, 3, 2), 1.0), ("deep", (2, 2, 2), 0.5)):
        model = models.ResNet(sizes, width=2, num_classes=10, step_size=h)
        variables = models.init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
        checkpoint.save_model(str(root / name), variables, {
            "dataset": "fashion_mnist", "width": 2, "num_classes": 10,
            "image_shape": [28, 28, 1], "stage_sizes": list(sizes), "step_size": h,
            "cycle": 1, "config": {"fashion_mnist_dir": data, "data_dir": None,
                                   "eval_batch_size": 4}}, step=7)
        workdirs.append(str(root / name))
    return workdirs


def test_commands_write_plots_and_numbers(trained_workdirs, tmp_path):
    from mlres_jax import analyze
    shallow, deep = trained_workdirs
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
        json.dump({"config": {"cycle_boundaries": [1.0]}, "history": [
            {"epoch": 1.0, "train_error": 0.5, "test_error": 0.6},
            {"epoch": 2.0, "train_error": 0.4, "test_error": 0.5}]}, handle)
    analyze.run_curves([shallow], options)
    for name in ("norms", "lesion", "gamma", "step_size", "training_curves"):
        _assert_png(tmp_path / f"{name}.png")
    removal_rows = (tmp_path / "lesion_removals.csv").read_text().splitlines()
    assert removal_rows[0] == "block,stage,block_in_stage,downsampling,test_error"
    assert len(removal_rows) == 8
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize("args,message", [
    (["norms", "--workdir=/nonexistent/run"], "workdir '/nonexistent/run' does not exist"),
    (["curves", "--workdir={tmp}"], "no summary.json in"),
    (["lesion", "--workdir={shallow}", "--steps=8"], r"no checkpoint of step\(s\) \[8\]"),
])
def test_command_bad_input_is_one_line(args, message, trained_workdirs, tmp_path):
    args = [a.format(tmp=tmp_path, shallow=trained_workdirs[0]) for a in args]
    result = subprocess.run([sys.executable, "-m", "mlres_jax.analyze", *args],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match("error: .*" + message, lines[0]), result.stderr
