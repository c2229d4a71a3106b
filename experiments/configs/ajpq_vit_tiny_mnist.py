"""AJPQ on ViT-tiny (MNIST-sized: 28x28, patch 7): fp32 pre-training (FIT's ViT recipe), the
agent's search of per-layer weight bits and pruned output channels over the 24 inner layers of
the transformer's 26 (the first and last at 8 bits) to a size budget, then the fine-tune of the
best policy.

    python -m experiments.run --config experiments/configs/ajpq_vit_tiny_mnist.py \\
        --workdir runs/ajpq_vit
    python -m experiments.run --config experiments/configs/ajpq_vit_tiny_mnist.py \\
        --config.method.name=ajpq_random --workdir runs/ajpq_vit_random   # the same evaluations
"""

import ml_collections

from experiments.configs import ajpq_mnist_cnn, fit_vit_tiny_mnist


def get_config() -> ml_collections.ConfigDict:
    """The MNIST AJPQ recipe on ``vit_tiny_mnist`` with the transformer's learning rates."""
    c = fit_vit_tiny_mnist.on_vit(ajpq_mnist_cnn.get_config())
    c.method.size = 0.1
    return c
