"""Prepared TFDS datasets (array_record format) read from a user ``data_dir`` without
TensorFlow and without downloading: CIFAR-10, ImageNet."""


from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxjpq.data.sources import ArraySource, Batch

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _version_key(p: Path) -> tuple[int, ...]:
    return tuple(int(v) for v in p.name.split("."))


def tfds_dataset_dir(name: str, data_dir: str | os.PathLike) -> Path:
    """Directory of the newest prepared version of TFDS dataset ``name`` (e.g. ``glue/sst2``).

    Raises ``FileNotFoundError`` naming the directory and the dataset when it is not prepared.
    """
    if data_dir is None:
        raise ValueError(f"Dataset '{name}' needs a data_dir holding the prepared TFDS dataset.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"TFDS data_dir {root} does not exist; prepare '{name}' there (e.g. `tfds build "
            f"{name} --data_dir={root} --file_format=array_record`) or pass the right data_dir."
        )
    ds_dir = root.joinpath(*name.split("/"))
    versions = [
        p for p in ds_dir.glob("*") if re.fullmatch(r"\d+\.\d+\.\d+", p.name)
        and (p / "dataset_info.json").is_file()
    ] if ds_dir.is_dir() else []
    if not versions:
        raise FileNotFoundError(
            f"Dataset '{name}' is not prepared in {root} (no {ds_dir}/<version>/"
            f"dataset_info.json). Prepare it with `tfds build {name} --data_dir={root} "
            "--file_format=array_record`; this loader never downloads."
        )
    return max(versions, key=_version_key)


def open_tfds(name: str, split: str, data_dir: str | os.PathLike) -> Any:
    """Random-access TFDS data source (array_record) for ``name``/``split``, decoding with numpy.

    Works without TensorFlow. Returns an object with ``len`` and ``__getitems__(list[int])``.
    """
    import tensorflow_datasets as tfds

    path = tfds_dataset_dir(name, data_dir)
    builder = tfds.builder_from_directory(os.fspath(path))
    if split not in builder.info.splits:
        raise ValueError(
            f"Dataset '{name}' in {path} has splits {sorted(builder.info.splits)}, not '{split}'."
        )
    fmt = builder.info.file_format
    if fmt is not None and getattr(fmt, "value", fmt) != "array_record":
        raise ValueError(
            f"Dataset '{name}' in {path} is stored as {fmt}; random access without TensorFlow "
            "needs array_record. Re-prepare it with --file_format=array_record."
        )
    return builder.as_data_source(split=split)


def _read(ds: Any, indices: np.ndarray) -> list[dict[str, Any]]:
    return ds.__getitems__([int(i) for i in indices])


def read_all(ds: Any, chunk: int = 4096) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in range(0, len(ds), chunk):
        out.extend(_read(ds, np.arange(s, min(s + chunk, len(ds)))))
    return out


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 [..., C] images → float32 ``(x/255 - mean) / std`` per channel."""
    return ((images.astype(np.float32) / 255.0) - mean) / std


def load_cifar10(data_dir: str | os.PathLike) -> dict[str, ArraySource]:
    """CIFAR-10 from a prepared TFDS ``cifar10`` in ``data_dir``: ``{"train", "test"}`` splits.

    ``inputs`` float32 [N, 32, 32, 3] normalised per channel, ``labels`` int32 [N]. Use
    ``augment=random_crop_flip`` when batching the train split.
    """
    out = {}
    for split in ("train", "test"):
        rows = read_all(open_tfds("cifar10", split, data_dir))
        images = np.stack([r["image"] for r in rows]) if rows else np.zeros((0, 32, 32, 3))
        out[split] = ArraySource(
            {
                "inputs": normalize(images, CIFAR10_MEAN, CIFAR10_STD),
                "labels": np.array([r["label"] for r in rows], np.int32),
            }
        )
    return out


def _resize_shorter(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def _random_resized_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Crop of 8%–100% area and aspect 3/4–4/3 (10 tries, else center), resized to size²."""
    from PIL import Image

    h, w = img.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(0.08, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = img[top : top + ch, left : left + cw]
            break
    else:
        s = min(h, w)
        crop = _center_crop(img, s)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR))


@dataclasses.dataclass(frozen=True)
class ImageNetSource:
    """Lazy ImageNet split: decodes, crops and normalises only the requested examples.

    ``train=True``: random-resized crop + horizontal flip; else resize shorter side to
    ``size * 8 / 7`` and center crop. ``inputs`` float32 [B, size, size, 3], ``labels`` int32.
    """

    ds: Any
    train: bool
    size: int = 224

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        rows = _read(self.ds, indices)
        images = []
        for r in rows:
            img = np.asarray(r["image"])
            if img.ndim == 2 or img.shape[-1] == 1:
                img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=-1)
            if self.train:
                img = _random_resized_crop(img, self.size, rng)
                if rng.random() < 0.5:
                    img = img[:, ::-1]
            else:
                img = _center_crop(_resize_shorter(img, round(self.size * 8 / 7)), self.size)
            images.append(img)
        labels = [r["label"] for r in rows]
        return {
            "inputs": normalize(np.stack(images), IMAGENET_MEAN, IMAGENET_STD),
            "labels": np.asarray(labels, np.int32),
        }


def load_imagenet(data_dir: str | os.PathLike, size: int = 224) -> dict[str, ImageNetSource]:
    """ImageNet from a prepared TFDS ``imagenet2012`` in ``data_dir``.

    Returns lazy ``{"train", "validation"}`` ``ImageNetSource`` splits of ``size``² crops.
    """
    return {
        "train": ImageNetSource(open_tfds("imagenet2012", "train", data_dir), True, size),
        "validation": ImageNetSource(
            open_tfds("imagenet2012", "validation", data_dir), False, size
        ),
    }
