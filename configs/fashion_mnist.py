"""The multi-level method on Fashion-MNIST, sized for a 2-core CPU: the main job of `make run`.

ResNet with 8 filters in the first stage (half the paper's 16), three cycles
2-2-2 -> 4-4-4 -> 8-8-8 with h 1 -> 0.5 -> 0.25, the paper's schedule (cosine
from 0.5 to 0.001, restarted per cycle) and optimiser. The cycles are 4, 2
and 1 epochs: the cheap shallow model gets the most epochs, as in the paper's
60/50/50 split (theoretical cost 3/7 = 0.43 of the last-cycle model,
plan.theoretical_cost_ratio). Full train (60,000) and test (10,000) sets;
its measured times and errors are in docs/results.md.

    python -m mlres_jax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "fashion_mnist"
    config.width = 8
    config.stage_sizes = (2, 2, 2)
    config.multilevel = True
    config.num_epochs = 7.0
    config.cycle_boundaries = (4.0, 6.0)
    # One checkpoint per epoch (600 steps of batch 100).
    config.checkpoint_every_steps = 600
    config.batch_size = 100
    config.eval_every_epochs = 1.0
    return config
