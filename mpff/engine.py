"""Runs one rank's task list from the plan: the only place that waits for buffers.

Receives are posted early (a window of tasks ahead), sends are posted as soon as a task's
output exists, and the send buffer is kept alive until its request completes. A rank blocks
only when its next task needs a buffer that has not arrived; that wait is recorded as a
``wait`` span (a bubble). There is no blocking collective inside the training loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import Config
from .ff import cooldown_lr, make_adam, seed_for, train_epochs
from .model import FFNet, overlay, random_negatives, train_head
from .plan import Buf, Plan, Task, Transfer
from .trace import Tracer

# Progress record codes (first field of a record sent to rank 0).
REC_LOSS, REC_ACC, REC_HEAD_LOSS = 1.0, 2.0, 3.0

FIXED_STREAM, RANDOM_STREAM, SHUFFLE_STREAM, HEAD_STREAM = 0xF1, 0xA4, 0x5F, 0x4E


class Preempted(Exception):
    """A stop was requested (SIGTERM / SIGUSR1); checkpoints of passed chapters are on disk."""


@dataclass
class _Recv:
    transfer: Transfer
    array: np.ndarray
    req: object
    unpacked: bool = False


@dataclass
class EngineResult:
    test_accuracy: dict[int, float] = field(default_factory=dict)
    losses: dict[tuple[int, int], float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0


class Engine:
    """Executes the tasks of ``rank`` in ``plan``. ``comm`` is an mpff.comm.Comm (or None for
    a single process with every task local)."""

    def __init__(self, cfg: Config, plan: Plan, comm, rank: int, dataset, tracer: Tracer,
                 device: torch.device, *, on_progress: Callable[[np.ndarray], None] | None = None,
                 write_model: Callable[[FFNet], None] | None = None,
                 initial_state: dict | None = None, window: int | None = None,
                 checkpoint: Callable[[int, dict, dict, dict], None] | None = None,
                 checkpoint_every: int = 0, should_stop: Callable[[], bool] | None = None) -> None:
        self.cfg = cfg
        self.plan = plan
        self.comm = comm
        self.rank = rank
        self.tracer = tracer
        self.device = device
        self.on_progress = on_progress
        self.write_model = write_model
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.should_stop = should_stop or (lambda: False)
        self._boundary = plan.start_chapter - 1  # newest chapter boundary this rank has passed
        self.tasks = plan.rank_tasks(rank)
        self.window = window if window is not None else 2 * plan.num_layers + 6
        self.result = EngineResult()

        t = cfg.train
        self.C = t.epochs_per_chapter
        self.net = FFNet.from_config(cfg).to(device)
        self.opts = [layer.make_optimizer(t.lr) for layer in self.net.layers]
        self.head_opt = make_adam(self.net.head.parameters(), t.head_lr)
        self.version = {("layer", k): -1 for k in range(plan.num_layers)}
        self.version[("head", -1)] = -1

        # ----- data: only the shards this rank's tasks touch are moved to the device -----
        n = dataset.x_train.shape[0]
        self.n_train = n
        self.shard_index = np.array_split(np.arange(n), plan.shards)
        self.y_train = dataset.y_train
        self._shards: dict[int, dict] = {}
        self.x_test = torch.from_numpy(dataset.x_test).to(device)
        self.y_test = torch.from_numpy(dataset.y_test).to(device)
        self._x_train_np = dataset.x_train
        self.neg_labels: dict[int, np.ndarray] = {}   # chapter -> labels for that chapter's shard
        self._cache: tuple | None = None              # (chapter, last layer applied, h_pos, h_neg)

        self._recvs: dict[Buf, _Recv] = {}
        self._recv_queue = list(plan.recvs[rank]) if comm is not None else []
        self._task_pos = {task: i for i, task in enumerate(self.tasks)}
        self._sends: list[tuple[object, np.ndarray]] = []
        if initial_state:
            self._load_initial(initial_state)

    # ------------------------------------------------------------------ data
    def shard(self, s: int) -> dict:
        if s not in self._shards:
            idx = self.shard_index[s]
            x = torch.from_numpy(np.ascontiguousarray(self._x_train_np[idx])).to(self.device)
            y = torch.from_numpy(self.y_train[idx]).to(self.device)
            m = self.cfg.model
            self._shards[s] = {
                "index": idx, "x": x, "y": y,
                "x_pos": overlay(x, y, m.label_position),
                "x_neg": torch.empty_like(x), "neg_chapter": None,
            }
        return self._shards[s]

    def negatives_for(self, chapter: int) -> np.ndarray:
        """Wrong labels used in ``chapter`` for the samples of that chapter's shard."""
        t = self.cfg.train
        s = self.plan.data_shard(chapter)
        idx = self.shard_index[s]
        y = self.y_train[idx]
        if t.negatives == "random":
            return random_negatives(y, idx, self.n_train, t.seed, RANDOM_STREAM, chapter)
        if t.negatives == "adaptive":
            if self.plan.newest:
                newest = [c for c in self._newest_negatives() if c <= chapter
                          and self.plan.data_shard(c) == s]
                if newest:
                    return self.neg_labels[max(newest)]
            elif chapter > t.adaptive_lag:
                return self.neg_labels[chapter]
        return random_negatives(y, idx, self.n_train, t.seed, FIXED_STREAM)

    def _newest_negatives(self) -> list[int]:
        for b, rv in self._recvs.items():  # pick up what has arrived, without waiting
            if b.kind == "neg" and not rv.unpacked and self.comm.test(rv.req):
                self._unpack(b)
        return list(self.neg_labels)

    # ------------------------------------------------------------------ buffers
    def _buf_size(self, b: Buf, full: bool) -> tuple[int, type]:
        if b.kind == "neg":
            return len(self.shard_index[self.plan.data_shard(b.chapter)]), np.int64
        params = (list(self.net.layers[b.index].parameters()) if b.kind == "layer"
                  else list(self.net.head.parameters()))
        n = sum(p.numel() for p in params)
        return (n + (1 + 2 * n if full else 0)), np.float32

    def _pack(self, b: Buf, full: bool) -> np.ndarray:
        if b.kind == "neg":
            return np.ascontiguousarray(self.neg_labels[b.chapter], dtype=np.int64)
        module, _ = self._module(b)
        size, _ = self._buf_size(b, full)
        out = np.empty(size, dtype=np.float32)
        flat = torch.from_numpy(out)
        i = 0
        for p in module.parameters():
            n = p.numel()
            flat[i:i + n] = p.detach().reshape(-1).cpu()  # note: device-to-host copy on GPU
            i += n
        if full:
            flat[i:] = torch.from_numpy(self._opt_flat(b))
        return out

    def _module(self, b: Buf):
        if b.kind == "layer":
            return self.net.layers[b.index], self.opts[b.index]
        return self.net.head, self.head_opt

    def _unpack(self, b: Buf) -> None:
        rv = self._recvs[b]
        if rv.unpacked:
            return
        with self.tracer.span("recv", b.chapter, b.index, peer=rv.transfer.peer, nbytes=rv.array.nbytes):
            if b.kind == "neg":
                self.neg_labels[b.chapter] = rv.array
            else:
                self._load_flat(b, rv.array, rv.transfer.full)
        self.result.bytes_received += rv.array.nbytes
        rv.unpacked = True

    def _load_flat(self, b: Buf, array: np.ndarray, full: bool) -> None:
        """Load a packed buffer: parameters, then (full) step, exp_avg..., exp_avg_sq... as _pack wrote."""
        module, _ = self._module(b)
        params = list(module.parameters())
        flat = torch.from_numpy(array)
        i = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                p.copy_(flat[i:i + n].view_as(p))
                i += n
        if full:
            self._load_opt(b, array[i:])
        self.version[(b.kind, b.index)] = b.chapter

    def _load_initial(self, state: dict) -> None:
        """State from a checkpoint: {"buffers": {Buf: (flat, full)}, "negatives": {chapter: labels},
        "local_optimizer": {layer or -1: flat}}. With exchange = "weights" a rank keeps its own
        optimizer state (when the checkpoint has it: same world size), else the producer's."""
        local = state.get("local_optimizer", {})
        for b, (array, full) in state.get("buffers", {}).items():
            self._load_flat(b, array, full)
            if not self.plan.full_exchange and b.index in local:
                self._load_opt(b, local[b.index])
        self.neg_labels.update(state.get("negatives", {}))

    def _opt_flat(self, b: Buf) -> np.ndarray | None:
        """This rank's own Adam state of a layer (or the head) as one flat array, if any."""
        module, opt = self._module(b)
        params = list(module.parameters())
        if not all(p in opt.state and opt.state[p] for p in params):
            return None
        st = [opt.state[p] for p in params]
        parts = [st[0]["step"].reshape(1).cpu()] + [x["exp_avg"].reshape(-1).cpu() for x in st] \
            + [x["exp_avg_sq"].reshape(-1).cpu() for x in st]
        return torch.cat(parts).numpy()

    def _load_opt(self, b: Buf, flat_np: np.ndarray) -> None:
        module, opt = self._module(b)
        params = list(module.parameters())
        flat = torch.from_numpy(flat_np)
        # fused Adam keeps `step` on the parameters' device, the single-tensor Adam on the CPU
        fused = any(g.get("fused") for g in opt.param_groups)
        step = flat[0].clone().to(params[0].device if fused else "cpu")
        i, avgs = 1, []
        for p in params:
            avgs.append(flat[i:i + p.numel()].view_as(p).to(self.device, copy=True))
            i += p.numel()
        for p, avg in zip(params, avgs):
            sq = flat[i:i + p.numel()].view_as(p).to(self.device, copy=True)
            i += p.numel()
            opt.state[p] = {"step": step.clone(), "exp_avg": avg, "exp_avg_sq": sq}

    # ------------------------------------------------------------------ checkpoints
    def _pass_boundaries(self, upto: int) -> None:
        """This rank has finished every task of chapters <= upto: write the checkpoints due."""
        while self._boundary < upto:
            self._boundary += 1
            b = self._boundary
            if (self.checkpoint is None or not self.checkpoint_every or b >= self.plan.num_chapters - 1
                    or (b + 1) % self.checkpoint_every):
                continue
            with self.tracer.span("checkpoint", b, -1):
                self.checkpoint(b, *self._checkpoint_state(b))

    def _checkpoint_state(self, b: int):
        buffers = {}
        for buf in self.plan.network(b):
            prod = self.plan.producer.get(buf)
            if prod is not None and self.plan.rank_of[prod] == self.rank:
                buffers[buf] = (self._pack(buf, True), True)
        negatives = {c: labels for c, labels in self.neg_labels.items() if c > b}
        local = {}
        if not self.plan.full_exchange:
            for buf in self.plan.network(b):
                flat = self._opt_flat(buf)
                if flat is not None:
                    local[buf.index] = flat
        return buffers, negatives, local

    def _post_recvs(self, upto: int) -> None:
        """Post receives for every buffer first needed by a task at position <= upto."""
        while self._recv_queue and self._task_pos[self._recv_queue[0][0]] <= upto:
            _, tr = self._recv_queue.pop(0)
            size, dtype = self._buf_size(tr.buf, tr.full)
            array = np.empty(size, dtype=dtype)
            self._recvs[tr.buf] = _Recv(tr, array, self.comm.irecv(array, tr.peer, tr.tag))

    def _idle(self) -> None:
        if self.should_stop():
            raise Preempted()
        if self._sends:
            self._sends = [(r, a) for r, a in self._sends if not self.comm.test(r)]
        if self.on_progress is not None and self.rank == 0 and self.comm is not None:
            for rec in self.comm.poll_progress():
                self.on_progress(rec)

    def _need(self, b: Buf, chapter: int, layer: int) -> None:
        """Make buffer ``b`` current in the local model, waiting for it if it is remote."""
        if self.plan.is_initial(b):
            return
        if b.kind != "neg" and self.version[(b.kind, b.index)] == b.chapter:
            return  # produced here, or already unpacked
        if b.kind == "neg" and b.chapter in self.neg_labels:
            return
        rv = self._recvs.get(b)
        if rv is None:
            raise AssertionError(f"rank {self.rank}: no receive posted for {b}")  # plan invariant
        if not self.comm.test(rv.req):
            with self.tracer.span("wait", chapter, layer, peer=rv.transfer.peer):
                self.comm.wait(rv.req, on_idle=self._idle)
        self._unpack(b)
        if not self.plan.newest:
            del self._recvs[b]  # free the receive buffer; the model holds the values now

    def _publish(self, task: Task) -> None:
        for tr in self.plan.sends[task]:
            start = self.tracer.now()
            array = self._pack(tr.buf, tr.full)
            req = self.comm.isend(array, tr.peer, tr.tag)
            self.tracer.add_span("send", tr.buf.chapter, tr.buf.index, start, self.tracer.now(),
                                 array.nbytes, tr.peer)
            self._sends.append((req, array))  # keep the buffer alive until the send completes
            self.result.bytes_sent += array.nbytes

    def _report(self, code: float, chapter: int, layer: int, value: float) -> None:
        rec = np.array([code, chapter, layer, value], dtype=np.float64)
        if self.rank == 0 or self.comm is None:
            if self.on_progress is not None:
                self.on_progress(rec)
        else:
            self._sends.append((self.comm.send_progress(rec), rec))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # note: sync point so spans measure GPU work

    # ------------------------------------------------------------------ tasks
    def run(self) -> EngineResult:
        last_chapter = None
        for pos, task in enumerate(self.tasks):
            if self.should_stop():
                raise Preempted()
            if self.comm is not None:
                self._post_recvs(pos + self.window)
            if last_chapter is not None and task.chapter != last_chapter:
                self._chapter_end(last_chapter)
            self._pass_boundaries(task.chapter - 1)
            last_chapter = task.chapter
            # What the task reads comes first; the state it trains (from chapter c-1) is waited
            # for last, so a train task's forward passes through the layers below fill that wait.
            inputs = self.plan.inputs(task)
            for b, trainable in inputs:
                if not trainable:
                    self._need(b, task.chapter, task.layer)
            if task.kind == "train":
                self._inputs(task.chapter, task.layer)
            for b, trainable in inputs:
                if trainable:
                    self._need(b, task.chapter, task.layer)
            getattr(self, f"_do_{task.kind}")(task)
            if self.comm is not None:
                self._publish(task)
                self._idle()
        if last_chapter is not None:
            self._chapter_end(last_chapter)
        self._pass_boundaries(self.plan.num_chapters - 1)
        # drain: all our sends must complete before the buffers go away, and every posted
        # receive (newest-mode negatives may never have been needed) must be matched
        if self.comm is not None:
            self._post_recvs(len(self.tasks) + 1)
            for rv in list(self._recvs.values()):
                if not rv.unpacked and not self.comm.test(rv.req):
                    with self.tracer.span("wait", -1, -1, peer=rv.transfer.peer):
                        self.comm.wait(rv.req, on_idle=self._idle)
            for req, _ in self._sends:
                if not self.comm.test(req):
                    with self.tracer.span("wait", -1, -1):
                        self.comm.wait(req, on_idle=self._idle)
            self._sends.clear()
        return self.result

    def _chapter_end(self, chapter: int) -> None:
        self.tracer.flush()

    def _lrs_and_seeds(self, base_lr: float, chapter: int, stream: int, layer: int):
        t = self.cfg.train
        lrs, seeds = [], []
        for m in range(self.C):
            lrs.append(cooldown_lr(base_lr, chapter * self.C + m + 1, t.epochs, t.cooldown_final))
            seeds.append(seed_for(t.seed, stream, chapter, layer, m))
        return lrs, seeds

    def _inputs(self, chapter: int, layer: int):
        """Inputs of ``layer`` in ``chapter``: this chapter's positives and negatives pushed through
        layers 0..layer-1 as trained in this chapter (recomputed when not cached here)."""
        sh = self.shard(self.plan.data_shard(chapter))
        if self._cache is not None and self._cache[0] == chapter and self._cache[1] < layer:
            _, j, h_pos, h_neg = self._cache
        else:
            if sh["neg_chapter"] != chapter:
                labels = torch.from_numpy(self.negatives_for(chapter)).to(self.device)
                overlay(sh["x"], labels, self.cfg.model.label_position, out=sh["x_neg"])
                sh["neg_chapter"] = chapter
            j, h_pos, h_neg = -1, sh["x_pos"], sh["x_neg"]
        for k in range(j + 1, layer):
            with self.tracer.span("forward", chapter, layer):
                layer_k = self.net.layers[k]
                h_pos, h_neg = layer_k.forward_all(h_pos), layer_k.forward_all(h_neg)
                self._sync()
            self._cache = (chapter, k, h_pos, h_neg)
        return h_pos, h_neg

    def _do_train(self, task: Task) -> None:
        c, k = task.chapter, task.layer
        h_pos, h_neg = self._inputs(c, k)
        layer = self.net.layers[k]
        with self.tracer.span("train", c, k):
            xn_pos, xn_neg = layer.normalize_all(h_pos), layer.normalize_all(h_neg)
            lrs, seeds = self._lrs_and_seeds(self.cfg.train.lr, c, SHUFFLE_STREAM, k)
            loss = train_epochs(layer, self.opts[k], xn_pos, xn_neg, batch_size=self.cfg.train.batch_size,
                                lrs=lrs, seeds=seeds)
            del xn_pos, xn_neg
            self._sync()
        self.version[("layer", k)] = c
        self.result.losses[(c, k)] = loss
        self.tracer.scalar("loss", c, k, loss)
        self._report(REC_LOSS, c, k, loss)

    def _do_head(self, task: Task) -> None:
        c = task.chapter
        sh = self.shard(self.plan.data_shard(c))
        with self.tracer.span("head", c, -1):
            feats = self.net.head_features(sh["x"])
            lrs, seeds = self._lrs_and_seeds(self.cfg.train.head_lr, c, HEAD_STREAM, -1)
            loss = train_head(self.net, self.head_opt, feats, sh["y"], batch_size=self.cfg.train.batch_size,
                              lrs=lrs, seeds=seeds)
            del feats
            self._sync()
        self.version[("head", -1)] = c
        self.tracer.scalar("head_loss", c, -1, loss)
        self._report(REC_HEAD_LOSS, c, -1, loss)

    def _do_negatives(self, task: Task) -> None:
        target = task.chapter + 1 + self.plan.lag
        sh = self.shard(self.plan.data_shard(target))
        with self.tracer.span("negatives", task.chapter, -1):
            labels = self.net.adaptive_negatives(sh["x"], sh["y"], self.cfg.train.classifier)
            self.neg_labels[target] = labels.cpu().numpy().astype(np.int64)
        self.tracer.scalar("negatives_changed", task.chapter, -1, float(
            np.mean(self.neg_labels[target] != self.negatives_for_prev(target))))

    def negatives_for_prev(self, target: int) -> np.ndarray:
        prev = self.neg_labels.get(target - 1)
        if prev is None or len(prev) != len(self.neg_labels[target]):
            return np.full(len(self.neg_labels[target]), -1)
        return prev

    def _do_eval(self, task: Task) -> None:
        with self.tracer.span("eval", task.chapter, -1):
            acc = self.net.accuracy(self.x_test, self.y_test, self.cfg.train.classifier)
        self.result.test_accuracy[task.chapter] = acc
        self.tracer.scalar("test_accuracy", task.chapter, -1, acc)
        self._report(REC_ACC, task.chapter, -1, acc)

    def _do_final(self, task: Task) -> None:
        if self.write_model is not None:
            with self.tracer.span("io", task.chapter, -1):
                self.write_model(self.net)


def wait_all_progress(comm, expected: int, on_progress, poll: float) -> None:
    """Rank 0 after its own tasks: collect the remaining progress records from other ranks."""
    got = 0
    while got < expected:
        recs = comm.poll_progress()
        for rec in recs:
            on_progress(rec)
        got += len(recs)
        if got < expected:
            time.sleep(poll)
