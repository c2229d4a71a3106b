"""DJPQ on ViT-tiny (MNIST-sized: 28x28, patch 7): VIB gates on attention heads and MLP units,
learned bits in [2, 8] under a relative-BOPs target.

    python -m experiments.run --config experiments/configs/djpq_vit_tiny_mnist.py \\
        --workdir runs/djpq_vit
"""

import ml_collections

from experiments.configs import djpq_mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """The MNIST DJPQ recipe on ``vit_tiny_mnist``, lower learning rate for the transformer."""
    c = djpq_mnist_cnn.get_config()
    c.model = ml_collections.ConfigDict({"name": "vit_tiny_mnist"})
    c.optim.learning_rate = 1e-3
    c.method.pretrain_optim.learning_rate = 1e-3
    c.method.target_bops = 0.02  # relative to fp32
    return c
