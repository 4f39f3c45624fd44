"""The discrete-event simulator of a plan: its task graph run as the executor runs it, with given
task times, message costs and contention between ranks of one node.

The report models a run's bubble with it (measured task times); ``mpff predict`` predicts runs
on more ranks with it (task times from a profile). :mod:`mpff.plan` decides the tasks and the
transfers; this module only times them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..plan import Buf, Plan, Task, Transfer

__all__ = ["SimResult", "simulate"]


@dataclass
class SimResult:
    """What :func:`simulate` predicts: ``makespan`` (seconds from the start of the first task
    to the end of the last step of any rank), ``busy`` per rank (seconds working, stretched by
    contention; waiting is not busy), when each task's own work ended, and the message totals."""
    makespan: float
    busy: list[float]
    finish: dict[Task, float] = field(default_factory=dict)
    messages: int = 0
    bytes_moved: int | None = None  # None: a negatives buffer was sent and the plan has no n_train

    @property
    def bubble(self) -> float:
        total = len(self.busy) * self.makespan
        return 1.0 - sum(self.busy) / total if total > 0 else 0.0


def simulate(plan: Plan, durations: Mapping[tuple[str, int, int], float], latency: float = 0.0, *,
             message_cost: Callable[[int, int, int], float] | None = None,
             pack_cost: Callable[[int], float] | None = None,
             unpack_cost: Callable[[int], float] | None = None,
             node_of: Sequence[int] | None = None, contention: float = 0.0) -> SimResult:
    """Run ``plan``'s graph as the executor runs it, with task times ``durations`` ({(kind,
    chapter, layer): seconds}; absent: 0). Each rank works through its tasks in order; it waits
    only for a buffer from another rank that has not arrived.

    A task runs as the executor runs it: it waits for (and unpacks) what it reads, then, for a
    train task, does its forward passes (``("forward", c, k)``: the layers below applied to
    the chapter's data), and only then waits for the state it trains (from chapter c-1);
    after its own work it packs and posts each of its sends in turn.

    Messages: a transfer of ``nbytes`` from rank ``src`` to ``dst`` arrives
    ``message_cost(src, dst, nbytes)`` seconds after it is posted (default: ``latency``);
    packing costs the sender ``pack_cost(nbytes)`` and unpacking the receiver
    ``unpack_cost(nbytes)`` seconds of work (default 0).

    Contention: ranks on one node (``node_of[rank]``; default a node per rank) slow each
    other: while m other ranks of its node are working, a rank's work runs ``1 + contention
    * m`` times slower (waiting ranks do not slow anyone)."""
    n = plan.world_size
    node = list(node_of) if node_of is not None else list(range(n))
    if len(node) != n:
        raise ValueError(f"node_of has {len(node)} entries for {n} ranks")
    costs = _Costs(plan, latency, message_cost, pack_cost, unpack_cost)
    programs = [_program(plan, r, durations, costs) for r in range(n)]
    loop = _EventLoop(programs, node, contention)
    loop.run()
    return SimResult(makespan=max(loop.done_at) if loop.done_at else 0.0, busy=loop.busy, finish=loop.finish,
                     messages=costs.messages, bytes_moved=costs.total_bytes)


class _Costs:
    """Message sizes (computed once per buffer), what packing, unpacking and a flight cost, and
    the plan's message totals as the programs are built."""

    def __init__(self, plan: Plan, latency: float, message_cost, pack_cost, unpack_cost) -> None:
        self.plan, self.latency = plan, latency
        self.message_cost, self.pack_cost, self.unpack_cost = message_cost, pack_cost, unpack_cost
        self.inbound = {(tr.buf, r): tr for r in range(plan.world_size) for _, tr in plan.recvs[r]}
        self.sizes: dict[tuple[Buf, bool], int | None] = {}
        self.messages, self.total_bytes = 0, 0

    def nbytes(self, tr: Transfer) -> int | None:
        key = (tr.buf, tr.full)
        if key not in self.sizes:
            self.sizes[key] = (None if tr.buf.kind == "neg" and self.plan.n_train is None
                               else self.plan.buffer_bytes(tr.buf, tr.full))
        return self.sizes[key]

    def need_bytes(self, tr: Transfer) -> int:
        size = self.nbytes(tr)
        if size is None:
            raise ValueError("the plan was built without n_train: negatives messages have no size")
        return size

    def count(self, tr: Transfer) -> None:
        size = self.nbytes(tr)
        self.messages += 1
        self.total_bytes = None if size is None or self.total_bytes is None else self.total_bytes + size

    def flight(self, src: int, tr: Transfer) -> float:
        if self.message_cost is not None:
            return float(self.message_cost(src, tr.peer, self.need_bytes(tr)))
        return float(self.latency)


