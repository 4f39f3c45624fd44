"""Run configuration: frozen dataclasses, TOML presets, ``--set`` overrides, validation.

A configuration has four sections (``model``, ``train``, ``data``, ``run``), each a
keyword-only frozen dataclass whose fields carry their documentation (``mpff settings``
prints them all). Presets ship inside the package, in ``mpff/presets/*.toml`` (``configs/``
in a clone links to them): ``--config tiny`` names one from any directory, and a path names
any TOML file. ``--set section.key=value`` overrides any field. Every
problem a user can fix raises :class:`ConfigError` (a ``ValueError``) with one
sentence that says what to do; the CLI prints it once and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import unicodedata
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


from . import algorithms, dataspec, layers
from .dataspec import EMNIST_SPLITS, TORCHVISION_SETS  # noqa: F401 - where others read them
from .errors import ConfigError


# Names are checked against the registries (mpff.algorithms, mpff.dataspec, mpff.layers) when a
# configuration is validated, so entries registered after this import are accepted too; the
# tuples below are the built-ins, for messages and the offline tools.
def all_schedules() -> tuple[str, ...]:
    """Every registered algorithm's schedules, each once."""
    return tuple(dict.fromkeys(s for a in algorithms.names() for s in algorithms.get(a).schedules))


SCHEDULES = all_schedules()
ALGORITHMS = algorithms.names()
NEGATIVES = ("fixed", "random", "adaptive")
CLASSIFIERS = ("goodness", "softmax")
DATASETS = dataspec.names()


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    dims: tuple[int, ...] = (784, 2000, 2000, 2000, 2000)
    """Layer widths, input first: [784, 2000, 2000, 2000, 2000] is the paper's network."""
    threshold_coeff: float = 0.01
    """Goodness threshold per unit: theta = threshold_coeff * out_features (20 for 2000 units)."""
    goodness: str = "mean"
    """'mean': g = mean(h**2) (the paper's author code); 'sum': g = sum(h**2) (Hinton, loeweX;
    use threshold_coeff = 1.0 for their theta = n_units)."""
    norm_eps: float = 1e-4
    """Added to the L2 norm when each layer normalises its input row: x / (||x|| + eps)."""
    label_position: str = "last"
    """Where the one-hot label is written over the input: the 'last' entries (paper) or the 'first',
    one per class (10 for MNIST)."""
    neutral_value: float = 0.1
    """Value of all the label entries in a neutral sample (label unknown)."""
    layer: str = "linear"
    """The kind of every FF layer: 'linear' (normalise, x @ weight.T + bias, ReLU), or a kind
    registered with mpff.layers.register."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if len(self.dims) < 2 or any(d <= 0 for d in self.dims):
            raise ConfigError("model.dims needs an input size and at least one positive layer width")
        if self.dims[0] < 10:
            raise ConfigError("model.dims[0] (the input size) must be at least 10 to hold the label")
        if self.threshold_coeff <= 0:
            raise ConfigError("model.threshold_coeff must be positive")
        _choice("model.goodness", self.goodness, ("mean", "sum"))
        _choice("model.label_position", self.label_position, ("last", "first"))
        if self.norm_eps < 0:
            raise ConfigError("model.norm_eps must be >= 0")
        _choice("model.layer", self.layer, layers.names())

    @property
    def num_layers(self) -> int:
        return len(self.dims) - 1


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    epochs: int = 100
    """E: total epochs every layer is trained for."""
    chapters: int = 100
    """S: number of chapters (splits); each chapter trains every layer for C = E/S epochs.
    With ``chapter_batches`` set it is derived from the data (``mpff train`` writes the count
    into the run's config.toml)."""
    chapter_batches: int = 0
    """Chapters of K batches instead of C epochs (0: C = E/S epochs): chapter c is the next K
    batches of the epochs' shuffled order, from many epochs down to 1 (per-batch FF); weights
    travel after each chapter and S may exceed E (mpff.chapters). The data pushed through
    the layers is held for the chapter's samples only, ``slice_batches`` at a time."""
    slice_batches: int = 100
    """With ``chapter_batches``: a chapter's samples go through the layers this many batches at
    a time (a longer chapter is streamed: a layer's inputs are recomputed slice by slice), so a
    rank holds a slice's activations, not the data set's. Part of the result (like the batch)."""
    batch_size: int = 64
    """Positive samples per step (each step also sees as many negatives)."""
    lr: float = 0.01
    """Adam learning rate of the FF layers before the cooldown."""
    head_lr: float = 1e-4
    """Adam learning rate of the softmax head before the cooldown."""
    cooldown_final: str = "hold"
    """The cooldown 2*lr*(E-e)/E reaches 0 at the last epoch: 'hold' trains it at the previous
    epoch's rate (the first author's code), 'zero' follows the formula (the epoch changes nothing)."""
    negatives: str = "adaptive"
    """'fixed' (drawn once), 'random' (fresh each chapter) or 'adaptive' (most-predicted wrong label)."""
    adaptive_lag: int = 0
    """Adaptive negatives: those used from chapter c+1+lag on come from the network after chapter c."""
    adaptive_mode: str = "lag"
    """'lag': deterministic, waits for the negatives of chapter c-1-lag; 'newest': the paper's
    Single Layer behaviour, uses the newest negatives that have arrived without waiting
    (not reproducible)."""
    classifier: str = "goodness"
    """'goodness' (sum of goodness over layers 2..L per overlaid label) or 'softmax' (a trained head)."""
    seed: int = 0
    """Seed of every random choice (initial weights, shuffles, negatives)."""
    threads: int = 1
    """torch threads per rank; 0 keeps torch's default. One per rank unless a rank has cores of its own."""
    eval_every: int = 1
    """Evaluate test accuracy every this many chapters (the last chapter always); 0: last only."""
    precision: str = "fp32"
    """Matrix products in 'fp32', 'bf16' (bfloat16 arithmetic inside the products: oneDNN on
    CPUs with AVX-512 BF16 or AMX, cuBLAS on GPUs from Ampere on) or 'tf32' (CUDA GPUs from
    Ampere on); inputs, outputs, weights and Adam's state stay fp32.
    Runs are bit-identical across schedules within one precision."""
    algorithm: str = "ff"
    """'ff' (Forward-Forward, the PFF schedules) or 'backprop' (the same network as an MLP
    trained end to end with backpropagation, for comparison; SPEC section 4)."""
    bp_lr: float = 1e-3
    """Adam learning rate of backprop before the cooldown. Apart from ``lr`` so that each
    algorithm has a default that suits it: FF's 0.01 diverges for backprop with Adam."""

    def __post_init__(self) -> None:
        _choice("train.algorithm", self.algorithm, algorithms.names())
        _choice("train.precision", self.precision, ("fp32", "bf16", "tf32"))
        if self.bp_lr <= 0:
            raise ConfigError("train.bp_lr must be positive")
        for name in ("epochs", "chapters", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        if self.chapter_batches < 0 or self.slice_batches < 1:
            raise ConfigError("train.chapter_batches must be >= 0 (0: chapters of whole epochs) and "
                              "train.slice_batches at least 1")
        if self.chapter_batches and self.adaptive_mode == "newest":
            raise ConfigError("train.adaptive_mode = 'newest' reuses a chapter's negatives for the "
                              "same samples, which chapters of train.chapter_batches never meet "
                              "again; use adaptive_mode = 'lag'")
        if self.epochs % self.chapters and not self.chapter_batches:
            raise ConfigError(
                f"train.epochs ({self.epochs}) must be divisible by train.chapters ({self.chapters}); "
                "choose chapters that divide the epochs"
            )
        if self.lr <= 0 or self.head_lr <= 0:
            raise ConfigError("train.lr and train.head_lr must be positive")
        _choice("train.negatives", self.negatives, NEGATIVES)
        _choice("train.cooldown_final", self.cooldown_final, ("hold", "zero"))
        _choice("train.adaptive_mode", self.adaptive_mode, ("lag", "newest"))
        _choice("train.classifier", self.classifier, CLASSIFIERS)
        if self.adaptive_lag < 0:
            raise ConfigError("train.adaptive_lag must be >= 0")
        if self.threads < 0 or self.eval_every < 0:
            raise ConfigError("train.threads and train.eval_every must be >= 0")

    @property
    def epochs_per_chapter(self) -> int:
        """C = E/S whole epochs (chapters of epochs; 0 with chapter_batches: see mpff.chapters)."""
        return 0 if self.chapter_batches else self.epochs // self.chapters


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = "mnist"
    """'mnist' (the copy embedded in mpff), 'idx' (any IDX set: Fashion-MNIST, KMNIST),
    'cifar10' (python pickle batches), 'npz' (x_train, y_train, x_test, y_test) or
    'torchvision' (the set data.name through torchvision, which must be installed)."""
    path: str = ""
    """Directory (idx, cifar10, mnist) or file (npz) to read; empty for the embedded MNIST.
    torchvision: its root (the folder ``mpff data download`` fills); ImageFolder: the folder
    holding train/ and test/, each with one subfolder of images per class."""
    name: str = ""
    """torchvision: the data set: MNIST, FashionMNIST, KMNIST, EMNIST, CIFAR10, CIFAR100, SVHN
    or ImageFolder (any case)."""
    split: str = ""
    """torchvision EMNIST: its split, byclass, bymerge, balanced, letters, digits or mnist."""
    train_subset: int = 0
    """Use only the first N training samples (0: all)."""
    test_subset: int = 0
    """Use only the first N test samples (0: all)."""
    shards: int = 0
    """Split the training set into this many shards; chapter c trains on shard c mod shards.
    0: the world size for 'federated', 1 otherwise. Set it to N to run the Sequential
    counterpart of an N-rank Federated run."""

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, dataspec.names())
        spec = dataspec.get(self.dataset)
        spec.check(self)
        if spec.needs_path and not self.path:
            raise ConfigError(f"data.path must name the {self.dataset} data to read"
                              + (" (torchvision's root, where `mpff data download` puts it)"
                                 if self.dataset == "torchvision" else ""))
        if self.train_subset < 0 or self.test_subset < 0 or self.shards < 0:
            raise ConfigError("data.train_subset, data.test_subset and data.shards must be >= 0")

    @property
    def facts(self) -> dataspec.Facts:
        """What the data set is before it is read (mpff.dataspec)."""
        return dataspec.facts(self)

    @property
    def num_classes(self) -> int | None:
        """Classes of the data set, known without reading it (None: an ImageFolder's folders tell)."""
        return self.facts.num_classes

    @property
    def input_dim(self) -> int | None:
        """Values per flattened sample where the data set fixes it (None: the files tell)."""
        return self.facts.input_dim

    @property
    def train_samples(self) -> int | None:
        """Training samples a run uses: data.train_subset, else the full set's (None: unknown)."""
        return self.train_subset or self.facts.train_size

    @property
    def test_samples(self) -> int | None:
        """Test samples a run uses: data.test_subset, else the full set's (None: unknown)."""
        return self.test_subset or self.facts.test_size


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    schedule: str = "sequential"
    """'sequential' (rank 0 does everything), 'single_layer', 'all_layers' or 'federated' (FF);
    'sequential' or 'data_parallel' (backprop: every rank takes a slice of every batch)."""
    exchange: str = "weights"
    """What travels between ranks: 'weights' (weights and biases, as the paper) or 'full'
    (also the Adam state; needed for results identical to Sequential)."""
    device: str = "auto"
    """'auto' (the GPU of the node-local rank, else CPU), 'cpu' or 'cuda'."""
    poll_interval: float = 0.001
    """Seconds between MPI request tests while a rank waits (keeps waiting ranks off the CPU)."""
    trace: bool = True
    """Write per-rank HDF5 timing traces."""
    report: bool = True
    """Write the report (Markdown, PNG, trace-viewer JSON) at the end of the run."""
    checkpoint_every: int = 1
    """Checkpoint every this many chapters (0: never). On by default: a checkpoint costs about
    0.4 % of a run at the workstation preset (benchmarks/overhead.py) and saves the run when
    the job dies; only the newest ``checkpoint_keep`` are kept."""
    checkpoint_keep: int = 2
    """Keep the newest this many complete checkpoints, deleting older ones (0: keep all)."""
    stall_timeout: float = 0.0
    """Seconds a rank may wait for one message (a peer's buffer, or rank 0 for the other ranks'
    progress) before the job is aborted as stalled, naming the peer and the buffer; 0: wait
    forever. Set it well above the longest task (a chapter of the largest layer)."""
    inputs: str = "recompute"
    """Single Layer: each rank 'recompute's its inputs through the layers below it (received as
    weights each chapter), or the rank before it 'ship's them (its block's outputs on the
    chapter's positives and negatives). Shipping moves 2 x samples x width x 4 bytes per block
    boundary and chapter instead of the forward passes; bit-identical either way."""
    blocks: str = "cost"
    """Single Layer with more layers than ranks: contiguous blocks of layers balanced by their
    work ('cost': training plus the forward passes that feed a block, from the layer sizes) or
    by layer count ('count')."""
    eval_placement: str = "balanced"
    """Single Layer on several ranks: where the evaluations before the last chapter run.
    'balanced': each on the rank with the least work (from the layer sizes), one chapter later
    on a rank that does not own the last layer, so it fills time that rank would spend waiting
    instead of delaying the last rank; 'last': on the rank of the last layer (the paper's).
    The last chapter's evaluation is always on the last rank; results are identical."""
    scaling: str = "strong"
    """Data-parallel backprop: 'strong' (the global batch is train.batch_size, each of N ranks
    takes 1/N of it) or 'weak' (each rank takes train.batch_size, the global batch is N times it)."""

    def __post_init__(self) -> None:
        _choice("run.schedule", self.schedule, all_schedules())
        _choice("run.scaling", self.scaling, ("strong", "weak"))
        _choice("run.blocks", self.blocks, ("cost", "count"))
        _choice("run.inputs", self.inputs, ("recompute", "ship"))
        _choice("run.eval_placement", self.eval_placement, ("balanced", "last"))
        _choice("run.exchange", self.exchange, ("weights", "full"))
        _choice("run.device", self.device, ("auto", "cpu", "cuda"))
        if min(self.poll_interval, self.checkpoint_every, self.checkpoint_keep, self.stall_timeout) < 0:
            raise ConfigError("run.poll_interval, run.checkpoint_every, run.checkpoint_keep and "
                              "run.stall_timeout must be >= 0")


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "run": RunConfig}


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    name: str = "run"
    """Preset name (the TOML file's stem), used for default output directories."""

    def __post_init__(self) -> None:
        width = self.data.input_dim
        if width is not None and self.model.dims[0] != width:
            raise ConfigError(f"{self.data.facts.title} has {width} inputs: set model.dims[0] = {width}")
        _check_algorithm(self)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in SECTIONS:
            sec = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()}
        out["name"] = self.name
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        lines = [f"name = {json.dumps(self.name)}", ""]
        for name in SECTIONS:
            lines.append(f"[{name}]")
            for key, value in self.to_dict()[name].items():
                lines.append(f"{key} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def replace(self, **sections: Any) -> Config:
        """Copy with some fields of some sections changed: replace(run={'schedule': 'x'})."""
        kwargs = {}
        for name, changes in sections.items():
            kwargs[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **kwargs)

    def resolved_shards(self, world_size: int) -> int:
        """How many shards the training set is cut into on ``world_size`` ranks: data.shards when
        set, else one per rank for Federated and one (no sharding) otherwise. Chapter c trains on
        shard c mod shards; ``shard_sizes`` gives their lengths."""
        if self.data.shards:
            return self.data.shards
        return world_size if self.run.schedule == "federated" else 1


    def chapter_geometry(self, n_train: int, world_size: int):
        """With ``train.chapter_batches``: the chapters of a run on ``n_train`` samples and
        ``world_size`` ranks (:class:`mpff.chapters.Chapters`); None for chapters of epochs."""
        t = self.train
        if not t.chapter_batches:
            return None
        from .chapters import Chapters

        return Chapters(epochs=t.epochs, batch_size=t.batch_size, chapter_batches=t.chapter_batches,
                        shard_lens=shard_sizes(n_train, self.resolved_shards(world_size)),
                        slice_batches=t.slice_batches)

    def with_chapters(self, n_train: int | None, world_size: int) -> Config:
        """This configuration with ``train.chapters`` derived from ``train.chapter_batches`` for
        ``n_train`` training samples (unchanged for chapters of epochs, or when n_train is unknown)."""
        geometry = self.chapter_geometry(n_train, world_size) if n_train else None
        if geometry is None or geometry.num_chapters == self.train.chapters:
            return self
        return self.replace(train={"chapters": geometry.num_chapters})


def shard_sizes(n: int, shards: int) -> list[int]:
    """Samples in each of ``shards`` shards of ``n`` samples: np.array_split's rule, the first
    n mod shards shards one longer. The one statement of the shard rule (data, plan, predict)."""
    base, extra = divmod(n, shards)
    return [base + (1 if s < extra else 0) for s in range(shards)]


#: Settings only Forward-Forward uses. A backprop run refuses any of them set to something other
#: than its default: the user meant something backprop cannot do. Comparing with the default
#: (rather than asking whether the key was written) keeps every way of building a Config alike:
#: presets, --set, config.toml written back by a run (it lists every key), ``replace``.
FF_ONLY = {
    "model": ("threshold_coeff", "goodness", "norm_eps", "label_position", "neutral_value", "layer"),
    "train": ("lr", "head_lr", "negatives", "adaptive_lag", "adaptive_mode", "classifier",
              "chapter_batches", "slice_batches"),
    "data": ("shards",),
    "run": ("exchange",),
}
BP_ONLY = {"train": ("bp_lr",), "run": ("scaling",)}
BP_SCHEDULES = algorithms.get("backprop").schedules


def _changed(cfg: Config, keys: dict[str, tuple[str, ...]]) -> list[tuple[str, Any]]:
    out = []
    for section, names in keys.items():
        sec = getattr(cfg, section)
        defaults = SECTIONS[section]()
        for name in names:
            value = getattr(sec, name)
            if value != getattr(defaults, name) and not (section == "data" and value == 1):
                out.append((f"{section}.{name}", value))  # data.shards = 1 means no sharding
    return out


def _check_algorithm(cfg: Config) -> None:
    """Settings that belong to the other algorithm are user errors, one line each."""
    schedule = cfg.run.schedule
    if cfg.train.algorithm == "backprop":
        if schedule not in BP_SCHEDULES:
            raise ConfigError(f"run.schedule = {schedule!r} is a Forward-Forward schedule; backprop "
                              "runs 'sequential' or 'data_parallel'")
        for where, value in _changed(cfg, FF_ONLY):
            raise ConfigError(f"{where} = {value!r} is a Forward-Forward setting that backprop does "
                              f"not use; remove it, or set train.algorithm = 'ff'"
                              + ("; backprop's rate is train.bp_lr" if where == "train.lr" else ""))
    elif cfg.train.algorithm != "ff":  # a registered algorithm: its own schedules
        runs = algorithms.get(cfg.train.algorithm).schedules
        if schedule not in runs:
            raise ConfigError(f"run.schedule = {schedule!r} is not one train.algorithm = "
                              f"{cfg.train.algorithm!r} runs; use {', '.join(runs)}")
    else:
        if schedule == "data_parallel":
            raise ConfigError("run.schedule = 'data_parallel' is for backprop (set train.algorithm = "
                              "'backprop'); FF spreads chapters or layers over ranks: use "
                              "single_layer, all_layers or federated")
        for where, value in _changed(cfg, BP_ONLY):
            raise ConfigError(f"{where} = {value!r} is a backprop setting; remove it, or set "
                              "train.algorithm = 'backprop'")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


#: Integers a setting may hold: TOML's (config.toml is written back and read on --resume) and
#: HDF5's attributes' (the model and the traces store the configuration), 64-bit signed.
INT_MIN, INT_MAX = -(2 ** 63), 2 ** 63 - 1


def _int64(where: str, value: int) -> int:
    if not INT_MIN <= value <= INT_MAX:
        raise ConfigError(f"{where} = {value} does not fit in 64 bits (TOML's integers, which "
                          f"config.toml and the model file keep); give a value from {INT_MIN} to {INT_MAX}")
    return value


def _coerce(section: str, key: str, value: Any, annotation: str) -> Any:
    """Check a TOML or --set value against the field's type; ints widen to floats."""
    where = f"{section}.{key}"
    if annotation == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if annotation == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return _int64(where, value)
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    if annotation == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, not {value!r}")
            return float(value)
        raise ConfigError(f"{where} must be a number, not {value!r}")
    if annotation == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, not {value!r}")
    if annotation.startswith("tuple"):
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(_int64(where, v) for v in value)
        raise ConfigError(f"{where} must be a list of integers, not {value!r}")
    raise AssertionError(f"unhandled annotation {annotation}")  # internal invariant


def from_dict(data: dict[str, Any], name: str = "run") -> Config:
    """Build a validated Config from nested dicts (unknown sections or keys are errors)."""
    data = dict(data)
    name = data.pop("name", name)
    kwargs: dict[str, Any] = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section [{section}]; known sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of settings")
        cls = SECTIONS[section]
        known = {f.name: f for f in fields(cls)}
        sec_kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"unknown config key {section}.{key}; known keys: {', '.join(known)}"
                )
            sec_kwargs[key] = _coerce(section, key, value, str(known[key].type))
        kwargs[section] = cls(**sec_kwargs)
    return Config(name=str(name), **kwargs)


