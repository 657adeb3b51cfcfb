"""WResNet-122 (fixed depth, 20-20-20 blocks, h = 1, learning rate restarted at epochs 60 and 110).

Paper Table 4. Run:

    python -m mlres_jax.main --config=configs/wrn122.py --workdir=runs/wrn122
    (add --config.dataset=cifar100 or --config.dataset=stl10 to switch data)
"""

from configs import default


def get_config():
    config = default.get_config()
    config.width = 32
    config.stage_sizes = (20, 20, 20)
    config.multilevel = False
    # Scanned blocks at this depth: compile time flat in depth (why, and the
    # measurement behind this default: docs/paper-scale.md);
    # --config.scan_blocks=False for the unrolled layout.
    config.scan_blocks = True
    return config
