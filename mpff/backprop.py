"""Backpropagation on "the same network" as FF, on one rank or data-parallel: the baseline PFF is
measured against (SPEC section 4).

The FF network ``dims = [d0, d1, ..., dL]`` becomes the MLP ``d0 -> d1 -> ... -> dL -> 10``, ReLU
after each hidden layer, a linear output, cross-entropy, one Adam over all parameters at
``train.bp_lr`` with FF's cooldown rule (:func:`mpff.ff.cooldown_lr`). Inputs are the data set's
normalised rows as they are: no label overlay and no per-layer normalisation (those are FF's).
Initial weights and every epoch's shuffle come from seeded generators, so every rank builds the
same network and draws the same permutation without communicating.

Data-parallel (``run.schedule = "data_parallel"``): every rank runs every train task on its slice
of every global batch, drawn from the one global permutation, and PyTorch's
DistributedDataParallel averages the gradients (an all-reduce per bucket, overlapped with the
backward pass). ``run.scaling = "strong"`` keeps the global batch at ``train.batch_size``;
``"weak"`` gives each rank ``train.batch_size``, so the global batch is N times that. Each rank
scales its summed loss by ``N / global batch``; after DDP's average the gradient is the
sequential run's gradient of the same global batch, also when the last batch does not split
evenly (a rank may even get no rows). torch.distributed must be started first
(:func:`mpff.ddp.init_process_group`).

:class:`BPState` is what the executor drives for a backprop plan: ``train(c, 0)`` trains the
whole MLP for chapter c's epochs (every rank in data-parallel), ``eval(c)`` and ``final`` run on
rank 0. Its one buffer kind, ``Buf("model", 0, c)``, is the whole MLP after chapter c; it never
travels between ranks (DDP keeps the replicas equal), it only goes into checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ff import (
    adam_state,
    chapter_rates,
    epochs,
    generator,
    load_adam_state,
    make_adam,
    matmul_precision,
)
from .halt import VOTE_EVERY, Diverged, Halt, from_code
from .model import MLP
from .plan import Buf, Task
from .progress import Record
from .trace import STEP_PHASES

#: Random streams of backprop (apart from FF's, so that the two never share a draw by accident).
SHUFFLE_STREAM = 0xB5  # the epoch shuffles (the MLP's initial weights: model.MLP_INIT_STREAM)


class StepClock:
    """Seconds of each phase of the training steps of a chapter, summed: the forward pass with
    the loss, the backward pass (in data-parallel it ends when DDP's last all-reduce is back) and
    the optimizer step. ``mpff predict`` splits a step with them: the optimizer's share does not
    shrink when data-parallel ranks split a batch, the passes' does.

    On the CPU every step is timed (``time.perf_counter``: four reads per step of milliseconds).
    On a GPU CUDA events time every :attr:`SAMPLE_EVERY`-th step (events on every step would add
    launches to a step that launches are likely to bound) and the sums are scaled to all steps;
    they are read at the end of the chapter, when the device has finished.
    """

    SAMPLE_EVERY = 8

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._sums = [0.0] * len(STEP_PHASES)
        self._timed = 0
        self._marks: list = []       # this step's marks (perf_counter values or CUDA events)
        self._events: list[list] = []

    def mark(self) -> None:
        """A phase border of this step: call before the forward pass and after each phase."""
        if not self.cuda:
            self._marks.append(time.perf_counter())
        elif self.steps % self.SAMPLE_EVERY == 0:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        if len(self._marks) == len(STEP_PHASES) + 1:
            if self.cuda:
                self._events.append(self._marks)
            else:
                for i in range(len(STEP_PHASES)):
                    self._sums[i] += self._marks[i + 1] - self._marks[i]
                self._timed += 1
            self._marks = []

    def step_done(self) -> None:
        self.steps += 1

    def seconds(self) -> dict[str, float]:
        """{phase: seconds summed over the chapter's steps} (CUDA: the samples scaled to all)."""
        sums, timed = list(self._sums), self._timed
        if self._events:
            torch.cuda.synchronize()
            for marks in self._events:
                for i in range(len(STEP_PHASES)):
                    sums[i] += marks[i].elapsed_time(marks[i + 1]) / 1e3
            timed += len(self._events)
        scale = self.steps / timed if timed else 0.0
        return {phase: sums[i] * scale for i, phase in enumerate(STEP_PHASES)}


def batch_slice(batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of a global batch of ``batch`` rows that ``rank`` takes: contiguous parts whose
    sizes differ by at most one (the first ``batch % world_size`` ranks get the extra row)."""
    base, extra = divmod(batch, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class BPState:
    """One rank's backprop model, optimizer and data; runs the tasks of a backprop plan.

    ``plan`` is used for buffer sizes only (``plan.buffer_spec``); ``tracer`` gets ``train``,
    ``eval`` and (data-parallel) ``allreduce`` spans and the ``loss``/``test_accuracy`` scalars;
    ``process_group`` is the torch.distributed group of a data-parallel run (None: the default
    group, which :func:`mpff.ddp.init_process_group` starts).
    """

    def __init__(self, cfg, plan, rank: int, world_size: int, dataset, tracer, device: torch.device,
                 *, process_group=None, check: Callable[[], None] | None = None,
                 pending: Callable[[], Halt | None] | None = None) -> None:
        t = cfg.train
        if t.algorithm != "backprop":  # pragma: no cover - internal invariant (the executor picks)
            raise AssertionError("BPState runs backprop configurations only")
        self.cfg = cfg
        self.plan = plan
        self.rank = rank
        self.world_size = world_size
        #: one process: raises a halt (a stop signal...) at every step. Data-parallel ranks must
        #: not leave a step alone (the others would wait in DDP's all-reduce), so they vote every
        #: VOTE_EVERY steps on what ``pending`` says and all leave at the same step.
        self.check = check
        self.pending = pending
        self.tracer = tracer
        self.device = device
        self.C = t.epochs_per_chapter
        self.data_parallel = cfg.run.schedule == "data_parallel" and world_size > 1
        #: rows per optimizer step over all ranks
        self.global_batch = t.batch_size * (world_size if cfg.run.scaling == "weak" else 1)

        self.net = MLP.from_config(cfg, dataset.num_classes).to(device)
        self.opt = make_adam(self.net.parameters(), t.bp_lr)
        self.version = -1          # the chapter whose model self.net holds (-1: initial)
        self.steps = 0             # optimizer steps taken (every rank takes every step)
        self.losses: dict[int, float] = {}
        self.test_accuracy: dict[int, float] = {}
        self.bytes_allreduced = 0  # payload of every gradient all-reduce of this rank
        self._chapter = -1         # for the all-reduce spans
        self.clock = StepClock(device)  # the phases of the last chapter's steps

        # The whole training set on the device (on the CPU a view of the numpy array, no copy);
        # each step gathers its rows into one preallocated batch buffer.
        self.x_train = torch.from_numpy(dataset.x_train).to(device)
        self.y_train = torch.from_numpy(dataset.y_train).to(device)
        self.x_test = torch.from_numpy(dataset.x_test).to(device)
        self.y_test = torch.from_numpy(dataset.y_test).to(device)
        self.n_train = int(self.x_train.shape[0])
        rows = batch_slice(self.global_batch, 0, world_size if self.data_parallel else 1)
        self._xb = torch.empty(rows[1] - rows[0], self.x_train.shape[1], dtype=self.x_train.dtype,
                               device=device)

        self.model: nn.Module = self.net
        self.process_group = process_group
        if self.data_parallel:
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel

            if not dist.is_initialized():  # pragma: no cover - internal invariant
                raise AssertionError("data-parallel backprop: start torch.distributed first "
                                     "(mpff.ddp.init_process_group)")
            # Constructing DDP is collective (it broadcasts rank 0's parameters, equal anyway).
            # Gradients are views into DDP's all-reduce buckets: no second copy of them.
            self.model = DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None,
                process_group=process_group, gradient_as_bucket_view=True)
            self.model.register_comm_hook(process_group, self._timed_allreduce)

    # ------------------------------------------------------------------ what mpff train asks (mpff.algorithms)
    @classmethod
    def create(cls, setup, tracer, watch) -> BPState:
        """This rank's state; a data-parallel run first starts torch.distributed from the MPI job
        (collective: every rank calls it), its group kept in ``setup.ddp_group`` for the shutdown."""
        comm = setup.comm
        if setup.plan.replicated and comm.size > 1:
            from .ddp import init_process_group
            setup.ddp_group = init_process_group(comm, setup.device)
        return cls(setup.cfg, setup.plan, comm.rank, comm.size, setup.dataset, tracer, setup.device,
                   process_group=setup.ddp_group, check=watch.check, pending=watch.pending)

    @staticmethod
    def memory_figure(cfg, n_train: int, world_size: int) -> dict:
        from .memory import bp_rank
        return bp_rank(cfg, n_train, world_size)

    @classmethod
    def summary(cls, cfg, world_size: int) -> str:
        t = cfg.train
        return (f"backprop (Adam lr {t.bp_lr:g}, global batch "
                f"{t.batch_size * (world_size if cfg.run.scaling == 'weak' else 1)}"
                + (f", {cfg.run.scaling} scaling" if cfg.run.schedule == "data_parallel" else "") + ")")

    @staticmethod
    def classified_by(cfg) -> str:
        return "backprop"

    def save(self, path: str, setup) -> None:
        """The model file (mpff.modelfile.save_bp_model) of the MLP after the last chapter."""
        from .modelfile import save_bp_model

        cfg, ds = self.cfg, setup.dataset
        save_bp_model(path, self.net, cfg, ds.input_mean, ds.input_std, ds.input_scale,
                      self.test_accuracy.get(cfg.train.chapters - 1),
                      {"world_size": setup.comm.size, "schedule": cfg.run.schedule, "scaling": cfg.run.scaling})

    def traffic(self) -> dict:
        """DDP moves the gradients, outside the executor: bytes as a ring all-reduce sends them."""
        return dict(bytes_allreduced=self.bytes_allreduced, global_batch=self.global_batch,
                    bytes_sent=self.bytes_sent, bytes_received=self.bytes_received)

    def close(self) -> None:
        """Drop the DDP wrapper (its reducer holds the process group) before the group is shut
        down (mpff.ddp.shutdown)."""
        self.model = self.net

    # ------------------------------------------------------------------ data-parallel plumbing
    def _timed_allreduce(self, group, bucket):
        """DDP's own averaging all-reduce, timed. Called when a bucket of gradients is ready, in
        the middle of the backward pass; its ``allreduce`` span runs from then until the averaged
        bucket is back, so it overlaps the backward computation of the layers below (it is not
        all waiting). Bytes: the bucket's payload."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        start = self.tracer.now()
        payload = bucket.buffer()
        nbytes = payload.numel() * payload.element_size()
        chapter = self._chapter
        self.bytes_allreduced += nbytes

        def done(fut):
            self.tracer.add_span("allreduce", chapter, 0, start, self.tracer.now(), nbytes)
            return fut.value()

        return default_hooks.allreduce_hook(group, bucket).then(done)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent, modelled as a ring all-reduce: 2 (N-1)/N of each payload.
        (gloo and NCCL pick their algorithm per message; the ring is the bandwidth-optimal one.)"""
        n = self.world_size if self.data_parallel else 1
        return int(round(self.bytes_allreduced * 2 * (n - 1) / n))

    bytes_received = bytes_sent

    def _allreduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.data_parallel:
            import torch.distributed as dist
            dist.all_reduce(values, group=self.process_group)
        return values

    def _halt_point(self) -> None:
        if not self.data_parallel:
            if self.check is not None:
                self.check()
            return
        if self.pending is None or self.steps % VOTE_EVERY:
            return
        import torch.distributed as dist
        halt = self.pending()
        vote = torch.tensor([halt.code if halt is not None else 0], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.process_group)  # ~tens of us, gloo
        if int(vote.item()):
            raise halt if halt is not None and halt.code == int(vote.item()) else from_code(int(vote.item()))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # note: sync point so spans measure GPU work

    # ------------------------------------------------------------------ training
    def train_chapter(self, chapter: int) -> float:
        """Train the C epochs of ``chapter``; returns the mean cross-entropy per training sample
        of its last epoch (over all ranks' rows)."""
        t = self.cfg.train
        n, bg = self.n_train, self.global_batch
        ranks = self.world_size if self.data_parallel else 1
        rank = self.rank if self.data_parallel else 0
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, rows
        self._chapter = chapter
        clock = self.clock
        clock.reset()
        self.model.train()
        lrs = chapter_rates(t.bp_lr, chapter, self.C, t.epochs, t.cooldown_final)
        shuffles = [generator(t.seed, SHUFFLE_STREAM, chapter, m) for m in range(self.C)]
        for perm in epochs(self.opt, n, self.device, lrs, shuffles):
            total.zero_()
            for i in range(0, n, bg):
                self._halt_point()
                b = min(bg, n - i)
                lo, hi = batch_slice(b, rank, ranks)
                idx = perm[i + lo:i + hi]
                xb = self._xb[:hi - lo]
                torch.index_select(self.x_train, 0, idx, out=xb)
                # gradients are freed before the forward pass, so they never coexist with the
                # activations of a whole forward pass (DDP's bucket views stay allocated)
                self.opt.zero_grad(set_to_none=True)
                clock.mark()
                loss_sum = F.cross_entropy(self.model(xb), self.y_train[idx], reduction="sum")
                clock.mark()
                # DDP averages over ranks: N / b makes that average the mean over the global batch
                (loss_sum * (ranks / b)).backward()
                clock.mark()
                self.opt.step()
                clock.mark()
                clock.step_done()
                total[0] += loss_sum.detach()
                total[1] += hi - lo
                self.steps += 1
        total = self._allreduce_sum(total)  # one small collective per chapter (a no-op on 1 rank)
        return float(total[0].item() / max(total[1].item(), 1.0))  # note: host sync per chapter

    # ------------------------------------------------------------------ the executor's interface
    def prepare(self, task: Task) -> None:
        """Nothing to prepare: the data is on the device from the start."""

    def run(self, task: Task) -> list[Record]:
        with matmul_precision(self.cfg.train.precision, self.device):
            return self._run(task)

    def _run(self, task: Task) -> list[Record]:
        c = task.chapter
        if task.kind == "train":
            with self.tracer.span("train", c, 0):
                loss = self.train_chapter(c)
                self._sync()
            # every rank sees the same loss (all-reduced) and weights: all stop together
            if not math.isfinite(loss) or not all(bool(torch.isfinite(p).all()) for p in self.net.parameters()):
                what = "loss" if not math.isfinite(loss) else "weights"
                raise Diverged(f"the {what} of backprop became {loss if what == 'loss' else 'NaN or infinite'} "
                               f"in chapter {c + 1}; lower train.bp_lr (now {self.cfg.train.bp_lr:g}) and start again")
            self.version = c
            self.losses[c] = loss
            self.tracer.scalar("loss", c, 0, loss)
            self.tracer.scalar("bp_steps", c, 0, self.clock.steps)
            for phase, seconds in self.clock.seconds().items():
                self.tracer.scalar(f"bp_{phase}_seconds", c, 0, seconds)
            return [Record("loss", c, 0, loss)] if self.rank == 0 else []
        if task.kind == "eval":
            with self.tracer.span("eval", c, -1):
                self.net.eval()
                acc = self.net.accuracy(self.x_test, self.y_test)
            self.test_accuracy[c] = acc
            self.tracer.scalar("test_accuracy", c, -1, acc)
            return [Record("accuracy", c, -1, acc)]
        if task.kind == "final":
            return []  # the executor writes model.h5 from self.net (modelfile.save_bp_model)
        raise AssertionError(f"backprop has no {task.kind!r} tasks")  # plan invariant

    def holds(self, buf: Buf) -> bool:
        return buf.kind == "model" and self.version == buf.chapter

    def _size(self, full: bool) -> int:
        n = sum(p.numel() for p in self.net.parameters())
        return n + (1 + 2 * n if full else 0)

    def pack(self, buf: Buf, full: bool) -> np.ndarray:
        """The model as one float32 array: every parameter (layer by layer, weight then bias),
        then when ``full`` Adam's step, every exp_avg and every exp_avg_sq (zeros before the
        first step, which Adam treats as a fresh start)."""
        if buf.kind != "model":  # pragma: no cover - plan invariant
            raise AssertionError(f"backprop has no {buf.kind!r} buffers")
        size = self._size(full)
        if self.plan is not None:
            assert (size, np.float32) == self.plan.buffer_spec(buf, full), "buffer_spec disagrees"
        out = np.empty(size, dtype=np.float32)
        flat = torch.from_numpy(out)
        params = list(self.net.parameters())
        i = 0
        for p in params:
            flat[i:i + p.numel()] = p.detach().reshape(-1).cpu()  # note: device-to-host on GPU
            i += p.numel()
        if full:  # zeros before the first step, which Adam treats as a fresh start
            state = adam_state(self.opt, params)
            flat[i:] = state if state is not None else 0.0
        return out

    def load(self, buf: Buf, array: np.ndarray, full: bool) -> None:
        """Inverse of :meth:`pack`. Without ``full`` this rank keeps its own Adam state."""
        if array.shape != (self._size(full),) or array.dtype != np.float32:
            raise ValueError(f"a backprop model buffer of {self._size(full)} float32 values was "
                             f"expected, not {array.dtype} {array.shape}")
        flat = torch.from_numpy(array)
        params = list(self.net.parameters())
        i = 0
        with torch.no_grad():
            for p in params:
                p.copy_(flat[i:i + p.numel()].view_as(p))
                i += p.numel()
        if full:
            load_adam_state(self.opt, params, flat[i:], self.device)
        self.version = buf.chapter

    def checkpoint(self, chapter: int, owned: list[Buf]) -> dict:
        for buf in owned:
            if not self.holds(buf):  # pragma: no cover - executor invariant
                raise AssertionError(f"rank {self.rank} does not hold {buf} at chapter {chapter}")
        return {"buffers": {buf: (self.pack(buf, True), True) for buf in owned}}

    def restore(self, snapshot: dict) -> None:
        """Load a checkpoint's model buffer (every rank of a data-parallel run loads the same)."""
        for buf, (array, full) in snapshot.get("buffers", {}).items():
            self.load(buf, array, full)
