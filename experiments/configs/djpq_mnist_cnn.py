"""DJPQ on ``MnistCNN``: VIB channel gates + learned bits in [2, 8] (first and last layer fixed at
8 bits) under a relative-BOPs target, trained from scratch on real MNIST with the GETA config's
recipe and step count.

    python -m experiments.run --config experiments/configs/djpq_mnist_cnn.py --workdir runs/djpq
    # other targets / the power-of-two variant:
    ... --config.method.target_bops=0.005 --config.method.power_of_two=True
"""

import ml_collections

from experiments.configs import geta_mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """1 % relative BOPs target, continuous bits in [2, 8]."""
    c = geta_mnist_cnn.get_config()
    c.method = ml_collections.ConfigDict()
    c.method.name = "djpq"
    c.method.target_bops = 0.01  # relative to fp32, met exactly after rounding and thresholding
    c.method.bits = (2.0, 8.0)  # (b_l, b_u) of every learned quantizer
    c.method.power_of_two = False  # True: bits in {2, 4, 8}
    c.method.init_bits = 8.0  # bits of the initial steps
    c.method.gamma1 = 1e-3  # weight of the summed KL of the gates
    c.method.gamma2 = 1.0  # initial weight of the relative soft BOPs, adapted during the search
    c.method.gamma2_rate = 0.01  # log-space step of gamma2 per update
    c.method.margin = 0.1  # the search aims at (1 - margin) * target
    c.method.quant_lr = 1e-2  # Adam on log d, log q_m, gate mu and log sigma^2
    c.method.init_log_sigma2 = -4.0  # initial log variance of the VIB gates
    c.method.gate_at = "weights"  # gates scale the weights before Q ("output": the paper's)
    c.method.pretrain_steps = 0  # > 0: start from a shared fp32 pre-training of this length
    c.method.pretrain_optim = ml_collections.ConfigDict(  # optim.* fields of the pre-training
        {"learning_rate": 2e-3, "warmup_steps": 200})
    c.method.pretrain_dir = ""  # default <workdir>/pretrain; share it across one seed's runs
    return c
