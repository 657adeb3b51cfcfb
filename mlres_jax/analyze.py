"""Command line: the paper's analyses (Sec. 3.2, 3.3, App. C) of a run's checkpoints.

  python -m mlres_jax.analyze norms     --workdir=runs/fashion_mnist
  python -m mlres_jax.analyze gamma     --workdir=runs/a --workdir=runs/b --steps=all
  python -m mlres_jax.analyze lesion    --workdir=runs/fashion_mnist --num_shuffles=3
  python -m mlres_jax.analyze step-size --workdir=runs/h1 --workdir=runs/h05
  python -m mlres_jax.analyze curves    --workdir=runs/fashion_mnist

``norms`` is paper Fig. 4, ``gamma`` Fig. 3, ``lesion`` Sec. 3.3, ``step-size``
App. C (Fig. 7) and ``curves`` Fig. 6. Each writes a PNG and the numbers
behind it (CSV, and JSON for summaries) into ``--output_dir`` (default
``<first workdir>/analysis``), every file atomically. Checkpoints are read
with `mlres_jax.checkpoint.load_model`; the test split is the one of the
run's data set, found where the run found it unless ``--fashion_mnist_dir``
or ``--data_dir`` say otherwise. A user's mistake (no such workdir,
checkpoint or ``summary.json``, data set missing) ends the command with one
line on stderr and exit status 2. The numbers come from
`mlres_jax.measurements`, the plots from `mlres_jax.figures`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import flags, logging

from mlres_jax import (
    checkpoint,
    cli,
    datasets,
    errors,
    figures,
    files,
    input_pipeline,
    measurements,
    models,
    reporting,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the analyses' flags (the command is the first argument)."""
    flags.DEFINE_multi_string(
        "workdir",
        None,
        "Run folder(s) holding checkpoints/ (and summary.json for curves). "
        "gamma and step-size take several; the others one.",
    )
    flags.DEFINE_string(
        "steps",
        "latest",
        "Which checkpoints of each workdir: 'latest', 'all', or comma-separated "
        "steps, e.g. '1800,3600'.",
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "Folder for the PNG, CSV and JSON files; default <first workdir>/analysis.",
    )
    flags.DEFINE_integer("num_examples", 0, "Use the first N test images; 0 (default) uses all.")
    flags.DEFINE_integer(
        "batch_size", 0, "Images per forward pass; 0 (default): the run's eval_batch_size."
    )
    flags.DEFINE_integer("num_shuffles", 3, "lesion: random shuffles per stage.")
    flags.DEFINE_integer("seed", 0, "lesion: seed of the shuffles.")
    flags.DEFINE_string(
        "fashion_mnist_dir", None, "Folder of the Fashion-MNIST files; default: the run's."
    )
    flags.DEFINE_string("data_dir", None, "tfds data dir; default: the run's.")
    flags.mark_flag_as_required("workdir")
    flags.register_validator("num_examples", lambda n: n >= 0, "must be >= 0")
    flags.register_validator("batch_size", lambda n: n >= 0, "must be >= 0")
    flags.register_validator("num_shuffles", lambda n: n >= 0, "must be >= 0")


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings shared by the commands; see the flags of the same names."""

    output_dir: str
    num_examples: int = 0
    batch_size: int = 0
    num_shuffles: int = 3
    seed: int = 0
    fashion_mnist_dir: str | None = None
    data_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Loaded:
    """One checkpoint with its network and test split."""

    workdir: str
    step: int
    model: models.ResNet
    variables: dict
    metadata: checkpoint.CheckpointMetadata
    images: np.ndarray
    labels: np.ndarray
    batch_size: int

    @property
    def label(self) -> str:
        sizes = models.format_stage_sizes(self.model.stage_sizes)
        return (
            f"{sizes}, h = {self.model.step_size:g} "
            f"({os.path.basename(os.path.normpath(self.workdir))}, step {self.step})"
        )


# ---------------------------------------------------------------------------
# Finding and loading checkpoints.


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in ``<workdir>/checkpoints``, sorted.

    Raises:
      errors.UserError: if the workdir or its checkpoints are missing.
    """
    if not os.path.isdir(workdir):
        raise errors.UserError(f"workdir {workdir!r} does not exist")
    steps = checkpoint.list_steps(workdir)
    if not steps:
        raise errors.UserError(
            f"no checkpoint in {checkpoint.checkpoint_dir(workdir)}: train a run with "
            f"'python -m mlres_jax.main --workdir={workdir} ...' first"
        )
    return steps


