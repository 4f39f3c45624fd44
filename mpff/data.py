"""Data sets: the embedded MNIST, any IDX set, CIFAR-10 python batches and ``.npz`` files;
the data sets torchvision reads (``data.dataset = "torchvision"``, :mod:`mpff.tvdata`).

The readers here use numpy, gzip and pickle (no torchvision): an IDX file is
decompressed in one piece and viewed with :func:`numpy.frombuffer`, so the full
embedded MNIST loads in well under a second. Nothing is cached on disk.

Every reader returns a :class:`Dataset` of float32, C-contiguous, flattened
``(N, D)`` inputs and int64 labels in 0..9 (0..classes-1 for a torchvision set).
:func:`load_dataset` reads the data set a :class:`~mpff.config.DataConfig` names, keeps
the first ``train_subset`` / ``test_subset`` samples, and only then normalises, so
statistics taken from the training set are those of the training samples actually used.

Normalisation (train and test use the same constants, taken from training data only):

* ``mnist``: ``(x / 255 - 0.1307) / 0.3081``, the customary fixed MNIST constants,
  whatever the subset (and also when ``data.path`` points at another MNIST copy).
* ``idx`` (Fashion-MNIST, KMNIST, ...): ``x / 255``, then standardised with the
  scalar mean and standard deviation of the training pixels.
* ``cifar10``: ``x / 255``, then standardised per colour channel (the three
  contiguous blocks of 1024 values of the 3072-vector) with the mean and standard
  deviation of that channel over the training set.
* ``npz``: uint8 arrays are divided by 255 first; then standardised with the
  scalar mean and standard deviation of the training inputs.
* ``torchvision``: greyscale sets (MNIST, FashionMNIST, KMNIST, EMNIST) as ``idx``; colour
  sets (CIFAR10, CIFAR100, SVHN, an ImageFolder of RGB images) flattened channel by channel
  and standardised per channel as ``cifar10``.

Standard deviations are population ones (``ddof=0``); a constant training set
(standard deviation 0) is only centred. For uint8 data the statistics are exact
(computed from a 256-bin histogram in float64) and the mapping is applied as a
256-entry float32 lookup table.

Every problem a user can fix raises :class:`~mpff.config.ConfigError` with one
sentence that names the offending file and says what to do.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pickle
import zlib
from dataclasses import dataclass

import numpy as np

from mpff import dataspec
from mpff.config import ConfigError, DataConfig

#: Classes of a data set that does not say otherwise (mpff.dataspec states it).
NUM_CLASSES = dataspec.DEFAULT_CLASSES
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_DIM = 3072
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

# IDX type codes (third byte of the magic number); multi-byte types are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A normalised data set; ``eq=False`` because arrays have no single truth value."""

    name: str
    x_train: np.ndarray
    """float32, shape (N, D), C-contiguous, normalised."""
    y_train: np.ndarray
    """int64, shape (N,), values 0..num_classes-1."""
    x_test: np.ndarray
    """float32, shape (M, D), C-contiguous, normalised with the training constants."""
    y_test: np.ndarray
    """int64, shape (M,)."""
    num_classes: int = NUM_CLASSES
    input_mean: np.ndarray | None = None
    """(D,) float32: a raw input v maps to (v / input_scale - input_mean) / input_std."""
    input_std: np.ndarray | None = None
    input_scale: float = 255.0
    """255 for byte images, 1 for float inputs."""

    def __post_init__(self) -> None:  # internal invariants, not user errors
        for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test)):
            if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                raise ValueError(f"Dataset arrays have inconsistent shapes {x.shape}, {y.shape}")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError("Dataset train and test inputs differ in width")

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])


