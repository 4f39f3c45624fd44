"""Pure scheduling: (configuration, world size) -> which rank runs which task, and what travels.

Training is one task graph (SPEC section 2):

- ``train(c, k)``: train layer k for the C epochs of chapter c. Needs layer k after chapter c-1
  (its trainable state) and layers 0..k-1 after chapter c (to compute its inputs).
- ``head(c)``: train the softmax head after chapter c (softmax classifier only).
- ``negatives(c)``: adaptive negatives for chapter c+1+lag, from the network after chapter c.
- ``eval(c)``: test accuracy after chapter c.
- ``final``: write the model after the last chapter.

A schedule is only an *assignment* of these tasks to ranks (:func:`assign`): one short
function per variant. Everything else is derived here: each rank runs its tasks in the
global topological order (so no schedule can deadlock), and every buffer produced on one
rank and needed on another becomes one send and one matching receive. The engine executes
a rank's list; :mod:`mpff.predict.simulate` times the same graph (measured or predicted task
times) to model the pipeline bubble.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import layers
from .config import Config, ConfigError, DataConfig, shard_sizes
from .dataspec import DEFAULT_CLASSES


@dataclass(frozen=True, order=True)
class Task:
    kind: str      # "train" | "head" | "negatives" | "eval" | "final"
    chapter: int
    layer: int = -1


@dataclass(frozen=True, order=True)
class Buf:
    """A versioned piece of state: ("layer", k, c) is layer k after chapter c; ("head", -1, c);
    ("neg", -1, c) is the negative labels *used in* chapter c."""
    kind: str
    index: int
    chapter: int


@dataclass(frozen=True)
class Transfer:
    buf: Buf
    peer: int
    full: bool      # also the optimizer state (exchange = "full" and the peer trains it next)
    tag: int


def layer_blocks(num_layers: int, world_size: int, costs: list[float] | None = None,
                 feeds: list[float] | None = None) -> list[int]:
    """Single Layer ownership: layer k -> rank, in contiguous blocks.

    Without ``costs``, blocks as equal in layer count as possible. With ``costs`` (a layer's
    training work per chapter) and ``feeds`` (the work of pushing the chapter's data through
    it), blocks balanced by work: a block of layers i..j costs its layers' training plus the
    forward passes through layers 0..j-1 that make its inputs (the recomputation below it and
    the passes between its own layers); the partition minimises the largest block."""
    if world_size > num_layers:
        raise ConfigError(
            f"single_layer needs at most one rank per layer: {world_size} ranks for {num_layers} "
            f"layers; run with -n {num_layers} or fewer, or use all_layers"
        )
    if costs is None:
        bounds = [list(b) for b in np.array_split(np.arange(num_layers), world_size)]
    else:
        bounds = _balanced_blocks(costs, feeds or [0.0] * num_layers, world_size)
    owner = [0] * num_layers
    for rank, block in enumerate(bounds):
        for k in block:
            owner[int(k)] = rank
    return owner


def _balanced_blocks(costs: list[float], feeds: list[float], parts: int) -> list[list[int]]:
    """Contiguous partition of the layers into ``parts`` non-empty blocks minimising the largest
    block cost (dynamic programming over the split points; ties: earlier splits)."""
    n = len(costs)
    train = np.concatenate([[0.0], np.cumsum(costs)])
    fed = np.concatenate([[0.0], np.cumsum(feeds)])

    def block(i: int, j: int) -> float:  # layers i..j-1
        return float(train[j] - train[i] + fed[j - 1])

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for j in range(p, n - (parts - p) + 1):
            for i in range(p - 1, j):
                value = max(best[p - 1][i], block(i, j))
                if value < best[p][j] - 1e-12:
                    best[p][j], cut[p][j] = value, i
    blocks, j = [], n
    for p in range(parts, 0, -1):
        i = cut[p][j]
        blocks.append(list(range(i, j)))
        j = i
    return blocks[::-1]


def layer_work(dims, epochs_per_chapter: float, kind: str = layers.DEFAULT) -> tuple[list[float], list[float]]:
    """(training, forward) work per layer and chapter in multiply-adds per sample: a forward
    pass through layer k costs what its kind says (in*out for a linear layer); training costs
    about three passes (forward, and the backward pass's two products) for each of the
    chapter's epochs."""
    spec = layers.get(kind)
    fwd = [float(spec.forward_macs(dims[k], dims[k + 1])) for k in range(len(dims) - 1)]
    return [3.0 * epochs_per_chapter * f for f in fwd], fwd


def assign(schedule: str, task: Task, num_layers: int, num_chapters: int, world_size: int,
           owner: list[int] | None = None) -> int:
    """The whole difference between the PFF variants: which rank runs ``task`` (``owner``: the
    Single Layer blocks, layer -> rank; by count when not given)."""
    if schedule == "sequential":
        return 0
    if schedule == "single_layer":
        owner = owner or layer_blocks(num_layers, world_size)
        # head, negatives, eval and the final model need the whole network of the chapter:
        # they run where its last layer is trained.
        # (a layer's owner also ships its outputs to the next block, run.inputs = "ship")
        return owner[task.layer if task.kind in ("train", "ship") else num_layers - 1]
    if schedule in ("all_layers", "federated"):
        chapter = task.chapter if task.kind != "final" else num_chapters - 1
        return chapter % world_size
    if schedule == "data_parallel":
        # backprop: every rank runs every train task on its slice of each batch (Plan.replicated);
        # rank 0 is the one that evaluates and writes, and the nominal producer of the model
        return 0
    raise ConfigError(f"unknown schedule {schedule!r}")  # pragma: no cover (validated in config)


#: (training, test) samples that stand in for a data set whose sizes only its files tell, when
#: the plan is built before they are read: the default data set's (MNIST)
_STAND_IN = (DataConfig().facts.train_size, DataConfig().facts.test_size)


class Plan:
    """The task graph of one run and its assignment to ``world_size`` ranks."""

    def __init__(self, cfg: Config, world_size: int, start_chapter: int = 0,
                 n_train: int | None = None, num_classes: int | None = None) -> None:
        #: chapters of train.chapter_batches: their count follows from the training samples
        #: (those of the data set's files when known, else what the configuration says)
        cfg = cfg.with_chapters(n_train or cfg.data.train_samples or _STAND_IN[0], world_size)
        self.cfg = cfg
        self.n_train = n_train  # training samples: sizes the negatives buffers (None: unknown)
        #: which batches each chapter holds (mpff.chapters); None for chapters of whole epochs
        self.geometry = cfg.chapter_geometry(n_train, world_size) if n_train else None
        #: classes of the data set: the width of the head and of backprop's output, the labels the
        #: goodness classifier tries; None takes the data set's count (that of an ImageFolder is
        #: known once its folders are read: the default count stands for it until then)
        self.num_classes = int(num_classes or cfg.data.num_classes or DEFAULT_CLASSES)
        self.world_size = world_size
        self.schedule = cfg.run.schedule
        self.num_layers = cfg.model.num_layers
        self.num_chapters = cfg.train.chapters
        self.start_chapter = start_chapter
        #: backprop: one train task per chapter trains the whole MLP (buffer "model")
        self.backprop = cfg.train.algorithm == "backprop"
        #: data-parallel: train tasks run on every rank (DDP averages the gradients inside them)
        self.replicated = self.schedule == "data_parallel"
        self.softmax = cfg.train.classifier == "softmax" and not self.backprop
        self.adaptive = cfg.train.negatives == "adaptive" and not self.backprop
        self.lag = cfg.train.adaptive_lag
        self.newest = self.adaptive and cfg.train.adaptive_mode == "newest"
        self.full_exchange = cfg.run.exchange == "full"
        self.shards = cfg.resolved_shards(world_size)
        self._validate()

        self.owner = self._owner() if self.schedule == "single_layer" else None
        #: Single Layer, run.inputs = "ship": the owner of the last layer of a block sends its
        #: outputs on the chapter's data to the next block's rank instead of that rank
        #: recomputing them through every layer below (tasks "ship", buffers "act")
        self.ship = self.owner is not None and cfg.run.inputs == "ship" and world_size > 1
        #: Single Layer, run.eval_placement = "balanced": chapter -> the rank (not the last
        #: layer's) that runs that chapter's evaluation, one chapter later in its task order
        self.moved_evals: dict[int, int] = self._place_evals()
        self.tasks: list[Task] = self._global_order()
        self.rank_of: dict[Task, int] = {
            t: assign(self.schedule, t, self.num_layers, self.num_chapters, world_size, self.owner)
            for t in self.tasks
        }
        for c, r in self.moved_evals.items():
            if Task("eval", c) in self.rank_of:
                self.rank_of[Task("eval", c)] = r
        self._by_rank: list[list[Task]] | None = None
        self.producer: dict[Buf, Task] = {}
        for t in self.tasks:
            for b in self.outputs(t):
                self.producer[b] = t
        self._derive_transfers()

    def _owner(self) -> list[int]:
        """Single Layer blocks: balanced by work (run.blocks = "cost") or by count."""
        if self.cfg.run.blocks == "count":
            return layer_blocks(self.num_layers, self.world_size)
        m = self.cfg.model
        costs, feeds = layer_work(m.dims, self.chapter_epochs, m.layer)
        return layer_blocks(self.num_layers, self.world_size, costs, feeds)

    # ----- the graph -----
    def _validate(self) -> None:
        n, s = self.world_size, self.schedule
        if s == "sequential" and n != 1:
            others = "data_parallel" if self.backprop else "single_layer, all_layers or federated"
            raise ConfigError(f"schedule 'sequential' runs on one rank, not {n}; use mpiexec -n 1 "
                              f"or choose {others}")
        if s == "single_layer":
            layer_blocks(self.num_layers, n)
        if self.cfg.run.inputs == "ship" and s != "single_layer":
            raise ConfigError(f"run.inputs = 'ship' is for single_layer (its ranks recompute their "
                              f"inputs); schedule {s!r} computes them once, set run.inputs = 'recompute'")
        if s == "federated":
            if self.shards != n:
                raise ConfigError(f"federated needs one data shard per rank: data.shards = {self.shards} "
                                  f"but {n} ranks; leave data.shards = 0")
            if self.adaptive and (1 + self.lag) % n:
                raise ConfigError(
                    f"federated adaptive negatives are made by the rank that owns the shard: set "
                    f"train.adaptive_lag to {n - 1} (a multiple of the ranks, minus one)")
        if self.newest and s not in ("single_layer", "sequential"):
            raise ConfigError("train.adaptive_mode = 'newest' is the paper's Single Layer behaviour; "
                              "use it with schedule single_layer, or use 'lag'")
        if not 0 <= self.start_chapter <= self.num_chapters:
            raise ConfigError(f"cannot start at chapter {self.start_chapter} of {self.num_chapters}")

    def _evaluated(self, c: int) -> bool:
        every = self.cfg.train.eval_every
        return c == self.num_chapters - 1 or bool(every and (c + 1) % every == 0)

    def _place_evals(self) -> dict[int, int]:
        """Single Layer: the evaluations before the last chapter, each to the rank with the
        least work so far (ties: the last layer's rank, which then keeps it). A rank's work per
        chapter, in multiply-adds, from the layer sizes (:func:`layer_work`): its layers'
        training and the forward passes it makes (below its block when recomputing, the pass it
        ships otherwise); an evaluation's: the test set through every layer, once per label for
        the goodness classifier."""
        if (self.owner is None or self.world_size < 2 or self.cfg.run.eval_placement != "balanced"
                or self.backprop):
            return {}
        n = self.world_size
        m, data = self.cfg.model, self.cfg.data
        costs, fwd = layer_work(m.dims, self.chapter_epochs, m.layer)
        rows = 2 * (self.n_train or data.train_samples or _STAND_IN[0])  # positives and negatives
        n_test = data.test_samples or _STAND_IN[1]
        chapter = [0.0] * n
        for k in range(self.num_layers):
            r = self.owner[k]
            chapter[r] += costs[k] * rows
            if k + 1 == self.num_layers or self.owner[k + 1] != r:  # the block's last layer
                first = self.block_start(k) if self.ship else 0     # passes up to its input
                chapter[r] += sum(fwd[first:k]) * rows
                if self.ship and k + 1 < self.num_layers:
                    chapter[r] += fwd[k] * rows                    # the pass it ships
        per_label = self.num_classes if self.cfg.train.classifier == "goodness" else 1
        evaluation = sum(fwd) * n_test * per_label
        last = self.owner[self.num_layers - 1]
        load = [chapter[r] * self.num_chapters for r in range(n)]
        load[last] += evaluation  # the last chapter's evaluation stays there
        moved = {}
        # from chapter 0 whatever the start, so a resumed run places them as the first run did
        # (a resumed run repeats the moved evaluation of the chapter before it: its rank may
        # have checkpointed that chapter before evaluating it)
        for c in range(self.num_chapters - 1):
            if not self._evaluated(c):
                continue
            r = min(range(n), key=lambda q: (load[q], q != last))
            load[r] += evaluation
            if r != last:
                moved[c] = r
        return moved

    def _global_order(self) -> list[Task]:
        tasks = []
        deferred = self._deferred()
        for c in range(self.start_chapter, self.num_chapters):
            for k in range(1 if self.backprop else self.num_layers):
                tasks.append(Task("train", c, k))
                if self.ship and k + 1 < self.num_layers and self.owner[k + 1] != self.owner[k]:
                    tasks.append(Task("ship", c, k))
            for e in deferred.get(c, ()):
                tasks.append(Task("eval", e))
            if self.softmax:
                tasks.append(Task("head", c))
            if self.adaptive and c + 1 + self.lag < self.num_chapters:
                tasks.append(Task("negatives", c))
            if self._evaluated(c) and c not in self.moved_evals:
                tasks.append(Task("eval", c))
        if self.start_chapter < self.num_chapters:
            tasks.append(Task("final", self.num_chapters - 1))
        return tasks

    def eval_delay(self, rank: int) -> int:
        """Chapters a moved evaluation waits on ``rank``: the pipeline stages after it, plus one
        (the last layer of chapter c is done about that many chapters after the rank's own)."""
        return self.world_size - rank

    def _deferred(self) -> dict[int, list[int]]:
        """Chapter c -> the moved evaluations that run after its training (the chapter
        ``eval_delay`` later, or the last chapter for those that would fall beyond it); only
        chapters of this plan (a resumed run's checkpoint came after the earlier ones)."""
        last = self.num_chapters - 1
        out: dict[int, list[int]] = {}
        for e, r in sorted(self.moved_evals.items()):
            if e >= self.start_chapter:
                out.setdefault(min(e + self.eval_delay(r), last), []).append(e)
        return out

    def network(self, c: int) -> list[Buf]:
        """Everything a whole-network task after chapter c needs."""
        if self.backprop:
            return [Buf("model", 0, c)]
        bufs = [Buf("layer", k, c) for k in range(self.num_layers)]
        if self.softmax:
            bufs.append(Buf("head", -1, c))
        return bufs

    def inputs(self, t: Task) -> list[tuple[Buf, bool]]:
        """(buffer, trainable) pairs the task needs; trainable ones carry optimizer state when full."""
        if t.kind == "train" and self.backprop:
            return [(Buf("model", 0, t.chapter - 1), True)]
        if t.kind in ("train", "ship"):
            ins = [(Buf("layer", t.layer, t.chapter - 1), True)] if t.kind == "train" else \
                [(Buf("layer", t.layer, t.chapter), False)]
            ins += [(b, False) for b in self.data_inputs(t.chapter, t.layer)]
            if self.adaptive and not self.newest and t.chapter > self.lag:
                ins.append((Buf("neg", -1, t.chapter), False))
            return ins
        if t.kind == "head":
            return ([(Buf("layer", k, t.chapter), False) for k in range(self.num_layers)]
                    + [(Buf("head", -1, t.chapter - 1), True)])
        return [(b, False) for b in self.network(t.chapter)]

    def block_start(self, k: int) -> int:
        """The first layer of the Single Layer block that holds layer k (0 for other schedules)."""
        if self.owner is None:
            return 0
        b = k
        while b > 0 and self.owner[b - 1] == self.owner[k]:
            b -= 1
        return b

    def data_inputs(self, chapter: int, k: int) -> list[Buf]:
        """What layer k's inputs in ``chapter`` are computed from: the layers below it as trained
        in that chapter (recomputed from the data), or with shipping, the outputs of the layer
        before its block (buffer "act") and the layers of its block below it."""
        if not self.ship or self.block_start(k) == 0:
            return [Buf("layer", j, chapter) for j in range(k)]
        b0 = self.block_start(k)
        return [Buf("act", b0 - 1, chapter)] + [Buf("layer", j, chapter) for j in range(b0, k)]

    def outputs(self, t: Task) -> list[Buf]:
        if t.kind == "train":
            return [Buf("model", 0, t.chapter)] if self.backprop else [Buf("layer", t.layer, t.chapter)]
        if t.kind == "head":
            return [Buf("head", -1, t.chapter)]
        if t.kind == "negatives":
            return [Buf("neg", -1, t.chapter + 1 + self.lag)]
        if t.kind == "ship":
            return [Buf("act", t.layer, t.chapter)]
        return []

    def is_initial(self, b: Buf) -> bool:
        """Available on every rank without a message: initial state, or loaded from a checkpoint."""
        return b not in self.producer

    # ----- communication, derived -----
    def tag(self, b: Buf) -> int:
        L = self.num_layers
        slot = {"layer": b.index, "head": L, "neg": L + 1, "act": L + 2 + b.index, "model": 0}[b.kind]
        return (b.chapter + 1) * (2 * L + 2) + slot

    def _derive_transfers(self) -> None:
        self.sends: dict[Task, list[Transfer]] = {t: [] for t in self.tasks}
        self.recvs: list[list[tuple[Task, Transfer]]] = [[] for _ in range(self.world_size)]
        first_use: dict[tuple[Buf, int], Task] = {}
        full_needed: dict[tuple[Buf, int], bool] = {}
        negatives = [b for b in self.producer if b.kind == "neg"] if self.newest else []
        heard: set[int] = set()
        for t in self.tasks:
            r = self.rank_of[t]
            ins = self.inputs(t)
            if self.newest and t.kind == "train" and r not in heard:
                # newest mode: every rank that trains hears every negatives update, never waits;
                # its first train task (the earliest chapter) is the first use of all it hears
                heard.add(r)
                ins = ins + [(b, False) for b in negatives if b.chapter > t.chapter]
            for b, trainable in ins:
                if self.is_initial(b) or self.rank_of[self.producer[b]] == r:
                    continue
                key = (b, r)
                first_use.setdefault(key, t)
                full_needed[key] = full_needed.get(key, False) or (trainable and self.full_exchange)
        order = {t: i for i, t in enumerate(self.tasks)}
        for (b, r), t in sorted(first_use.items(), key=lambda kv: (order[kv[1]], kv[0][0])):
            src_task = self.producer[b]
            src = self.rank_of[src_task]
            full = full_needed[(b, r)]
            self.sends[src_task].append(Transfer(b, r, full, self.tag(b)))
            self.recvs[r].append((t, Transfer(b, src, full, self.tag(b))))

    def rank_tasks(self, rank: int) -> list[Task]:
        if self._by_rank is None:  # one pass over the tasks for every rank, not one per rank
            self._by_rank = [[] for _ in range(self.world_size)]
            for t in self.tasks:
                if self.replicated and t.kind == "train":
                    for tasks in self._by_rank:
                        tasks.append(t)
                else:
                    self._by_rank[self.rank_of[t]].append(t)
        return list(self._by_rank[rank])

    def final_rank(self) -> int:
        return self.rank_of[Task("final", self.num_chapters - 1)]

    def data_shard(self, chapter: int) -> int:
        return chapter % self.shards

    @property
    def chapter_epochs(self) -> float:
        """A chapter's length in epochs of its shard: C, or for chapters of train.chapter_batches
        their mean (from the configured sizes when the plan was built without n_train)."""
        t = self.cfg.train
        if not t.chapter_batches:
            return float(t.epochs_per_chapter)
        geometry = self.geometry or self.cfg.chapter_geometry(
            self.cfg.data.train_samples or _STAND_IN[0], self.world_size)
        return geometry.mean_epochs()

    def chapter_rows(self, chapter: int) -> int:
        """Samples chapter ``chapter`` trains on: its shard, or its batches (train.chapter_batches)."""
        if self.geometry is not None:
            return self.geometry.rows(chapter)
        return self.shard_len(self.data_shard(chapter))

    def shard_len(self, shard: int) -> int:
        """Samples in ``shard`` (np.array_split of the training set into ``shards`` parts)."""
        if self.n_train is None:
            raise ValueError("the plan was built without n_train: negatives buffers have no size")
        return shard_sizes(self.n_train, self.shards)[shard]

    def buffer_spec(self, b: Buf, full: bool) -> tuple[int, type]:
        """(elements, dtype) of buffer ``b`` as it travels and is checkpointed: a layer or the head
        is its parameters (the tensors its kind names, :mod:`mpff.layers`: weight then bias for a
        linear layer) and, when ``full``, Adam's step, exp_avg and exp_avg_sq;
        so is backprop's "model" (all its Linear layers, the output layer included, one Adam);
        negatives are one int64 label per sample of the chapter (its shard, or its batches)."""
        if b.kind == "neg":
            return self.chapter_rows(b.chapter), np.int64
        dims = self.cfg.model.dims
        if b.kind == "act":  # layer b.index's outputs on the chapter's positives, then negatives
            return 2 * self.chapter_rows(b.chapter) * dims[b.index + 1], np.float32
        if b.kind == "layer":  # its tensors in the order of the module's parameters (mpff.layers)
            n = layers.layer_params(dims, b.index, self.cfg.model.layer)
        elif b.kind == "head":
            n = layers.head_params(dims, self.num_classes)
        elif b.kind == "model":  # backprop: the whole MLP dims -> classes, every Linear's weight, bias
            n = layers.mlp_parameters(dims, self.num_classes)
        else:  # pragma: no cover - internal invariant
            raise AssertionError(f"unknown buffer kind {b.kind!r}")
        return n + (1 + 2 * n if full else 0), np.float32

    def buffer_bytes(self, b: Buf, full: bool) -> int:
        n, dtype = self.buffer_spec(b, full)
        return n * np.dtype(dtype).itemsize

    def describe(self) -> str:
        """A few human-readable lines: who runs what."""
        lines = []
        for r in range(self.world_size):
            counts: dict[str, int] = {}
            for t in self.rank_tasks(r):
                counts[t.kind] = counts.get(t.kind, 0) + 1
            sends = sum(len(self.sends[t]) for t in self.rank_tasks(r))
            lines.append(f"rank {r}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                         + f"; {sends} sends, {len(self.recvs[r])} receives")
        return "\n".join(lines)


def build_plan(cfg: Config, world_size: int, start_chapter: int = 0, n_train: int | None = None,
               num_classes: int | None = None) -> Plan:
    return Plan(cfg, world_size, start_chapter, n_train, num_classes)


def count_tasks(cfg: Config, world_size: int) -> int:
    """How many tasks the plan of ``cfg`` on ``world_size`` ranks has, counted without building
    it (so a caller can refuse a plan too big to build): ``len(build_plan(cfg, n).tasks)``."""
    cfg = cfg.with_chapters(cfg.data.train_samples or _STAND_IN[0], world_size)
    chapters, layers = cfg.train.chapters, cfg.model.num_layers
    backprop = cfg.train.algorithm == "backprop"
    n = chapters * (1 if backprop else layers)
    if not backprop:
        if cfg.run.schedule == "single_layer" and cfg.run.inputs == "ship" and 1 < world_size <= layers:
            n += chapters * (world_size - 1)   # one ship task per block boundary and chapter
        if cfg.train.classifier == "softmax":
            n += chapters
        if cfg.train.negatives == "adaptive":
            n += max(chapters - 1 - cfg.train.adaptive_lag, 0)
    every = cfg.train.eval_every
    n += (chapters // every + (1 if chapters % every else 0)) if every else 1
    return n + 1  # the final model write


def pipeline_bubble(num_chapters: int, num_stages: int) -> float:
    """GPipe's (p-1)/(m+p-1) for equal stage times: Single Layer with L = N stages."""
    return (num_stages - 1) / (num_chapters + num_stages - 1)
