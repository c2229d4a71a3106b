"""The FITCompress baseline on ViT-tiny: FIT's ViT recipe with every inner layer at
``uniform_bits`` and global magnitude pruning in place of the search.

    python -m experiments.run --config experiments/configs/uniform_vit_tiny_mnist.py \\
        --workdir runs/um_vit
"""

import ml_collections

from experiments.configs import fit_vit_tiny_mnist


def get_config() -> ml_collections.ConfigDict:
    """FIT's ViT config with the baseline in place of the search."""
    c = fit_vit_tiny_mnist.get_config()
    c.method.name = "uniform_magnitude"
    return c
