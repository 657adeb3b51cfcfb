"""The paper's measurements of a trained network: residual norms and lesion errors.

A block computes ``Y_{j+1} = S(Y_j) + h * F(Y_j)`` and its residual module
output is ``G(Y_j) = h * F(Y_j)`` (paper Sec. 3.1, Eq. 2).

* **norms**: `block_norms` gives, per block, the mean over a data set of the
  per-example L2 norms ||Y_j|| and ||F(Y_j)|| (and ||G(Y_j)|| = h·||F(Y_j)||),
  the numbers behind the paper's Fig. 3 (gamma), Fig. 4 and Fig. 7 (App. C);
* **lesion errors** (paper Sec. 3.3): `error_rate`, `removal_errors`,
  `shuffle_errors`, evaluating through `steps.evaluate`, the evaluation loop
  that training uses.

Computations only: no files. Figures of these numbers are in
`mlres_jax.figures`; the command line is `mlres_jax.analyze`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mlres_jax import input_pipeline, lesions, models, steps


def l2_norm_per_example(x: jax.Array) -> jax.Array:
    """L2 norm of each example over its whole feature map.

    Args:
      x: float[N, H, W, C].

    Returns:
      float32[N], ``sqrt(sum over H, W, C of x^2)``.
    """
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2, 3)))


def _block_keys(model: models.ResNet) -> list[tuple[str, str]]:
    return [
        (models.stage_name(s), models.block_name(j))
        for s, n in enumerate(model.stage_sizes)
        for j in range(n)
    ]


@functools.partial(jax.jit, static_argnames="model")
def _norm_sums(variables, images, mask, *, model):
    """Sums over the real examples of ||Y_j|| and ||F(Y_j)||, float32[d] each."""
    _, state = model.apply(
        variables,
        input_pipeline.preprocess_for_eval(images),
        train=False,
        mutable=[models.INTERMEDIATES],
    )
    sown = state[models.INTERMEDIATES]
    weight = mask.astype(jnp.float32)
    input_norms = jnp.stack(
        [l2_norm_per_example(sown[s][b]["block_input"][0]) for s, b in _block_keys(model)]
    )
    F_norms = jnp.stack([l2_norm_per_example(sown[s][b]["F"][0]) for s, b in _block_keys(model)])
    return input_norms @ weight, F_norms @ weight


@dataclasses.dataclass(frozen=True, eq=False)
class BlockNorms:
    """Per-block norms of one network, each the mean over a data set.

    Blocks are numbered through all stages, j = 0 .. d - 1 (d = number of
    blocks), stage by stage.

    Attributes:
      stage_sizes: blocks per stage of the network.
      step_size: its step size h.
      input_norm: float64[d], mean ||Y_j|| of the block inputs.
      F_norm: float64[d], mean ||F(Y_j)|| (the residual module before h).
      num_examples: examples averaged over.
    """

    stage_sizes: tuple[int, ...]
    step_size: float
    input_norm: np.ndarray
    F_norm: np.ndarray
    num_examples: int

    @property
    def num_blocks(self) -> int:
        """d, the number of residual blocks."""
        return int(sum(self.stage_sizes))

    @property
    def G_norm(self) -> np.ndarray:
        """float64[d], mean ||G(Y_j)|| = h·||F(Y_j)|| (paper Eq. 5)."""
        return abs(self.step_size) * self.F_norm

    @property
    def gamma(self) -> float:
        """gamma = mean_j ||G(Y_j)|| over the d blocks (paper Sec. 3.2, Fig. 3)."""
        return float(np.mean(self.G_norm))

    @property
    def stage_index(self) -> np.ndarray:
        """int[d], 0-based stage of each block."""
        return np.repeat(np.arange(len(self.stage_sizes)), self.stage_sizes)

    @property
    def block_index(self) -> np.ndarray:
        """int[d], 0-based position of each block within its stage."""
        return np.concatenate([np.arange(n) for n in self.stage_sizes]).astype(int)

    @property
    def first_in_stage(self) -> np.ndarray:
        """bool[d], True for the first block of each stage."""
        return self.block_index == 0

    @property
    def time(self) -> np.ndarray:
        """float64[d], conceptual time t_j = j·h of each block input (App. C)."""
        return np.arange(self.num_blocks) * self.step_size

    def ratio_summary(self) -> dict[str, float]:
        """Mean of ||G(Y_j)|| / ||Y_j|| over first blocks and over the rest.

        The paper's Fig. 4 claim (Sec. 3.3): G is small compared with Y except
        at the first block of each stage. The ratio is of the per-block means.
        ``other_blocks`` is None for a network of one block per stage.
        """
        ratio = self.G_norm / self.input_norm
        first = self.first_in_stage
        return {
            "first_blocks": float(np.mean(ratio[first])),
            "other_blocks": (float(np.mean(ratio[~first])) if np.any(~first) else None),
        }

    def records(self) -> list[dict]:
        """One row per block for a CSV: 1-based stage and block numbers."""
        return [
            {
                "block": j + 1,
                "stage": int(s) + 1,
                "block_in_stage": int(b) + 1,
                "first_in_stage": bool(b == 0),
                "t": float(t),
                "input_norm": float(y),
                "F_norm": float(f),
                "G_norm": float(g),
                "G_over_input": float(g / y),
            }
            for j, (s, b, t, y, f, g) in enumerate(
                zip(
                    self.stage_index,
                    self.block_index,
                    self.time,
                    self.input_norm,
                    self.F_norm,
                    self.G_norm,
                )
            )
        ]


def block_norms(
    model: models.ResNet, variables, images: np.ndarray, *, batch_size: int
) -> BlockNorms:
    """Per-block mean norms ||Y_j|| and ||F(Y_j)|| over a data set at test time.

    Each example's norm is over its whole feature map (H·W·C), then averaged
    over the examples (the norms of paper Fig. 3, Fig. 4). Images are
    standardised as in evaluation; the batch norms use their running averages.

    Args:
      model: the network.
      variables: its ``{"params", "batch_stats"}``.
      images: uint8[N, H, W, C] raw images (e.g. the test split), N >= 1.
      batch_size: examples per forward pass; the last batch is padded and
        masked.

    Returns:
      `BlockNorms` of the network.
    """
    labels = np.zeros((len(images),), np.int32)
    input_sum = F_sum = 0.0
    for batch_images, _, mask in input_pipeline.eval_batches(images, labels, batch_size):
        sums = jax.device_get(_norm_sums(variables, batch_images, mask, model=model))
        input_sum = input_sum + sums[0].astype(np.float64)
        F_sum = F_sum + sums[1].astype(np.float64)
    count = len(images)
    return BlockNorms(
        stage_sizes=tuple(model.stage_sizes),
        step_size=float(model.step_size),
        input_norm=np.asarray(input_sum) / count,
        F_norm=np.asarray(F_sum) / count,
        num_examples=count,
    )


# ---------------------------------------------------------------------------
# Test errors of lesioned networks (paper Sec. 3.3).


def error_rate(
    model: models.ResNet, variables, images: np.ndarray, labels: np.ndarray, *, batch_size: int
) -> float:
    """Fraction of ``images`` misclassified (batch norms at running averages).

    Evaluates with `steps.evaluate` and `steps.make_eval_step`, which
    compiles once per distinct model and variable shapes, so every lesion of
    a non-first block of a stage reuses one executable.

    Args:
      model, variables: the network.
      images: uint8[N, H, W, C]; labels: int[N]; N >= 1.
      batch_size: examples per forward pass.

    Returns:
      Test error in [0, 1].
    """
    return steps.evaluate(steps.make_eval_step(model), variables, images, labels, batch_size)[
        "error"
    ]


def removal_errors(
    model: models.ResNet, variables, images: np.ndarray, labels: np.ndarray, *, batch_size: int
) -> list[dict]:
    """Test error with each single block removed (`lesions.lesion`), for every block.

    Returns:
      One record per block, in order: ``block`` (1-based through all
      stages), ``stage``, ``block_in_stage`` (1-based), ``downsampling``
      (bool) and ``test_error`` (fraction).
    """
    records = []
    number = 0
    for s, n in enumerate(model.stage_sizes):
        for j in range(n):
            number += 1
            lesioned, lesioned_variables = lesions.lesion(model, variables, s, j)
            records.append(
                {
                    "block": number,
                    "stage": s + 1,
                    "block_in_stage": j + 1,
                    "downsampling": lesions.is_downsampling_block(model, s, j),
                    "test_error": error_rate(
                        lesioned, lesioned_variables, images, labels, batch_size=batch_size
                    ),
                }
            )
    return records


def shuffle_errors(
    model: models.ResNet,
    variables,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    num_shuffles: int,
    seed: int,
) -> list[dict]:
    """Test error after random shuffles of the blocks within each stage.

    For every stage of at least 3 blocks, ``num_shuffles`` random orders
    (`lesions.random_block_permutation`; the first block stays first) are each
    evaluated with the other stages intact. Stages of fewer blocks have no
    such shuffle and are skipped.

    Returns:
      One record per shuffle: ``stage`` (1-based), ``shuffle`` (1-based),
      ``order`` (the 1-based old block numbers in their new order, as a
      space-separated string), ``blocks_moved`` and ``test_error``.
    """
    rng = np.random.default_rng(seed)
    records = []
    for s, n in enumerate(model.stage_sizes):
        if n < 3:
            continue
        for k in range(num_shuffles):
            order = lesions.random_block_permutation(rng, n)
            shuffled = lesions.permute_blocks(variables, s, order)
            records.append(
                {
                    "stage": s + 1,
                    "shuffle": k + 1,
                    "order": " ".join(str(i + 1) for i in order),
                    "blocks_moved": sum(i != source for i, source in enumerate(order)),
                    "test_error": error_rate(
                        model, shuffled, images, labels, batch_size=batch_size
                    ),
                }
            )
    return records
