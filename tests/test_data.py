"""Tests of mpff.data: the embedded MNIST, IDX, CIFAR-10 batches, .npz, subsets, errors."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest

from mpff import data
from mpff.config import ConfigError, DataConfig


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as an IDX file (the inverse of read_idx)."""
    codes = {
        np.uint8: 0x08,
        np.int8: 0x09,
        np.int16: 0x0B,
        np.int32: 0x0C,
        np.float32: 0x0D,
        np.float64: 0x0E,
    }
    code = codes[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr: np.ndarray, gz: bool = False) -> str:
    payload = idx_bytes(arr)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(payload) if gz else payload)
    return str(path)


def make_idx_dir(directory, n_train=50, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(os.path.join(directory, name + (".gz" if gz else "")), arr, gz=gz)
    return arrays


def write_cifar_batches(directory, per_batch=4, n_test=6, seed=0):
    """Pickle batches in the CIFAR-10 python format: dicts with bytes keys, uint8 data."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        # distinct per-channel offsets so per-channel normalisation is visible
        x = np.concatenate(
            [rng.integers(lo, lo + 60, (n, 1024)) for lo in (0, 90, 190)], axis=1
        ).astype(np.uint8)
        y = [int(v) for v in (np.arange(n) + k) % 10]
        batch = {
            b"batch_label": name.encode(),
            b"labels": y,
            b"data": x,
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
        with open(os.path.join(directory, name), "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        batches[name] = (x, y)
    return batches


# ------------------------------------------------------------------------ embedded MNIST


@pytest.fixture(scope="module")
def mnist():
    return data.load_dataset(DataConfig())


def test_embedded_mnist(mnist):
    assert os.path.isabs(data.embedded_mnist_dir())
    assert mnist.name == "mnist"
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert mnist.input_dim == 784 and mnist.num_classes == 10
    for x in (mnist.x_train, mnist.x_test):
        assert x.dtype == np.float32 and x.flags.c_contiguous
    for y in (mnist.y_train, mnist.y_test):
        assert y.dtype == np.int64
        assert set(np.unique(y).tolist()) == set(range(10))
    assert abs(float(mnist.x_train.mean())) < 0.05
    assert abs(float(mnist.x_train.std()) - 1.0) < 0.05
    # background pixel 0 maps to -mean/std of the fixed MNIST constants
    assert np.isclose(mnist.x_train.min(), -0.1307 / 0.3081, atol=1e-6)
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # the canonical first labels


def test_embedded_mnist_subsets_match_full(mnist):
    small = data.load_dataset(DataConfig(train_subset=100, test_subset=30))
    assert small.x_train.shape == (100, 784) and small.x_test.shape == (30, 784)
    np.testing.assert_array_equal(small.x_train, mnist.x_train[:100])
    np.testing.assert_array_equal(small.y_test, mnist.y_test[:30])


def test_mnist_subset_too_large_is_config_error():
    with pytest.raises(ConfigError, match="train_subset = 60001 exceeds"):
        data.load_dataset(DataConfig(train_subset=60001))
    with pytest.raises(ConfigError, match="test_subset"):
        data.load_dataset(DataConfig(test_subset=10001))


# ---------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    for name, arr in (("img" + suffix, images), ("lab" + suffix, labels)):
        out = data.read_idx(write_idx(tmp_path / name, arr, gz=gz))
        assert out.dtype == np.uint8 and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)
        assert out.flags.writeable


def test_read_idx_other_dtypes_native_order(tmp_path):
    for arr in (
        np.arange(-6, 6, dtype=np.int16).reshape(3, 4),
        np.linspace(-1, 1, 10, dtype=np.float32),
        np.arange(5, dtype=np.int32) * 100000,
    ):
        out = data.read_idx(write_idx(tmp_path / "a", arr))
        assert out.dtype == arr.dtype and out.dtype.isnative
        np.testing.assert_array_equal(out, arr)


def test_read_idx_gzip_detected_by_content(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "noext", arr, gz=True)), arr)


def test_read_idx_truncated(tmp_path):
    full = idx_bytes(np.zeros((1000, 28, 28), dtype=np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(full[: 16 + 1000])
    with pytest.raises(ConfigError) as err:
        data.read_idx(str(path))
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg
    assert "expected 784000 bytes of data, found 1000" in msg and "re-download" in msg


def test_read_idx_truncated_gzip(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(5000, dtype=np.int32)))
    path = tmp_path / "cut-labels.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError, match="cut-labels.gz"):
        data.read_idx(str(path))


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long-idx"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"xx")
    with pytest.raises(ConfigError, match="long-idx.*2 bytes more"):
        data.read_idx(str(path))


@pytest.mark.parametrize("head", [b"\x01\x02\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00"])
def test_read_idx_bad_magic(tmp_path, head):
    path = tmp_path / "bad-magic-file"
    path.write_bytes(head + (4).to_bytes(4, "big") + b"abcd")
    with pytest.raises(ConfigError, match="bad-magic-file.*not an IDX file"):
        data.read_idx(str(path))


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no-such-file.gz.*not found"):
        data.read_idx(str(tmp_path / "no-such-file.gz"))


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        data.read_idx(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------- read_idx_dataset


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_dataset(tmp_path, gz):
    arrays = make_idx_dir(tmp_path, gz=gz)
    ds = data.read_idx_dataset(str(tmp_path), "fashion")
    assert ds.name == "fashion"
    assert ds.x_train.shape == (50, 784) and ds.x_test.shape == (20, 784)
    assert ds.x_train.dtype == np.float32 and ds.x_train.flags.c_contiguous
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    # scalar standardisation with the training statistics, applied to both splits
    tr = arrays["train-images-idx3-ubyte"].reshape(50, -1) / 255.0
    te = arrays["t10k-images-idx3-ubyte"].reshape(20, -1) / 255.0
    np.testing.assert_allclose(ds.x_train, (tr - tr.mean()) / tr.std(), atol=1e-5)
    np.testing.assert_allclose(ds.x_test, (te - tr.mean()) / tr.std(), atol=1e-5)


def test_load_dataset_idx_with_subsets(tmp_path):
    make_idx_dir(tmp_path)
    full = data.read_idx_dataset(str(tmp_path), "x")
    ds = data.load_dataset(
        DataConfig(dataset="idx", path=str(tmp_path), train_subset=10, test_subset=5)
    )
    assert ds.name == tmp_path.name
    assert ds.x_train.shape == (10, 784) and ds.x_test.shape == (5, 784)
    np.testing.assert_array_equal(ds.y_train, full.y_train[:10])
    assert abs(float(ds.x_train.mean())) < 1e-5  # statistics of the subset actually used
    with pytest.raises(ConfigError, match="train_subset = 51"):
        data.load_dataset(DataConfig(dataset="idx", path=str(tmp_path), train_subset=51))


def test_read_idx_dataset_missing_file(tmp_path):
    make_idx_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte.*not found"):
        data.read_idx_dataset(str(tmp_path), "x")


def test_read_idx_dataset_count_mismatch(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(49, np.uint8), gz=True)
    with pytest.raises(ConfigError, match="50 samples but .*train-labels.* 49 labels"):
        data.read_idx_dataset(str(tmp_path), "x")


def test_read_idx_dataset_bad_labels(tmp_path):
    make_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, np.uint8), gz=True)
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte.gz.*0..9"):
        data.read_idx_dataset(str(tmp_path), "x")


# ------------------------------------------------------------------------ read_cifar10


@pytest.mark.parametrize("nested", [False, True])
def test_read_cifar10(tmp_path, nested):
    where = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    batches = write_cifar_batches(where)
    ds = data.read_cifar10(str(tmp_path))
    assert ds.name == "cifar10" and ds.input_dim == 3072
    assert ds.x_train.shape == (20, 3072) and ds.x_test.shape == (6, 3072)
    assert ds.x_train.dtype == np.float32 and ds.x_train.flags.c_contiguous
    expected = [y for i in range(1, 6) for y in batches[f"data_batch_{i}"][1]]
    assert ds.y_train.tolist() == expected
    assert ds.y_test.tolist() == batches["test_batch"][1]
    raw = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]) / 255.0
    raw_test = batches["test_batch"][0] / 255.0
    for c in range(3):
        block = slice(c * 1024, (c + 1) * 1024)
        chan = ds.x_train[:, block]
        assert abs(float(chan.mean())) < 1e-4 and abs(float(chan.std()) - 1) < 1e-3
        mean, std = raw[:, block].mean(), raw[:, block].std()
        np.testing.assert_allclose(
            ds.x_test[:, block], (raw_test[:, block] - mean) / std, atol=1e-5
        )


def test_load_dataset_cifar10_subset(tmp_path):
    write_cifar_batches(tmp_path)
    ds = data.load_dataset(
        DataConfig(dataset="cifar10", path=str(tmp_path), train_subset=6, test_subset=2)
    )
    assert ds.x_train.shape == (6, 3072) and ds.y_test.shape == (2,)
    with pytest.raises(ConfigError, match="test_subset = 7"):
        data.load_dataset(DataConfig(dataset="cifar10", path=str(tmp_path), test_subset=7))


def test_read_cifar10_missing_batch(tmp_path):
    write_cifar_batches(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(ConfigError, match="data_batch_3.*not found"):
        data.read_cifar10(str(tmp_path))


def test_read_cifar10_corrupt_batch(tmp_path):
    write_cifar_batches(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x02}q\x00(garbage")
    with pytest.raises(ConfigError, match="test_batch.*re-download"):
        data.read_cifar10(str(tmp_path))


def test_read_cifar10_refuses_foreign_pickles(tmp_path):
    write_cifar_batches(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as fh:
        pickle.dump({b"data": os.getcwd, b"labels": [0]}, fh)
    with pytest.raises(ConfigError, match="data_batch_1.*unexpected object"):
        data.read_cifar10(str(tmp_path))


# ---------------------------------------------------------------------------- read_npz


def test_read_npz_uint8_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    x_train = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    x_test = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
    y_train = (np.arange(30) % 10).astype(np.int32)
    y_test = (np.arange(12) % 10).astype(np.uint8)
    path = tmp_path / "digits.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = data.read_npz(str(path))
    assert ds.name == "digits" and ds.input_dim == 64
    assert ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)
    tr, te = x_train.reshape(30, -1) / 255.0, x_test.reshape(12, -1) / 255.0
    np.testing.assert_allclose(ds.x_train, (tr - tr.mean()) / tr.std(), atol=1e-5)
    np.testing.assert_allclose(ds.x_test, (te - tr.mean()) / tr.std(), atol=1e-5)


def test_read_npz_float_inputs_and_subsets(tmp_path):
    rng = np.random.default_rng(3)
    x_train = rng.normal(5.0, 2.0, (40, 6)).astype(np.float64)
    x_test = rng.normal(5.0, 2.0, (10, 6)).astype(np.float64)
    path = tmp_path / "f.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(40) % 10, x_test=x_test, y_test=np.arange(10))
    ds = data.read_npz(str(path))
    assert ds.x_train.dtype == np.float32 and ds.x_train.flags.c_contiguous
    np.testing.assert_allclose(ds.x_train, (x_train - x_train.mean()) / x_train.std(), atol=1e-5)
    sub = data.load_dataset(
        DataConfig(dataset="npz", path=str(path), train_subset=10, test_subset=3)
    )
    assert sub.x_train.shape == (10, 6) and sub.x_test.shape == (3, 6)
    x10 = x_train[:10]
    np.testing.assert_allclose(sub.x_train, (x10 - x10.mean()) / x10.std(), atol=1e-5)
    with pytest.raises(ConfigError, match="f.npz: data.train_subset = 41 exceeds"):
        data.load_dataset(DataConfig(dataset="npz", path=str(path), train_subset=41))


def test_read_npz_errors(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((3, 4)), y_train=np.zeros(3, int))
    with pytest.raises(ConfigError, match="partial.npz.*x_test, y_test"):
        data.read_npz(str(path))
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match="broken.npz"):
        data.read_npz(str(bad))
    with pytest.raises(ConfigError, match="absent.npz.*not found"):
        data.read_npz(str(tmp_path / "absent.npz"))
    mismatch = tmp_path / "mismatch.npz"
    np.savez(
        mismatch,
        x_train=np.zeros((3, 4)),
        y_train=np.zeros(2, int),
        x_test=np.zeros((1, 4)),
        y_test=np.zeros(1, int),
    )
    with pytest.raises(ConfigError, match="mismatch.npz.*3 samples.*2 labels"):
        data.read_npz(str(mismatch))


def test_read_cifar10_python2_numpy_core_names(tmp_path):
    """The real batches were pickled by old numpy: globals under numpy.core.multiarray."""
    write_cifar_batches(tmp_path)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        path = tmp_path / name
        blob = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        path.write_bytes(blob)
    assert b"numpy.core.multiarray" in (tmp_path / "test_batch").read_bytes()
    ds = data.read_cifar10(str(tmp_path))
    assert ds.x_test.shape == (6, 3072)


def test_mnist_from_path_uses_fixed_constants(tmp_path):
    arrays = make_idx_dir(tmp_path, n_train=12, n_test=4)
    ds = data.load_dataset(DataConfig(dataset="mnist", path=str(tmp_path)))
    x = arrays["train-images-idx3-ubyte"].reshape(12, -1) / 255.0
    np.testing.assert_allclose(ds.x_train, (x - 0.1307) / 0.3081, atol=1e-5)


def test_read_idx_huge_header_is_truncation(tmp_path):
    path = tmp_path / "huge-idx"
    path.write_bytes(bytes([0, 0, 0x0C, 3]) + b"\xff\xff\xff\xff" * 3 + b"\x00" * 8)
    with pytest.raises(ConfigError, match="huge-idx: truncated IDX file"):
        data.read_idx(str(path))
