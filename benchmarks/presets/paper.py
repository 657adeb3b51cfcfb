"""Study preset ``paper``: ResNet-14 / ResNet-50 / ResNet-50-i on CIFAR-10 (paper Table 3).

The paper's settings of ``configs/resnet50i.py``: 160 epochs, cycles
restarting at epochs 60 and 110, 2-2-2 -> 4-4-4 -> 8-8-8 blocks with 16-32-64
filters, batch 100. The baselines are ResNet-14 (2-2-2) and ResNet-50 (8-8-8,
h = 1) with the same restarts. Theoretical saving 1 - 0.5625 = 43.75 %; the
paper measured 114 min (ResNet-50) against 67 min (ResNet-50-i) on a GTX 1080,
41 % saved.

Needs CIFAR-10 prepared as tensorflow-datasets ArrayRecord files (see
docs/paper-scale.md) and a GPU: on the paper's GTX 1080 the three runs would take about
3.5 hours (ResNet-50 114 min, ResNet-50-i 67 min, ResNet-14 about a quarter
of ResNet-50). Other data sets and models of Tables 3 and 4:

    python -m benchmarks.study --config=benchmarks/presets/paper.py \
        --models=first_cycle,last_cycle,multilevel/paper --seeds=0
    python -m benchmarks.study --config=benchmarks/presets/paper.py \
        --config.data_dir=/data/tfds --config.dataset=cifar100
    python -m benchmarks.study --config=configs/wrn122i.py --config.dataset=stl10
"""

from configs import resnet50i


def get_config():
    return resnet50i.get_config()
