"""Tests of the growth rules, their inverses and the momentum policies (`mlres_jax.multilevel`)."""

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlres_jax import models, multilevel, steps
from tests import flax_example_resnet
from tests.networks import IMAGE_SHAPE, one_block_stage_refusal, random_images, random_variables

RULES = sorted(multilevel.GROWTH_RULES)
UNEVEN = (2, 3, 4)


def _model(stage_sizes, step_size=1.0):
    return models.ResNet(stage_sizes, width=4, num_classes=3, step_size=step_size)


def _fresh(model):
    return jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), IMAGE_SHAPE))


@functools.cache
def _trained(stage_sizes=UNEVEN):
    """Variables after 30 SGD steps on images whose label is their brightest third."""
    model = _model(stage_sizes)
    optimizer = optax.sgd(0.05, momentum=0.9)
    state = steps.create_train_state(jax.random.key(0), model, optimizer, IMAGE_SHAPE)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 60, (48, *IMAGE_SHAPE)).astype(np.uint8)
    labels = rng.integers(0, 3, 48).astype(np.int32)
    for i, label in enumerate(labels):
        images[i, :, :, label] += 180
    step = steps.make_train_step(model, optimizer, crop_padding=0)
    for k in range(30):
        state, _ = step(
            state,
            jnp.asarray(images),
            jnp.asarray(labels),
            jnp.arange(8 * (k % 6), 8 * (k % 6) + 8, dtype=jnp.int32),
            jax.random.key(1),
        )
    return model, jax.device_get(state.variables), jax.device_get(state.opt_state)


def _outputs(model, variables, images):
    return np.asarray(model.apply(variables, images.astype(np.float32) / 255.0, train=False))


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_gives_the_fresh_deeper_models_names_and_shapes(rule):
    model, variables, opt_state = _trained()
    deeper_model, deeper = multilevel.interpolate_model(model, variables, rule)
    assert deeper_model.stage_sizes == (4, 6, 8) and deeper_model.step_size == 0.5
    chex.assert_trees_all_equal_shapes_and_dtypes(deeper, _fresh(deeper_model))
    grown_momentum = multilevel.grow_optimizer_state(opt_state, rule, "interpolate")
    chex.assert_trees_all_equal_shapes(grown_momentum[0].trace, deeper["params"])


@pytest.mark.parametrize("variables_of", ["trained", "random"])
def test_identity_rule_keeps_the_eval_outputs(variables_of):
    if variables_of == "trained":
        model, variables, _ = _trained()
    else:
        model = _model(UNEVEN)
        variables = random_variables(model)
    images = random_images(6)
    deeper_model, deeper = multilevel.interpolate_model(model, variables, "identity")
    before = _outputs(model, variables, images)
    after = _outputs(deeper_model, deeper, images)
    # Float rounding only: h/2 * 2G is hG exactly, zero blocks add exact zeros;
    # the sums of the residual stream are rounded in another order.
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * np.abs(before).max())
    # The paper's rule does change them, so the check can fail.
    paper_model, paper = multilevel.interpolate_model(model, variables, "paper")
    assert np.abs(_outputs(paper_model, paper, images) - before).max() > 1e-3


def test_transition_keeping_stays_closer_to_the_network_than_the_papers_rule():
    model, variables, _ = _trained()
    images = random_images(32, seed=5)
    before = _outputs(model, variables, images)
    distance = {}
    for rule in ("paper", "transition_keeping"):
        deeper_model, deeper = multilevel.interpolate_model(model, variables, rule)
        distance[rule] = float(
            np.sqrt(np.mean((_outputs(deeper_model, deeper, images) - before) ** 2))
        )
    assert distance["transition_keeping"] < distance["paper"], distance


@pytest.mark.parametrize("rule", RULES)
def test_coarsening_inverts_every_rule(rule):
    model, variables, _ = _trained()
    back_model, back = multilevel.coarsen_model(
        *multilevel.interpolate_model(model, variables, rule), rule
    )
    assert back_model == model
    if rule == "transition_keeping":  # scales 2/3 and 3/2 are not exact in float32
        chex.assert_trees_all_close(back, variables, rtol=1e-6, atol=1e-7)
    else:  # copies, and scales by powers of 2
        chex.assert_trees_all_equal(back, variables)