def _unwritable(text: str) -> str | None:
    """What in ``text`` cannot round-trip through a TOML file (config.toml): a newline or another
    control character (TOML would read what follows it as more settings, or refuse it), or a
    lone surrogate (bytes of the command line that are not UTF-8)."""
    for ch in text:
        if ch == "\n" or ch == "\r":
            return "a line break"
        if unicodedata.category(ch) == "Cc" and ch != "\t":
            return f"the control character {ch!r}"
        if unicodedata.category(ch) == "Cs":
            return "bytes that are not UTF-8 text"
    return None


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse 'section.key=value' where value is TOML (bare words are taken as strings). One
    setting per --set: a value holding a line break (or anything config.toml could not hold)
    is refused, not cut where TOML's next line would begin."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r} must look like section.key=value, e.g. train.epochs=4")
    bad = _unwritable(text)
    if bad is not None:
        raise ConfigError(f"--set {text!r} holds {bad}, which config.toml cannot hold; "
                          + ("give one setting per --set, on one line, e.g. --set train.epochs=4 "
                             "--set train.lr=0.1" if bad == "a line break" else "remove it"))
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()  # a bare word such as single_layer
    return section, key, value


def preset_names() -> list[str]:
    """The presets shipped in the package (``mpff/presets/<name>.toml``), sorted."""
    folder = resources.files("mpff") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def resolve_config_path(path: str) -> str:
    """The TOML file ``--config`` names: an existing file, else a packaged preset given by
    its bare name (``tiny``) or file name (``tiny.toml``), so presets work from any directory."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        raise ConfigError(f"config file {path!r} is a directory; give a TOML file in it (such as "
                          f"{os.path.join(path, 'config.toml')!r}) or a preset name ({', '.join(preset_names())})")
    if os.path.exists(path):
        raise ConfigError(f"config file {path!r} is not a regular file; give a TOML file or a preset name "
                          f"({', '.join(preset_names())})")
    name = path[:-5] if path.endswith(".toml") else path
    if os.sep not in path and (os.altsep is None or os.altsep not in path) and name in preset_names():
        # resources.files is a real directory for a normal (or editable) install, not a zip
        return str(resources.files("mpff") / "presets" / f"{name}.toml")
    raise ConfigError(f"config file {path!r} not found; give a TOML file or a preset name "
                      f"({', '.join(preset_names())})")


def _other_algorithm_keys(algorithm: str, data: dict[str, Any]) -> list[tuple[str, str]]:
    """(section, key) of the settings in ``data`` that only the other algorithm uses and that
    differ from their defaults (a default changes nothing and is never refused), the schedule
    included when it is the other algorithm's."""
    other = FF_ONLY if algorithm == "backprop" else BP_ONLY
    out = []
    for section, names in other.items():
        defaults = SECTIONS[section]()
        values = data.get(section)
        if not isinstance(values, dict):
            continue
        out += [(section, k) for k in names if k in values and values[k] != getattr(defaults, k)]
    schedule = data.get("run", {}).get("schedule") if isinstance(data.get("run"), dict) else None
    if schedule is not None and (schedule in BP_SCHEDULES) != (algorithm == "backprop") \
            and schedule != "sequential":
        out.append(("run", "schedule"))
    return out


