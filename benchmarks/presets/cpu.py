"""Compare preset ``cpu``: Fashion-MNIST, width 8, 2-2-2 -> 4-4-4 -> 8-8-8, ~40 min on 2 cores.

The default of ``python -m benchmarks.compare``. The model is that of
``configs/fashion_mnist.py`` (ResNet with 8 filters in the first stage). The
run is 6 epochs with the cycle boundaries at the paper's fractions of the run
(60/160 and 110/160 of 6 epochs = epochs 2.25 and 4.125), so the cycles are
2.25 / 1.875 / 1.875 epochs = 1350 / 1125 / 1125 steps at batch 100, and the
theoretical saving is the paper's: 1 - (2.25/4 + 1.875/2 + 1.875) / 6
= 1 - 0.5625 = 43.75 %.

Time budget (measured on this 2-core machine, batch 100, 28x28, per epoch of
60,000 images including the evaluation on 10,000): about 55 s at 2-2-2,
100 s at 4-4-4 and 220 s at 8-8-8. The three runs:

    first-cycle model, 2-2-2 for 6 epochs:      6 x 55               =  330 s
    last-cycle model, 8-8-8 for 6 epochs:       6 x 220              = 1320 s
    multi-level, 2.25 + 1.875 + 1.875 epochs:   124 + 188 + 413      =  724 s
                                                                  total 2374 s

about 40 minutes, plus 5 compilations of each step (about 3-30 s each) and
three data loads: 40-45 minutes when nothing else runs on the machine. At the
high end of the per-epoch costs (60 / 110 / 230 s) the total is 2512 s = 42 min.

    python -m benchmarks.compare --output_dir=runs/bench/compare
    python -m benchmarks.compare --config=benchmarks/presets/cpu.py \
        --config.fashion_mnist_dir=FOLDER
"""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.num_epochs = 6.0
    config.cycle_boundaries = (2.25, 4.125)
    return config