def test_coarsening_says_why_it_cannot():
    _, variables, _ = _trained()
    with pytest.raises(
        ValueError,
        match=r"cannot coarsen stage2: it has 3 blocks.*"
        r"only an even number",
    ):
        multilevel.coarsen(variables)

    def averaging_rule(num_blocks, **_):  # old blocks replaced by averages: not invertible
        return [
            multilevel.NewBlock(((i, 0.5), (max(i, 1), 0.5)), 1.0, inserted=bool(p))
            for i in range(num_blocks)
            for p in (0, 1)
        ]

    grown = multilevel.interpolate(random_variables(_model((2, 2))), "paper")
    multilevel.GROWTH_RULES["averaging"] = averaging_rule
    try:
        with pytest.raises(ValueError, match="does not keep old block 1 as a scaled copy"):
            multilevel.coarsen(grown, "averaging")
    finally:
        del multilevel.GROWTH_RULES["averaging"]


def _labelled(variables):
    """Every leaf of block b of stage s filled with 100 s + b (1-based)."""

    def label(path, leaf):
        names = [getattr(k, "key", "") for k in path]
        stage = next((int(n[5:]) for n in names if multilevel.is_stage_key(n)), 0)
        block = next((int(n[5:]) for n in names if str(n).startswith("block")), 0)
        return jnp.full(leaf.shape, 100.0 * stage + block)

    return jax.tree.map_with_path(label, variables)


def _pattern(tree, stage):
    return [
        int(tree["params"][f"stage{stage}"][f"block{b}"]["conv1"]["kernel"].ravel()[0]) % 100
        for b in range(1, len(tree["params"][f"stage{stage}"]) + 1)
    ]


@pytest.mark.parametrize(
    "rule,pattern",
    [
        ("paper", [1, 2, 2, 2, 3, 3, 4, 4]),
        ("appended", [1, 2, 3, 4, 2, 2, 3, 4]),
        ("linear", [1, 2, 2, 2, 3, 3, 4, 4]),  # conv1 of (b2+b3)/2 = 2.5 -> 2, (b3+b4)/2 -> 3
    ],
)
def test_copy_patterns(rule, pattern):
    grown = multilevel.interpolate(_labelled(random_variables(_model((2, 3, 4)))), rule)
    assert _pattern(grown, 3) == pattern


def test_linear_rule_averages_and_transition_keeping_scales():
    variables = _labelled(random_variables(_model((2, 3, 4))))
    linear = multilevel.interpolate(variables, "linear")["params"]["stage3"]
    assert float(linear["block4"]["conv1"]["kernel"].ravel()[0]) == 302.5  # (b2 + b3) / 2
    kept = multilevel.interpolate(variables, "transition_keeping")["params"]["stage2"]
    # [b1, b2, b2, b2, b3, b3]: b1 once (x2), b2 three times (x2/3), b3 twice (x1).
    scales = [
        float(kept[f"block{b}"]["conv2"]["kernel"].ravel()[0])
        / float(variables["params"]["stage2"][f"block{s}"]["conv2"]["kernel"].ravel()[0])
        for b, s in zip(range(1, 7), (1, 2, 2, 2, 3, 3))
    ]
    np.testing.assert_allclose(scales, [2, 2 / 3, 2 / 3, 2 / 3, 1, 1], rtol=1e-6)
    # Only the residual output is scaled; the batch-norm statistics are copies.
    stats = multilevel.interpolate(variables, "transition_keeping")["batch_stats"]["stage2"]
    chex.assert_trees_all_equal(stats["block1"], variables["batch_stats"]["stage2"]["block1"])


