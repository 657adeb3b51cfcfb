"""Pre-activation ResNet and Wide ResNet with an explicit step size h.

The network is the forward-Euler reading of a ResNet (paper Sec. 3.1, Eq. 2):
every residual block computes ``Y_{j+1} = S(Y_j) + h * G(Y_j)`` where ``G`` is
the residual module (BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3) and ``S``
is the shortcut (the identity, or for the first block of stages 2 and 3 a
parameter-free stride-2 subsampling with zero-padded channels, "option A").

Parameters are named by stage and block, 1-based like the paper's figures::

    params/stem/conv
    params/stage1/block1/{norm1, conv1, norm2, conv2}
    ...
    params/stage3/block8/...
    params/final_norm
    params/head

so that interpolation (`mlres_jax.multilevel`) edits one stage's blocks
without renaming anything else. ``batch_stats`` mirrors the same names.

**Scanned layout** (``scan_blocks=True``): the blocks after the first of a
stage all have the same shapes, so they run as one ``jax.lax.scan`` (flax
``nn.scan``) over parameters stacked along a leading axis, which keeps the
compile time flat in depth. The first (downsampling) block stays apart::

    params/stage2/block1/...                         (as above)
    params/stage2/blocks/residual/{norm1, ...}       (leading axis: blocks 2..n)

`mlres_jax.multilevel.SCANNED` reads and writes this layout, and
`multilevel.convert_layout` converts between the two (a pure function). The
scanned blocks' convolution is a field (``scanned_conv``), chosen for the
backend where a run builds its model (`mlres_jax.cpu_backend`).

**Mixed precision** (``dtype=jnp.bfloat16``): convolutions, batch norms and
the head compute in bfloat16 with float32 parameters (batch-norm statistics
are reduced in float32, flax's default); the loss is computed in float32.

For the analyses (`mlres_jax.measurements`) every residual module sows its
input Y_j and its output F(Y_j) into the collection ``"intermediates"``
(``intermediates/stage2/block3/{block_input, F}``, each a 1-tuple); this is a
no-op unless the caller makes that collection mutable.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlres_jax import cpu_backend

# A module class or a partial of one, as flax's examples type ``conv``.
ModuleDef = Any

# He initialisation (fan-out), the usual choice for ResNets on CIFAR.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Batch-norm running statistics are an exponential moving average with this
# momentum; 0.9 as in the TensorFlow CIFAR ResNets the paper builds on.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5
# Batch statistics: the variance is the mean of squared deviations from the
# batch mean (two passes), as TensorFlow's ``tf.nn.moments`` computes it,
# not flax's default E[x^2] - E[x]^2. The one-pass form cancels
# catastrophically when a channel's mean is large against its spread; then
# a change in the order of the sums (another number of devices) moves the
# variance far more than one rounding error, and training drifts from the
# single-device run within a few steps: with 4 CPU devices against 1 (width
# 4, batch 8, 16 steps at learning rate 0.01) the parameters differed by
# 7e-4 with the one-pass form and by 2e-5 with the two-pass one.
BATCH_NORM_FAST_VARIANCE = False

# Collection into which every residual module sows Y_j and F(Y_j).
INTERMEDIATES = "intermediates"

# Names in the scanned layout: stage/blocks/residual holds blocks 2..n stacked.
SCANNED_BLOCKS = "blocks"
SCANNED_MODULE = "residual"


def batch_norm(train: bool, dtype: Any) -> ModuleDef:
    """The network's batch normalisation (the constants above), in train or eval mode.

    Args:
      train: normalise with the batch's statistics and update the running
        ones; False: with the running statistics.
      dtype: the computation's dtype (``float32`` or ``bfloat16``).
    """
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=BATCH_NORM_EPSILON,
        use_fast_variance=BATCH_NORM_FAST_VARIANCE,
        dtype=dtype,
    )


def block_name(block_index: int) -> str:
    """Name of the block at 0-based position ``block_index`` within a stage."""
    return f"block{block_index + 1}"


def stage_name(stage_index: int) -> str:
    """Name of the stage at 0-based position ``stage_index``."""
    return f"stage{stage_index + 1}"


def downsampling_shortcut(x: jax.Array, out_features: int) -> jax.Array:
    """Parameter-free shortcut S of a downsampling block ("option A").

    Subsamples with stride 2 and appends zero channels.

    Args:
      x: float[N, H, W, C] block input.
      out_features: number of output channels, >= C.

    Returns:
      float[N, ceil(H/2), ceil(W/2), out_features].
    """
    x = x[:, ::2, ::2, :]
    extra = out_features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))


class ResidualModule(nn.Module):
    """The residual module G = F of one block (paper Fig. 2, Eq. 2).

    BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv3x3; convolutions have
    no bias. The step size h is applied by the caller.

    When ``"intermediates"`` is mutable, sows ``block_input`` (Y_j,
    float32[N, H, W, C_in]) and ``F`` (F(Y_j), float32[N, H', W', features]),
    the residual module's output before it is multiplied by h.
    """

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    # The convolution module (flax's ``nn.Conv`` or one with its signature,
    # e.g. `mlres_jax.cpu_backend.CanonicalGradientConv`).
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = batch_norm(train, self.dtype)
        conv = functools.partial(
            self.conv,
            self.features,
            (3, 3),
            use_bias=False,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
        )
        y = nn.relu(norm(name="norm1")(x))
        y = conv(strides=(self.strides, self.strides), name="conv1")(y)
        y = nn.relu(norm(name="norm2")(y))
        y = conv(name="conv2")(y)
        self.sow(INTERMEDIATES, "block_input", x)
        self.sow(INTERMEDIATES, "F", y)
        return y


class _ScannedBlock(nn.Module):
    """One identity-shortcut block as the body of `nn.scan`: ``(Y, _) -> (Y + h G(Y), None)``."""

    features: int
    step_size: float
    train: bool
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x: jax.Array, _) -> tuple[jax.Array, None]:
        residual = ResidualModule(self.features, 1, self.dtype, self.conv, name=SCANNED_MODULE)(
            x, self.train
        )
        return x + self.step_size * residual, None


class Stage(nn.Module):
    """``num_blocks`` residual blocks of one width; the first may downsample.

    Each block computes ``Y_{j+1} = S(Y_j) + step_size * G(Y_j)``.

    With ``downsample_by_shortcut`` the stage first applies the parameter-free
    downsampling shortcut S alone, and all its blocks keep the shape: this is
    the stage after a lesion removed its downsampling block (paper Sec. 3.3,
    Veit et al. 2016). Then ``downsample`` must be False.
    """

    num_blocks: int
    features: int
    downsample: bool
    step_size: float
    downsample_by_shortcut: bool = False
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    scanned_conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, x: jax.Array, train: bool):
        if self.downsample_by_shortcut:
            x = downsampling_shortcut(x, self.features)
        # Scanned: the first block apart, the identical others as one scan.
        unrolled = 1 if self.scan_blocks and self.num_blocks > 1 else self.num_blocks
        for j in range(unrolled):
            first = j == 0
            strides = 2 if (first and self.downsample) else 1
            residual = self.step_size * ResidualModule(
                self.features, strides, self.dtype, name=block_name(j)
            )(x, train)
            if strides == 2 or x.shape[-1] != self.features:
                shortcut = downsampling_shortcut(x, self.features)
            else:
                shortcut = x
            x = shortcut + residual
        if unrolled < self.num_blocks:
            scan = nn.scan(
                _ScannedBlock,
                variable_axes={"params": 0, "batch_stats": 0, INTERMEDIATES: 0},
                split_rngs={"params": True},
                length=self.num_blocks - 1,
            )
            x, _ = scan(
                self.features,
                self.step_size,
                train,
                self.dtype,
                self.scanned_conv,
                name=SCANNED_BLOCKS,
            )(x, None)
        return x


class ResNet(nn.Module):
    """Pre-activation ResNet for small images (paper Sec. 5.1, App. A).

    Attributes:
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2)`` for ResNet-14;
        depth = 2 * sum(stage_sizes) + 2.
      width: filters of the stem and the first stage (16 for ResNet, 32 for
        Wide ResNet); each later stage doubles it.
      num_classes: outputs of the dense head.
      step_size: the explicit step size h multiplying every residual module
        (paper Eq. 2, App. C); 1.0 is a plain ResNet.
      shortcut_only_stages: 0-based indices (>= 1) of stages whose first,
        downsampling block was removed in a lesion (paper Sec. 3.3): such a
        stage downsamples by its parameter-free shortcut S alone and all of
        its ``stage_sizes[i]`` blocks keep the shape. Empty (the default) for
        every trained network; see `mlres_jax.lesions.lesioned_model`.
      scan_blocks: run the blocks after the first of each stage as one scan
        (the scanned layout above); the same function of the same (converted)
        parameters.
      dtype: computation dtype, ``jnp.float32`` or ``jnp.bfloat16``
        (parameters stay float32).
      scanned_conv: the convolution module of the scanned blocks (flax's
        ``nn.Conv`` or one with its signature); the same function whichever
        is chosen. A run on the CPU takes
        `mlres_jax.cpu_backend.scanned_conv` (gradients in the form XLA:CPU
        runs fast inside a scan).

    Call: ``model.apply(variables, images, train=...)`` with
    ``images: float32[N, H, W, C]``; returns logits ``float32[N, num_classes]``.
    With ``train=True`` pass ``mutable=["batch_stats"]``.
    """

    stage_sizes: Sequence[int] = (2, 2, 2)
    width: int = 16
    num_classes: int = 10
    step_size: float = 1.0
    shortcut_only_stages: Sequence[int] = ()
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    scanned_conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        for i in self.shortcut_only_stages:
            if not 1 <= i < len(self.stage_sizes):
                raise ValueError(
                    f"shortcut_only_stages holds {i}, but only stages 1.."
                    f"{len(self.stage_sizes) - 1} (0-based) downsample"
                )
        x = nn.Conv(
            self.width,
            (3, 3),
            use_bias=False,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            name="stem",
        )(images)
        for i, num_blocks in enumerate(self.stage_sizes):
            shortcut_only = i in self.shortcut_only_stages
            x = Stage(
                num_blocks=num_blocks,
                features=self.width * 2**i,
                downsample=i > 0 and not shortcut_only,
                step_size=self.step_size,
                downsample_by_shortcut=shortcut_only,
                scan_blocks=self.scan_blocks,
                dtype=self.dtype,
                scanned_conv=self.scanned_conv,
                name=stage_name(i),
            )(x, train)
        x = batch_norm(train, self.dtype)(name="final_norm")(x)
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
        return logits.astype(jnp.float32)  # the loss and metrics in float32, also under bfloat16


def format_stage_sizes(stage_sizes: Sequence[int]) -> str:
    """``(2, 2, 2)`` -> ``"2-2-2"``, the paper's notation for blocks per stage."""
    return "-".join(str(n) for n in stage_sizes)


def depth(stage_sizes: Sequence[int]) -> int:
    """Layer count of the paper's names: 2 convs per block + stem + dense."""
    return 2 * sum(stage_sizes) + 2


def init_variables(model: ResNet, rng: jax.Array, image_shape: Sequence[int]):
    """Fresh variables (``params`` and ``batch_stats``) for ``model``.

    Args:
      model: the network.
      rng: PRNG key.
      image_shape: (H, W, C) of one input image.

    Returns:
      dict with ``params`` and ``batch_stats`` pytrees of float32 arrays.
      The initialisation runs once, so it is compiled with
      `cpu_backend.one_shot_compiler_options` (on the CPU, without XLA's
      optimisations, which would cost more time than they save).
    """
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False))
    if isinstance(dummy, jax.core.Tracer):  # inside jax.eval_shape or jit
        return dict(init(rng, dummy))
    executable = init.lower(rng, dummy).compile(
        compiler_options=cpu_backend.one_shot_compiler_options()
    )
    return dict(executable(rng, dummy))


def count_parameters(params) -> int:
    """Number of trainable scalars in a ``params`` pytree (paper Table 5)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
