"""Fashion-MNIST from its four IDX files (Debian's ``dataset-fashion-mnist`` package, a directory
the user names) or a prepared TFDS ``fashion_mnist``; every IDX file's contents sha256-pinned."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np

from jaxjpq.data.sources import ArraySource
from jaxjpq.data.tfds import open_tfds, read_all

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# sha256 of each file's decompressed contents (the gzip layer may differ between packagers)
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32,
               0x0E: np.float64}


def parse_idx(data: bytes, name: str = "IDX file") -> np.ndarray:
    """An IDX array (magic ``0 0 type ndim``, big-endian int32 dims, then the values)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{name} is not an IDX file (magic {data[:4].hex()}).")
    ndim = data[3]
    dims = np.frombuffer(data, ">i4", ndim, 4).astype(np.int64)
    dtype = np.dtype(_IDX_DTYPES[data[2]]).newbyteorder(">")
    n = int(np.prod(dims))
    body = 4 + 4 * ndim
    if len(data) != body + n * dtype.itemsize:
        raise ValueError(f"{name}: {len(data) - body} bytes of values for shape {tuple(dims)}.")
    return np.frombuffer(data, dtype, n, body).reshape(dims).astype(dtype.newbyteorder("="))


def _read(directory: Path, stem: str) -> np.ndarray:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            raw = p.read_bytes()
            data = gzip.decompress(raw) if name.endswith(".gz") else raw
            if hashlib.sha256(data).hexdigest() != FASHION_MNIST_SHA256[stem]:
                raise ValueError(f"{p} does not match the pinned sha256 of Fashion-MNIST's "
                                 f"{stem}; the file is damaged or another dataset.")
            return parse_idx(data, str(p))
    raise FileNotFoundError(stem)


def load_fashion_mnist(directory: str | os.PathLike | None = None, *,
                       data_dir: str | os.PathLike | None = None) -> dict[str, ArraySource]:
    """Fashion-MNIST: ``{"train": 50k, "val": 10k, "test": 10k}`` (val: the last 10k of the
    60k training images), like :func:`jaxjpq.data.load_mnist`.

    ``inputs`` float32 [N, 28, 28, 1] = pixel / 256 in [0, 1), ``labels`` int32 [N] in [0, 10).
    Read from ``directory`` (the four ``*-ubyte[.gz]`` IDX files; default
    ``$JAXJPQ_FASHION_MNIST`` or Debian's ``/usr/share/datasets/fashion-mnist``), or, with
    ``data_dir``, from a prepared TFDS ``fashion_mnist`` there.
    """
    if data_dir is not None:
        parts = {}
        for split in ("train", "test"):
            rows = read_all(open_tfds("fashion_mnist", split, data_dir))
            parts[split] = (np.stack([np.asarray(r["image"]).reshape(28, 28) for r in rows]),
                            np.array([r["label"] for r in rows], np.int32))
        (tx, ty), test = parts["train"], parts["test"]
    else:
        d = Path(directory or os.environ.get("JAXJPQ_FASHION_MNIST") or FASHION_MNIST_DIR)
        try:
            tx, ty = _read(d, "train-images-idx3-ubyte"), _read(d, "train-labels-idx1-ubyte")
            test = (_read(d, "t10k-images-idx3-ubyte"), _read(d, "t10k-labels-idx1-ubyte"))
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"Fashion-MNIST's {e.args[0]} is not in {d}: install it (apt-get install -y "
                "dataset-fashion-mnist, as root) or pass directory= (the four IDX files) or "
                "data_dir= (a prepared TFDS fashion_mnist).") from None

    def source(x, y):
        return ArraySource({"inputs": (np.asarray(x, np.float32) / 256.0)[..., None],
                            "labels": np.asarray(y, np.int32)})

    n_val = min(10_000, len(tx) // 6)
    return {"train": source(tx[:-n_val], ty[:-n_val]), "val": source(tx[-n_val:], ty[-n_val:]),
            "test": source(*test)}
