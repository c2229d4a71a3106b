"""GETA on ViT-tiny (MNIST-sized: 28x28, patch 7): attention heads and MLP units pruned
(30 % of the prunable units), weights/activations at [4, 8] bits.

    python -m experiments.run --config experiments/configs/geta_vit_tiny_mnist.py \\
        --workdir runs/geta_vit
"""

import ml_collections

from experiments.configs import geta_mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """The MNIST GETA recipe on ``vit_tiny_mnist``, lower learning rate for the transformer."""
    c = geta_mnist_cnn.get_config()
    c.model = ml_collections.ConfigDict({"name": "vit_tiny_mnist"})
    c.optim.learning_rate = 1e-3
    c.method.pretrain_optim.learning_rate = 1e-3
    c.method.sparsity = 0.3
    c.method.bits = (4.0, 8.0)
    return c
