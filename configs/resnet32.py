"""ResNet-32 (fixed depth, 5-5-5 blocks, h = 1, learning rate restarted at epochs 60 and 110).

Paper Table 3. Run:

    python -m mlres_jax.main --config=configs/resnet32.py --workdir=runs/resnet32
    (add --config.dataset=cifar100 or --config.dataset=stl10 to switch data)
"""

from configs import default


def get_config():
    return default.paper_model(width=16, stage_sizes=(5, 5, 5), multilevel=False)
