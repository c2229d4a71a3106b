"""fp32 baseline: ``MnistCNN`` on real MNIST (50k train / 10k val / 10k test).

    python -m experiments.run --config experiments/configs/mnist_cnn.py --workdir runs/mnist_cnn
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """AdamW + warm-up/cosine, batch 128, 5 epochs."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "mnist_cnn"
    c.model.features = (32, 64)
    c.model.hidden = 128

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist"
    c.data.data_dir = ""  # tfds datasets only; MNIST uses the cache ($JAXJPQ_CACHE)
    c.data.cache_dir = ""
    c.data.train_limit = 0  # > 0: train on the first n examples only (smoke tests)
    c.data.eval_limit = 0  # > 0: evaluate on the first n examples of val/test only
    c.data.augment = False

    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 5
    c.num_steps = 0  # > 0 overrides num_epochs

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 1e-4
    c.optim.momentum = 0.9  # sgd only
    c.optim.grad_clip = 0.0  # > 0: clip by global norm

    c.checkpoint_every = 500
    c.log_every = 50
    c.progress = True
    c.data_parallel = False  # True: state replicated, batches split over every local device
    return c
