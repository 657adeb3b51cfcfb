"""ResNet-122-i (multi-level, 5-5-5 -> 10-10-10 -> 20-20-20 blocks, h 1 -> 0.5 -> 0.25).

Paper Table 3. Run:

    python -m mlres_jax.main --config=configs/resnet122i.py --workdir=runs/resnet122i
    (add --config.dataset=cifar100 or --config.dataset=stl10 to switch data)
"""

from configs import default


def get_config():
    return default.paper_model(width=16, stage_sizes=(5, 5, 5), multilevel=True, scan_blocks=True)