@pytest.mark.parametrize("policy", sorted(multilevel.MOMENTUM_POLICIES))
def test_momentum_policies(policy):
    model = _model((2, 2))
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = steps.create_train_state(jax.random.key(0), model, optimizer, IMAGE_SHAPE)
    trace = _labelled({"params": state.params})["params"]
    opt_state = (optax.TraceState(trace=trace), optax.EmptyState())
    grown = multilevel.grow_optimizer_state(opt_state, "identity", policy)[0].trace["stage1"]
    # identity: [2 b1, 0 b2', 2 b2, 0 b2'] in the parameters' residual output.
    first = [float(grown[f"block{b}"]["conv1"]["kernel"].ravel()[0]) for b in range(1, 5)]
    expected = {
        "interpolate": [101, 102, 102, 102],
        "reset": [0, 0, 0, 0],
        "zero_inserted": [101, 0, 102, 0],
    }[policy]
    assert first == expected


# --- Other people's networks ---------------------------------------------------


def test_growing_a_flax_examples_resnet_matches_this_projects_pattern():
    small = flax_example_resnet.ResNet(stage_sizes=(2, 3))
    variables = small.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)), train=False)
    assert multilevel.stage_sizes_from_widths(variables["params"]) == (2, 3)
    layout = multilevel.flax_examples_layout((2, 3))
    # Label block k (0-based, through all stages) with k + 1 in every leaf.
    labelled = {
        collection: {
            name: (
                jax.tree.map(lambda x, n=name: jnp.full(x.shape, 1.0 + int(n.split("_")[1])), tree)
                if name.startswith("ResNetBlock_")
                else tree
            )
            for name, tree in trees.items()
        }
        for collection, trees in variables.items()
    }
    grown = multilevel.interpolate(labelled, "paper", layout)
    big = flax_example_resnet.ResNet(stage_sizes=(4, 6))
    fresh = jax.eval_shape(
        lambda: big.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)), train=False)
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(grown, fresh)
    copied = [
        int(jax.tree.leaves(grown["params"][f"ResNetBlock_{k}"])[0].ravel()[0]) for k in range(10)
    ]
    # This project's naming gives, per stage, the old blocks (1-based) in this order:
    ours = multilevel.interpolate(_labelled(random_variables(_model((2, 3)))), "paper")
    expected = _pattern(ours, 1) + [2 + b for b in _pattern(ours, 2)]
    assert copied == expected == [1, 2, 2, 2, 3, 4, 4, 4, 5, 5]
    # The grown network runs, and coarsening gives the original back.
    big.apply(grown, jnp.zeros((2, *IMAGE_SHAPE)), train=False)
    chex.assert_trees_all_equal(
        multilevel.coarsen(grown, "paper", multilevel.flax_examples_layout((4, 6))), labelled
    )


def test_identity_rule_keeps_a_flax_examples_resnets_outputs():
    # flax's example ResNets have no step size h to halve: the identity rule must
    # leave the old blocks' residual outputs as they are (doubling them, right for
    # this project's ResNet with h halved, changes this network's outputs).
    small, big = (
        flax_example_resnet.ResNet(stage_sizes=(2, 2)),
        flax_example_resnet.ResNet(stage_sizes=(4, 4)),
    )
    variables = small.init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)), train=False)
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    variables = jax.tree.unflatten(
        treedef,
        [  # nonzero last-norm scales
            x + 0.1 * jnp.abs(jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)
        ],
    )
    images = jnp.asarray(random_images(4), jnp.float32) / 255.0
    before = small.apply(variables, images, train=False)
    for rule in ("identity", "paper"):
        grown = multilevel.interpolate(variables, rule, multilevel.flax_examples_layout((2, 2)))
        after = big.apply(grown, images, train=False)
        if rule == "identity":  # inserted blocks add exact zeros; old blocks are unchanged
            np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
        else:  # the paper's copies do change the outputs: the check above can fail
            assert float(jnp.abs(after - before).max()) > 1e-3


# --- Trees the layout does not fit ---------------------------------------------

_NO_STAGES = {"params": {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}}


