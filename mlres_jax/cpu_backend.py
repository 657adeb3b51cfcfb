"""Workarounds for XLA's CPU backend, in one place, applied only on the CPU.

Two of them:

* `CanonicalGradientConv`: flax's ``nn.Conv`` with `conv_with_canonical_gradients`,
  for the convolutions of the blocks inside a ``jax.lax.scan`` (the scanned
  layout of `mlres_jax.models.ResNet`). The model takes it as a field
  (``ResNet.scanned_conv``, as flax's examples take ``conv: ModuleDef =
  nn.Conv``); `scanned_conv` chooses it for a platform.
* `one_shot_compiler_options`: XLA options for a program that runs once (the
  initialisation of the variables), with the optimisations off.

Where a run's model is built (`mlres_jax.train.Run.model`, the benchmarks) it
asks this module for the platform it runs on; nothing inside the model tests
the backend.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The dimension order XLA's CPU backend runs on its fast convolution kernel
# (flax's default): images NHWC, kernels HWIO, outputs NHWC.
CANONICAL_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """(before, after) padding of a stride-1 'SAME' convolution with this kernel size."""
    return (kernel_size - 1) // 2, kernel_size // 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _canonical_conv(inputs: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    padding = [_same_padding(k) for k in kernel.shape[:2]]
    return jax.lax.conv_general_dilated(
        inputs,
        kernel,
        (1, 1),
        padding,
        dimension_numbers=CANONICAL_CONV_DIMENSIONS,
        precision=precision,
    )


def _canonical_conv_forward(inputs, kernel, precision):
    return _canonical_conv(inputs, kernel, precision), (inputs, kernel)


def _canonical_conv_backward(precision, residuals, output_cotangent):
    inputs, kernel = residuals
    (top, bottom), (left, right) = [_same_padding(k) for k in kernel.shape[:2]]
    # Input cotangent: the output cotangent correlated with the kernel rotated
    # by 180 degrees, input and output channels swapped (still HWIO).
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    inputs_cotangent = jax.lax.conv_general_dilated(
        output_cotangent,
        flipped,
        (1, 1),
        [(bottom, top), (right, left)],
        dimension_numbers=CANONICAL_CONV_DIMENSIONS,
        precision=precision,
    )
    # Kernel cotangent: dK[a, b, i, o] = sum_{n, y, x} X_pad[n, y + a, x + b, i] dY[n, y, x, o],
    # a convolution with channels as batch ([C_in, H, W, N]) and the output
    # cotangent as an HWIO kernel ([H, W, N, C_out]); its output is [C_in, kh, kw, C_out].
    kernel_cotangent = jax.lax.conv_general_dilated(
        jnp.transpose(inputs, (3, 1, 2, 0)),
        jnp.transpose(output_cotangent, (1, 2, 0, 3)),
        (1, 1),
        [(top, bottom), (left, right)],
        dimension_numbers=CANONICAL_CONV_DIMENSIONS,
        precision=precision,
    )
    return inputs_cotangent, jnp.transpose(kernel_cotangent, (1, 2, 0, 3)).astype(kernel.dtype)


_canonical_conv.defvjp(_canonical_conv_forward, _canonical_conv_backward)


def conv_with_canonical_gradients(
    inputs: jax.Array,
    kernel: jax.Array,
    window_strides,
    padding,
    *,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
) -> jax.Array:
    """A stride-1 'SAME' convolution whose gradients are NHWC x HWIO convolutions too.

    The same function as ``jax.lax.conv_general_dilated`` (its signature, so
    that it can be ``flax.linen.Conv``'s ``conv_general_dilated``), with
    hand-written gradients: the input gradient is a convolution of the output
    cotangent with the flipped kernel, the kernel gradient a convolution with
    the channel and batch axes swapped, both in the NHWC x HWIO -> NHWC form.

    Why: XLA's CPU backend hands a convolution to its fast (Eigen) kernel only
    in that form. JAX's automatic gradients of a convolution come in other
    dimension orders, which XLA rewrites into the fast form with transposes,
    but only in the entry computation (its ``ConvCanonicalization`` pass walks
    nothing else). Inside the body of a ``jax.lax.scan`` they stay as they are
    and run as generic loops, several times slower (``benchmarks.throughput
    --layouts=unrolled,scanned`` measures it). With this function the scanned
    blocks' gradients take the fast path too.

    Args:
      inputs: float[N, H, W, C_in].
      kernel: float[kh, kw, C_in, C_out], kh and kw odd or even (SAME padding
        puts the extra row and column after, as XLA does).
      window_strides: must be (1, 1).
      padding: must be ``"SAME"``.
      lhs_dilation, rhs_dilation: must be None or all ones.
      dimension_numbers: must be NHWC x HWIO -> NHWC (flax's default).
      feature_group_count: must be 1.
      precision: passed on to every convolution.

    Returns:
      float[N, H, W, C_out], in the inputs' dtype.

    Raises:
      ValueError: for any other stride, padding, dilation, dimension order or
        group count.
    """
    dimensions = jax.lax.conv_dimension_numbers(
        inputs.shape, kernel.shape, dimension_numbers or CANONICAL_CONV_DIMENSIONS
    )
    canonical = jax.lax.conv_dimension_numbers(
        inputs.shape, kernel.shape, CANONICAL_CONV_DIMENSIONS
    )
    unsupported = {
        "window_strides": (tuple(window_strides), "(1, 1)", tuple(window_strides) == (1, 1)),
        "padding": (padding, '"SAME"', isinstance(padding, str) and padding.upper() == "SAME"),
        "lhs_dilation": (
            lhs_dilation,
            "None or ones",
            not lhs_dilation or set(lhs_dilation) == {1},
        ),
        "rhs_dilation": (
            rhs_dilation,
            "None or ones",
            not rhs_dilation or set(rhs_dilation) == {1},
        ),
        "dimension_numbers": (dimension_numbers, "NHWC x HWIO -> NHWC", dimensions == canonical),
        "feature_group_count": (feature_group_count, "1", feature_group_count == 1),
    }
    for name, (value, allowed, ok) in unsupported.items():
        if not ok:
            raise ValueError(
                f"conv_with_canonical_gradients: {name} is {value!r}; only {allowed} is supported"
            )
    return _canonical_conv(inputs, kernel, precision)


# ``nn.Conv`` with the canonical gradients: one object, so that models built
# with it compare (and hash) equal.
CanonicalGradientConv = functools.partial(
    nn.Conv, conv_general_dilated=conv_with_canonical_gradients
)

# XLA options for a program that runs once: its optimisations would cost more
# compile time than they save (the variables' initialisation of a 2-2-2
# network compiles several times faster without them on a CPU).
_ONE_SHOT_CPU_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def _platform(platform: str | None) -> str:
    return jax.default_backend() if platform is None else platform


def scanned_conv(platform: str | None = None) -> Any:
    """The convolution module of the blocks inside a scan on ``platform``.

    Args:
      platform: ``"cpu"``, ``"gpu"``, ``"tpu"``...; None for JAX's default backend.

    Returns:
      `CanonicalGradientConv` on the CPU; ``flax.linen.Conv`` elsewhere, where
      the compiler picks the convolution kernels for any dimension order, in
      loops too.
    """
    return CanonicalGradientConv if _platform(platform) == "cpu" else nn.Conv


def one_shot_compiler_options(platform: str | None = None) -> dict[str, Any]:
    """XLA compiler options for a program that runs once on ``platform``.

    Args:
      platform: as in `scanned_conv`.

    Returns:
      On the CPU, the backend optimisations and LLVM's expensive passes off;
      elsewhere no options (``{}``, the compiler's defaults).
    """
    return dict(_ONE_SHOT_CPU_OPTIONS) if _platform(platform) == "cpu" else {}
