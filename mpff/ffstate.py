"""The model side of one Forward-Forward rank: network, optimizers, data shards, negatives.

:class:`FFState` runs one task of the plan (:meth:`FFState.run`), and is the one serialiser
of its state: :meth:`pack` and :meth:`load` turn a buffer (a layer or the head after some
chapter, with or without Adam's state; the negative labels of a chapter) into one flat array
and back, for messages and checkpoints alike. Buffer sizes come from
:meth:`mpff.plan.Plan.buffer_spec`. No MPI here: the executor (:mod:`mpff.executor`) moves
the arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .config import Config, shard_sizes
from .ff import (
    FFSteps,
    adam_state,
    chapter_rates,
    cooldown_lr,
    generator,
    load_adam_state,
    make_adam,
    matmul_precision,
    seed_for,
    train_batches,
    train_epochs,
)
from .halt import Diverged
from .model import (
    FFNet,
    hardest_wrong_label,
    overlay,
    random_negatives,
    train_head,
    train_head_batches,
    wrong_label_offsets,
)
from .plan import Buf, Plan, Task
from .progress import Record

FIXED_STREAM, RANDOM_STREAM, SHUFFLE_STREAM, HEAD_STREAM = 0xF1, 0xA4, 0x5F, 0x4E


class FFState:
    """One rank's FF network and data, as the executor drives it."""

    def __init__(self, cfg: Config, plan: Plan, dataset, tracer, device: torch.device, *, rank: int = 0,
                 check: Callable[[], None] | None = None) -> None:
        # with train.chapter_batches the plan's configuration has the chapters the data makes
        self.cfg = plan.cfg if cfg.train.chapter_batches else cfg
        self.rank = rank
        self.plan = plan
        self.tracer = tracer
        self.device = device
        #: raises to halt the run (a stop signal, another rank's halt); called at every step
        self.check = check
        t = cfg.train
        self.C = t.epochs_per_chapter
        self.net = FFNet.from_config(cfg, dataset.num_classes).to(device)
        self.opts = [layer.make_optimizer(t.lr) for layer in self.net.layers]
        self.head_opt = make_adam(self.net.head.parameters(), t.head_lr)
        #: (kind, index) -> the chapter whose version the local model holds (-1: initial)
        self.version = {("layer", k): -1 for k in range(plan.num_layers)}
        self.version[("head", -1)] = -1

        # ----- data: only the shards this rank's tasks touch are moved to the device -----
        n = dataset.x_train.shape[0]
        self.n_train = n
        bounds = np.cumsum([0, *shard_sizes(n, plan.shards)])
        self.shard_index = [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        self.y_train = dataset.y_train
        self._shards: dict[int, dict] = {}
        self.x_test = torch.from_numpy(dataset.x_test).to(device)
        self.y_test = torch.from_numpy(dataset.y_test).to(device)
        self._x_train_np = dataset.x_train
        self.neg_labels: dict[int, np.ndarray] = {}   # chapter -> labels for that chapter's shard
        self._cache: tuple | None = None              # (chapter, last layer applied, h_pos, h_neg)
        #: the softmax head's features of a shard, kept from a head task for the negatives task that
        #: follows it with the same layers: (shard, layer versions, features)
        self._features: tuple | None = None
        #: versions this rank's whole-network tasks read; a moved evaluation (Single Layer,
        #: run.eval_placement) runs chapters after its own, when this rank has trained or
        #: received newer ones: those are kept (params, and Adam's state for layers trained
        #: here: the checkpoint of that chapter, written after the evaluation, needs them)
        #: until the rank passes that chapter's boundary
        self._reads = {b for t in plan.rank_tasks(rank) if t.kind in ("eval", "head", "negatives", "final")
                       for b, _ in plan.inputs(t) if b.kind in ("layer", "head")}
        self._kept: dict[Buf, tuple[np.ndarray, bool]] = {}
        self._passed = plan.start_chapter - 1
        self.test_accuracy: dict[int, float] = {}     # chapter -> accuracy, of the evals run here
        #: shipped inputs (run.inputs = "ship"): chapter -> (layer whose outputs, h_pos, h_neg)
        self._act: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._act_out: dict[tuple[int, int], np.ndarray] = {}  # (layer, chapter) -> array to send
        #: chapters of train.chapter_batches (mpff.chapters): the chapter whose rows, labels and
        #: negatives are at hand; the shard permutations of the epochs in use; the last slice's
        #: inputs (chapter, slice, last layer applied, h_pos, h_neg); the fixed negatives' offsets
        self._rows: tuple | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._slice_cache: tuple | None = None
        self._fixed_offsets: np.ndarray | None = None

    # ------------------------------------------------------------------ what mpff train asks (mpff.algorithms)
    @classmethod
    def create(cls, setup, tracer, watch) -> FFState:
        """This rank's state (FF needs no collective set-up: the executor moves its buffers)."""
        return cls(setup.cfg, setup.plan, setup.dataset, tracer, setup.device, rank=setup.comm.rank,
                   check=watch.check)

    @staticmethod
    def memory_figure(cfg: Config, n_train: int, world_size: int) -> dict:
        """The analytic memory of one rank (:func:`mpff.memory.ff_rank`)."""
        from .memory import ff_rank
        return ff_rank(cfg, n_train, world_size)

    @classmethod
    def summary(cls, cfg: Config, world_size: int) -> str:
        """The banner's words for the run."""
        return f"{cfg.train.negatives} negatives, {cfg.train.classifier} classifier"

    @staticmethod
    def classified_by(cfg: Config) -> str:
        """How the final accuracy was measured, for the last line of the run."""
        return f"{cfg.train.classifier} classifier"

    def save(self, path: str, setup) -> None:
        """The model file (mpff.modelfile.save_model) of the network after the last chapter."""
        from .modelfile import save_model

        cfg, ds = self.cfg, setup.dataset
        save_model(path, self.net, cfg, input_mean=ds.input_mean, input_std=ds.input_std,
                   input_scale=ds.input_scale, test_accuracy=self.test_accuracy.get(cfg.train.chapters - 1),
                   extra={"world_size": setup.comm.size, "schedule": cfg.run.schedule})

    def traffic(self) -> dict:
        """Bytes moved outside the executor's messages: none (the executor counts its own)."""
        return {}

    def close(self) -> None:
        """Nothing to let go of."""

    # ------------------------------------------------------------------ data
    def shard(self, s: int) -> dict:
        if s not in self._shards:
            idx = self.shard_index[s]
            x = torch.from_numpy(np.ascontiguousarray(self._x_train_np[idx])).to(self.device)
            y = torch.from_numpy(self.y_train[idx]).to(self.device)
            m = self.cfg.model
            self._shards[s] = {
                "index": idx, "x": x, "y": y,
                "x_pos": overlay(x, y, m.label_position, num_classes=self.net.num_classes),
                "x_neg": torch.empty_like(x), "neg_chapter": None,
            }
        return self._shards[s]

    def negatives_for(self, chapter: int) -> np.ndarray:
        """Wrong labels used in ``chapter`` for the samples of that chapter's shard."""
        if self.plan.geometry is not None:
            return self._chapter(chapter)[2]
        t = self.cfg.train
        s = self.plan.data_shard(chapter)
        idx = self.shard_index[s]
        y = self.y_train[idx]
        if t.negatives == "random":
            return random_negatives(y, idx, self.n_train, t.seed, RANDOM_STREAM, chapter,
                                    num_classes=self.net.num_classes)
        if t.negatives == "adaptive":
            if self.plan.newest:
                newest = [c for c in self.neg_labels if c <= chapter and self.plan.data_shard(c) == s]
                if newest:
                    return self.neg_labels[max(newest)]
            elif chapter > t.adaptive_lag:
                return self.neg_labels[chapter]
        return random_negatives(y, idx, self.n_train, t.seed, FIXED_STREAM,
                                num_classes=self.net.num_classes)

    # ------------------------------------------------------------------ the serialiser
    def holds(self, b: Buf) -> bool:
        if b.kind == "neg":
            return b.chapter in self.neg_labels
        if b.kind == "act":
            return b.chapter in self._act and self._act[b.chapter][0] == b.index
        return self.version[(b.kind, b.index)] == b.chapter or b in self._kept

    def _retain(self, kind: str, index: int) -> None:
        """About to overwrite (train, or load a newer version of) a layer or the head before this
        rank has passed that version's chapter boundary (only where a moved evaluation holds the
        boundary back): keep it for the tasks that read it and the checkpoint of that chapter."""
        b = Buf(kind, index, self.version[(kind, index)])
        if b.chapter <= self._passed or b in self._kept:
            return  # the usual case: every task of that chapter has run here
        producer = self.plan.producer.get(b)
        owned = producer is not None and self.plan.rank_of[producer] == self.rank
        if owned or b in self._reads:  # owned: a checkpoint of that chapter may still be due
            self._kept[b] = (self.pack(b, owned), owned)

    def passed(self, boundary: int) -> None:
        """The executor has passed the boundary after chapter ``boundary`` (every task of the
        chapters up to it has run here): what was kept for them can go."""
        self._passed = boundary
        for b in [b for b in self._kept if b.chapter <= boundary]:
            del self._kept[b]
        if self.plan.geometry is not None:  # a chapter's negatives are for its samples only
            for c in [c for c in self.neg_labels if c <= boundary]:
                del self.neg_labels[c]

    def _set_params(self, b: Buf, flat_np: np.ndarray) -> int:
        module, _ = self._module(b)
        flat = torch.from_numpy(flat_np)
        i = 0
        with torch.no_grad():
            for p in module.parameters():
                n = p.numel()
                p.copy_(flat[i:i + n].view_as(p))
                i += n
        return i

    def _module(self, b: Buf):
        if b.kind == "layer":
            return self.net.layers[b.index], self.opts[b.index]
        return self.net.head, self.head_opt

    def pack(self, b: Buf, full: bool) -> np.ndarray:
        """Layer or head: parameters (in the order of ``parameters()``, which is the order of
        the layer kind's tensors), then with ``full`` Adam's state (:func:`mpff.ff.adam_state`).
        Negatives: the int64 labels."""
        if b.kind == "neg":
            return np.ascontiguousarray(self.neg_labels[b.chapter], dtype=np.int64)
        if b.kind == "act":  # made by the ship task; the executor keeps it alive until sent
            return self._act_out.pop((b.index, b.chapter)).reshape(-1)
        module, _ = self._module(b)
        size, dtype = self.plan.buffer_spec(b, full)
        out = np.empty(size, dtype=dtype)
        flat = torch.from_numpy(out)
        i = 0
        for p in module.parameters():
            n = p.numel()
            flat[i:i + n] = p.detach().reshape(-1).cpu()  # note: device-to-host copy on GPU
            i += n
        if full:
            flat[i:] = torch.from_numpy(self.optimizer_state(b))
        return out

    def load(self, b: Buf, array: np.ndarray, full: bool) -> None:
        if b.kind == "neg":
            self.neg_labels[b.chapter] = array
            return
        if b.kind == "act":
            h = torch.from_numpy(array).view(2, -1, self.cfg.model.dims[b.index + 1]).to(self.device)
            self._act = {b.chapter: (b.index, h[0], h[1])}  # earlier chapters' are done with
            return
        if b.chapter != self.version[(b.kind, b.index)]:
            self._retain(b.kind, b.index)
        i = self._set_params(b, array)
        if full:
            self.load_optimizer_state(b, array[i:])
        self.version[(b.kind, b.index)] = b.chapter

    def optimizer_state(self, b: Buf) -> np.ndarray | None:
        """This rank's own Adam state of a layer (or the head) as one flat array, if it has any."""
        module, opt = self._module(b)
        flat = adam_state(opt, list(module.parameters()))
        return None if flat is None else flat.numpy()

    def load_optimizer_state(self, b: Buf, flat_np: np.ndarray) -> None:
        module, opt = self._module(b)
        load_adam_state(opt, list(module.parameters()), torch.from_numpy(flat_np), self.device)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, chapter: int, owned: list[Buf]) -> dict:
        """The state after ``chapter`` that this rank saves: the buffers it produced (with Adam's
        state), the negatives it holds for later chapters, and with ``exchange = "weights"`` its
        own optimizer states (what it would use for a layer it receives)."""
        buffers = {b: (self._full(b), True) for b in owned}
        for c in sorted(self.neg_labels):
            if c > chapter:
                b = Buf("neg", -1, c)
                buffers[b] = (self.pack(b, False), False)
        local = {}
        if not self.plan.full_exchange:
            for b in self.plan.network(chapter):
                if b in buffers and self.version[(b.kind, b.index)] != b.chapter:
                    local[b.index] = buffers[b][0][self._num_params(b):]  # kept with its version
                    continue
                flat = self.optimizer_state(b)
                if flat is not None:
                    local[b.index] = flat
        return {"buffers": buffers, "local_optimizer": local}

    def _full(self, b: Buf) -> np.ndarray:
        """Parameters and Adam's state of ``b``: the current ones, or those kept of that version."""
        if self.version[(b.kind, b.index)] == b.chapter:
            return self.pack(b, True)
        array, full = self._kept[b]  # a moved evaluation's rank checkpoints after it moved on
        assert full, f"rank {self.rank} kept {b} without its optimizer state"
        return array

    def _num_params(self, b: Buf) -> int:
        return sum(p.numel() for p in self._module(b)[0].parameters())

    def restore(self, snapshot: dict) -> None:
        """State from a checkpoint ({"buffers": {Buf: (flat, full)}, "local_optimizer": {index:
        flat}}). With exchange = "weights" a rank keeps its own optimizer state (when the
        checkpoint has it: same world size), else the producer's."""
        local = snapshot.get("local_optimizer", {})
        for b, (array, full) in snapshot.get("buffers", {}).items():
            self.load(b, array, full)
            if b.kind != "neg" and not self.plan.full_exchange and b.index in local:
                self.load_optimizer_state(b, local[b.index])

    # ------------------------------------------------------------------ tasks
    def prepare(self, task: Task) -> None:
        if task.kind == "train":
            with matmul_precision(self.cfg.train.precision, self.device):
                if self.plan.geometry is None:
                    self._inputs(task.chapter, task.layer)
                elif self.plan.geometry.num_batches(task.chapter):
                    self._slice_inputs(task.chapter, task.layer, 0)

    def run(self, task: Task) -> list[Record]:
        with matmul_precision(self.cfg.train.precision, self.device):
            if task.kind not in ("eval", "head", "negatives", "final"):
                return getattr(self, f"_do_{task.kind}")(task)
            # a whole-network task: the versions it reads, from what was kept where this rank
            # has moved on (a moved evaluation), and the current ones put back after
            swapped = []
            for b, _ in self.plan.inputs(task):
                if b.kind not in ("layer", "head"):
                    continue
                cur = Buf(b.kind, b.index, self.version[(b.kind, b.index)])
                if cur != b and b in self._kept:
                    swapped.append((cur, self.pack(cur, False)))
                    self._set_params(b, self._kept[b][0])
            try:
                return getattr(self, f"_do_{task.kind}")(task)
            finally:
                for cur, live in swapped:
                    self._set_params(cur, live)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # note: sync point so spans measure GPU work

    def _check_finite(self, what: str, chapter: int, loss: float, params, setting: str, lr: float) -> None:
        """A NaN or infinite loss or weight ends the run as diverged (every later result would be
        meaningless, and a model of NaNs predicts one class for everything)."""
        bad = "loss" if not math.isfinite(loss) else None
        if bad is None and not all(bool(torch.isfinite(p).all()) for p in params):  # one sync per task
            bad = "weights"
        if bad is not None:
            raise Diverged(f"the {bad} of {what} became {'NaN or infinite' if bad == 'weights' else loss} "
                           f"in chapter {chapter + 1}; lower {setting} (now {lr:g}) and start again")

    def _lrs_and_seeds(self, base_lr: float, chapter: int, stream: int, layer: int):
        t = self.cfg.train
        lrs = chapter_rates(base_lr, chapter, self.C, t.epochs, t.cooldown_final)
        return lrs, [seed_for(t.seed, stream, chapter, layer, m) for m in range(self.C)]

    def _inputs(self, chapter: int, layer: int):
        """Inputs of ``layer`` in ``chapter``: this chapter's positives and negatives pushed through
        layers 0..layer-1 as trained in this chapter (recomputed when not cached here), or with
        shipped inputs, from the outputs of the layer before this rank's block."""
        b0 = self.plan.block_start(layer) if self.plan.ship else 0
        if self._cache is not None and self._cache[0] == chapter and b0 - 1 <= self._cache[1] < layer:
            _, j, h_pos, h_neg = self._cache
        elif b0 > 0:
            j, h_pos, h_neg = self._act[chapter]
        else:
            sh = self.shard(self.plan.data_shard(chapter))
            if sh["neg_chapter"] != chapter:
                labels = torch.from_numpy(self.negatives_for(chapter)).to(self.device)
                overlay(sh["x"], labels, self.cfg.model.label_position, out=sh["x_neg"],
                        num_classes=self.net.num_classes)
                sh["neg_chapter"] = chapter
            j, h_pos, h_neg = -1, sh["x_pos"], sh["x_neg"]
        for k in range(j + 1, layer):
            h_pos, h_neg = self._forward(chapter, layer, k, h_pos, h_neg)
            self._cache = (chapter, k, h_pos, h_neg)
        return h_pos, h_neg

    def _forward(self, chapter: int, layer: int, k: int, h_pos: torch.Tensor,
                 h_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positives and negatives through layer k, traced as the forward work of ``layer``'s task."""
        with self.tracer.span("forward", chapter, layer):
            layer_k = self.net.layers[k]
            h_pos = layer_k.forward_all(h_pos, check=self.check)
            h_neg = layer_k.forward_all(h_neg, check=self.check)
            self._sync()
        return h_pos, h_neg

    def _do_ship(self, task: Task) -> list[Record]:
        """Layer k's outputs on the chapter's positives and negatives, for the next block's rank
        (the forward pass it would otherwise repeat through every layer below it)."""
        c, k = task.chapter, task.layer
        if self.plan.geometry is not None:
            return self._ship_slices(task)
        h_pos, h_neg = self._inputs(c, k)
        layer = self.net.layers[k]
        with self.tracer.span("ship", c, k):
            out = np.empty((2, h_pos.shape[0], layer.out_features), dtype=np.float32)
            if self.device.type == "cpu":  # straight into the send buffer
                view = torch.from_numpy(out)
                layer.forward_all(h_pos, out=view[0], check=self.check)
                layer.forward_all(h_neg, out=view[1], check=self.check)
            else:  # note: device-to-host copies
                out[0] = layer.forward_all(h_pos, check=self.check).cpu().numpy()
                out[1] = layer.forward_all(h_neg, check=self.check).cpu().numpy()
            self._act_out[(k, c)] = out
        return []

    def _do_train(self, task: Task) -> list[Record]:
        c, k = task.chapter, task.layer
        layer = self.net.layers[k]
        if self.plan.geometry is not None:
            self._retain("layer", k)
            loss = self._train_slices(c, k)
        else:
            h_pos, h_neg = self._inputs(c, k)
            self._retain("layer", k)
            with self.tracer.span("train", c, k):
                xn_pos, xn_neg = layer.normalize_all(h_pos), layer.normalize_all(h_neg)
                lrs, seeds = self._lrs_and_seeds(self.cfg.train.lr, c, SHUFFLE_STREAM, k)
                loss = train_epochs(layer, self.opts[k], xn_pos, xn_neg, batch_size=self.cfg.train.batch_size,
                                    lrs=lrs, seeds=seeds, check=self.check)
                del xn_pos, xn_neg
                self._sync()
        self._check_finite(f"layer {k + 1}", c, loss, layer.parameters(), "train.lr", self.cfg.train.lr)
        self.version[("layer", k)] = c
        self.tracer.scalar("loss", c, k, loss)
        return [Record("loss", c, k, loss)]

    def _layer_versions(self) -> tuple[int, ...]:
        return tuple(self.version[("layer", k)] for k in range(self.plan.num_layers))

    def _do_head(self, task: Task) -> list[Record]:
        c = task.chapter
        self._retain("head", -1)
        if self.plan.geometry is not None:
            return self._head_slices(c)
        s = self.plan.data_shard(c)
        sh = self.shard(s)
        with self.tracer.span("head", c, -1):
            feats = self.net.head_features(sh["x"], check=self.check)
            lrs, seeds = self._lrs_and_seeds(self.cfg.train.head_lr, c, HEAD_STREAM, -1)
            loss = train_head(self.net, self.head_opt, feats, sh["y"], batch_size=self.cfg.train.batch_size,
                              lrs=lrs, seeds=seeds, check=self.check)
            self._sync()
        # Adaptive negatives with the softmax head score the same samples through the same layers:
        # keep the features for the negatives task of this chapter when it runs here on this shard
        # (one pass of the training set through the network instead of two).
        neg = Task("negatives", c)
        if (self.plan.rank_of.get(neg) == self.rank
                and self.plan.data_shard(c + 1 + self.plan.lag) == s):
            self._features = (s, self._layer_versions(), feats)
        del feats
        return self._head_done(c, loss)

    def _head_done(self, c: int, loss: float) -> list[Record]:
        self._check_finite("the softmax head", c, loss, self.net.head.parameters(), "train.head_lr",
                           self.cfg.train.head_lr)
        self.version[("head", -1)] = c
        self.tracer.scalar("head_loss", c, -1, loss)
        return [Record("head_loss", c, -1, loss)]

    def _do_negatives(self, task: Task) -> list[Record]:
        target = task.chapter + 1 + self.plan.lag
        if self.plan.geometry is not None:
            with self.tracer.span("negatives", task.chapter, -1):
                self.neg_labels[target] = self._adaptive_slices(target)
            return []
        sh = self.shard(self.plan.data_shard(target))
        with self.tracer.span("negatives", task.chapter, -1):
            kept, self._features = self._features, None
            if kept is not None and kept[:2] == (self.plan.data_shard(target), self._layer_versions()):
                with torch.no_grad():  # what adaptive_negatives computes, from the head task's features
                    labels = hardest_wrong_label(self.net.head(kept[2]), sh["y"])
            else:
                labels = self.net.adaptive_negatives(sh["x"], sh["y"], self.cfg.train.classifier,
                                                     check=self.check)
            del kept
            self.neg_labels[target] = labels.cpu().numpy().astype(np.int64)
        prev = self.neg_labels.get(target - 1)
        if prev is None or len(prev) != len(self.neg_labels[target]):
            prev = np.full(len(self.neg_labels[target]), -1)
        self.tracer.scalar("negatives_changed", task.chapter, -1, float(np.mean(self.neg_labels[target] != prev)))
        return []

    def _do_eval(self, task: Task) -> list[Record]:
        with self.tracer.span("eval", task.chapter, -1):
            acc = self.net.accuracy(self.x_test, self.y_test, self.cfg.train.classifier, check=self.check)
        self.test_accuracy[task.chapter] = acc
        self.tracer.scalar("test_accuracy", task.chapter, -1, acc)
        return [Record("accuracy", task.chapter, -1, acc)]

    def _do_final(self, task: Task) -> list[Record]:
        return []  # the network is complete here; the run directory writes the model

    # ------------------------------------------------------------------ chapters of train.chapter_batches
    def _perm(self, shard: int, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the shard's samples: from (seed, shard, epoch) alone, shared
        by every layer, the same on every rank (two kept: a chapter spans at most a few epochs)."""
        key = (shard, epoch)
        if key not in self._perms:
            g = generator(self.cfg.train.seed, SHUFFLE_STREAM, shard, epoch)
            self._perms[key] = torch.randperm(len(self.shard_index[shard]), generator=g).numpy()
            while len(self._perms) > 2:
                del self._perms[next(iter(self._perms))]
        return self._perms[key]

    def _chapter_indices(self, chapter: int) -> np.ndarray:
        """The chapter's samples in training order, as indices into the training set."""
        geometry = self.plan.geometry
        s = geometry.shard(chapter)
        parts = [self._perm(s, b.epoch)[b.lo:b.lo + b.rows] for b in geometry.batches(chapter)]
        return self.shard_index[s][np.concatenate(parts)] if parts else np.zeros(0, dtype=np.int64)

    def _chapter(self, chapter: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The chapter's samples in training order: (indices into the training set, labels,
        negative labels), for the chapter at hand only."""
        if self._rows is not None and self._rows[0] == chapter:
            return self._rows[1:]
        idx = self._chapter_indices(chapter)
        y = self.y_train[idx]
        t, classes = self.cfg.train, self.net.num_classes
        if t.negatives == "random":  # drawn for the chapter's samples alone
            neg = (y + wrong_label_offsets(len(idx), t.seed, RANDOM_STREAM, chapter, num_classes=classes)) % classes
        elif t.negatives == "adaptive" and chapter > t.adaptive_lag:
            neg = self.neg_labels[chapter]
        else:  # fixed: one wrong label per sample, drawn once for the training set
            if self._fixed_offsets is None:
                self._fixed_offsets = wrong_label_offsets(self.n_train, t.seed, FIXED_STREAM, num_classes=classes)
            neg = (y + self._fixed_offsets[idx]) % classes
        self._rows = (chapter, idx, y, neg)
        return idx, y, neg

    def _slice_rows(self, chapter: int, i: int) -> tuple[int, int, list[tuple[int, int, int]]]:
        """Slice i of the chapter: its first and end row, and its batches as (start within the
        slice, rows, global epoch)."""
        batches = self.plan.geometry.slices(chapter)[i]
        lo = batches[0].start
        hi = batches[-1].start + batches[-1].rows
        return lo, hi, [(b.start - lo, b.rows, b.global_epoch) for b in batches]

    def _slice_x(self, chapter: int, i: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Slice i's inputs (no label written in), labels and negative labels, on the device."""
        idx, y, neg = self._chapter(chapter)
        lo, hi, _ = self._slice_rows(chapter, i)
        x = torch.from_numpy(self._x_train_np[idx[lo:hi]]).to(self.device)
        return x, torch.from_numpy(y[lo:hi]).to(self.device), neg[lo:hi]

    def _slice_inputs(self, chapter: int, layer: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of ``layer`` on slice i of ``chapter``: its positives and negatives pushed
        through layers 0..layer-1 as trained in this chapter (from the last slice's cache when it
        got that far), or with shipped inputs, from the outputs of the layer before the block."""
        b0 = self.plan.block_start(layer) if self.plan.ship else 0
        cache = self._slice_cache
        if cache is not None and cache[:2] == (chapter, i) and b0 - 1 <= cache[2] < layer:
            _, _, j, h_pos, h_neg = cache
        elif b0 > 0:
            lo, hi, _ = self._slice_rows(chapter, i)
            j, a_pos, a_neg = self._act[chapter]
            h_pos, h_neg = a_pos[lo:hi], a_neg[lo:hi]
        else:
            x, y, neg = self._slice_x(chapter, i)
            position, classes = self.cfg.model.label_position, self.net.num_classes
            h_pos = overlay(x, y, position, num_classes=classes)
            h_neg = overlay(x, torch.from_numpy(neg).to(self.device), position, num_classes=classes)
            j = -1
        for k in range(j + 1, layer):
            h_pos, h_neg = self._forward(chapter, layer, k, h_pos, h_neg)
            self._slice_cache = (chapter, i, k, h_pos, h_neg)
        return h_pos, h_neg

    def _rates(self, lr0: float, batches: list[tuple[int, int, int]]) -> list[tuple[int, int, float]]:
        t = self.cfg.train
        return [(start, rows, cooldown_lr(lr0, e, t.epochs, t.cooldown_final)) for start, rows, e in batches]

    def _train_slices(self, c: int, k: int) -> float:
        """Train layer k on chapter c's batches in order, slice by slice; the chapter's mean loss."""
        layer, steps = self.net.layers[k], None
        for i in range(len(self.plan.geometry.slices(c))):
            h_pos, h_neg = self._slice_inputs(c, k, i)
            with self.tracer.span("train", c, k):
                xn_pos, xn_neg = layer.normalize_all(h_pos), layer.normalize_all(h_neg)
                if steps is None:
                    steps = FFSteps(layer, self.opts[k], xn_pos, self.cfg.train.batch_size, self.check)
                train_batches(steps, xn_pos, xn_neg, self._rates(self.cfg.train.lr, self._slice_rows(c, i)[2]))
                del xn_pos, xn_neg
                self._sync()
        return 0.0 if steps is None else steps.mean_loss()

    def _ship_slices(self, task: Task) -> list[Record]:
        """Layer k's outputs on the whole chapter's positives and negatives, slice by slice."""
        c, k = task.chapter, task.layer
        layer = self.net.layers[k]
        out = np.empty((2, self.plan.chapter_rows(c), layer.out_features), dtype=np.float32)
        view = torch.from_numpy(out)
        for i in range(len(self.plan.geometry.slices(c))):
            h_pos, h_neg = self._slice_inputs(c, k, i)
            lo, hi, _ = self._slice_rows(c, i)
            with self.tracer.span("ship", c, k):
                view[0, lo:hi] = layer.forward_all(h_pos, check=self.check).cpu()  # note: device-to-host
                view[1, lo:hi] = layer.forward_all(h_neg, check=self.check).cpu()
        self._act_out[(k, c)] = out
        return []

    def _head_slices(self, c: int) -> list[Record]:
        """The softmax head on chapter c's batches in order, slice by slice."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = 0
        for i in range(len(self.plan.geometry.slices(c))):
            x, y, _ = self._slice_x(c, i)
            with self.tracer.span("head", c, -1):
                feats = self.net.head_features(x, check=self.check)
                steps += train_head_batches(self.net, self.head_opt, feats, y,
                                            self._rates(self.cfg.train.head_lr, self._slice_rows(c, i)[2]),
                                            total, check=self.check)
                del feats
                self._sync()
        loss = float(total.item()) / max(steps, 1)
        return self._head_done(c, loss)

    def _adaptive_slices(self, target: int) -> np.ndarray:
        """The most-predicted wrong label of each sample of chapter ``target``, slice by slice."""
        labels = []
        idx = self._chapter_indices(target)
        y = self.y_train[idx]
        for i in range(len(self.plan.geometry.slices(target))):
            lo, hi, _ = self._slice_rows(target, i)
            x = torch.from_numpy(self._x_train_np[idx[lo:hi]]).to(self.device)
            labels.append(self.net.adaptive_negatives(x, torch.from_numpy(y[lo:hi]), self.cfg.train.classifier,
                                                      check=self.check).cpu().numpy().astype(np.int64))
        return np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
