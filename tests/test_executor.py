"""The executor in this process, on COMM_SELF and on a duplicate of COMM_WORLD, as mpi4py tests
itself: one test body, assertions that hold at any size, checks that differ by rank combined with
an allreduce so every rank passes or fails together.

Under plain pytest the world has one rank; ``test_mpi.py::test_executor_suite_at_several_sizes``
runs this file under ``mpiexec -n 2`` and ``-n 3``. The rank state here is a toy (numpy only, no
torch): it computes deterministic functions of its inputs, so any schedule must reproduce the
one-rank result bit for bit, exactly as the Forward-Forward state must.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI

from mpff.comm import Comm
from mpff.config import Config
from mpff.executor import Executor, Preempted, Stalled
from mpff.halt import EXIT_STALLED, PeerLost
from mpff.plan import Buf, build_plan
from mpff.progress import Board, Record, Reporter, expected
from mpff.trace import Tracer

N_TRAIN = 24


class ToyState:
    """A rank state whose 'training' is arithmetic on small arrays (see module docstring)."""

    def __init__(self, plan, rank: int, *, slow: dict | None = None) -> None:
        self.plan = plan
        self.rank = rank
        self.slow = slow or {}  # task -> seconds to sleep in it
        self.params, self.opt, self.version = {}, {}, {}
        for b in plan.network(0):
            n, _ = plan.buffer_spec(b, False)
            self.params[(b.kind, b.index)] = np.full(n, 0.01 * (b.index + 2), dtype=np.float32)
            self.opt[(b.kind, b.index)] = np.zeros(1 + 2 * n, dtype=np.float32)
            self.version[(b.kind, b.index)] = -1
        self.neg: dict[int, np.ndarray] = {}
        self.ran: list = []
        self._inputs: dict = {}
        #: every version this rank has held: a task may read an older one (a moved evaluation
        #: runs after its rank has trained the next versions), and so may a checkpoint
        self.history: dict[Buf, tuple[np.ndarray, np.ndarray]] = {}

    def _now(self, key) -> None:
        kind, index = key
        self.history[Buf(kind, index, self.version[key])] = (self.params[key].copy(), self.opt[key].copy())

    def _params_of(self, b: Buf) -> np.ndarray:
        if self.version[(b.kind, b.index)] == b.chapter:
            return self.params[(b.kind, b.index)]
        return self.history[b][0]

    # the serialiser
    def holds(self, b: Buf) -> bool:
        if b.kind == "neg":
            return b.chapter in self.neg
        return self.version[(b.kind, b.index)] == b.chapter or b in self.history

    def pack(self, b: Buf, full: bool) -> np.ndarray:
        if b.kind == "neg":
            return self.neg[b.chapter].copy()
        key = (b.kind, b.index)
        params, opt = ((self.params[key], self.opt[key]) if self.version[key] == b.chapter
                       else self.history[b])
        return np.concatenate([params] + ([opt] if full else []))

    def load(self, b: Buf, array: np.ndarray, full: bool) -> None:
        if b.kind == "neg":
            self.neg[b.chapter] = array.copy()
            return
        n = self.params[(b.kind, b.index)].size
        self.params[(b.kind, b.index)] = array[:n].copy()
        if full:
            self.opt[(b.kind, b.index)] = array[n:].copy()
        self.version[(b.kind, b.index)] = b.chapter
        self._now((b.kind, b.index))

    def checkpoint(self, chapter: int, owned: list[Buf]) -> dict:
        return {"buffers": {b: (self.pack(b, True), True) for b in owned}}

    # the tasks
    def _mean(self, k: int) -> np.float32:
        return np.float32(self.params[("layer", k)].mean())

    def prepare(self, task) -> None:
        if task.kind == "train":
            x = np.float32(task.chapter + 1)
            for j in range(task.layer):
                x = np.float32(x * self._mean(j) + np.float32(1))
            self._inputs[task] = x

    def run(self, task) -> list[Record]:
        self.ran.append(task)
        time.sleep(self.slow.get(task, 0.0))
        c, k = task.chapter, task.layer
        if task.kind == "train":
            key = ("layer", k)
            neg = self.neg.get(c)
            push = np.float32(neg.mean() / 10) if neg is not None else np.float32(0)
            self.opt[key][0] += 1
            self.params[key] = (self.params[key] * np.float32(0.5) + self._inputs.pop(task)
                                + self.opt[key][0] * np.float32(1e-3) + push).astype(np.float32)
            self.version[key] = c
            self._now(key)
            return [Record("loss", c, k, float(self.params[key][0]))]
        if task.kind == "head":
            key = ("head", -1)
            total = sum(self._mean(j) for j in range(self.plan.num_layers))
            self.opt[key][0] += 1
            self.params[key] = (self.params[key] * np.float32(0.25) + np.float32(total)).astype(np.float32)
            self.version[key] = c
            self._now(key)
            return [Record("head_loss", c, -1, float(self.params[key][0]))]
        if task.kind == "negatives":
            target = c + 1 + self.plan.lag
            n, _ = self.plan.buffer_spec(Buf("neg", -1, target), False)
            seed = int(1000 * sum(self._mean(j) for j in range(self.plan.num_layers))) % 7
            self.neg[target] = ((np.arange(n) + seed) % 10).astype(np.int64)
            return []
        if task.kind == "eval":  # of the network of its chapter, whatever this rank holds now
            value = sum(float(self._params_of(b).mean()) for b in self.plan.network(c))
            return [Record("accuracy", c, -1, value % 1)]
        return []

    def network_values(self, chapter: int) -> dict:
        return {(b.kind, b.index): self.params[(b.kind, b.index)].copy() for b in self.plan.network(chapter)}


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(params=["self", "world-dup"])
def comm(request):
    c = MPI.COMM_SELF.Dup() if request.param == "self" else MPI.COMM_WORLD.Dup()
    yield c
    c.Free()


def _cfg(schedule: str, *, negatives: str = "adaptive", classifier: str = "softmax", layers: int = 3,
         chapters: int = 5, lag: int = 0, exchange: str = "full") -> Config:
    return Config().replace(
        model={"dims": (12,) + (4,) * layers},
        train={"epochs": chapters, "chapters": chapters, "negatives": negatives, "classifier": classifier,
               "adaptive_lag": lag},
        run={"schedule": schedule, "exchange": exchange},
        data={"shards": 0, "dataset": "npz", "path": "toy.npz"})  # never opened: the toy makes no data


def _tracer(rank: int) -> Tracer:
    return Tracer(None, rank, {}, enabled=False)


def _execute(cfg: Config, comm, **state_kw):
    """Run cfg's plan on ``comm``; returns (plan, state, board or None)."""
    plan = build_plan(cfg, comm.Get_size(), n_train=N_TRAIN)
    rank = comm.Get_rank()
    state = ToyState(plan, rank, **state_kw)
    mc = Comm(comm, poll_interval=0.0005)
    board = Board(plan, time.perf_counter(), quiet=True) if rank == 0 else None
    try:
        ex = Executor(plan, mc, state, _tracer(rank), reporter=Reporter(mc, board))
        ex.run()
        ex.reporter.collect(timeout=60)
    finally:
        mc.free()
    return plan, state, board