@pytest.mark.parametrize(
    "layout,looks_for",
    [
        (multilevel.STAGES, "keys 'stage1', 'stage2', ... holding blocks 'block1'"),
        (multilevel.SCANNED, "keys 'stage1', 'stage2', ... holding 'block1' and 'blocks/residual'"),
        (multilevel.flax_examples_layout((2, 2)), "keys ResNetBlock_0 .. ResNetBlock_3"),
    ],
)
@pytest.mark.parametrize("action", [*RULES, "coarsen"])
def test_a_tree_without_the_layouts_stages_is_refused(layout, looks_for, action):
    # Before: interpolate returned such a tree unchanged, and the mistake showed later.
    with pytest.raises(ValueError) as raised:
        if action == "coarsen":
            multilevel.coarsen(_NO_STAGES, "paper", layout)
        else:
            multilevel.interpolate(_NO_STAGES, action, layout)
    message = str(raised.value)
    verb = "coarsen" if action == "coarsen" else "interpolate"
    assert message.startswith(f"cannot {verb}: {layout.label} finds no stage of blocks"), message
    assert looks_for in message
    assert "top-level keys are ['params'] (under 'params': ['dense'])" in message


def test_a_stage_whose_blocks_differ_is_refused():
    variables = random_variables(_model((2, 4)))
    stage = dict(variables["params"]["stage2"])
    stage["block3"] = {**stage["block3"], "conv1": {"kernel": jnp.zeros((3, 3, 8, 4))}}
    broken = {**variables, "params": {**variables["params"], "stage2": stage}}
    for action in (lambda t: multilevel.interpolate(t, "identity"), multilevel.coarsen):
        with pytest.raises(
            ValueError,
            match=(
                r"cannot (interpolate|coarsen) under multilevel.STAGES: stage 'stage2' does not "
                r"match the layout: its block 2 \(0-based\) has 'conv1/kernel' of shape "
                r"\(3, 3, 8, 4\), block 1 \(3, 3, 8, 8\); the layout expects every block after "
                r"the first \(the stage's transition block"
            ),
        ):
            action(broken)


@pytest.mark.parametrize(
    "network,names,missing,near",
    [
        # What block 0 of the first stage has (for flax's examples: of stage 2, its
        # projection block, the block with the most leaves).
        # A name whose last component some leaf has: refused before as well.
        (
            "ours",
            ("conv3/kernel",),
            "'conv3/kernel'",
            r"stage 'stage1' has, for 'conv3/kernel', named 'kernel': \['conv1/kernel', "
            r"'conv2/kernel'\]",
        ),
        # Last components no leaf has: ignored before (the identity rule no identity).
        (
            "ours",
            ("conv2/w",),
            "'conv2/w'",
            r"stage 'stage1' has, for 'conv2/w', under 'conv2': \['conv2/kernel'\]",
        ),
        (
            "ours",
            "conv2/weight",
            "'conv2/weight'",
            r"stage 'stage1' has, for 'conv2/weight', under 'conv2': \['conv2/kernel'\]",
        ),
        (
            "flax examples",
            ("BatchNorm_1/gamma", "BatchNorm_1/beta"),
            "'BatchNorm_1/gamma' or 'BatchNorm_1/beta'",
            r"stage 'stage2' has, for 'BatchNorm_1/gamma' and 'BatchNorm_1/beta', "
            r"under 'BatchNorm_1': "
            r"\['BatchNorm_1/bias', 'BatchNorm_1/scale'\]",
        ),
    ],
)
@pytest.mark.parametrize("tree", ["variables", "optimizer state"])
def test_a_layout_whose_residual_output_is_not_in_the_blocks_is_refused(
    network, names, missing, near, tree
):
    if network == "ours":
        variables = random_variables(_model((2, 2)))
        layout = multilevel.StageLayout(residual_output=names, label="the layout")
    else:
        variables = flax_example_resnet.ResNet(stage_sizes=(2, 2)).init(
            jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)), train=False
        )
        layout = dataclasses.replace(
            multilevel.flax_examples_layout((2, 2), residual_output=names), label="the layout"
        )
    with pytest.raises(ValueError) as raised:
        if tree == "variables":  # parameters and batch statistics: neither has them
            multilevel.interpolate(variables, "identity", layout)
        else:
            multilevel.grow_optimizer_state(
                optax.sgd(0.1, momentum=0.9).init(variables["params"]),
                "identity",
                "interpolate",
                layout,
            )
    message = str(raised.value)
    assert re.match(
        rf"cannot interpolate under the layout: no block of the tree has {missing}, "
        r"which the layout names as part of the residual output; block 0 \(0-based\) "
        rf"of {near}; pass residual_output=",
        message,
    ), message