def resolve_checkpoints(workdirs: Sequence[str], steps: str) -> list[tuple[str, int]]:
    """``(workdir, step)`` pairs selected by a ``--steps`` value.

    Raises:
      errors.UserError: for a missing workdir or step, or a bad ``steps``.
    """
    pairs = []
    for workdir in workdirs:
        available = checkpoint_steps(workdir)
        if steps == "latest":
            chosen = available[-1:]
        elif steps == "all":
            chosen = available
        else:
            try:
                chosen = [int(s) for s in steps.split(",")]
            except ValueError:
                raise errors.UserError(
                    f"--steps={steps!r}: expected 'latest', 'all' or comma-separated step numbers"
                ) from None
            missing = [s for s in chosen if s not in available]
            if missing:
                raise errors.UserError(
                    f"no checkpoint of step(s) {missing} in {workdir}; steps: {available}"
                )
        pairs += [(workdir, step) for step in chosen]
    return pairs


class _Loader:
    """Loads checkpoints, and each data set's test split once."""

    def __init__(self, options: Options):
        self._options = options
        self._test_sets = {}

    def _test_set(self, metadata: checkpoint.CheckpointMetadata) -> tuple[np.ndarray, np.ndarray]:
        config = metadata.config
        name = metadata.dataset
        data_dir = self._options.data_dir or config.get("data_dir")
        fashion_mnist_dir = (
            self._options.fashion_mnist_dir
            or config.get("fashion_mnist_dir")
            or datasets.DEFAULT_FASHION_MNIST_DIR
        )
        key = (name, data_dir, fashion_mnist_dir)
        if key not in self._test_sets:
            if name not in datasets.DATASETS:
                raise errors.UserError(
                    f"the checkpoint's data set {name!r} is not one of {sorted(datasets.DATASETS)}"
                )
            data = datasets.load(name, data_dir=data_dir, fashion_mnist_dir=fashion_mnist_dir)
            images, labels = data.test_images, data.test_labels
            if self._options.num_examples > 0:
                images = images[: self._options.num_examples]
                labels = labels[: self._options.num_examples]
            self._test_sets[key] = (images, labels)
        return self._test_sets[key]

    def load(self, workdir: str, step: int) -> Loaded:
        model, variables, metadata = checkpoint.load_model(workdir, step)
        images, labels = self._test_set(metadata)
        batch_size = input_pipeline.fitted_eval_batch_size(
            self._options.batch_size or metadata.config.get("eval_batch_size") or 500, len(images)
        )
        logging.info("Loaded %s: %d test images", workdir, len(images))
        return Loaded(
            workdir, metadata.step, model, variables, metadata, images, labels, int(batch_size)
        )


def _only_one(pairs: list[tuple[str, int]], command: str) -> tuple[str, int]:
    if len(pairs) != 1:
        raise errors.UserError(
            f"{command} analyses one checkpoint, but --workdir/--steps select {len(pairs)}: {pairs}"
        )
    return pairs[0]


def _path(options: Options, name: str) -> str:
    return os.path.join(options.output_dir, name)


def _report(*paths: str) -> None:
    for path in paths:
        print(f"wrote {path}")


# ---------------------------------------------------------------------------
# The commands.


