"""Shared test fixtures: tiny datasets written in real TFDS array_record format under the real
names (cifar10, imagenet2012, glue/sst2), read back through the public loaders."""

from __future__ import annotations

import io
import os

import jax
import numpy as np
import pytest
from hypothesis import settings

# One persistent compilation cache for the session's workers and the subprocesses they start:
# the suite compiles the same small models' steps in many tests (the environment variables
# reach the subprocesses, the config updates this process).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                   ".pytest_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# CI runs every property test on the same derandomized examples (a failure reproduces exactly);
# locally hypothesis explores new ones each run.
settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE",
                                                                          "dev"))


def _encode(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _builder(name, version, rows, features, example, config=None, **info):
    """A TFDS ``GeneratorBasedBuilder`` class named ``name`` (TFDS derives the dataset name from
    it) writing ``rows[split]`` through ``example(i, split, row)``."""
    import types

    import tensorflow_datasets as tfds

    def body(ns):
        ns["VERSION"] = tfds.core.Version(version)
        if config:
            ns["BUILDER_CONFIGS"] = [tfds.core.BuilderConfig(name=config)]
        ns["_info"] = lambda self: tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features()), **info)
        ns["_split_generators"] = lambda self, dl_manager: {
            s: self._generate_examples(s) for s in rows}
        ns["_generate_examples"] = lambda self, split: (
            (i, example(i, split, row)) for i, row in enumerate(rows[split]))

    return types.new_class(name, (tfds.core.GeneratorBasedBuilder,),
                           {"skip_registration": True}, body)


def _fake_builders():
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    cifar = {s: [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), int(rng.integers(10)))
                 for _ in range(n)] for s, n in (("train", 12), ("test", 5))}
    imnet = {s: [(rng.integers(0, 256, (int(rng.integers(20, 48)), int(rng.integers(20, 48)), 3),
                               dtype=np.uint8), int(rng.integers(1000))) for _ in range(n)]
             for s, n in (("train", 6), ("validation", 4))}
    sst2 = {s: [(f"Sentence {i} is {'good' if i % 2 else 'bad'}!", i % 2) for i in range(n)]
            for s, n in (("train", 9), ("validation", 3))}

    f = tfds.features
    Cifar10 = _builder("Cifar10", "3.0.2", cifar, lambda: {
        "id": f.Text(), "image": f.Image(shape=(32, 32, 3)), "label": f.ClassLabel(num_classes=10),
    }, lambda i, split, row: {"id": f"{split}_{i}", "image": _encode(row[0], "PNG"),
                              "label": row[1]}, supervised_keys=("image", "label"))
    Imagenet2012 = _builder("Imagenet2012", "5.1.0", imnet, lambda: {
        "image": f.Image(encoding_format="jpeg"), "label": f.ClassLabel(num_classes=1000),
        "file_name": f.Text(),
    }, lambda i, split, row: {"image": _encode(row[0], "JPEG"), "label": row[1],
                              "file_name": f"{i}.JPEG"})
    Glue = _builder("Glue", "2.0.0", sst2, lambda: {
        "idx": f.Scalar(np.int32), "label": f.ClassLabel(num_classes=2), "sentence": f.Text(),
    }, lambda i, split, row: {"idx": i, "label": row[1], "sentence": row[0]}, config="sst2")
    return (Cifar10, Imagenet2012, Glue), (cifar, imnet, sst2)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    builders, raw = _fake_builders()
    for cls in builders:
        kwargs = {"config": "sst2"} if cls.__name__ == "Glue" else {}
        cls(data_dir=str(root), file_format="array_record", **kwargs).download_and_prepare()
    return root, raw


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop each module's compiled executables when it ends: a worker's memory then stays near
    one module's needs (two suites at once fit a 2-core, 24 GB machine)."""
    yield
    jax.clear_caches()
