"""Checks a run's ConfigDict and fills in the fields derived from the data set.

`resolve` is called before any data is loaded or model built, so a wrong value
costs the user seconds, not a compile. Every message names the field, the
value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from mlres_jax import datasets, errors, multilevel, plan

# Paper Sec. 5.2: mini-batch 100 for CIFAR, 32 for STL-10. Fashion-MNIST is
# not in the paper; it uses CIFAR's 100.
PAPER_BATCH_SIZES = {"cifar10": 100, "cifar100": 100, "stl10": 32, "fashion_mnist": 100}


class ConfigError(errors.UserError, ValueError):
    """A config field has a value that is not allowed."""


def _fail(field: str, value: Any, allowed: str):
    raise ConfigError(f"config.{field} = {value!r} is not allowed: {allowed}")


def _positive_number(config, field: str):
    value = config[field]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        _fail(field, value, "it must be a finite number > 0")


def _positive_integer(config, field: str, allow_derived: bool = False, allow_zero: bool = False):
    value = config[field]
    if allow_derived and value == -1:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        extra = " (or -1 to derive it from the data set)" if allow_derived else ""
        _fail(field, value, f"it must be an integer {'>= 0' if allow_zero else '> 0'}{extra}")


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validates ``config`` and returns a copy with derived fields filled in.

    Derived: ``batch_size`` (-1 -> the paper's for the data set),
    ``crop_padding`` (-1 -> the data set's, paper App. A), ``data_dir``
    ('' -> None).

    Args:
      config: a config from ``configs/*.py``, possibly overridden.

    Returns:
      A new, unlocked ConfigDict; the input is not changed.

    Raises:
      ConfigError: naming the first field whose value is not allowed.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    if config.dataset not in datasets.DATASETS:
        _fail("dataset", config.dataset, f"known data sets are {sorted(datasets.DATASETS)}")
    info = datasets.DATASETS[config.dataset]
    _check_model(config)
    _check_multilevel(config)
    _check_schedule(config)
    _check_optimizer(config)
    _resolve_batches_and_padding(config, info)
    _check_speed(config)
    _check_bookkeeping(config)
    config.data_dir = config.data_dir or None
    return config


def check_against_data(config: ml_collections.ConfigDict, num_train: int) -> None:
    """Checks the fields whose validity depends on the training set's size.

    Called with the count from ``datasets.check_available``, before
    the data is loaded: the batch must fit the training set, and every cycle
    of the plan must have at least one step once its epochs are rounded to
    whole steps (``plan.plan_cycles``).

    Args:
      config: a resolved config (`resolve`).
      num_train: training examples found.

    Raises:
      ConfigError: naming ``batch_size``, ``cycle_boundaries`` (or
        ``num_epochs`` for a run of one cycle) with the numbers involved.
    """
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        _fail(
            "batch_size",
            config.batch_size,
            f"it must not exceed the {num_train} training examples found for {config.dataset}",
        )
    try:
        plan.plan_cycles_of_config(config, steps_per_epoch)
    except ValueError as error:
        field = "cycle_boundaries" if config.cycle_boundaries else "num_epochs"
        _fail(
            field,
            config[field],
            f"with {num_train} training examples and batch {config.batch_size} "
            f"({steps_per_epoch} steps per epoch), {error}",
        )


def _check_model(config) -> None:
    sizes = config.stage_sizes
    if (
        not isinstance(sizes, (tuple, list))
        or not sizes
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)
    ):
        _fail("stage_sizes", sizes, "it must be a non-empty tuple of integers >= 1, e.g. (2, 2, 2)")
    config.stage_sizes = tuple(sizes)
    _positive_integer(config, "width")
    _positive_number(config, "step_size")


def _check_multilevel(config) -> None:
    if not isinstance(config.multilevel, bool):
        _fail("multilevel", config.multilevel, "it must be True or False")
    if config.interpolation_rule not in multilevel.GROWTH_RULES:
        _fail(
            "interpolation_rule",
            config.interpolation_rule,
            f"known rules are {sorted(multilevel.GROWTH_RULES)}",
        )
    if config.momentum_at_interpolation not in multilevel.MOMENTUM_POLICIES:
        _fail(
            "momentum_at_interpolation",
            config.momentum_at_interpolation,
            f"it must be one of {sorted(multilevel.MOMENTUM_POLICIES)}",
        )


def _check_schedule(config) -> None:
    """The run's length and cycle boundaries (paper Sec. 5.2)."""
    _positive_number(config, "num_epochs")
    boundaries = config.cycle_boundaries
    if not isinstance(boundaries, (tuple, list)) or any(
        isinstance(b, bool) or not isinstance(b, (int, float)) for b in boundaries
    ):
        _fail(
            "cycle_boundaries",
            boundaries,
            "it must be a tuple of epochs, e.g. (60, 110), or () for one cycle",
        )
    edges = [0, *boundaries, config.num_epochs]
    if any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        _fail(
            "cycle_boundaries",
            boundaries,
            f"epochs must increase strictly inside (0, num_epochs = {config.num_epochs})",
        )
    config.cycle_boundaries = tuple(float(b) for b in boundaries)
    if (
        config.multilevel
        and config.cycle_boundaries
        and min(config.stage_sizes) < 2
        and not multilevel.grows_one_block_stages(config.interpolation_rule)
    ):
        _fail(
            "stage_sizes",
            config.stage_sizes,
            f"the {config.interpolation_rule!r} growth rule needs at least 2 blocks "
            "in every stage (the block after the first is made from the second, "
            f"paper App. B); the rules {multilevel.rules_growing_one_block_stages()} grow a "
            "stage of one block",
        )