def _program(plan: Plan, r: int, durations: Mapping[tuple[str, int, int], float], costs: _Costs) -> list[tuple]:
    """Rank ``r``'s program: ("wait", key) | ("work", seconds, task finished or None)
    | ("post", key, seconds in flight); key = (buffer, receiving rank)."""
    prog: list[tuple] = []
    unpacked: set[Buf] = set()
    for t in plan.rank_tasks(r):
        ins = plan.inputs(t)
        for step in ("reads", "trains"):
            for b, trainable in ins:
                if trainable != (step == "trains"):
                    continue
                if plan.is_initial(b) or plan.rank_of[plan.producer[b]] == r or b in unpacked:
                    continue
                unpacked.add(b)
                prog.append(("wait", (b, r)))
                if costs.unpack_cost is not None:
                    prog.append(("work", float(costs.unpack_cost(costs.need_bytes(costs.inbound[(b, r)]))), None))
            if step == "reads" and t.kind == "train":
                prog.append(("work", float(durations.get(("forward", t.chapter, t.layer), 0.0)), None))
        prog.append(("work", float(durations.get((t.kind, t.chapter, t.layer), 0.0)), t))
        for tr in plan.sends[t]:
            costs.count(tr)
            if costs.pack_cost is not None:
                prog.append(("work", float(costs.pack_cost(costs.need_bytes(tr))), None))
            prog.append(("post", (tr.buf, tr.peer), costs.flight(r, tr)))
    return prog


class _EventLoop:
    """Runs the programs. Event-driven: only ranks whose state can change are visited (a rank
    that finished a step, or whose awaited message was posted or has arrived), so a step costs
    the ranks at work, not the world size: 1024 ranks x 1024 chapters simulate in about a
    second, where visiting every rank at every step took 31 s."""

    def __init__(self, programs: list[list[tuple]], node: list[int], contention: float) -> None:
        n = len(programs)
        self.programs, self.node, self.contention = programs, node, contention
        self.now = 0.0
        self.pos = [0] * n
        self.left: list[float | None] = [None] * n   # seconds of work (alone) left in the current step
        self.arrival: dict[tuple[Buf, int], float] = {}
        self.waiter: dict[tuple[Buf, int], int] = {}  # a message not yet posted -> the rank waiting for it
        self.due: list[tuple[float, int]] = []         # (arrival, rank) of waits on posted messages
        self.working: set[int] = set()
        self.busy = [0.0] * n
        self.done_at = [0.0] * n
        self.finish: dict[Task, float] = {}
        self.ready = list(range(n))

    def run(self) -> None:
        while True:
            while self.ready:  # take every step that needs no time; a post may release a waiting rank
                self._advance(self.ready.pop())
            if not self.working and not self.due:
                if self.waiter:  # pragma: no cover - the global order rules this out
                    raise AssertionError(f"simulated deadlock at t = {self.now}: ranks wait for {list(self.waiter)}")
                return
            if not self.working:
                self.now = self.due[0][0]
            else:
                self._work()
            while self.due and self.due[0][0] <= self.now:
                self.ready.append(heapq.heappop(self.due)[1])

    def _advance(self, r: int) -> None:
        """Rank r's steps that take no time, up to one that waits or works."""
        prog = self.programs[r]
        while self.pos[r] < len(prog):
            step = prog[self.pos[r]]
            if step[0] == "wait":
                at = self.arrival.get(step[1])
                if at is None:
                    self.waiter[step[1]] = r
                    return
                if at > self.now:
                    heapq.heappush(self.due, (at, r))
                    return
            elif step[0] == "post":
                at = self.arrival[step[1]] = self.now + step[2]
                other = self.waiter.pop(step[1], None)
                if other is not None:
                    if at > self.now:
                        heapq.heappush(self.due, (at, other))
                    else:
                        self.ready.append(other)
            else:
                if self.left[r] is None:
                    self.left[r] = max(step[1], 0.0)
                if self.left[r] > 0.0:
                    self.working.add(r)
                    return
                self.left[r] = None
                if step[2] is not None:
                    self.finish[step[2]] = self.now
            self.pos[r] += 1
            self.done_at[r] = self.now

    def _work(self) -> None:
        """Advance time to the next end of a working rank's step or the next arrival."""
        per_node: dict[int, int] = {}
        for r in self.working:
            per_node[self.node[r]] = per_node.get(self.node[r], 0) + 1
        slow = {r: 1.0 + self.contention * (per_node[self.node[r]] - 1) for r in self.working}
        step_end = min(self.left[r] * slow[r] for r in self.working)
        if self.due and self.due[0][0] - self.now < step_end:
            dt, new_now = self.due[0][0] - self.now, self.due[0][0]
        else:
            dt, new_now = step_end, self.now + step_end
        for r in list(self.working):
            self.busy[r] += dt
            if self.left[r] * slow[r] <= dt:
                self.left[r] = 0.0  # ends now (exactly: no rounding left over)
                self.working.discard(r)
                self.ready.append(r)
            else:
                self.left[r] -= dt / slow[r]
        self.now = new_now
