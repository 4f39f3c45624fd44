"""Runs one rank's tasks from the plan: task order, messages, waits, checkpoints at boundaries.

The executor knows tasks, buffers and messages, and nothing of torch: what a task computes,
and how a buffer is packed into a flat array and loaded back, is the rank state's business
(:class:`RankState`; :class:`mpff.ffstate.FFState` for Forward-Forward). It always runs on a
communicator (one process runs on ``COMM_SELF``: the plan then has no messages), so there is
one code path.

Receives are posted early (a window of tasks ahead), sends as soon as a task's output exists,
and a send buffer is kept alive until its request completes. A rank blocks only when its next
task needs a buffer that has not arrived; that wait is traced as a ``wait`` span (a bubble).
There is no blocking collective inside the loop. While it waits, a rank polls: stop requests
(:class:`Preempted`), completed sends, progress records (rank 0), and the stall deadline
(:class:`Stalled`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .halt import IOFailure, PeerLost, Preempted, Stalled, Watch, io_reason
from .plan import Buf, Plan, Task, Transfer
from .progress import Record, Reporter

__all__ = ["Executor", "ExecResult", "Preempted", "RankState", "Stalled"]

#: Buffers of requests abandoned when a rank leaves early (see Executor.abandon).
_KEEP_ALIVE: list = []


class RankState(Protocol):
    """The model side of a rank, as the executor drives it (see mpff.ffstate.FFState)."""

    def holds(self, buf: Buf) -> bool:
        """Is this version of ``buf`` current here (produced here, loaded, or restored)?"""

    def pack(self, buf: Buf, full: bool) -> np.ndarray:
        """``buf`` as one flat array of ``plan.buffer_spec(buf, full)``: for messages and checkpoints."""

    def load(self, buf: Buf, array: np.ndarray, full: bool) -> None:
        """The inverse of :meth:`pack`."""

    def prepare(self, task: Task) -> None:
        """Work that needs only the task's non-trainable inputs (FF: forward passes below a layer)."""

    def run(self, task: Task) -> list[Record]:
        """Run one task; the progress records it produced."""

    def checkpoint(self, chapter: int, owned: list[Buf]) -> dict:
        """What this rank saves at the boundary after ``chapter`` (``owned``: the buffers it produced)."""

    # Optional: ``passed(boundary)``, called after the rank passes the boundary after a chapter
    # (every task of the chapters up to it has run here). A task may read versions older than
    # the current ones (a moved evaluation): ``holds``, ``pack`` and ``checkpoint`` answer for
    # them until then.


class Checkpointer(Protocol):
    def due(self, chapter: int) -> bool:
        """Is a checkpoint due at the boundary after ``chapter`` (0-based)?"""

    def write(self, chapter: int, snapshot: dict) -> None:
        """Write this rank's snapshot of that boundary."""


@dataclass
class _Recv:
    transfer: Transfer
    array: np.ndarray
    req: Any
    unpacked: bool = False


@dataclass
class ExecResult:
    bytes_sent: int = 0
    bytes_received: int = 0
    train_start: float = 0.0   # the tracer's clock: when the first task began
    train_end: float = 0.0     # and when the last one (and the drain) ended