def run_norms(pairs: list[tuple[str, int]], options: Options) -> dict:
    """Fig. 4: per-block ||Y_j|| and ||G(Y_j)|| of one checkpoint."""
    loaded = _Loader(options).load(*_only_one(pairs, "norms"))
    norms = measurements.block_norms(
        loaded.model, loaded.variables, loaded.images, batch_size=loaded.batch_size
    )
    ratios = norms.ratio_summary()
    summary = {
        "workdir": loaded.workdir,
        "step": loaded.step,
        "stage_sizes": list(norms.stage_sizes),
        "step_size": norms.step_size,
        "num_examples": norms.num_examples,
        "gamma": norms.gamma,
        "G_over_input_first_blocks": ratios["first_blocks"],
        "G_over_input_other_blocks": ratios["other_blocks"],
    }
    paths = [_path(options, n) for n in ("norms.png", "norms.csv", "norms.json")]
    files.save_figure(
        figures.norms_figure(norms, f"Norms of the residual modules: {loaded.label}"), paths[0]
    )
    files.write_csv(paths[1], norms.records())
    files.write_json(paths[2], summary)
    others = ratios["other_blocks"]
    print(
        f"{loaded.label}: mean ||G(Y_j)|| / ||Y_j|| is "
        f"{ratios['first_blocks']:.4f} for the first block of each stage and "
        + (
            f"{others:.4f} for the other blocks"
            if others is not None
            else "there are no other blocks"
        )
        + f"; gamma = {norms.gamma:.4f}"
    )
    _report(*paths)
    return summary


def run_gamma(pairs: list[tuple[str, int]], options: Options) -> list[dict]:
    """Fig. 3: gamma = mean_j ||G(Y_j)|| against d, one point per checkpoint."""
    loader = _Loader(options)
    records = []
    for workdir, step in pairs:
        loaded = loader.load(workdir, step)
        norms = measurements.block_norms(
            loaded.model, loaded.variables, loaded.images, batch_size=loaded.batch_size
        )
        records.append(
            {
                "label": os.path.basename(os.path.normpath(workdir)),
                "workdir": workdir,
                "step": loaded.step,
                "stage_sizes": "-".join(map(str, norms.stage_sizes)),
                "num_blocks": norms.num_blocks,
                "step_size": norms.step_size,
                "gamma": norms.gamma,
                "mean_F_norm": float(np.mean(norms.F_norm)),
                "num_examples": norms.num_examples,
            }
        )
        print(f"{loaded.label}: d = {norms.num_blocks}, gamma = {norms.gamma:.4f}")
    paths = [_path(options, "gamma.png"), _path(options, "gamma.csv")]
    files.save_figure(figures.gamma_figure(records), paths[0])
    files.write_csv(paths[1], records)
    _report(*paths)
    return records


def _lesion_summary(baseline: float, removals: list[dict], shuffles: list[dict]) -> dict:
    def increases(pick):
        values = [r["test_error"] - baseline for r in removals if pick(r)]
        return (
            {"mean": float(np.mean(values)), "max": float(np.max(values)), "count": len(values)}
            if values
            else None
        )

    by_stage = {}
    for r in shuffles:
        by_stage.setdefault(r["stage"], []).append(r["test_error"] - baseline)
    return {
        "baseline_test_error": baseline,
        "error_increase_removing_downsampling_block": increases(lambda r: r["downsampling"]),
        "error_increase_removing_other_block": increases(lambda r: not r["downsampling"]),
        "error_increase_shuffling_stage": {
            str(stage): {"mean": float(np.mean(v)), "max": float(np.max(v)), "count": len(v)}
            for stage, v in sorted(by_stage.items())
        },
    }


def run_lesion(pairs: list[tuple[str, int]], options: Options) -> dict:
    """Sec. 3.3: test error with each block removed, and with shuffled stages."""
    loaded = _Loader(options).load(*_only_one(pairs, "lesion"))
    network_and_data = (loaded.model, loaded.variables, loaded.images, loaded.labels)
    batch_size = loaded.batch_size
    baseline = measurements.error_rate(*network_and_data, batch_size=batch_size)
    removals = measurements.removal_errors(*network_and_data, batch_size=batch_size)
    shuffles = measurements.shuffle_errors(
        *network_and_data,
        batch_size=batch_size,
        num_shuffles=options.num_shuffles,
        seed=options.seed,
    )
    summary = dict(
        _lesion_summary(baseline, removals, shuffles),
        workdir=loaded.workdir,
        step=loaded.step,
        stage_sizes=list(loaded.model.stage_sizes),
        num_examples=len(loaded.images),
    )
    paths = [
        _path(options, n)
        for n in ("lesion.png", "lesion_removals.csv", "lesion_shuffles.csv", "lesion.json")
    ]
    files.save_figure(
        figures.lesion_figure(removals, shuffles, baseline, f"Removing one block: {loaded.label}"),
        paths[0],
    )
    files.write_csv(paths[1], removals)
    files.write_csv(paths[2], shuffles)
    files.write_json(paths[3], summary)
    down = summary["error_increase_removing_downsampling_block"]
    other = summary["error_increase_removing_other_block"]
    print(
        f"{loaded.label}: test error {100 * baseline:.2f} %; removing a block "
        "raises it by (mean / max, percentage points)"
    )
    for name, value in (("downsampling blocks", down), ("other blocks", other)):
        if value:
            print(
                f"  {name:>20}: {100 * value['mean']:+.2f} / {100 * value['max']:+.2f}"
                f"  ({value['count']} blocks)"
            )
    for stage, value in summary["error_increase_shuffling_stage"].items():
        print(
            f"  {'shuffled stage ' + stage:>20}: {100 * value['mean']:+.2f} / "
            f"{100 * value['max']:+.2f}  ({value['count']} shuffles)"
        )
    _report(*paths)
    return summary


