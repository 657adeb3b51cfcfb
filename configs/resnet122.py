"""ResNet-122 (fixed depth, 20-20-20 blocks, h = 1, learning rate restarted at epochs 60 and 110).

Paper Table 3. Run:

    python -m mlres_jax.main --config=configs/resnet122.py --workdir=runs/resnet122
    (add --config.dataset=cifar100 or --config.dataset=stl10 to switch data)
"""

from configs import default


def get_config():
    return default.paper_model(
        width=16, stage_sizes=(20, 20, 20), multilevel=False, scan_blocks=True
    )
