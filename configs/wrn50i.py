"""WResNet-50-i (multi-level, 2-2-2 -> 4-4-4 -> 8-8-8 blocks, h 1 -> 0.5 -> 0.25).

Paper Table 4. Run:

    python -m mlres_jax.main --config=configs/wrn50i.py --workdir=runs/wrn50i
    (add --config.dataset=cifar100 or --config.dataset=stl10 to switch data)
"""

from configs import default


def get_config():
    return default.paper_model(width=32, stage_sizes=(2, 2, 2), multilevel=True)
