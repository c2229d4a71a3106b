"""The FITCompress baseline on ``MnistCNN``: the same pre-training and fine-tune, every inner
layer at ``uniform_bits`` and global magnitude pruning (the first level of the same schedule
that meets the budget), at the same size budget.

    python -m experiments.run --config experiments/configs/uniform_mnist_cnn.py --workdir runs/um
"""

import ml_collections

from experiments.configs import fit_mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """FIT's config with the baseline in place of the search."""
    c = fit_mnist_cnn.get_config()
    c.method.name = "uniform_magnitude"
    return c
