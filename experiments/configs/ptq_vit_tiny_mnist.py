"""Prune-then-quantize baseline on ViT-tiny (MNIST), the recipe of ``geta_vit_tiny_mnist``:
magnitude pruning of 30 % of the prunable units at 20 % of the steps, uniform 4-bit weights and
activations (first and last layer 8 bits) with QAT from 30 %.

    python -m experiments.run --config experiments/configs/ptq_vit_tiny_mnist.py \\
        --workdir runs/ptq_vit
"""

import ml_collections

from experiments.configs import geta_vit_tiny_mnist, ptq_mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """The GETA ViT config's model and optimizer with the staged baseline as the method."""
    c = geta_vit_tiny_mnist.get_config()
    c.method = ptq_mnist_cnn.get_config().method
    c.method.sparsity = 0.3
    c.method.pretrain_optim.learning_rate = 1e-3
    return c
