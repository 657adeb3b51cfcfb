"""Study preset ``cpu``: Fashion-MNIST, width 8, 2-2-2 -> 4-4-4 -> 8-8-8, 6 epochs, for a CPU.

The default of ``python -m benchmarks.study``. The model is that of
``configs/fashion_mnist.py`` (ResNet with 8 filters in the first stage). The
run is 6 epochs with the cycle boundaries at the paper's fractions of the run
(60/160 and 110/160 of 6 epochs = epochs 2.25 and 4.125), so the cycles are
2.25 / 1.875 / 1.875 epochs = 1350 / 1125 / 1125 steps at batch 100, and the
theoretical saving is the paper's: 1 - (2.25/4 + 1.875/2 + 1.875) / 6
= 1 - 0.5625 = 43.75 %. The three models train 6 epochs of 2-2-2, 6 of 8-8-8
and the multi-level run; how long the study takes on a 2-core CPU is in
docs/benchmarks.md.

    python -m benchmarks.study --output_dir=runs/bench/study
    python -m benchmarks.study --config=benchmarks/presets/cpu.py \
        --config.fashion_mnist_dir=FOLDER
"""

from configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.num_epochs = 6.0
    config.cycle_boundaries = (2.25, 4.125)
    return config