def test_batch_statistics_are_grown_with_the_parameters():
    # They have no residual-output leaf (conv2/kernel): alone, a misspelt name
    # could not be told from a tree that has none, so they are refused alone ...
    variables = random_variables(_model((2, 2)))
    with pytest.raises(
        ValueError,
        match=(
            r"no block of the tree has 'conv2/kernel', .* block 0 \(0-based\) of stage 'stage1' "
            r"has, for 'conv2/kernel', the leaves \['norm1/mean', 'norm1/var', 'norm2/mean', "
            r"'norm2/var'\]; .* \(a tree that holds none of them, such as batch statistics "
            r"alone, is grown in one call together with the parameters\)"
        ),
    ):
        multilevel.interpolate(variables["batch_stats"], "identity")
    # ... and grown in one call with them, as copies (no factor on a statistic).
    grown = multilevel.interpolate(variables, "identity")["batch_stats"]["stage2"]
    chex.assert_trees_all_equal(
        grown["block2"], grown["block3"], variables["batch_stats"]["stage2"]["block2"]
    )


# Every constructor that takes residual_output, given the names as one argument.
_LAYOUT_CONSTRUCTORS = {
    "StageLayout": lambda names: multilevel.StageLayout(residual_output=names),
    "ScannedStageLayout": lambda names: multilevel.ScannedStageLayout(residual_output=names),
    "KeyLayout": lambda names: multilevel.KeyLayout(
        lambda key: None, lambda stage, block, sizes: "", names, first_block_is_transition=True
    ),
    "flax_examples_layout": lambda names: multilevel.flax_examples_layout(
        (2, 2), residual_output=names
    ),
    "ListLayout": lambda names: multilevel.ListLayout(
        "blocks", names, first_block_is_transition=False
    ),
    "BONSAI_RESNET": lambda names: dataclasses.replace(
        multilevel.BONSAI_RESNET, residual_output=names
    ),
    "transformer_layout": lambda names: multilevel.transformer_layout(names, blocks="layers"),
}


@pytest.mark.parametrize("constructor", sorted(_LAYOUT_CONSTRUCTORS))
def test_residual_output_given_as_one_string_is_one_name(constructor):
    make = _LAYOUT_CONSTRUCTORS[constructor]
    # Before: ('m', 'l', 'p', '/', 'd', ...), each character a "name", no error.
    assert make("mlp/down/kernel").residual_output == ("mlp/down/kernel",)
    assert make(["mlp/down/kernel", "mlp/down/bias"]).residual_output == (
        "mlp/down/kernel",
        "mlp/down/bias",
    )
    # Anything else is refused, naming the field, the value and what is allowed.
    for value, error, message in [
        ((), ValueError, r"residual_output names no leaf: got \(\); "),
        (
            ("mlp/down/kernel", ""),
            ValueError,
            r"residual_output has an empty name: got \('mlp/down/kernel', ''\); ",
        ),
        (
            ("mlp/down/kernel", 2),
            TypeError,
            r"residual_output must be a leaf path .* or a sequence of them .*: got "
            r"\('mlp/down/kernel', 2\), whose entry 2 is not a string but of type int",
        ),
        (
            None,
            TypeError,
            r"residual_output must be a leaf path .*: got None, of type "
            r"NoneType",
        ),
    ]:
        with pytest.raises(error, match=message):
            make(value)


def test_list_and_key_layouts_are_told_whether_the_first_block_is_a_transition():
    # No default: True (the default before) silently made a transformer's block 0 a
    # transition, the block after it a copy of block 1 and a one-block stack ungrowable.
    for make in (
        lambda **kw: multilevel.ListLayout("blocks", "mlp/fc2/kernel", **kw),
        lambda **kw: multilevel.KeyLayout(
            lambda key: None, lambda s, b, sizes: "", "conv2/kernel", **kw
        ),
    ):
        with pytest.raises(
            TypeError, match="missing 1 required keyword-only argument: 'first_block_is_transition'"
        ):
            make()
        assert make(first_block_is_transition=False).first_block_is_transition is False
    # Nor positionally, where a bare True or False would not say what it is.
    with pytest.raises(TypeError, match="takes 3 positional arguments but 4 were given"):
        multilevel.ListLayout("blocks", "mlp/fc2/kernel", False)


