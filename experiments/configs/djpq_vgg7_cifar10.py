"""DJPQ on ``vgg7`` / cifar10 (paper scale; see ``experiments/configs/paper.py``).

    python -m experiments.run --config experiments/configs/djpq_vgg7_cifar10.py \\
        --config.data.data_dir=/path/to/tfds --workdir runs/djpq_vgg7_cifar10
"""

import ml_collections

from experiments.configs.paper import djpq_config


def get_config() -> ml_collections.ConfigDict:
    """The cifar10 recipe of ``paper.RECIPES`` around DJPQ
    (target in ``paper.DJPQ_TARGETS``)."""
    return djpq_config("vgg7", "cifar10")
