"""FITCompress on ViT-tiny (MNIST-sized: 28x28, patch 7): fp32 pre-training, Fisher, the FIT
search of per-layer bits in [2, 8] and a global unstructured mask to 15 % of the fp32 model's
bytes, then the fine-tune.

    python -m experiments.run --config experiments/configs/fit_vit_tiny_mnist.py \\
        --workdir runs/fit_vit
"""

import ml_collections

from experiments.configs import fit_mnist_cnn


def on_vit(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An MNIST search-then-fine-tune recipe moved to ``vit_tiny_mnist``: the transformer's
    pre-training and fine-tune learning rates."""
    c.model = ml_collections.ConfigDict({"name": "vit_tiny_mnist"})
    c.method.pretrain_optim.learning_rate = 1e-3
    c.optim.learning_rate = 2e-4
    return c


def get_config() -> ml_collections.ConfigDict:
    """The MNIST FIT recipe on ``vit_tiny_mnist``, the transformer's learning rate."""
    c = on_vit(fit_mnist_cnn.get_config())
    c.method.size = 0.15
    return c
