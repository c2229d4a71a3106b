"""FITCompress on ``MnistCNN``: fp32 pre-training, empirical Fisher from per-sample gradients,
best-first FIT search of per-layer weight bits in [2, 8] and a global unstructured mask to a
size budget (the saved export at 10 % of the fp32 model's bytes), then quantization-aware
fine-tuning at the chosen bits and mask. First and last layer at 8 bits; activations at 8 bits.

    python -m experiments.run --config experiments/configs/fit_mnist_cnn.py --workdir runs/fit
    python -m experiments.run --config experiments/configs/fit_mnist_cnn.py \\
        --config.method.size=0.05 --config.method.pretrain_dir=runs/pretrain_s0 --workdir runs/fit_5
"""

import ml_collections

from experiments.configs import mnist_cnn


def get_config() -> ml_collections.ConfigDict:
    """The fp32 recipe for pre-training (2000 steps) and the fine-tune (500 steps)."""
    c = mnist_cnn.get_config()
    c.num_epochs = 0
    c.num_steps = 500  # fine-tune steps (qat at the searched bits and mask)
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 50
    c.method = ml_collections.ConfigDict()
    c.method.name = "fit"
    c.method.pretrain_steps = 2000  # 0: pretrain_epochs epochs
    c.method.pretrain_epochs = 0  # fp32 pre-training epochs when pretrain_steps = 0
    c.method.pretrain_optim = ml_collections.ConfigDict(  # optim.* fields of the pre-training
        {"learning_rate": 2e-3, "warmup_steps": 200})  # (the fp32 recipe's)
    c.method.pretrain_dir = ""  # default <workdir>/pretrain; share it across one seed's runs
    c.method.size = 0.1  # budget: bytes of the saved export directory / fp32 model bytes
    c.method.bops = 0.0  # or a BOPs budget (cost.relative_bops) with size = 0
    c.method.bits = (2.0, 8.0)  # options: integers from b_u down to b_l (reference code: 3, 2)
    c.method.act_bits = 0.0  # bits of the learned activation quantizers (0: b_u)
    c.method.size_metric = "export"  # size = saved export / fp32; "active": nnz·bits / fp32
    c.method.levels = 40  # global sparsity levels 1 - logspace(0, -3, levels)
    c.method.criterion = "fit"  # path: edge+heuristic; "rate": edge/size; "least_fit": least FIT
    c.method.fisher_samples = 16384  # training samples of the empirical Fisher
    c.method.fisher_reduce = "diag"  # F elementwise; "layer_mean": each layer's mean (Tr(F)/n)
    c.method.refisher_every = 0  # > 0: the Fisher estimated again every this many path moves,
    c.method.refisher_samples = 4096  # on this many samples, at the compressed model
    c.method.chunk = 128  # samples per call of the Fisher pass
    c.method.quant_lr = 1e-3  # fine-tune step of the clips
    c.method.uniform_bits = 4.0  # used by the uniform_magnitude baseline only
    return c