# The rules that make the block inserted after a one-block stage's transition
# block from nothing: identity (a zero-residual block) and transition_keeping
# (which keeps b1's contribution, c_1 = 1, and so inserts the same block).
ONE_BLOCK_RULES = ["identity", "transition_keeping"]


def _one_block_network(layout_name, stage_sizes=(2, 1)):
    """Variables, layout and the deeper network's fresh variables, for a stage of one block."""
    if layout_name == "flax_examples_layout":

        def init(sizes, seed):
            return flax_example_resnet.ResNet(stage_sizes=sizes).init(
                jax.random.key(seed), jnp.zeros((1, *IMAGE_SHAPE)), train=False
            )

        grown_sizes = tuple(2 * n for n in stage_sizes)
        return (
            multilevel.flax_examples_layout(stage_sizes),
            init(stage_sizes, 0),
            init(grown_sizes, 1),
            None,
        )
    layout = getattr(multilevel, layout_name)
    model = _model(stage_sizes)
    variables = random_variables(model)
    fresh = models.init_variables(
        multilevel.interpolated_model(model), jax.random.key(1), IMAGE_SHAPE
    )
    if layout_name == "SCANNED":
        variables = multilevel.convert_layout(variables, multilevel.STAGES, layout)
        fresh = multilevel.convert_layout(fresh, multilevel.STAGES, layout)
    return layout, variables, fresh, model


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("layout_name", ["STAGES", "SCANNED", "flax_examples_layout"])
def test_a_one_block_stage_is_refused_in_the_layouts_terms(layout_name, rule):
    layout, variables, _, _ = _one_block_network(layout_name)
    with pytest.raises(ValueError) as raised:
        multilevel.interpolate(variables, rule, layout)
    assert str(raised.value) == one_block_stage_refusal("stage2", layout.label, rule)


def test_which_rules_grow_a_one_block_stage():
    # paper, linear and appended copy the second block after the first; the
    # other two insert a zero-residual block there.
    assert [r for r in RULES if multilevel.grows_one_block_stages(r)] == ONE_BLOCK_RULES
    assert multilevel.rules_growing_one_block_stages() == ONE_BLOCK_RULES
    assert multilevel.identity_rule(1) == [
        multilevel.NewBlock(((0, 1.0),), 2.0, False),
        multilevel.NewBlock((), 0.0, True),
    ]
    assert multilevel.transition_keeping_rule(1) == multilevel.identity_rule(1)
    # Without h to halve, b1 keeps its factor 1.
    assert multilevel.identity_rule(1, step_size_halved=False)[0].residual_scale == 1.0


def test_initial_that_the_layout_cannot_read_is_refused():
    # flax_examples_layout's keys depend on the stage sizes: it cannot read
    # the grown network's, so it cannot take a fresh block from it.
    layout, variables, fresh, _ = _one_block_network("flax_examples_layout")
    with pytest.raises(
        ValueError,
        match=r"cannot read initial= to interpolate under "
        r"flax_examples_layout\(\(2, 1\)\): 'ResNetBlock_3' is beyond the 3 blocks",
    ):
        multilevel.interpolate(variables, "identity", layout, initial=fresh)
    # A tree of the old depth has too few blocks.
    layout, variables, _, _ = _one_block_network("STAGES")
    with pytest.raises(ValueError, match="with 2 blocks in stage2 \\(found 1\\)"):
        multilevel.interpolate(variables, "identity", layout, initial=variables)