def _set_aside(data: dict[str, Any], file_algorithm: str, set_keys: set[tuple[str, str]],
               notes: list[str] | None) -> None:
    """When --set switches the algorithm of a config file, drop the file's settings that only
    the file's algorithm uses (one note names them), so one preset serves both algorithms.
    The same settings given with --set, or a file that mixes them itself, are still refused."""
    train = data.get("train")
    algorithm = train.get("algorithm", "ff") if isinstance(train, dict) else "ff"
    if algorithm == file_algorithm or algorithm not in ALGORITHMS:
        return
    dropped = [(sec, key) for sec, key in _other_algorithm_keys(algorithm, data)
               if (sec, key) not in set_keys]
    for sec, key in dropped:
        del data[sec][key]
    if dropped and notes is not None:
        kind = "Forward-Forward" if algorithm == "backprop" else "backprop"
        after = ("; run.schedule is now 'sequential' (one rank): add --set "
                 "run.schedule=data_parallel for several" if ("run", "schedule") in dropped
                 and algorithm == "backprop" else "")
        notes.append(f"train.algorithm = {algorithm!r}: set aside the config file's {kind} "
                     f"settings {', '.join(f'{s}.{k}' for s, k in dropped)}{after}")


def load(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
         notes: list[str] | None = None) -> Config:
    """Read a TOML file or packaged preset (the defaults when path is None), apply --set overrides.

    When the overrides change the file's ``train.algorithm``, the file's settings of the other
    algorithm are set aside and a line saying so is appended to ``notes``."""
    data: dict[str, Any] = {}
    name = "run"
    if path:
        path = resolve_config_path(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path!r} is not a text file (TOML is UTF-8 text); "
                              "give a preset such as configs/tiny.toml") from None
        except OSError as exc:
            raise ConfigError(f"config file {path!r} cannot be read ({exc.strerror})") from None
        name = os.path.splitext(os.path.basename(path))[0]
    train = data.get("train")
    file_algorithm = train.get("algorithm", "ff") if isinstance(train, dict) else "ff"
    set_keys = set()
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"[{section}] must be a table of settings")
        data[section][key] = value
        set_keys.add((section, key))
    if path:
        _set_aside(data, file_algorithm, set_keys, notes)
    return from_dict(data, name=name)
