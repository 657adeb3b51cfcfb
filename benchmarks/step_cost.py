r"""Where a train step's time goes: the part that does not shrink with depth.

A step of the multi-level method costs a fixed part plus a part per block;
the saving of the shallow cycles comes only from the second. This benchmark
times the real train step (`steps.make_train_step`) and variants of it with
one piece taken away, at every depth of a multi-level run, and fits
``time = fixed + per_block * blocks`` to each: the drop in ``fixed`` from one
variant to the next is that piece's fixed cost. It is a differential profile:
each number is a measured difference of whole compiled steps, not a guess.

Variants, each the previous one less one piece:

* ``train step``: the step training runs (gather, augmentation, forward,
  backward, SGD update with weight decay, non-finite guard, metric sums);
* ``no guard``: the update applied without the non-finite check (`lax.cond`)
  and without the running metric sums;
* ``no augmentation``: images only standardised, no crop or flip;
* ``no update``: the gradients computed, the parameters left as they are;
* ``forward only``: the loss, no gradients;
* ``gather only``: the batch gathered from the training set, nothing else:
  dispatch, argument handling and buffer donation.

Beside them it times the host's share of the training loop: putting each
step's batch indices on the device (`parallel.shard_batch`) and the loop
around the step, against the step alone.

Writes ``step_cost.json`` and ``step_cost.md`` to ``--output_dir``::

    python -m benchmarks.step_cost                  # width 8, 28x28x1, batch 100
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from benchmarks import common
from mlres_jax import cli, datasets, files, input_pipeline, models, parallel, steps

FLAGS = flags.FLAGS
VARIANTS = ("train step", "no guard", "no augmentation", "no update", "forward only",
            "gather only")


def _variant_step(name: str, model, optimizer, crop_padding: int):
    """A jitted step ``(state, images, labels, indices, rng) -> state`` for ``name``."""
    if name == "train step":
        full = steps.make_train_step(model, optimizer, crop_padding)
        return lambda *args: full(*args)[0]

    def step(state, train_images, train_labels, batch_indices, base_rng):
        images = train_images[batch_indices]
        labels = train_labels[batch_indices]
        if name == "gather only":
            return state.replace(step=state.step + jnp.sum(images[:, 0, 0, 0]).astype(jnp.int32)
                                 + jnp.sum(labels))
        rng = jax.random.fold_in(base_rng, state.step)
        images = (input_pipeline.preprocess_for_train(rng, images, crop_padding)
                  if name in ("no guard",) else input_pipeline.preprocess_for_eval(images))

        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                          images, train=True, mutable=["batch_stats"])
            return steps.cross_entropy_loss(logits, labels).mean(), updates

        if name == "forward only":
            loss, updates = loss_fn(state.params)
            return state.replace(batch_stats=updates["batch_stats"],
                                 step=state.step + (loss > 0).astype(jnp.int32))
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if name == "no update":
            total = sum(jnp.sum(g) for g in jax.tree_util.tree_leaves(grads))
            return state.replace(batch_stats=updates["batch_stats"],
                                 step=state.step + (total + loss > 0).astype(jnp.int32))
        param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, batch_stats=updates["batch_stats"],
                             params=optax.apply_updates(state.params, param_updates),
                             opt_state=opt_state)

    return jax.jit(step, donate_argnums=0)


def _median_seconds(call, count: int, warmup: int) -> float:
    """Median wall seconds of ``count`` calls ``call(i)`` after ``warmup``, each waited for."""
    common.time_calls(call, warmup)
    return float(np.median(common.time_calls(call, count)))


def measure_depth(stage_sizes, settings: dict) -> dict:
    """Median step seconds of every variant, and of the host loop, at one depth."""
    model = models.ResNet(stage_sizes, width=settings["width"], num_classes=10)
    optimizer = common.default_optimizer()
    rng = np.random.default_rng(0)
    count = 8 * settings["batch_size"]
    images, labels = map(jnp.asarray, common.synthetic_images(
        rng, count, settings["image_shape"], 10))
    batches = [rng.permutation(count)[:settings["batch_size"]].astype(np.int32)
               for _ in range(8)]
    device_batches = [jnp.asarray(b) for b in batches]
    key = jax.random.PRNGKey(1)
    result = {}
    for name in VARIANTS:
        step = _variant_step(name, model, optimizer, settings["crop_padding"])
        holder = {"state": steps.create_train_state(jax.random.PRNGKey(0), model, optimizer,
                                                    settings["image_shape"]), "i": 0}

        def call(_, step=step, holder=holder):
            holder["i"] += 1
            holder["state"] = step(holder["state"], images, labels,
                                   device_batches[holder["i"] % 8], key)
            return holder["state"]

        result[name] = _median_seconds(call, settings["steps"], settings["warmup"])
    # The host's share: indices put on the device each step, as training does.
    mesh = parallel.make_mesh(1)
    full = steps.make_train_step(model, optimizer, settings["crop_padding"], mesh)
    holder = {"state": parallel.put_replicated(steps.create_train_state(
        jax.random.PRNGKey(0), model, optimizer, settings["image_shape"]), mesh), "i": 0}
    data = parallel.put_replicated((np.asarray(images), np.asarray(labels)), mesh)
    key = parallel.put_replicated(key, mesh)

    def host_call(_):
        holder["i"] += 1
        holder["state"], _ = full(holder["state"], *data,
                                  parallel.shard_batch(batches[holder["i"] % 8], mesh), key)
        return holder["state"]

    result["train step, indices from the host"] = _median_seconds(
        host_call, settings["steps"], settings["warmup"])
    return result


def fit(blocks, seconds) -> dict:
    """Least-squares ``seconds = fixed + per_block * blocks``."""
    per_block, fixed = np.polyfit(np.asarray(blocks, float), np.asarray(seconds, float), 1)
    return {"fixed": float(fixed), "per_block": float(per_block)}


def report_markdown(report: dict) -> str:
    """``step_cost.md``: per variant the step time at each depth and the fit."""
    depths = report["depths"]
    names = list(report["seconds"][0])
    headers = ["variant", *[f"{models.format_stage_sizes(d)} (ms)" for d in depths],
               "fixed (ms)", "per block (ms)", "fixed, share of the 2-2-2 step"]
    body = []
    first = report["seconds"][0]["train step"]
    for name in names:
        times = [s[name] for s in report["seconds"]]
        f = report["fits"][name]
        body.append([name, *[f"{1e3 * t:.1f}" for t in times], f"{1e3 * f['fixed']:.1f}",
                     f"{1e3 * f['per_block']:.2f}", f"{100 * f['fixed'] / first:.0f} %"])
    s = report["settings"]
    return "\n".join([
        f"# Train-step cost by piece: width {s['width']}, images "
        f"{'x'.join(map(str, s['image_shape']))}, batch {s['batch_size']}",
        "", common.markdown_table(headers, body), "",
        f"- Median of {s['steps']} steps after {s['warmup']}; blocks = all blocks of the "
        "network; fixed and per block from a least-squares line through the depths.",
        f"- Machine: {common.machine_line(report['machine'])}.", ""])


def define_flags() -> None:
    """Defines the command-line flags (called only when run as a program)."""
    flags.DEFINE_integer("width", 8, "First-stage filters.")
    flags.DEFINE_string("dataset", "fashion_mnist", "Image shape and crop padding of this "
                        "data set.")
    flags.DEFINE_integer("batch_size", 100, "Training mini-batch (images).")
    flags.DEFINE_integer("steps", 20, "Timed steps per variant and depth.")
    flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
    flags.DEFINE_string("output_dir", "runs/bench/step_cost", "Folder for the outputs.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    info = datasets.DATASETS[FLAGS.dataset]
    settings = {"width": FLAGS.width, "image_shape": tuple(info.image_shape),
                "crop_padding": info.padding, "batch_size": FLAGS.batch_size,
                "steps": FLAGS.steps, "warmup": FLAGS.warmup}
    depths = [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    machine = common.machine_info()
    seconds = []
    for depth in depths:
        logging.info("Measuring %s", models.format_stage_sizes(depth))
        seconds.append(measure_depth(depth, settings))
    fits = {name: fit([sum(d) for d in depths], [s[name] for s in seconds])
            for name in seconds[0]}
    report = {"benchmark": "step_cost", "machine": machine, "settings": settings,
              "depths": depths, "seconds": seconds, "fits": fits}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    files.write_json(os.path.join(FLAGS.output_dir, "step_cost.json"), report)
    text = report_markdown(report)
    files.write_text(os.path.join(FLAGS.output_dir, "step_cost.md"), text)
    print(text, flush=True)


if __name__ == "__main__":
    cli.run_command(main, define_flags)
