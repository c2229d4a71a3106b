"""Paper-scale GETA and DJPQ configs (full runs on a GPU/TPU; a few steps on tiny inputs here).

Each ``geta_<model>_<dataset>.py`` config calls :func:`geta_config`, each
``djpq_<model>_<dataset>.py`` :func:`djpq_config`. The dataset must be prepared
under ``--config.data.data_dir`` (TFDS array_record format; nothing is downloaded).
"""

import ml_collections

from experiments.configs import geta_mnist_cnn

# (dataset, model) -> recipe: epochs, batch, optimizer, learning rate, weight decay, sparsity, bits
RECIPES = {
    "cifar10": dict(num_epochs=200, batch_size=128, optim="sgd", learning_rate=0.1,
                    weight_decay=5e-4, warmup_steps=500, sparsity=0.5, bits=(2.0, 8.0)),
    "imagenet2012": dict(num_epochs=90, batch_size=256, optim="sgd", learning_rate=0.1,
                         weight_decay=1e-4, warmup_steps=2500, sparsity=0.4, bits=(4.0, 8.0)),
    "sst2": dict(num_epochs=10, batch_size=32, optim="adamw", learning_rate=1e-4,
                 weight_decay=1e-2, warmup_steps=500, sparsity=0.3, bits=(4.0, 8.0)),
}


def geta_config(model: str, dataset: str) -> ml_collections.ConfigDict:
    """GETA on ``model`` (a zoo name) trained on ``dataset`` with the recipe in ``RECIPES``."""
    r = RECIPES[dataset]
    c = geta_mnist_cnn.get_config()
    c.model = ml_collections.ConfigDict({"name": model})
    c.data.name = dataset
    c.data.data_dir = ""  # required: where the TFDS dataset is prepared
    c.data.augment = dataset == "cifar10"
    if dataset == "imagenet2012":
        c.data.image_size = 224  # side of the square crops, pixels
    if dataset == "sst2":
        c.data.max_len = 64  # tokens per sentence (padded / truncated)
    c.num_steps = 0
    c.num_epochs = r["num_epochs"]
    c.batch_size = r["batch_size"]
    c.eval_batch_size = 500
    c.optim.name = r["optim"]
    c.optim.learning_rate = r["learning_rate"]
    c.optim.weight_decay = r["weight_decay"]
    c.optim.warmup_steps = r["warmup_steps"]
    c.method.sparsity = r["sparsity"]
    c.method.bits = r["bits"]
    return c


# dataset -> DJPQ relative-BOPs target (the paper's ResNet-18 / ImageNet point is ~53x fewer BOPs
# than fp32, i.e. ~1.9 %) and bit range.
DJPQ_TARGETS = {
    "cifar10": dict(target_bops=0.01, bits=(2.0, 8.0)),
    "imagenet2012": dict(target_bops=0.02, bits=(2.0, 8.0)),
}


def djpq_config(model: str, dataset: str) -> ml_collections.ConfigDict:
    """DJPQ on ``model`` with the ``dataset`` recipe of ``RECIPES`` and target of
    ``DJPQ_TARGETS``; the method fields are those of ``djpq_mnist_cnn``."""
    from experiments.configs import djpq_mnist_cnn

    c = geta_config(model, dataset)
    c.method = djpq_mnist_cnn.get_config().method
    c.method.target_bops = DJPQ_TARGETS[dataset]["target_bops"]
    c.method.bits = DJPQ_TARGETS[dataset]["bits"]
    return c


# dataset -> FITCompress budget (size: exported model / fp32 model; bops: relative BOPs) and
# fine-tune fraction. BERT's float embedding tables (gathers, not quantization sites) are ~90 % of
# its bytes, so its budget is in BOPs.
FIT_TARGETS = {
    "cifar10": dict(size=0.1, bits=(2.0, 8.0), finetune=0.3),
    "imagenet2012": dict(size=0.15, bits=(2.0, 8.0), finetune=0.3),
    "sst2": dict(bops=0.03, bits=(4.0, 8.0), finetune=0.3),
}


def fit_config(model: str, dataset: str) -> ml_collections.ConfigDict:
    """FITCompress on ``model``: pre-training with the ``dataset`` recipe of ``RECIPES``
    (its full step count), the search to the ``FIT_TARGETS`` budget, then the fine-tune
    (``finetune`` × the recipe's epochs, at a tenth of its learning rate)."""
    from experiments.configs import fit_mnist_cnn

    c = geta_config(model, dataset)
    t = FIT_TARGETS[dataset]
    r = RECIPES[dataset]
    method = fit_mnist_cnn.get_config().method
    method.size = t.get("size", 0.0)
    method.bops = t.get("bops", 0.0)
    method.bits = t["bits"]
    method.pretrain_steps = 0  # 0: the recipe's epochs (set from the data at run time)
    method.pretrain_epochs = r["num_epochs"]
    method.pretrain_optim = ml_collections.ConfigDict(
        {"learning_rate": r["learning_rate"], "warmup_steps": r["warmup_steps"]})
    c.method = method
    c.num_epochs = max(1, round(r["num_epochs"] * t["finetune"]))
    c.optim.learning_rate = r["learning_rate"] / 10
    c.optim.warmup_steps = 0
    return c


AJPQ_TARGETS = {  # budgets of the AJPQ configs (fractions of fp32; size = bytes of the export)
    "cifar10": dict(size=0.1, bits=(2.0, 8.0), finetune=0.3, episodes=60),
}


def ajpq_config(model: str, dataset: str) -> ml_collections.ConfigDict:
    """AJPQ on ``model``: pre-training with the ``dataset`` recipe of ``RECIPES``, the agent's
    search to the ``AJPQ_TARGETS`` budget, then the fine-tune (as :func:`fit_config`)."""
    from experiments.configs import ajpq_mnist_cnn

    c = fit_config(model, dataset)
    t = AJPQ_TARGETS[dataset]
    method = ajpq_mnist_cnn.get_config().method
    for k in ("pretrain_steps", "pretrain_epochs", "pretrain_optim"):
        method[k] = c.method[k]
    method.size = t.get("size", 0.0)
    method.bops = t.get("bops", 0.0)
    method.bits = t["bits"]
    method.episodes = t["episodes"]
    c.method = method
    return c
