"""Prune-then-quantize baseline on ``MnistCNN``, same budget and step count as
``geta_mnist_cnn``: fp32 training, magnitude channel pruning (50 %) at 20 % of the steps,
fine-tuning, uniform 4-bit weights and activations (first/last layer 8 bits) with QAT from 30 %.

The early QAT start is the stronger baseline: at 2 bits it beat pruning at 40 % / QAT from 70 %
by 0.37 points (sparsity 0.5) and 0.93 points (0.75), 3 seeds each (experiments/RESULTS.md).

    python -m experiments.run --config experiments/configs/ptq_mnist_cnn.py --workdir runs/ptq

``--config.method.sparsity=0`` gives quantize-only, ``--config.method.quantize_at=1`` prune-only.
"""

import ml_collections

from experiments.configs import geta_mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """The GETA config's recipe with the staged baseline in place of GETA."""
    c = geta_mnist_cnn.get_config()
    c.method = ml_collections.ConfigDict()
    c.method.name = "prune_then_quantize"
    c.method.sparsity = 0.5  # fraction of prunable channels removed, met exactly
    c.method.bits = 4.0  # uniform bits from quantize_at on (GETA's mean learned bits)
    c.method.prune_at = 0.2  # fraction of the steps
    c.method.quantize_at = 0.3  # fraction of the steps at which QAT starts
    c.method.pretrain_steps = 0  # > 0: start from a shared fp32 pre-training of this length
    c.method.pretrain_optim = ml_collections.ConfigDict(  # optim.* fields of the pre-training
        {"learning_rate": 2e-3, "warmup_steps": 200})
    c.method.pretrain_dir = ""  # default <workdir>/pretrain; share it across one seed's runs
    return c
