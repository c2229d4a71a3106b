"""fp32 baseline: ``MnistCNN`` on real MNIST (50k train / 10k val / 10k test).

    python -m experiments.run --config experiments/configs/mnist_cnn.py --workdir runs/mnist_cnn
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """AdamW + warm-up/cosine, batch 128, 5 epochs."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # initialisation, data order and dropout keys

    c.model = ml_collections.ConfigDict()
    c.model.name = "mnist_cnn"  # a zoo name (jaxjpq.models.registry); other model.* fields go to it
    c.model.features = (32, 64)  # conv output channels
    c.model.hidden = 128  # hidden dense units

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist"  # mnist (embedded), fashion_mnist, cifar10, imagenet2012, sst2 (tfds)
    c.data.data_dir = ""  # tfds datasets only; MNIST uses the cache ($JAXJPQ_CACHE)
    c.data.cache_dir = ""  # MNIST cache directory (default $JAXJPQ_CACHE or ~/.cache/jaxjpq)
    c.data.train_limit = 0  # > 0: train on the first n examples only (smoke tests)
    c.data.eval_limit = 0  # > 0: evaluate on the first n examples of val/test only
    c.data.augment = False  # random crop + flip (cifar10)

    c.batch_size = 128  # training examples per step
    c.eval_batch_size = 1000  # examples per evaluation step
    c.deploy_rounds = 10  # rounds timing the deployed model against the dense one (0: untimed)
    c.num_epochs = 5  # passes over the training split
    c.num_steps = 0  # > 0 overrides num_epochs

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw, adam or sgd; warm-up then cosine decay
    c.optim.learning_rate = 2e-3  # peak learning rate
    c.optim.warmup_steps = 200  # linear warm-up steps
    c.optim.weight_decay = 1e-4  # adamw only
    c.optim.momentum = 0.9  # sgd only
    c.optim.grad_clip = 0.0  # > 0: clip by global norm

    c.checkpoint_every = 500  # steps between orbax checkpoints (0: at the end only)
    c.log_every = 50  # steps per progress-bar update of the metrics
    c.progress = True  # tqdm progress bars
    c.data_parallel = False  # True: state replicated, batches split over every local device
    c.distributed = False  # True: multi-host (jax.distributed.initialize; each host its rows)
    return c
