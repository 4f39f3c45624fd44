"""Data sets by name (``data.dataset``): the reader, and the facts known without reading the
files: values per sample, classes, the full training and test sizes.

The configuration (:mod:`mpff.config`), the plan, the memory model and the predictors ask
:func:`facts`; :func:`mpff.data.load_dataset` asks :meth:`DataSpec.read`. Built-in readers are
named as ``"module:function"`` and imported on first use, so nothing here imports numpy or torch.

A new data set registers from any module before the configuration naming it is built::

    from mpff import dataspec
    dataspec.register(dataspec.DataSpec(name="toy", reader=read_toy, input_dim=64, num_classes=4,
                                        needs_path=False))

``read_toy(cfg: DataConfig)`` returns an :class:`mpff.data.Raw` (flattened inputs, int64
labels, how to normalise them); subsets and normalisation are :func:`mpff.data.load_dataset`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .registry import Registry, load_attr

#: Classes of a data set that does not say (IDX files and .npz arrays hold digits 0..9).
DEFAULT_CLASSES = 10


@dataclass(frozen=True)
class Facts:
    """What a configuration's data set is, before it is read (None: the files tell)."""

    title: str                 # as messages name it: "MNIST", "CIFAR-10", "EMNIST"
    input_dim: int | None      # values per flattened sample
    num_classes: int | None
    train_size: int | None     # samples of the full training set
    test_size: int | None


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """One data set kind: its reader and fixed facts (subclass it for facts that depend on
    other settings, as the torchvision sets do on data.name)."""

    name: str
    reader: str | Callable[[Any], Any]
    """``(DataConfig) -> mpff.data.Raw``, or a ``"module:function"`` naming one."""
    title: str = ""
    input_dim: int | None = None
    num_classes: int | None = DEFAULT_CLASSES
    train_size: int | None = None
    test_size: int | None = None
    needs_path: bool = True
    """Whether data.path must name the files (the embedded MNIST needs none)."""

    def check(self, cfg) -> None:
        """Settings of ``cfg`` (a DataConfig) this data set refuses; raises ConfigError."""
        if cfg.name or cfg.split:
            from .errors import ConfigError
            raise ConfigError(f"data.{'name' if cfg.name else 'split'} is for data.dataset = "
                              f"'torchvision', not {self.name!r}; remove it")

    def facts(self, cfg) -> Facts:
        return Facts(self.title or self.name, self.input_dim, self.num_classes, self.train_size,
                     self.test_size)

    def read(self, cfg):
        reader = load_attr(self.reader) if isinstance(self.reader, str) else self.reader
        return reader(cfg)


#: torchvision's data set classes that ``data.dataset = "torchvision"`` reads: (input width of the
#: flattened images, classes, training samples, test samples); None: known from the files only.
TORCHVISION_SETS: dict[str, tuple[int | None, int | None, int | None, int | None]] = {
    "MNIST": (784, 10, 60000, 10000), "FashionMNIST": (784, 10, 60000, 10000),
    "KMNIST": (784, 10, 60000, 10000), "EMNIST": (784, None, None, None),
    "CIFAR10": (3072, 10, 50000, 10000), "CIFAR100": (3072, 100, 50000, 10000),
    "SVHN": (3072, 10, 73257, 26032), "ImageFolder": (None, None, None, None),
}
#: EMNIST's splits: the length of torchvision's ``classes`` list ('letters' keeps torchvision's
#: labels 1..26, with class 0 'N/A' never seen), training and test samples
EMNIST: dict[str, tuple[int, int, int]] = {
    "byclass": (62, 697932, 116323), "bymerge": (47, 697932, 116323), "balanced": (47, 112800, 18800),
    "letters": (27, 124800, 20800), "digits": (10, 240000, 40000), "mnist": (10, 60000, 10000),
}
EMNIST_SPLITS = {split: classes for split, (classes, _, _) in EMNIST.items()}


class TorchvisionSpec(DataSpec):
    """``data.dataset = "torchvision"``: the set data.name (and EMNIST's data.split) names."""

    def check(self, cfg) -> None:
        from .errors import ConfigError

        known = {n.lower(): n for n in TORCHVISION_SETS}
        if not cfg.name:
            raise ConfigError(f"data.dataset = 'torchvision' needs data.name, one of "
                              f"{', '.join(TORCHVISION_SETS)}")
        if cfg.name.lower() not in known:
            raise ConfigError(f"data.name = {cfg.name!r} is not a data set mpff reads through "
                              f"torchvision; use one of {', '.join(TORCHVISION_SETS)}")
        object.__setattr__(cfg, "name", known[cfg.name.lower()])  # DataConfig is frozen
        if cfg.name == "EMNIST":
            if cfg.split not in EMNIST_SPLITS:
                said = f"data.split = {cfg.split!r} is not" if cfg.split else "needs data.split,"
                raise ConfigError(f"EMNIST {said} one of {', '.join(EMNIST_SPLITS)}; "
                                  "set data.split (e.g. data.split=balanced)")
        elif cfg.split:
            raise ConfigError(f"data.split is for EMNIST, not {cfg.name}; remove it")

    def facts(self, cfg) -> Facts:
        width, classes, n_train, n_test = TORCHVISION_SETS[cfg.name]
        if cfg.name == "EMNIST":
            classes, n_train, n_test = EMNIST[cfg.split]
        return Facts(cfg.name, width, classes, n_train, n_test)


DATASETS: Registry[DataSpec] = Registry("data set")


def register(spec: DataSpec, *, replace: bool = False) -> DataSpec:
    return DATASETS.register(spec.name, spec, replace=replace)


def get(name: str) -> DataSpec:
    return DATASETS.get(name)


def names() -> tuple[str, ...]:
    return DATASETS.names()


def facts(cfg) -> Facts:
    """The facts of the data set a (validated) DataConfig names."""
    return get(cfg.dataset).facts(cfg)


register(DataSpec(name="mnist", reader="mpff.data:read_mnist_raw", title="MNIST", input_dim=784,
                  train_size=60000, test_size=10000, needs_path=False))
register(DataSpec(name="idx", reader="mpff.data:read_idx_raw", title="IDX"))
register(DataSpec(name="cifar10", reader="mpff.data:read_cifar10_raw", title="CIFAR-10", input_dim=3072,
                  train_size=50000, test_size=10000))
register(DataSpec(name="npz", reader="mpff.data:read_npz_raw", title="npz"))
register(TorchvisionSpec(name="torchvision", reader="mpff.tvdata:read_raw", title="torchvision",
                         num_classes=None))