def _check_optimizer(config) -> None:
    _positive_number(config, "learning_rate_max")
    _positive_number(config, "learning_rate_min")
    if config.learning_rate_min > config.learning_rate_max:
        _fail(
            "learning_rate_min",
            config.learning_rate_min,
            f"it must not exceed learning_rate_max = {config.learning_rate_max}",
        )
    for field in ("momentum", "weight_decay"):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
            _fail(field, value, "it must be a number in [0, 1)")


def _resolve_batches_and_padding(config, info: datasets.DataSetInfo) -> None:
    _positive_integer(config, "batch_size", allow_derived=True)
    if config.batch_size == -1:
        config.batch_size = PAPER_BATCH_SIZES[config.dataset]
    if config.batch_size > info.num_train:
        _fail(
            "batch_size",
            config.batch_size,
            f"it must not exceed the {info.num_train} training examples of {config.dataset}",
        )
    _positive_integer(config, "eval_batch_size")
    padding = config.crop_padding
    if padding == -1:
        config.crop_padding = info.padding
    elif (
        isinstance(padding, bool)
        or not isinstance(padding, int)
        or not (0 <= padding <= min(info.image_shape[:2]))
    ):
        _fail(
            "crop_padding",
            padding,
            f"it must be -1 (derive), or an integer in [0, {min(info.image_shape[:2])}] pixels",
        )


def start_from(config: ml_collections.ConfigDict, metadata) -> ml_collections.ConfigDict:
    """The config of a run that starts from a checkpoint (``config.init_from``).

    The checkpoint's stage sizes and step size h replace ``stage_sizes`` and
    ``step_size`` (a grown checkpoint's depth comes from its metadata); its
    data set and width must be this run's.

    Args:
      config: a resolved config with ``init_from`` set.
      metadata: the checkpoint's ``checkpoint.CheckpointMetadata``.

    Returns:
      A new resolved config.

    Raises:
      ConfigError: naming ``init_from`` and every field that differs.
    """
    differences = [
        f"{field} (checkpoint {saved!r}, config {config[field]!r})"
        for field, saved in (("dataset", metadata.dataset), ("width", metadata.width))
        if saved != config[field]
    ]
    if differences:
        _fail(
            "init_from",
            config.init_from,
            "its checkpoint is of another network or data set: it differs in "
            + " and ".join(differences),
        )
    config = ml_collections.ConfigDict(config.to_dict())
    config.stage_sizes = tuple(metadata.stage_sizes)
    config.step_size = float(metadata.step_size)
    return resolve(config)


COMPUTE_DTYPES = ("float32", "bfloat16")


def _check_speed(config) -> None:
    for field in ("scan_blocks", "compile_ahead"):
        if not isinstance(config[field], bool):
            _fail(field, config[field], "it must be True or False")
    if config.compute_dtype not in COMPUTE_DTYPES:
        _fail("compute_dtype", config.compute_dtype, f"it must be one of {list(COMPUTE_DTYPES)}")


def _check_bookkeeping(config) -> None:
    if not isinstance(config.init_from, str):
        _fail("init_from", config.init_from, "it must be a folder (a string), or ''")
    _positive_integer(config, "growth_train_examples", allow_zero=True)
    devices = config.num_devices
    if (
        isinstance(devices, bool)
        or not isinstance(devices, int)
        or not (devices == -1 or devices >= 1)
    ):
        _fail("num_devices", devices, "it must be -1 (every device) or an integer >= 1")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        _fail("seed", config.seed, "it must be an integer >= 0")
    _positive_number(config, "eval_every_epochs")
    _positive_integer(config, "log_every_steps")
    _positive_integer(config, "checkpoint_every_steps")
    _positive_integer(config, "checkpoints_to_keep")
