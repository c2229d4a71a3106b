"""AJPQ on ``resnet20`` / cifar10 (paper scale; see ``experiments/configs/paper.py``).

    python -m experiments.run --config experiments/configs/ajpq_resnet20_cifar10.py \\
        --config.data.data_dir=/path/to/tfds --workdir runs/ajpq_resnet20_cifar10
"""

import ml_collections

from experiments.configs.paper import ajpq_config


def get_config() -> ml_collections.ConfigDict:
    """The cifar10 recipe of ``paper.RECIPES`` around AJPQ."""
    return ajpq_config("resnet20", "cifar10")
