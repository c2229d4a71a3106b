"""GETA on ``MnistCNN``: 50 % of the prunable channels removed, weight/activation bits in [2, 4]
(first and last layer fixed at 8 bits), trained from scratch on real MNIST.

    python -m experiments.run --config experiments/configs/geta_mnist_cnn.py --workdir runs/geta
"""

import ml_collections

from experiments.configs import mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """The fp32 recipe (AdamW, warm-up + cosine, batch 128) for ~5 epochs, wrapped by GETA."""
    c = mnist_cnn.get_config()
    c.num_epochs = 0
    c.num_steps = 2000
    c.method = ml_collections.ConfigDict()
    c.method.name = "geta"  # fp32 geta djpq prune_then_quantize fit uniform_magnitude ajpq(_random)
    c.method.sparsity = 0.5  # fraction of prunable channels removed, met exactly
    c.method.bits = (2.0, 4.0)  # (b_l, b_u) of every learned quantizer
    c.method.quant_lr = 1e-3  # step size of the quantizer parameters
    c.method.bit_reduction = 2.0  # bits the projection stage may remove per period
    c.method.cost_power = 0.0  # > 0: saliency / relative unit MACs^p (prune costly units first)
    c.method.allocation = "global"  # or "per_group": the same fraction of every group
    c.method.schedule = (0.1, 0.1, 0.2)  # warm-up, projection, joint (fractions of the steps)
    c.method.cooldown_clips = False  # True: clips q_m keep training in cool-down (bits fixed)
    c.method.unit_multiple = 1  # kept widths a multiple of this (e.g. 8 for accelerator kernels)
    c.method.saliency_rule = "jaxjpq"  # or "reference": cos+1, L2-normalised scores
    c.method.joint_rule = "reference"  # d of a redundant group toward d(b_l); "plain": 1/(P-k)
    c.method.project_activations = True  # False: activation bits free until the cool-down
    c.method.pretrain_steps = 0  # > 0: start from a shared fp32 pre-training of this length
    c.method.pretrain_optim = ml_collections.ConfigDict(  # optim.* fields of the pre-training
        {"learning_rate": 2e-3, "warmup_steps": 200})
    c.method.pretrain_dir = ""  # default <workdir>/pretrain; share it across one seed's runs
    return c