class Executor:
    """Executes the tasks of ``comm.rank`` in ``plan`` on ``state``."""

    def __init__(self, plan: Plan, comm, state: RankState, tracer, *, reporter: Reporter | None = None,
                 should_stop: Callable[[], bool] | None = None, watch: Watch | None = None,
                 checkpointer: Checkpointer | None = None, window: int | None = None,
                 stall_timeout: float = 0.0, recv_budget: int = 512 * 2 ** 20) -> None:
        self.plan = plan
        self.comm = comm
        self.rank = comm.rank
        self.state = state
        self.tracer = tracer
        self.reporter = reporter or Reporter(comm)
        #: raises a halt: a stop signal, ``should_stop()``, or another rank's halt notice
        self.watch = watch or Watch(comm, should_stop)
        self.checkpointer = checkpointer
        self.stall_timeout = stall_timeout
        self.tasks = plan.rank_tasks(self.rank)
        # enough tasks ahead that a buffer's receive is posted before its producer sends it
        self.window = window if window is not None else 2 * plan.num_layers + 6
        self.result = ExecResult()
        self._boundary = plan.start_chapter - 1  # newest chapter boundary this rank has passed
        self._recvs: dict[Buf, _Recv] = {}
        self._recv_queue = list(plan.recvs[self.rank])
        self._task_pos = {task: i for i, task in enumerate(self.tasks)}
        #: the earliest chapter among the tasks from each position on: a chapter boundary is
        #: passed (and checkpointed) only when every task of the chapters before it has run here
        #: (a moved evaluation runs chapters after its own)
        self._pending_from = [0] * len(self.tasks)
        low = plan.num_chapters
        for i in range(len(self.tasks) - 1, -1, -1):
            low = min(low, self.tasks[i].chapter)
            self._pending_from[i] = low
        #: posted sends: (request, the packed buffer MPI reads, what it is and to whom)
        self._sends: list[tuple[Any, np.ndarray, Transfer]] = []
        #: bytes of receive buffers posted ahead and not yet taken in (see _post_recvs)
        self._posted_bytes = 0
        self.recv_budget = recv_budget
        #: the peer of the message being posted or waited for, and what it is (for PeerLost)
        self._peer: int = -1
        self._doing: Any = "starting"   # a phrase, or (verb, Buf), formatted only when needed

    # ------------------------------------------------------------------ the loop
    def run(self) -> ExecResult:
        try:
            return self._run()
        except getattr(self.comm, "errors", ()) as exc:
            self.abandon()
            raise self._lost(exc) from None
        except BaseException:
            self.abandon()
            raise

    def _lost(self, exc: BaseException) -> PeerLost:
        """The halt for an MPI failure: the peer and what this rank was doing with it, MPI's own
        last line of the error (the transport's reason), and what to do."""
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = lines[-1] if lines else type(exc).__name__
        who = self._who(self._peer) if self._peer >= 0 else "a peer"
        doing = self._doing if isinstance(self._doing, str) else f"{self._doing[0]} {_name(self._doing[1])}"
        return PeerLost(f"rank {self.rank} lost {who} while {doing}: MPI: {why}; its process, host "
                        "or link is gone. Once it is back, resume with --resume (from the last complete "
                        "checkpoint)", peer=self._peer)

    def abandon(self) -> None:
        """Leaving early (a stop, a stall, an error): cancel the receives still posted and keep
        every buffer MPI may still read or write alive until the process ends -- freeing one
        under a pending request corrupts the heap when the message lands."""
        for rv in self._recvs.values():
            if not rv.unpacked:
                try:
                    rv.req.Cancel()
                except Exception:  # pragma: no cover - already complete or finalized
                    pass
        _KEEP_ALIVE.extend(rv.array for rv in self._recvs.values())
        _KEEP_ALIVE.extend(a for _, a, _ in self._sends)
        _KEEP_ALIVE.extend(self.reporter.buffers())
        self._recvs.clear()
        self._sends.clear()

    def _run(self) -> ExecResult:
        self.result.train_start = self.tracer.now()
        last_chapter = None
        for pos, task in enumerate(self.tasks):
            self._check_stop()
            self._post_recvs(pos, force=True)       # what this task reads
            self._post_recvs(pos + self.window)     # and ahead, within the budget
            if last_chapter is not None and task.chapter != last_chapter:
                self._flush()  # chapter end: buffered spans go to the file
            self._pass_boundaries(self._pending_from[pos] - 1)
            last_chapter = task.chapter
            # What the task reads comes first; the state it trains (from chapter c-1) is waited
            # for last, so a train task's forward passes through the layers below fill that wait.
            inputs = self.plan.inputs(task)
            for b, trainable in inputs:
                if not trainable:
                    self._need(b, task)
            if self.plan.newest and task.kind == "train":
                self._take_arrived("neg")  # the paper's Single Layer: newest negatives, never wait
            self.state.prepare(task)
            for b, trainable in inputs:
                if trainable:
                    self._need(b, task)
            for rec in self.state.run(task) or ():  # None: nothing to report
                self.reporter.report(rec)
            self._publish(task)
            self._idle()
        if last_chapter is not None:
            self._flush()
        self._pass_boundaries(self.plan.num_chapters - 1)
        self._drain()
        self.reporter.report(Record("done", -1, -1))
        for req in self.reporter.pending():
            self._wait(req, "its progress records to reach rank 0", peer=0)
        self.result.train_end = self.tracer.now()
        return self.result

    def _flush(self) -> None:
        try:
            self.tracer.flush()
        except OSError as exc:
            raise IOFailure(io_reason(f"the trace {self.tracer.path}", exc)) from None

    def _drain(self) -> None:
        """Every send must complete before its buffer goes away, and every posted receive
        (newest-mode negatives may never have been needed) must be matched."""
        self._post_recvs(len(self.tasks) + 1, force=True)
        for b, rv in list(self._recvs.items()):
            if not rv.unpacked:
                self._wait(rv.req, f"{_name(b)} from rank {rv.transfer.peer}", peer=rv.transfer.peer)
        for req, _, tr in self._sends:
            self._wait(req, f"{_name(tr.buf)}, sent to rank {tr.peer}, to be received", peer=tr.peer)
        self._sends.clear()

    # ------------------------------------------------------------------ messages
    def _post_recvs(self, upto: int, force: bool = False) -> None:
        """Post receives for every buffer first needed by a task at position <= upto, in order of
        first use; beyond what the current task needs (``force``), only while the posted
        buffers stay within ``recv_budget`` bytes (shipped activations are hundreds of MB)."""
        while self._recv_queue and self._task_pos[self._recv_queue[0][0]] <= upto:
            _, tr = self._recv_queue[0]
            count, dtype = self.plan.buffer_spec(tr.buf, tr.full)
            nbytes = count * np.dtype(dtype).itemsize
            if not force and self._posted_bytes and self._posted_bytes + nbytes > self.recv_budget:
                return
            self._recv_queue.pop(0)
            array = np.empty(count, dtype=dtype)
            self._peer, self._doing = tr.peer, ("posting the receive of", tr.buf)
            self._recvs[tr.buf] = _Recv(tr, array, self.comm.irecv(array, tr.peer, tr.tag))
            self._posted_bytes += nbytes

    def _need(self, b: Buf, task: Task) -> None:
        """Make buffer ``b`` current in the local state, waiting for it if it is remote."""
        if self.plan.is_initial(b) or self.state.holds(b):
            return
        rv = self._recvs.get(b)
        if rv is None:
            raise AssertionError(f"rank {self.rank}: no receive posted for {b}")  # plan invariant
        if not self.comm.test(rv.req):
            with self.tracer.span("wait", task.chapter, task.layer, peer=rv.transfer.peer):
                self._wait(rv.req, f"{_name(b)} from rank {rv.transfer.peer}", peer=rv.transfer.peer)
        self._unpack(b)

    def _take_arrived(self, kind: str) -> None:
        for b, rv in list(self._recvs.items()):
            if b.kind == kind and not rv.unpacked and self.comm.test(rv.req):
                self._unpack(b)

    def _unpack(self, b: Buf) -> None:
        rv = self._recvs.pop(b)  # the state holds the values now: the receive buffer can go
        self._posted_bytes -= rv.array.nbytes
        with self.tracer.span("recv", b.chapter, b.index, peer=rv.transfer.peer, nbytes=rv.array.nbytes):
            self.state.load(b, rv.array, rv.transfer.full)
        self.result.bytes_received += rv.array.nbytes
        rv.unpacked = True

    def _publish(self, task: Task) -> None:
        for tr in self.plan.sends[task]:
            start = self.tracer.now()
            array = self.state.pack(tr.buf, tr.full)
            self._peer, self._doing = tr.peer, ("sending", tr.buf)
            req = self.comm.isend(array, tr.peer, tr.tag)
            self.tracer.add_span("send", tr.buf.chapter, tr.buf.index, start, self.tracer.now(),
                                 array.nbytes, tr.peer)
            self._sends.append((req, array, tr))  # keep the buffer alive until the send completes
            self.result.bytes_sent += array.nbytes

    def _wait(self, req: Any, what: str, peer: int = -1) -> None:
        """Wait for ``req``, polling; past the stall deadline the job cannot go on."""
        start = time.monotonic()
        while True:
            self._peer, self._doing = peer, f"waiting for {what}"
            if self.comm.test(req):
                return
            self._idle()
            if self.stall_timeout and time.monotonic() - start > self.stall_timeout:
                raise Stalled(f"rank {self.rank} waited {self.stall_timeout:g} s for {what} "
                              f"(run.stall_timeout); {self._who(peer)} is stuck or far slower than "
                              "its peers", peer=peer)
            time.sleep(self.comm.poll_interval)

    def _who(self, peer: int) -> str:
        """'rank 3 on host node7' (the host as the ranks told each other at start-up)."""
        hosts = getattr(self.comm, "hosts", None) or []
        if not 0 <= peer < len(hosts):
            return f"rank {peer}"
        here = 0 <= self.rank < len(hosts) and hosts[self.rank] == hosts[peer]
        return f"rank {peer} on host {hosts[peer]}" + (" (this rank's host too)" if here else
                                                       f" (this rank runs on {hosts[self.rank]})")

    def _idle(self) -> None:
        self._check_stop()
        if self._sends:
            pending = []
            for send in self._sends:
                self._peer, self._doing = send[2].peer, ("sending", send[2].buf)
                if not self.comm.test(send[0]):
                    pending.append(send)
            self._sends = pending
        self.reporter.poll()

    def _check_stop(self) -> None:
        self.watch.check()

    # ------------------------------------------------------------------ checkpoints
    def _pass_boundaries(self, upto: int) -> None:
        """This rank has finished every task of chapters <= upto: write the checkpoints due."""
        while self._boundary < upto:
            self._boundary += 1
            b = self._boundary
            if self.checkpointer is None or not self.checkpointer.due(b):
                continue
            owned = [buf for buf in self.plan.network(b)
                     if buf in self.plan.producer and self.plan.rank_of[self.plan.producer[buf]] == self.rank]
            with self.tracer.span("checkpoint", b, -1):
                self.checkpointer.write(b, self.state.checkpoint(b, owned))
        passed = getattr(self.state, "passed", None)
        if passed is not None:
            passed(self._boundary)  # what was kept for the chapters before can go


def _name(b: Buf) -> str:
    """A buffer as a user reads it: its kind, layer (1-based) and chapter (1-based)."""
    what = {"layer": f"layer {b.index + 1}", "head": "the softmax head", "neg": "the negatives",
            "act": f"the outputs of layer {b.index + 1}", "model": "the model"}.get(b.kind, f"{b.kind} {b.index}")
    return f"{what} of chapter {b.chapter + 1}"