@pytest.mark.parametrize("rule", ONE_BLOCK_RULES)
@pytest.mark.parametrize("layout_name", ["STAGES", "SCANNED"])
def test_a_one_block_stage_grows_into_the_fresh_deeper_network(layout_name, rule):
    layout, variables, fresh, _ = _one_block_network(layout_name)
    grown = multilevel.interpolate(variables, rule, layout, initial=fresh)
    chex.assert_trees_all_equal_shapes_and_dtypes(grown, fresh)
    # As a function returning it: the same result.
    chex.assert_trees_all_equal(
        multilevel.interpolate(variables, rule, layout, initial=lambda: fresh), grown
    )
    # Coarsening gives the network back; the one-block stage's factor 2 is
    # undone exactly, transition_keeping's 2/3 of stage1 (two blocks) is not.
    back = multilevel.coarsen(grown, rule, layout)
    chex.assert_trees_all_equal(back["params"]["stage2"], variables["params"]["stage2"])
    chex.assert_trees_all_close(back, variables, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", ONE_BLOCK_RULES)
def test_a_one_block_stages_inserted_block_is_the_fresh_one_with_zero_residual(rule):
    model = _model((1, 1, 1), step_size=2.0)
    variables = random_variables(model)
    fresh_of = functools.partial(
        models.init_variables, rng=jax.random.key(7), image_shape=IMAGE_SHAPE
    )
    deeper_model, deeper = multilevel.interpolate_model(
        model, variables, rule, initial=lambda m: fresh_of(m)
    )
    assert deeper_model.stage_sizes == (2, 2, 2) and deeper_model.step_size == 1.0
    fresh = fresh_of(deeper_model)
    for stage in ("stage1", "stage2", "stage3"):
        inserted = deeper["params"][stage]["block2"]
        expected = dict(fresh["params"][stage]["block2"])
        expected["conv2"] = {"kernel": jnp.zeros_like(expected["conv2"]["kernel"])}
        chex.assert_trees_all_equal(inserted, expected)
        chex.assert_trees_all_equal(
            deeper["batch_stats"][stage]["block2"], fresh["batch_stats"][stage]["block2"]
        )
        # b1 keeps its contribution: h/2 * 2 G.
        kernel = variables["params"][stage]["block1"]["conv2"]["kernel"]
        chex.assert_trees_all_equal(
            deeper["params"][stage]["block1"]["conv2"]["kernel"], 2 * kernel
        )
    # The identity: the eval outputs are unchanged (float rounding only).
    images = random_images(6)
    before = _outputs(model, variables, images)
    np.testing.assert_allclose(
        _outputs(deeper_model, deeper, images), before, rtol=1e-5, atol=1e-5 * np.abs(before).max()
    )


def test_a_one_block_stages_inserted_block_starts_without_momentum():
    model = _model((1, 1, 1), step_size=2.0)
    optimizer = optax.sgd(0.1, momentum=0.9)
    state = steps.create_train_state(jax.random.key(0), model, optimizer, IMAGE_SHAPE)
    ones = jax.tree.map(jnp.ones_like, state.opt_state)  # momentum 1 everywhere
    state = state.replace(opt_state=ones)
    deeper = multilevel.interpolated_model(model)
    grown = steps.interpolate_train_state(
        state,
        "identity",
        "interpolate",
        initial=lambda: steps.create_train_state(jax.random.key(3), deeper, optimizer, IMAGE_SHAPE),
    )
    trace = grown.opt_state[0].trace
    for stage in ("stage1", "stage2", "stage3"):
        inserted = jax.tree.leaves(trace[stage]["block2"])
        assert all(float(jnp.abs(x).max()) == 0.0 for x in inserted)
        # The old block's momentum carried through the rule: 1, and 2 on conv2.
        old = trace[stage]["block1"]
        assert float(old["conv1"]["kernel"].min()) == 1.0
        assert float(old["conv2"]["kernel"].min()) == 2.0


def test_optimizer_state_without_the_layouts_stages():
    momentum = optax.sgd(0.1, momentum=0.9).init(_NO_STAGES["params"])
    with pytest.raises(ValueError, match="cannot interpolate: multilevel.STAGES finds no stage"):
        multilevel.grow_optimizer_state(momentum, "paper", "interpolate")
    plain = optax.sgd(0.1).init(_NO_STAGES["params"])  # no per-parameter state to grow
    assert multilevel.grow_optimizer_state(plain, "paper", "reset") == plain