def embedded_mnist_dir() -> str:
    """Absolute path of the MNIST copy shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets", "mnist")


# ----------------------------------------------------------------------------- files


def _why(exc: BaseException) -> str:
    """An exception as a short one-line phrase for a ConfigError message."""
    text = " ".join(str(exc).split()).rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic number."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; check data.path or download the file") from None
    except IsADirectoryError:
        raise ConfigError(
            f"{path}: is a directory, not a file; point data.path at the data"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot be read ({exc.strerror}); check its permissions"
        ) from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ConfigError(
                f"{path}: corrupt or truncated gzip file ({_why(exc)}); re-download it"
            ) from None
    return data


def _read_idx(path: str, writable: bool) -> np.ndarray:
    data = _read_bytes(path)
    if len(data) < 4:
        raise ConfigError(f"{path}: truncated IDX file (no complete header); re-download it")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ConfigError(
            f"{path}: not an IDX file (bad magic number 0x{data[:4].hex()}); "
            "point data.path at the IDX files, gzipped or not"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError(f"{path}: truncated IDX file (incomplete header); re-download it")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise ConfigError(
            f"{path}: truncated IDX file (expected {expected} bytes of data, found {found}); "
            "re-download it"
        )
    if found > expected:
        raise ConfigError(
            f"{path}: IDX file has {found - expected} bytes more than its header describes "
            f"(expected {expected}); re-download it"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    if dtype.itemsize > 1 or writable:  # native byte order, writable copy
        arr = np.array(arr, dtype=dtype.newbyteorder("="))
    return arr


def read_idx(path: str) -> np.ndarray:
    """Read any IDX file, gzipped or raw, as an array of its IDX shape and (native) dtype.

    Gzip is recognised by content, not by the ``.gz`` suffix. The magic number,
    type code, dimension count and payload length are all checked.
    """
    return _read_idx(path, writable=True)


def _find_idx(directory: str, base: str) -> str:
    """Path of ``base`` in directory: raw or ``.gz``, also with '.' before 'idx'."""
    dotted = base.replace("-idx", ".idx")
    for name in (base, base + ".gz", dotted, dotted + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(
        f"{os.path.join(directory, base)}[.gz]: file not found; put the four IDX files "
        f"({', '.join(IDX_FILES.values())}, gzipped or not) in {directory}"
    )


def check_labels(y: np.ndarray, where: str, num_classes: int = NUM_CLASSES) -> np.ndarray:
    if y.ndim != 1:
        raise ConfigError(
            f"{where}: labels must be one-dimensional, not of shape {y.shape}; "
            "store one class index per sample"
        )
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ConfigError(f"{where}: labels are not whole numbers; store class indices "
                              f"0..{num_classes - 1}")
    elif y.dtype.kind not in "iub":
        raise ConfigError(f"{where}: labels have dtype {y.dtype}; store integer class indices "
                          f"0..{num_classes - 1}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"{where}: labels range over {y.min()}..{y.max()}, not 0..{num_classes - 1}; "
            f"use a data set with {num_classes} classes"
        )
    return y.astype(np.int64)


def _check_pair(x: np.ndarray, y: np.ndarray, xwhere: str, ywhere: str) -> None:
    if x.ndim < 2:
        raise ConfigError(
            f"{xwhere}: inputs of shape {x.shape} have no per-sample dimensions; "
            "store one image per row"
        )
    if x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"{xwhere} has {x.shape[0]} samples but {ywhere} has {y.shape[0]} labels; "
            "use matching files"
        )
    if x.shape[0] == 0:
        raise ConfigError(f"{xwhere}: holds no samples; use a non-empty data set")


def _flatten(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)


# ------------------------------------------------------------------ raw (un-normalised)


@dataclass(frozen=True, eq=False)
class Raw:
    """What a data set's reader returns (:class:`mpff.dataspec.DataSpec`): flattened,
    un-normalised inputs (uint8 or anything numeric) with int64 labels, and how to normalise them."""

    source: str
    """Where the arrays came from (messages name it)."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    method: str = "scalar"
    """'mnist' (fixed constants), 'scalar' (training mean and std) or 'channels' (per colour
    channel of uint8 images flattened channel by channel)."""
    name: str = ""
    num_classes: int | None = None
    """Classes (None: the data set's facts, mpff.dataspec)."""
    channels: int = 3