def _all(comm, ok: bool) -> bool:
    return comm.allreduce(bool(ok), op=MPI.LAND)


# ------------------------------------------------------------------------------ tests

SCHEDULES = ["sequential", "single_layer", "all_layers", "federated"]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_any_schedule_gives_the_one_rank_result(comm, schedule):
    size = comm.Get_size()
    if schedule == "sequential" and size > 1:
        pytest.skip("sequential runs on one rank")
    lag = size - 1 if schedule in ("all_layers", "federated") else 1
    cfg = _cfg(schedule, lag=lag, layers=max(3, size) if schedule == "single_layer" else 3)
    if schedule == "federated":
        cfg = cfg.replace(data={"shards": size})
    plan, state, board = _execute(cfg, comm)
    if schedule == "single_layer" and size > 1:
        # evaluations dominate this toy's work: some move to the earlier ranks, chapters later
        assert plan.moved_evals and set(plan.moved_evals.values()) != {size - 1}
    # the reference: the Sequential plan of the same graph (same shards), run on this rank alone
    ref_cfg = cfg.replace(run={"schedule": "sequential"}, data={"shards": plan.shards})
    _, ref, ref_board = _execute(ref_cfg, MPI.COMM_SELF)
    last = plan.num_chapters - 1
    ok = True
    if comm.Get_rank() == plan.final_rank():
        got, want = state.network_values(last), ref.network_values(last)
        ok = sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert _all(comm, ok), f"rank {plan.final_rank()}: final network differs from the one-rank run"
    # every evaluation saw the network of its own chapter, wherever and whenever it ran
    assert _all(comm, board is None or (board.acc == ref_board.acc and len(board.acc) == plan.num_chapters))
    # every task ran exactly once, on the rank the plan assigns it to
    ran = comm.allgather(state.ran)
    assert sorted(t for r in ran for t in r) == sorted(plan.tasks)
    assert all(plan.rank_of[t] == r for r, tasks in enumerate(ran) for t in tasks)


def test_the_exchange_setting_decides_what_travels(comm):
    """Weights only: a layer trained on another rank than last chapter restarts its optimizer
    state there, so All Layers on 2+ ranks differs from one rank; full exchange does not."""
    size = comm.Get_size()
    cfg = _cfg("all_layers", negatives="fixed", classifier="goodness", exchange="weights")
    plan, state, _ = _execute(cfg, comm)
    _, ref, _ = _execute(cfg.replace(run={"schedule": "sequential"}), MPI.COMM_SELF)
    last = plan.num_chapters - 1
    same = None
    if comm.Get_rank() == plan.final_rank():
        got, want = state.network_values(last), ref.network_values(last)
        same = all(np.array_equal(got[k], want[k]) for k in want)
    assert comm.bcast(same, root=plan.final_rank()) == (size == 1)


