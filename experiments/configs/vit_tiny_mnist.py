"""fp32 baseline: ViT-tiny (28x28, patch 7) with the MNIST recipe and the transformer's
learning rate.

    python -m experiments.run --config experiments/configs/vit_tiny_mnist.py --workdir runs/vit_fp32
"""

import ml_collections

from experiments.configs import mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """``mnist_cnn``'s recipe on ``vit_tiny_mnist``, peak learning rate 1e-3."""
    c = mnist_cnn.get_config()
    c.model = ml_collections.ConfigDict({"name": "vit_tiny_mnist"})
    c.optim.learning_rate = 1e-3
    return c