def _raw_idx(directory: str) -> Raw:
    if not os.path.isdir(directory):
        raise ConfigError(
            f"{directory}: not a directory; point data.path at the folder holding the IDX files"
        )
    paths = {key: _find_idx(directory, base) for key, base in IDX_FILES.items()}
    arrays = {key: _read_idx(path, writable=False) for key, path in paths.items()}
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        xp, yp = paths[f"{split}_images"], paths[f"{split}_labels"]
        y = check_labels(y, yp)
        _check_pair(x, y, xp, yp)
        out[f"x_{split}"], out[f"y_{split}"] = _flatten(x), y
    if out["x_train"].shape[1] != out["x_test"].shape[1]:
        raise ConfigError(
            f"{paths['test_images']}: images of shape {arrays['test_images'].shape[1:]} "
            f"differ from the training images {arrays['train_images'].shape[1:]}; "
            "use the files of one data set"
        )
    return Raw(source=directory, **out)


_PICKLE_ALLOWED = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (a CIFAR batch needs no more)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # numpy 2 name, avoids the deprecation shim
        return super().find_class(module, name)


def _cifar10_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise ConfigError(
            f"{path}: CIFAR-10 batch not found; extract cifar-10-python.tar.gz and point "
            "data.path at its cifar-10-batches-py folder"
        )
    redo = "re-download cifar-10-python.tar.gz and extract it again"
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure: a corrupt file
        raise ConfigError(
            f"{path}: not a readable CIFAR-10 python batch ({_why(exc)}); {redo}"
        ) from None
    if not isinstance(batch, dict):
        raise ConfigError(f"{path}: holds a {type(batch).__name__}, not a CIFAR-10 batch; {redo}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ConfigError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'; {redo}")
    x = np.asarray(data)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != CIFAR10_DIM:
        raise ConfigError(
            f"{path}: batch data is {x.dtype} of shape {x.shape}, not uint8 rows of "
            f"{CIFAR10_DIM} values; {redo}"
        )
    y = check_labels(np.asarray(labels), path)
    if y.shape[0] != x.shape[0]:
        raise ConfigError(f"{path}: batch has {x.shape[0]} images but {y.shape[0]} labels; {redo}")
    return x, y


def _cifar10_dir(directory: str) -> str:
    if os.path.isfile(directory):
        raise ConfigError(
            f"{directory}: is a file; extract cifar-10-python.tar.gz and point data.path "
            "at its cifar-10-batches-py folder"
        )
    inner = os.path.join(directory, CIFAR10_DIRNAME)
    if not os.path.isfile(os.path.join(directory, CIFAR10_TRAIN_BATCHES[0])) and os.path.isdir(
        inner
    ):
        return inner
    return directory