def test_progress_reaches_rank_zero_complete(comm):
    cfg = _cfg("all_layers", lag=comm.Get_size() - 1)
    plan, _, board = _execute(cfg, comm)
    if comm.Get_rank() == 0:
        assert board.missing() == []
        assert board.got == expected(plan)
        assert board.done_ranks == set(range(comm.Get_size()))
        assert sorted(board.acc) == list(range(plan.num_chapters))
        assert board.next_to_print == plan.num_chapters  # every chapter's line was printed


def test_checkpoints_cover_the_network_at_every_boundary(comm):
    cfg = _cfg("all_layers", lag=comm.Get_size() - 1)
    plan = build_plan(cfg, comm.Get_size(), n_train=N_TRAIN)
    written: dict[int, set] = {}

    class Capture:
        def due(self, chapter):
            return chapter < plan.num_chapters - 1

        def write(self, chapter, snapshot):
            written.setdefault(chapter, set()).update(snapshot["buffers"])

    mc = Comm(comm)
    try:
        Executor(plan, mc, ToyState(plan, comm.Get_rank()), _tracer(comm.Get_rank()), checkpointer=Capture()).run()
        Reporter(mc, None).poll()
    finally:
        mc.free()
    every = comm.allgather(written)
    for c in range(plan.num_chapters - 1):
        union = set().union(*(w.get(c, set()) for w in every))
        assert union == set(plan.network(c)), c
        # each buffer is written by exactly one rank
        assert sum(len(w.get(c, set())) for w in every) == len(plan.network(c))


def test_a_stop_request_raises_preempted_on_every_rank(comm):
    cfg = _cfg("single_layer" if comm.Get_size() <= 3 else "all_layers", negatives="fixed",
               classifier="goodness", chapters=4)
    plan = build_plan(cfg, comm.Get_size(), n_train=N_TRAIN)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 3  # after a few checks: between tasks or while waiting

    mc = Comm(comm, poll_interval=0.0005)
    stopped = False
    try:
        Executor(plan, mc, ToyState(plan, comm.Get_rank()), _tracer(comm.Get_rank()), should_stop=should_stop).run()
    except Preempted:
        stopped = True
    finally:
        mc.free()
    assert _all(comm, stopped)


def test_a_stalled_peer_is_named(comm):
    """Single Layer on two ranks: rank 0 sleeps in its first task longer than rank 1 may wait."""
    if comm.Get_size() < 2:
        pytest.skip("needs two ranks")
    pair = comm.Split(0 if comm.Get_rank() < 2 else MPI.UNDEFINED, comm.Get_rank())
    if pair == MPI.COMM_NULL:
        comm.Barrier()
        return
    cfg = _cfg("single_layer", negatives="fixed", classifier="goodness", layers=2, chapters=1)
    plan = build_plan(cfg, 2, n_train=N_TRAIN)
    rank = pair.Get_rank()
    from mpff.plan import Task
    state = ToyState(plan, rank, slow={Task("train", 0, 0): 1.5})
    mc = Comm(pair, poll_interval=0.0005)
    ex = Executor(plan, mc, state, _tracer(rank), stall_timeout=0.3 if rank == 1 else 0.0)
    message = ""
    try:
        ex.run()
    except Stalled as exc:
        message = str(exc)
        ex.stall_timeout = 0.0
        ex._drain()  # take rank 0's message after all, so nothing is left in flight
    finally:
        mc.free()
        pair.Free()
    comm.Barrier()
    if rank == 1:
        assert "rank 1 waited 0.3 s for layer 1 of chapter 1 from rank 0 (run.stall_timeout)" in message, message
    else:
        assert message == ""


def test_an_mpi_failure_with_a_peer_is_a_peer_lost_halt_naming_it():
    """MPI failing a send (the peer's process, host or link gone) ends the rank with the stall's
    exit code and one line naming the peer, what was being sent and MPI's reason, not a traceback."""
    cfg = _cfg("single_layer", negatives="fixed", classifier="goodness", layers=2, chapters=1)
    plan = build_plan(cfg, 2, n_train=N_TRAIN)   # rank 0's half of a two-rank plan, run alone
    mc = Comm(MPI.COMM_SELF, poll_interval=0.0005)

    def isend(buf, dest, tag):
        raise MPI.Exception(MPI.ERR_OTHER)

    mc.isend = isend
    ex = Executor(plan, mc, ToyState(plan, 0), _tracer(0))
    try:
        with pytest.raises(PeerLost) as info:
            ex.run()
    finally:
        mc.free()
    halt = info.value
    assert halt.code == EXIT_STALLED and halt.peer == 1 and isinstance(halt, Stalled)
    text = str(halt)
    assert "\n" not in text and text.startswith("rank 0 lost rank 1 while sending layer 1 of chapter 1"), text
    assert "MPI: " in text and "--resume" in text, text