def run_step_size(pairs: list[tuple[str, int]], options: Options) -> list[dict]:
    """App. C: ||F(Y_j)|| against conceptual time t_j = j·h, per checkpoint."""
    loader = _Loader(options)
    curves, rows = [], []
    for workdir, step in pairs:
        loaded = loader.load(workdir, step)
        norms = measurements.block_norms(
            loaded.model, loaded.variables, loaded.images, batch_size=loaded.batch_size
        )
        curves.append((loaded.label, norms))
        rows += [dict(workdir=workdir, step=loaded.step, **row) for row in norms.records()]
        print(
            f"{loaded.label}: T = d·h = {norms.num_blocks * norms.step_size:g}, "
            f"mean ||F(Y_j)|| = {np.mean(norms.F_norm):.4f}"
        )
    paths = [_path(options, "step_size.png"), _path(options, "step_size.csv")]
    files.save_figure(figures.F_against_time_figure(curves), paths[0])
    files.write_csv(paths[1], rows)
    _report(*paths)
    return rows


def run_curves(workdirs: Sequence[str], options: Options) -> list[dict]:
    """Fig. 6: train and test error per epoch from ``summary.json``."""
    if len(workdirs) != 1:
        raise errors.UserError(f"curves takes one --workdir, got {len(workdirs)}")
    path = os.path.join(workdirs[0], "summary.json")
    summary = reporting.read_summary(path, whole=False)
    history, boundaries = summary["history"], summary["config"]["cycle_boundaries"]
    if not history:
        raise errors.UserError(f"{path} has no evaluations in 'history'")
    paths = [_path(options, "training_curves.png"), _path(options, "training_curves.csv")]
    figures.plot_training_curves(history, boundaries, paths[0])
    files.write_csv(paths[1], history)
    last = history[-1]
    print(
        f"{len(history)} evaluations; last at epoch {last['epoch']:g}: train error "
        f"{100 * last['train_error']:.2f} %, test error {100 * last['test_error']:.2f} %"
    )
    _report(*paths)
    return history


COMMANDS: dict[str, Callable] = {
    "norms": run_norms,
    "gamma": run_gamma,
    "lesion": run_lesion,
    "step-size": run_step_size,
}


def main(argv):
    if len(argv) != 2 or argv[1] not in (*COMMANDS, "curves"):
        raise errors.UserError(
            f"give one command of {', '.join([*COMMANDS, 'curves'])} before the flags, "
            f"e.g. 'python -m mlres_jax.analyze norms --workdir=RUN'; got {argv[1:]}"
        )
    command = argv[1]
    options = Options(
        output_dir=FLAGS.output_dir or os.path.join(FLAGS.workdir[0], "analysis"),
        num_examples=FLAGS.num_examples,
        batch_size=FLAGS.batch_size,
        num_shuffles=FLAGS.num_shuffles,
        seed=FLAGS.seed,
        fashion_mnist_dir=FLAGS.fashion_mnist_dir,
        data_dir=FLAGS.data_dir,
    )
    start = time.perf_counter()
    if command == "curves":
        run_curves(FLAGS.workdir, options)
    else:
        COMMANDS[command](resolve_checkpoints(FLAGS.workdir, FLAGS.steps), options)
    print(f"{command} took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    cli.run_command(main, define_flags, verbosity=logging.WARNING, takes_arguments=True)