def _raw_cifar10(directory: str) -> Raw:
    directory = _cifar10_dir(directory)
    train = [_cifar10_batch(os.path.join(directory, name)) for name in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _cifar10_batch(os.path.join(directory, CIFAR10_TEST_BATCH))
    return Raw(
        source=directory,
        x_train=np.concatenate([x for x, _ in train]),
        y_train=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
    )


def _raw_npz(path: str) -> Raw:
    if not os.path.isfile(path):
        raise ConfigError(
            f"{path}: file not found; point data.path at an .npz file with {', '.join(NPZ_KEYS)}"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if missing:
                raise ConfigError(
                    f"{path}: lacks the arrays {', '.join(missing)}; save it with "
                    f"np.savez(path, {'=..., '.join(NPZ_KEYS)}=...)"
                )
            arrays = {key: npz[key] for key in NPZ_KEYS}
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip or format errors: a bad file
        raise ConfigError(
            f"{path}: not a readable .npz file ({_why(exc)}); "
            "save it with np.savez and without object arrays"
        ) from None
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        where = f"{path} (x_{split})"
        if x.dtype.kind not in "iuf" and x.dtype.kind != "b":
            raise ConfigError(f"{where}: inputs have dtype {x.dtype}; store numbers")
        y = check_labels(y, f"{path} (y_{split})")
        _check_pair(x, y, where, f"{path} (y_{split})")
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            raise ConfigError(f"{where}: inputs contain NaN or infinity; clean the data")
        out[f"x_{split}"], out[f"y_{split}"] = _flatten(x), y
    xtr, xte = out["x_train"], out["x_test"]
    if xtr.shape[1] != xte.shape[1]:
        raise ConfigError(
            f"{path}: x_test samples have {xte.shape[1]} values but x_train samples "
            f"{xtr.shape[1]}; store both splits with the same image shape"
        )
    if (xtr.dtype == np.uint8) != (xte.dtype == np.uint8):
        raise ConfigError(
            f"{path}: x_train is {xtr.dtype} but x_test is {xte.dtype}; "
            "store both with the same dtype so they are scaled alike"
        )
    return Raw(source=path, **out)


# ------------------------------------------------------------------------ normalising


def _uint8_stats(x: np.ndarray) -> tuple[float, float]:
    """Exact mean and population std of x / 255 for uint8 x, from a 256-bin histogram."""
    counts = np.bincount(x.reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float(counts @ values / n)
    var = float(counts @ (values - mean) ** 2 / n)
    return mean, float(np.sqrt(var))


def _float_stats(x: np.ndarray) -> tuple[float, float]:
    mean = float(x.mean(dtype=np.float64))
    std = float(x.std(dtype=np.float64))
    return mean, std


def _safe(std: float) -> float:
    return std if std > 0 else 1.0


def _lut(mean: float, std: float) -> np.ndarray:
    """float32 table mapping each byte value v to (v / 255 - mean) / std."""
    return ((np.arange(256, dtype=np.float64) / 255.0 - mean) / _safe(std)).astype(np.float32)


def _apply_scalar(x: np.ndarray, mean: float, std: float, uint8: bool) -> np.ndarray:
    if uint8:
        return np.ascontiguousarray(_lut(mean, std)[x])
    out = np.array(x, dtype=np.float64 if x.dtype == np.float64 else np.float32, order="C")
    out -= mean
    out /= _safe(std)
    return np.ascontiguousarray(out, dtype=np.float32)


def _normalise(raw: Raw, method: str, name: str, num_classes: int = NUM_CLASSES,
               channels: int = 3) -> Dataset:
    """method: 'mnist' (fixed), 'scalar' (training mean/std) or 'channels' (per colour channel of
    uint8 images flattened channel by channel, ``channels`` contiguous blocks: CIFAR-10)."""
    xtr, xte = raw.x_train, raw.x_test
    if method == "channels":
        out = []
        size = xtr.shape[1] // channels
        blocks = [slice(c * size, (c + 1) * size) for c in range(channels)]
        stats = [_uint8_stats(xtr[:, block]) for block in blocks]
        for x in (xtr, xte):
            y = np.empty(x.shape, dtype=np.float32)
            for block, (mean, std) in zip(blocks, stats, strict=True):
                y[:, block] = _lut(mean, std)[x[:, block]]
            out.append(y)
        xtr_n, xte_n = out
        mean_v = np.repeat([m for m, _ in stats], size).astype(np.float32)
        std_v = np.repeat([_safe(s) for _, s in stats], size).astype(np.float32)
        scale = 255.0
    else:
        uint8 = xtr.dtype == np.uint8
        if method == "mnist":
            if not uint8:  # MNIST IDX images are always uint8
                raise ConfigError(f"{raw.source}: MNIST images must be uint8; use the IDX files")
            mean, std = MNIST_MEAN, MNIST_STD
        elif uint8:
            mean, std = _uint8_stats(xtr)
        else:
            mean, std = _float_stats(xtr)
        xtr_n = _apply_scalar(xtr, mean, std, uint8)
        xte_n = _apply_scalar(xte, mean, std, uint8)
        mean_v = np.full(xtr.shape[1], mean, dtype=np.float32)
        std_v = np.full(xtr.shape[1], _safe(std), dtype=np.float32)
        scale = 255.0 if uint8 else 1.0
    return Dataset(
        name=name,
        x_train=xtr_n,
        y_train=np.ascontiguousarray(raw.y_train, dtype=np.int64),
        x_test=xte_n,
        y_test=np.ascontiguousarray(raw.y_test, dtype=np.int64),
        num_classes=num_classes,
        input_mean=mean_v,
        input_std=std_v,
        input_scale=scale,
    )


# ------------------------------------------------------------------------- public API


def read_idx_dataset(directory: str, name: str) -> Dataset:
    """Read the four IDX files (train-/t10k-, images/labels, gzipped or not) of a directory.

    Fashion-MNIST and KMNIST use these names. Images are flattened to rows of
    rows*cols values and standardised with the training mean and std (see the
    module docstring); use :func:`load_dataset` for MNIST's fixed constants.
    """
    return _normalise(_raw_idx(directory), "scalar", name)


def read_cifar10(directory: str) -> Dataset:
    """Read CIFAR-10 python batches (data_batch_1..5, test_batch), standardised per channel.

    ``directory`` is the extracted ``cifar-10-batches-py`` folder or its parent.
    """
    return _normalise(_raw_cifar10(directory), "channels", "cifar10")


def read_npz(path: str) -> Dataset:
    """Read an .npz with x_train, y_train, x_test, y_test; inputs of any shape are flattened."""
    return _normalise(_raw_npz(path), "scalar", _npz_name(path))


def _npz_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0] or "npz"


def _subset(x: np.ndarray, y: np.ndarray, n: int, key: str, what: str, source: str):
    if n == 0:
        return x, y
    if n > x.shape[0]:
        raise ConfigError(
            f"{source}: data.{key} = {n} exceeds its {x.shape[0]} {what} samples; "
            f"lower data.{key} or set it to 0 to use them all"
        )
    return x[:n], y[:n]


def read_mnist_raw(cfg: DataConfig) -> Raw:
    """data.dataset = "mnist": the embedded copy, or the IDX files in data.path."""
    raw = _raw_idx(cfg.path or embedded_mnist_dir())
    return dataclasses.replace(raw, method="mnist", name="mnist")


def read_idx_raw(cfg: DataConfig) -> Raw:
    """data.dataset = "idx": the four IDX files in data.path, named after the folder."""
    base = os.path.basename(os.path.normpath(cfg.path))
    return dataclasses.replace(_raw_idx(cfg.path), name=base or "idx")


def read_cifar10_raw(cfg: DataConfig) -> Raw:
    return dataclasses.replace(_raw_cifar10(cfg.path), method="channels", name="cifar10")


def read_npz_raw(cfg: DataConfig) -> Raw:
    return dataclasses.replace(_raw_npz(cfg.path), name=_npz_name(cfg.path))


def load_dataset(cfg: DataConfig) -> Dataset:
    """Read the data set cfg names (its reader in mpff.dataspec), keep the first
    train_subset/test_subset samples, normalise. Files are checked here, where they are opened
    (the configuration checks values only)."""
    if cfg.path and not os.path.exists(cfg.path):
        raise ConfigError(f"data.path {cfg.path!r} does not exist; point it at the data set"
                          + (f" (torchvision's root; `mpff data download {cfg.name} --path "
                             f"{cfg.path}` fills it)" if cfg.dataset == "torchvision" else ""))
    raw = dataspec.get(cfg.dataset).read(cfg)
    xtr, ytr = _subset(
        raw.x_train, raw.y_train, cfg.train_subset, "train_subset", "training", raw.source
    )
    xte, yte = _subset(raw.x_test, raw.y_test, cfg.test_subset, "test_subset", "test", raw.source)
    classes = raw.num_classes or cfg.num_classes or NUM_CLASSES
    subset = dataclasses.replace(raw, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return _normalise(subset, raw.method, raw.name or cfg.dataset, classes, raw.channels)
