"""Shared test fixtures: tiny datasets written in real TFDS array_record format under the real
names (cifar10, imagenet2012, glue/sst2), read back through the public loaders."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from hypothesis import settings

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

    class Cifar10(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("3.0.2")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "id": tfds.features.Text(),
                    "image": tfds.features.Image(shape=(32, 32, 3)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in cifar}

        def _generate_examples(self, split):
            for i, (img, label) in enumerate(cifar[split]):
                yield i, {"id": f"{split}_{i}", "image": _encode(img, "PNG"), "label": label}

    class Imagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("5.1.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=1000),
                    "file_name": tfds.features.Text(),
                }),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in imnet}

        def _generate_examples(self, split):
            for i, (img, label) in enumerate(imnet[split]):
                yield i, {"image": _encode(img, "JPEG"), "label": label,
                          "file_name": f"{i}.JPEG"}

    class Glue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("2.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="sst2")]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "idx": tfds.features.Scalar(np.int32),
                    "label": tfds.features.ClassLabel(num_classes=2),
                    "sentence": tfds.features.Text(),
                }),
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in sst2}

        def _generate_examples(self, split):
            for i, (text, label) in enumerate(sst2[split]):
                yield i, {"idx": i, "label": label, "sentence": text}

    return (Cifar10, Imagenet2012, Glue), (cifar, imnet, sst2)


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    builders, raw = _fake_builders()
    for cls in builders:
        kwargs = {"config": "sst2"} if cls.__name__ == "Glue" else {}
        cls(data_dir=str(root), file_format="array_record", **kwargs).download_and_prepare()
    return root, raw
