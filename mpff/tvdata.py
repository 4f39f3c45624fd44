"""Data sets through torchvision (``data.dataset = "torchvision"``) and ``mpff data download``.

torchvision's own classes find, check and read the files under ``data.path`` (its ``root``):
MNIST, FashionMNIST and KMNIST (``ROOT/<name>/raw/``, the extracted IDX files), EMNIST
(``ROOT/EMNIST/raw/emnist-<split>-...``), CIFAR10 and CIFAR100 (``ROOT/cifar-10-batches-py``,
``ROOT/cifar-100-python``, each file's MD5 checked), SVHN (``ROOT/train_32x32.mat`` and
``test_32x32.mat``, MD5 checked, read with scipy) and ImageFolder (``ROOT/train/<class>/*`` and
``ROOT/test/<class>/*``, any image PIL reads, as RGB). Their per-sample ``__getitem__`` (PIL images
and transforms, ~20 us a sample) is never used: the arrays each class holds (``data`` and
``targets``, SVHN's ``labels``) are taken whole, and an ImageFolder's files are read once with its
loader; :mod:`mpff.data` then flattens and normalises them as its own readers do.

torchvision is imported only here, only for this data set: the default path never loads it. When
it cannot be imported (not installed, or built for another torch: the lean CPU torch 2.13.0 beside
torchvision 0.29.1 fails inside torchvision's import) the run stops with one line saying what
to install. ``mpff data download NAME --path ROOT`` runs torchvision's download (its URLs and
MD5 checksums) on a node with internet; offline it says which files to fetch and where to put
them, and run again with the files in place it only checks and unpacks them.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

from .config import ConfigError, DataConfig
from .dataspec import EMNIST_SPLITS, TORCHVISION_SETS

INSTALL = ("pip install torch==2.14.1 torchvision==0.29.1 (or the matching torch and torchvision "
           "pair your site provides)")
MNIST_LIKE = ("MNIST", "FashionMNIST", "KMNIST", "EMNIST")
SVHN_SPLITS = ("train", "test")


def _why(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()).rstrip(".")
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def datasets():
    """``torchvision.datasets``, or a ConfigError that says how to install torchvision."""
    try:
        with warnings.catch_warnings():  # its import may warn about image extensions: one line only
            warnings.simplefilter("ignore")
            import torchvision.datasets as tvd
    except Exception as exc:  # noqa: BLE001 - any failure to import: a missing or mismatched build
        raise ConfigError(f"data.dataset = 'torchvision' needs torchvision, which cannot be imported here "
                          f"({_why(exc, 120)}); install it: {INSTALL}") from None
    return tvd


def _scipy_for_svhn() -> None:
    try:
        import scipy.io  # noqa: F401 - torchvision's SVHN reads its .mat files with it
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"SVHN's .mat files are read with scipy, which cannot be imported here "
                          f"({_why(exc, 80)}); pip install scipy") from None


# ----------------------------------------------------------------------------- where files go


def expected_files(cfg: DataConfig, train: bool) -> list[str]:
    """The files torchvision reads for one split of ``cfg``'s data set (as its classes name them)."""
    root, name = cfg.path, cfg.name
    if name in ("MNIST", "FashionMNIST", "KMNIST"):
        prefix = "train" if train else "t10k"
        return [os.path.join(root, name, "raw", f"{prefix}-{kind}") for kind in
                ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if name == "EMNIST":
        prefix = f"emnist-{cfg.split}-{'train' if train else 'test'}"
        return [os.path.join(root, name, "raw", f"{prefix}-{kind}") for kind in
                ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if name == "CIFAR10":
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        return [os.path.join(root, "cifar-10-batches-py", n) for n in names + ["batches.meta"]]
    if name == "CIFAR100":
        return [os.path.join(root, "cifar-100-python", n) for n in ("train" if train else "test", "meta")]
    if name == "SVHN":
        return [os.path.join(root, f"{'train' if train else 'test'}_32x32.mat")]
    return [os.path.join(root, "train" if train else "test")]  # ImageFolder


def sources(tvd, cfg: DataConfig) -> tuple[list[str], str]:
    """(the URLs torchvision downloads ``cfg``'s data set from, the folder they go in), read from
    the data set class so they follow torchvision's own list."""
    cls = getattr(tvd, cfg.name)
    if cfg.name == "EMNIST":
        return [cls.url], os.path.join(cfg.path, cfg.name, "raw")
    if cfg.name in MNIST_LIKE:
        return [f"{cls.mirrors[0]}{filename}" for filename, _ in cls.resources], os.path.join(
            cfg.path, cfg.name, "raw")
    if cfg.name in ("CIFAR10", "CIFAR100"):
        return [cls.url], cfg.path
    if cfg.name == "SVHN":
        return [cls.split_list[s][0] for s in SVHN_SPLITS], cfg.path
    raise ConfigError("ImageFolder reads a folder of your own images (data.path/train/<class>/ and "
                      "data.path/test/<class>/); there is nothing to download")


def _download_hint(cfg: DataConfig) -> str:
    split = f" --split {cfg.split}" if cfg.split else ""
    return f"`mpff data download {cfg.name} --path {cfg.path}{split}`"


# ----------------------------------------------------------------------------- reading


def _open(tvd, cfg: DataConfig, train: bool):
    """torchvision's data set object for one split (download=False: its existence and MD5 checks)."""
    cls = getattr(tvd, cfg.name)
    if cfg.name == "SVHN":
        _scipy_for_svhn()
        return cls(cfg.path, split="train" if train else "test")
    if cfg.name == "EMNIST":
        return cls(cfg.path, split=cfg.split, train=train)
    return cls(cfg.path, train=train)


def _missing(cfg: DataConfig, train: bool) -> ConfigError:
    files = expected_files(cfg, train)
    absent = [f for f in files if not os.path.exists(f)]
    split = "training" if train else "test"
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        if os.path.exists(absent[0] + ".gz"):  # the archive is there, torchvision reads it unpacked
            return ConfigError(f"{absent[0]} is still gzipped; unpack and check it with {_download_hint(cfg)}")
        return ConfigError(f"{cfg.name}'s {split} files are not in {cfg.path} ({absent[0]} is missing{more}); "
                           f"fetch them with {_download_hint(cfg)} (run it offline for the URLs)")
    return ConfigError(f"{cfg.name}'s {split} files in {cfg.path} fail torchvision's checksum (corrupt or "
                       f"of another release); delete them and fetch them again with {_download_hint(cfg)}")


def _arrays(ds, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images flattened channel by channel, int64 labels) of a torchvision data set."""
    if name in MNIST_LIKE:  # torch tensors, (N, 28, 28) and (N,)
        return ds.data.numpy().reshape(len(ds.data), -1), ds.targets.numpy().astype(np.int64)
    if name == "SVHN":  # numpy (N, 3, 32, 32): already channel by channel
        return ds.data.reshape(len(ds.data), -1), np.asarray(ds.labels, dtype=np.int64)
    x = np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))  # CIFAR: numpy (N, 32, 32, 3) -> CHW
    return x.reshape(len(x), -1), np.asarray(ds.targets, dtype=np.int64)


def _image_folder(tvd, cfg: DataConfig, train: bool, classes: list[str] | None):
    folder = expected_files(cfg, train)[0]
    split = "train" if train else "test"
    if not os.path.isdir(folder):
        raise ConfigError(f"ImageFolder: {folder} is not a folder; put the images in {cfg.path}/{split}/<class>/ "
                          "(one subfolder per class, the same classes under train/ and test/)")
    try:
        ds = tvd.ImageFolder(folder)
    except Exception as exc:  # noqa: BLE001 - no class folders, or none with an image
        raise ConfigError(f"ImageFolder: cannot read {folder} ({_why(exc)}); give it one subfolder of "
                          "images per class") from None
    if classes is not None and ds.classes != classes:
        raise ConfigError(f"ImageFolder: {folder} has the classes {', '.join(ds.classes)} but train/ has "
                          f"{', '.join(classes)}; use the same class folders under train/ and test/")
    images, shape = [], None
    for path, _ in ds.samples:
        try:
            image = np.asarray(ds.loader(path), dtype=np.uint8)  # RGB, (H, W, 3)
        except Exception as exc:  # noqa: BLE001 - a file PIL cannot decode
            raise ConfigError(f"ImageFolder: {path} cannot be read as an image ({_why(exc)}); "
                              "remove or replace it") from None
        if shape is None:
            shape = image.shape
        elif image.shape != shape:
            raise ConfigError(f"ImageFolder: {path} is {image.shape[1]}x{image.shape[0]} but the first image "
                              f"is {shape[1]}x{shape[0]}; resize the images to one size")
        images.append(image)
    x = np.stack(images).transpose(0, 3, 1, 2)  # channel by channel, as CIFAR
    y = np.array([label for _, label in ds.samples], dtype=np.int64)
    return np.ascontiguousarray(x).reshape(len(x), -1), y, ds.classes, shape


def read_raw(cfg: DataConfig):
    """The raw arrays of the set ``cfg`` names, with their normalisation, name, classes and
    channels: the reader of ``data.dataset = "torchvision"`` (mpff.dataspec)."""
    from .data import Raw, check_labels

    tvd = datasets()
    out = {}
    if cfg.name == "ImageFolder":
        xtr, ytr, classes, shape = _image_folder(tvd, cfg, True, None)
        xte, yte, _, test_shape = _image_folder(tvd, cfg, False, classes)
        if test_shape != shape:
            raise ConfigError(f"ImageFolder: the test images are {test_shape[1]}x{test_shape[0]} but the "
                              f"training images {shape[1]}x{shape[0]}; resize them to one size")
        if len(classes) < 2:
            raise ConfigError(f"ImageFolder: {cfg.path}/train has {len(classes)} class folder; a classifier "
                              "needs at least 2")
        out = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}
        num_classes = len(classes)
    else:
        num_classes = cfg.num_classes
        for train in (True, False):
            try:
                ds = _open(tvd, cfg, train)
            except ConfigError:
                raise
            except RuntimeError as exc:
                if "not found" in str(exc).lower():  # torchvision: "Dataset not found [or corrupted]"
                    raise _missing(cfg, train) from None
                raise ConfigError(f"{cfg.name} in {cfg.path} cannot be read ({_why(exc)}); fetch it again "
                                  f"with {_download_hint(cfg)}") from None
            except Exception as exc:  # noqa: BLE001 - a truncated or foreign file torchvision chokes on
                raise ConfigError(f"{cfg.name} in {cfg.path} cannot be read ({_why(exc)}); delete its files "
                                  f"and fetch them again with {_download_hint(cfg)}") from None
            x, y = _arrays(ds, cfg.name)
            split = "train" if train else "test"
            where = f"{cfg.name} ({'training' if train else 'test'} split in {cfg.path})"
            if len(x) == 0 or len(x) != len(y):
                raise ConfigError(f"{where}: {len(x)} images and {len(y)} labels; fetch the files again "
                                  f"with {_download_hint(cfg)}")
            out[f"x_{split}"], out[f"y_{split}"] = x, check_labels(y, where, num_classes)
    channels = 1 if cfg.name in MNIST_LIKE else 3
    name = cfg.name + (f"-{cfg.split}" if cfg.split else "")
    if cfg.name == "ImageFolder":
        name = os.path.basename(os.path.normpath(cfg.path)) or name
    return Raw(source=cfg.path, **out, method="scalar" if channels == 1 else "channels", name=name,
               num_classes=num_classes, channels=channels)


# ----------------------------------------------------------------------------- mpff data


def download(cfg: DataConfig) -> None:
    """torchvision's download (and MD5 check, and unpacking) of both splits of ``cfg``'s data set
    into ``cfg.path``; files already there and intact are not fetched again."""
    tvd = datasets()
    urls, folder = sources(tvd, cfg)
    if cfg.name == "SVHN":
        _scipy_for_svhn()
    cls = getattr(tvd, cfg.name)
    made = _missing_folders(folder)
    try:
        os.makedirs(cfg.path, exist_ok=True)
        if cfg.name == "SVHN":
            for split in SVHN_SPLITS:
                cls(cfg.path, split=split, download=True)
        elif cfg.name == "EMNIST":
            cls(cfg.path, split=cfg.split, train=True, download=True)
        else:
            cls(cfg.path, train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - no network, a refused URL, a checksum mismatch
        for d in made:  # the folders torchvision made for the files, if they stayed empty
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise ConfigError(f"cannot download {cfg.name} here ({_why(exc, 160)}); on a machine with internet fetch "
                          f"{' '.join(urls)} and put {'them' if len(urls) > 1 else 'it'} in {folder}/, then run "
                          f"{_download_hint(cfg)} again here: it checks the MD5 checksums and unpacks") from None
    for train in (True, False):  # as mpff train will read them
        try:
            _open(tvd, cfg, train)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001
            raise _missing(cfg, train) from None


def _missing_folders(folder: str) -> list[str]:
    """``folder`` and the folders above it that do not exist yet, deepest first."""
    out, d = [], os.path.abspath(folder)
    while not os.path.exists(d) and os.path.dirname(d) != d:
        out.append(d)
        d = os.path.dirname(d)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpff data", description="data sets read through torchvision")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("download", help="download a torchvision data set (on a node with internet)",
                       description="Download a data set with torchvision (its URLs and MD5 checksums) into "
                                   "--path, the folder to give as data.path. Offline it says which files to "
                                   "fetch and where to put them; with them in place it checks and unpacks them.")
    p.add_argument("name", help=f"one of {', '.join(n for n in TORCHVISION_SETS if n != 'ImageFolder')}")
    p.add_argument("--path", "-p", required=True, help="torchvision's root folder (data.path)")
    p.add_argument("--split", default="", help=f"EMNIST's split: {', '.join(EMNIST_SPLITS)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``mpff data`` (argv excludes the word 'data'); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed usage (2) or help (0)
        return int(exc.code or 0)
    try:
        cfg = DataConfig(dataset="torchvision", name=args.name, split=args.split, path=args.path)
        download(cfg)
    except ConfigError as exc:
        print(f"mpff data: error: {exc}", file=sys.stderr)
        return 2
    split = f" --set data.split={cfg.split}" if cfg.split else ""
    print(f"mpff data: {cfg.name} is ready in {cfg.path}; train on it with --set data.dataset=torchvision "
          f"--set data.name={cfg.name}{split} --set data.path={cfg.path}", flush=True)
    return 0
