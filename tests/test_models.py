"""Tests of the network: parameter counts (paper Table 5), names, step size."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlres_jax import cpu_backend, models

# Paper Table 5: (width, blocks per stage, CIFAR-10, CIFAR-100).
PAPER_PARAMETER_COUNTS = [
    (16, 2, 172_506, 178_356),  # ResNet-14
    (16, 5, 464_154, 470_004),  # ResNet-32
    (16, 8, 755_802, 761_652),  # ResNet-50
    (16, 20, 1_922_394, 1_928_244),  # ResNet-122
    (32, 2, 685_994, 697_604),  # WResNet-14
    (32, 5, 1_849_898, 1_861_508),  # WResNet-32
    (32, 8, 3_013_802, 3_025_412),  # WResNet-50
    (32, 20, 7_669_418, 7_681_028),  # WResNet-122
]


def _param_count(width, blocks, num_classes, image_shape=(32, 32, 3)):
    model = models.ResNet((blocks,) * 3, width=width, num_classes=num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape))))
    return models.count_parameters(shapes["params"])


@pytest.mark.parametrize("width,blocks,cifar10,cifar100", PAPER_PARAMETER_COUNTS)
def test_parameter_counts_match_paper_table5(width, blocks, cifar10, cifar100):
    assert _param_count(width, blocks, 10) == cifar10
    assert _param_count(width, blocks, 100) == cifar100
    # STL-10 (96x96, 10 classes): global pooling makes it equal CIFAR-10's.
    assert _param_count(width, blocks, 10, (96, 96, 3)) == cifar10


def test_depth_follows_paper_names():
    assert models.depth((8, 8, 8)) == 50
    assert models.depth((20, 20, 20)) == 122
    assert models.depth((2, 2, 2)) == 14


def test_parameters_are_named_by_stage_and_block():
    model = models.ResNet((2, 3, 1), width=4, num_classes=5)
    variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
    params = variables["params"]
    assert set(params) == {"stem", "stage1", "stage2", "stage3", "final_norm", "head"}
    assert set(params["stage2"]) == {"block1", "block2", "block3"}
    assert set(params["stage2"]["block1"]) == {"norm1", "conv1", "norm2", "conv2"}
    # The first block of stage 2 takes 4 channels and downsamples to 8.
    chex.assert_shape(params["stage2"]["block1"]["conv1"]["kernel"], (3, 3, 4, 8))
    chex.assert_shape(params["stage2"]["block2"]["conv1"]["kernel"], (3, 3, 8, 8))
    assert set(variables["batch_stats"]["stage3"]["block1"]) == {"norm1", "norm2"}


def test_downsampling_shortcut_subsamples_and_zero_pads():
    x = jnp.arange(1 * 4 * 4 * 2, dtype=jnp.float32).reshape(1, 4, 4, 2)
    y = models.downsampling_shortcut(x, 4)
    chex.assert_shape(y, (1, 2, 2, 4))
    # Pixels (0,0), (0,2), (2,0), (2,2) of the input, channels then zeros.
    expected = np.zeros((1, 2, 2, 4), np.float32)
    for i, row in enumerate((0, 2)):
        for j, col in enumerate((0, 2)):
            expected[0, i, j, :2] = np.asarray(x[0, row, col])
    chex.assert_trees_all_close(y, expected)


def _perturb_blocks(params, scale):
    """Adds ``scale`` to every parameter inside the stages."""
    return {
        k: (jax.tree.map(lambda p: p + scale, v) if k.startswith("stage") else v)
        for k, v in params.items()
    }


def test_step_size_scales_the_residual_module():
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    for h, blocks_matter in ((0.0, False), (0.5, True)):
        model = models.ResNet((1, 1, 1), width=4, num_classes=3, step_size=h)
        variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
        logits = model.apply(variables, images)
        perturbed = dict(variables, params=_perturb_blocks(variables["params"], 0.3))
        other = model.apply(perturbed, images)
        # h = 0: Y_{j+1} = S(Y_j), so the blocks' parameters cannot matter.
        assert bool(jnp.allclose(logits, other, atol=1e-6)) != blocks_matter


def test_one_block_forward_equals_hand_composition():
    """Y1 = Y0 + h * G(Y0) for a one-stage, one-block network."""
    h = 0.25
    model = models.ResNet((1,), width=4, num_classes=3, step_size=h)
    images = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    variables = models.init_variables(model, jax.random.key(0), (6, 6, 3))
    params = variables["params"]
    stem = jax.lax.conv_general_dilated(
        images, params["stem"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    residual = models.ResidualModule(4).apply(
        {
            "params": params["stage1"]["block1"],
            "batch_stats": variables["batch_stats"]["stage1"]["block1"],
        },
        stem,
        train=False,
    )
    y1 = stem + h * residual
    stats = variables["batch_stats"]["final_norm"]
    normed = (y1 - stats["mean"]) / jnp.sqrt(stats["var"] + models.BATCH_NORM_EPSILON) * params[
        "final_norm"
    ]["scale"] + params["final_norm"]["bias"]
    pooled = jnp.mean(jax.nn.relu(normed), axis=(1, 2))
    expected = pooled @ params["head"]["kernel"] + params["head"]["bias"]
    chex.assert_trees_all_close(model.apply(variables, images), expected, atol=1e-5)


# --- The scanned layout and mixed precision -------------------------------------


def _variables_of(model, seed=0):
    variables = models.init_variables(model, jax.random.key(seed), (8, 8, 3))
    # Random batch-norm statistics and offsets, so every leaf matters.
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.1 * jnp.abs(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize("stage_sizes", [(2, 3, 1), (4,)])
def test_scanned_and_unrolled_layouts_compute_the_same(stage_sizes):
    from mlres_jax import multilevel  # pylint: disable=import-outside-toplevel

    unrolled = models.ResNet(stage_sizes, width=2, num_classes=3, step_size=0.5)
    scanned = unrolled.clone(scan_blocks=True)
    variables = _variables_of(unrolled)
    converted = multilevel.convert_layout(variables, multilevel.STAGES, multilevel.SCANNED)
    # The conversion gives exactly the scanned model's tree, and back.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        converted,
        jax.eval_shape(lambda: models.init_variables(scanned, jax.random.key(0), (8, 8, 3))),
    )
    chex.assert_trees_all_equal(
        multilevel.convert_layout(converted, multilevel.SCANNED, multilevel.STAGES), variables
    )
    images = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
    chex.assert_trees_all_close(
        scanned.apply(converted, images), unrolled.apply(variables, images), atol=1e-5, rtol=1e-5
    )
    out_s, new_s = scanned.apply(converted, images, train=True, mutable=["batch_stats"])
    out_u, new_u = unrolled.apply(variables, images, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(out_s, out_u, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
        multilevel.convert_layout(new_s, multilevel.SCANNED, multilevel.STAGES),
        new_u,
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("rule", ["paper", "identity", "transition_keeping", "linear", "appended"])
def test_interpolation_commutes_with_the_layout_conversion(rule):
    from mlres_jax import multilevel  # pylint: disable=import-outside-toplevel

    variables = _variables_of(models.ResNet((2, 3), width=2, num_classes=3))

    def to_scanned(tree):
        return multilevel.convert_layout(tree, multilevel.STAGES, multilevel.SCANNED)

    chex.assert_trees_all_equal(
        to_scanned(multilevel.interpolate(variables, rule)),
        multilevel.interpolate(to_scanned(variables), rule, multilevel.SCANNED),
    )


def test_bfloat16_computation_keeps_float32_parameters_and_tracks_float32():
    model = models.ResNet((2, 2), width=4, num_classes=3)
    variables = _variables_of(model)
    half = model.clone(dtype=jnp.bfloat16)
    chex.assert_trees_all_equal_shapes_and_dtypes(  # parameters stay float32
        jax.eval_shape(lambda: models.init_variables(half, jax.random.key(0), (8, 8, 3))),
        jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), (8, 8, 3))),
    )
    images = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
    full_out = model.apply(variables, images)
    half_out = half.apply(variables, images)
    assert half_out.dtype == jnp.float32  # logits in float32, as the docstring says
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4 %); through
    # a dozen layers the logits stay within a few percent of their scale.
    scale = float(jnp.max(jnp.abs(full_out)))
    assert float(jnp.max(jnp.abs(half_out.astype(jnp.float32) - full_out))) < 0.05 * scale


def test_interpolate_model_and_coarsen_model_follow_the_model_layout():
    from mlres_jax import multilevel  # pylint: disable=import-outside-toplevel

    model = models.ResNet((2, 3), width=2, num_classes=3)
    scanned_model = model.clone(scan_blocks=True)
    variables = _variables_of(model)
    scanned = multilevel.convert_layout(variables, multilevel.STAGES, multilevel.SCANNED)
    deeper_model, deeper = multilevel.interpolate_model(model, variables)
    scanned_deeper_model, scanned_deeper = multilevel.interpolate_model(scanned_model, scanned)
    assert scanned_deeper_model.scan_blocks and scanned_deeper_model.stage_sizes == (4, 6)
    chex.assert_trees_all_equal(
        multilevel.convert_layout(scanned_deeper, multilevel.SCANNED, multilevel.STAGES), deeper
    )
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    chex.assert_trees_all_close(
        scanned_deeper_model.apply(scanned_deeper, images),
        deeper_model.apply(deeper, images),
        atol=1e-5,
        rtol=1e-5,
    )
    _, back = multilevel.coarsen_model(scanned_deeper_model, scanned_deeper)
    chex.assert_trees_all_close(back, scanned, atol=1e-6)


# --- Convolutions inside the scan ------------------------------------------------


@pytest.mark.parametrize(
    "kernel_size,in_features,out_features,dtype",
    [((3, 3), 3, 5, jnp.float32), ((2, 4), 4, 4, jnp.float32), ((3, 3), 4, 4, jnp.bfloat16)],
)
def test_conv_with_canonical_gradients_matches_automatic_gradients(
    kernel_size, in_features, out_features, dtype
):
    # The oracle: JAX's own gradients of the same 'SAME' convolution.
    inputs = jax.random.normal(jax.random.key(0), (2, 7, 6, in_features), dtype)
    kernel = jax.random.normal(jax.random.key(1), (*kernel_size, in_features, out_features), dtype)
    cotangent = jax.random.normal(jax.random.key(2), (2, 7, 6, out_features), dtype)

    def plain(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def ours(x, k):
        return cpu_backend.conv_with_canonical_gradients(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    expected, expected_vjp = jax.vjp(plain, inputs, kernel)
    actual, actual_vjp = jax.vjp(ours, inputs, kernel)
    # float32: sums in another order only; bfloat16: 8 bits of mantissa over
    # sums of up to 2 * 7 * 6 = 84 products, within a few percent of the scale.
    tolerance = 1e-5 if dtype == jnp.float32 else 0.03
    for got, want in zip((actual, *actual_vjp(cotangent)), (expected, *expected_vjp(cotangent))):
        assert got.dtype == want.dtype == dtype
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        assert float(jnp.max(jnp.abs((got - want).astype(jnp.float32)))) <= tolerance * scale


@pytest.mark.parametrize(
    "field,value",
    [
        ("window_strides", (2, 2)),
        ("padding", "VALID"),
        ("rhs_dilation", (2, 2)),
        ("dimension_numbers", ("NCHW", "OIHW", "NCHW")),
        ("feature_group_count", 2),
    ],
)
def test_conv_with_canonical_gradients_rejects_other_convolutions(field, value):
    arguments = {"window_strides": (1, 1), "padding": "SAME", field: value}
    with pytest.raises(ValueError, match=field):
        cpu_backend.conv_with_canonical_gradients(
            jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), **arguments
        )


def _parameter_gradients(model, variables, images):
    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(logits**2)

    return jax.jit(jax.grad(loss)), variables["params"]


def test_the_cpu_workarounds_are_chosen_for_the_cpu_only():
    assert cpu_backend.scanned_conv("cpu") is cpu_backend.CanonicalGradientConv
    assert cpu_backend.scanned_conv("gpu") is nn.Conv
    assert cpu_backend.scanned_conv("tpu") is nn.Conv
    assert cpu_backend.one_shot_compiler_options("cpu") == {
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    }
    assert cpu_backend.one_shot_compiler_options("gpu") == {}
    # Models built with the same convolution compare and hash equal (the
    # eval step is cached per model).
    a, b = (models.ResNet((2,), scanned_conv=cpu_backend.scanned_conv("cpu")) for _ in "ab")
    assert a == b and hash(a) == hash(b)


def test_scanned_gradients_equal_unrolled_and_take_the_fast_convolution_form():
    from mlres_jax import multilevel  # pylint: disable=import-outside-toplevel

    unrolled = models.ResNet((3, 2), width=4, num_classes=3, step_size=0.5)
    scanned = unrolled.clone(scan_blocks=True, scanned_conv=cpu_backend.scanned_conv())
    variables = _variables_of(unrolled)
    converted = multilevel.convert_layout(variables, multilevel.STAGES, multilevel.SCANNED)
    images = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
    grad_unrolled, params_unrolled = _parameter_gradients(unrolled, variables, images)
    grad_scanned, params_scanned = _parameter_gradients(scanned, converted, images)
    chex.assert_trees_all_close(
        multilevel.convert_layout(
            {"params": grad_scanned(params_scanned)}, multilevel.SCANNED, multilevel.STAGES
        ),
        {"params": grad_unrolled(params_unrolled)},
        atol=1e-5,
        rtol=1e-5,
    )
    if jax.default_backend() != "cpu":
        return

    # On CPU every convolution of the compiled gradient, the scanned blocks'
    # included, must be NHWC x HWIO -> NHWC, the form XLA runs on its fast
    # kernel; JAX's own gradients inside the scan were f01b_i01o->01bf and
    # b01f_01oi->b01f, which ran 5 to 15 times slower.
    def forms(grad):
        text = grad.lower(params_scanned).compile().as_text()
        return set(re.findall(r"dim_labels=([\w>-]+)", text))

    assert forms(grad_scanned) == {"b01f_01io->b01f"}
    # The model takes the convolution it is given, and tests no backend
    # itself: with flax's own nn.Conv, JAX's gradient forms stay in the scan.
    grad_plain, _ = _parameter_gradients(scanned.clone(scanned_conv=nn.Conv), converted, images)
    assert forms(grad_plain) - {"b01f_01io->b01f"}
