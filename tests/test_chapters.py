"""Chapters shorter than an epoch (``train.chapter_batches``): the geometry, per-batch FF against a
loop written here, every schedule bit for bit the Sequential run at several chapter lengths,
resume from every chapter boundary, and the data a rank holds bounded by the chapter.

The in-process tests run on ``COMM_SELF`` and on a duplicate of ``COMM_WORLD``; the last test
runs this file under ``mpiexec -n 2`` and ``-n 3`` (as tests/test_registry.py does), where the
world duplicate spreads the schedules over real ranks.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpff.chapters import Chapters
from mpff.comm import Comm
from mpff.config import Config, ConfigError, load
from mpff.executor import Executor
from mpff.ff import FFLayer, cooldown_lr, generator
from mpff.ffstate import FIXED_STREAM, SHUFFLE_STREAM, FFState
from mpff.model import overlay, wrong_label_offsets
from mpff.plan import Buf, build_plan
from mpff.trace import Tracer

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import synthetic_dataset  # noqa: E402

DIM = 48
N_TRAIN = 150       # 10 batches of 16 an epoch, the last one of 6 rows
BATCH = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per rank, as mpff train runs
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["self", "world-dup"])
def comm(request):
    c = MPI.COMM_SELF.Dup() if request.param == "self" else MPI.COMM_WORLD.Dup()
    yield c
    c.Free()


DATA = synthetic_dataset(n_train=N_TRAIN, n_test=30, dim=DIM)


def _cfg(schedule: str, size: int, k: int, **train) -> Config:
    lag = size - 1 if schedule in ("all_layers", "federated") else 1
    settings = {"epochs": 3, "chapters": 1, "batch_size": BATCH, "negatives": "adaptive", "adaptive_lag": lag,
                "classifier": "softmax", "lr": 0.02, "chapter_batches": k, "slice_batches": 2,
                "eval_every": 4, **train}
    return Config().replace(
        model={"dims": (DIM, 12, 12, 12)}, train=settings, run={"schedule": schedule, "exchange": "full"},
        data={"dataset": "npz", "path": "unused.npz", "shards": size if schedule == "federated" else 0})


class Snapshots:
    """A checkpointer that keeps every boundary's snapshot in memory."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def due(self, chapter: int) -> bool:
        return True

    def write(self, chapter: int, snapshot: dict) -> None:
        self.at[chapter] = snapshot


def _execute(cfg: Config, comm, *, start: int = 0, snapshot: dict | None = None, keep: Snapshots | None = None):
    rank = comm.Get_rank()
    plan = build_plan(cfg, comm.Get_size(), start_chapter=start, n_train=N_TRAIN, num_classes=10)
    tracer = Tracer(None, rank, {}, enabled=False)
    state = FFState(plan.cfg, plan, DATA, tracer, torch.device("cpu"), rank=rank)
    if snapshot is not None:
        state.restore(snapshot)
    mc = Comm(comm, poll_interval=0.0005)
    try:
        Executor(plan, mc, state, tracer, checkpointer=keep).run()
    finally:
        mc.free()
    return plan, state


def _network(state: FFState) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.net.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _all(comm, ok: bool) -> bool:
    return comm.allreduce(bool(ok), op=MPI.LAND)


# ------------------------------------------------------------------------------ the geometry

def test_chapters_cover_every_epoch_once_in_order():
    geo = Chapters(epochs=3, batch_size=BATCH, chapter_batches=4, shard_lens=[N_TRAIN], slice_batches=3)
    assert geo.per_epoch == [10] and geo.total_batches == 30
    assert geo.num_chapters == math.ceil(30 / 4) == 8  # S > E; 4 does not divide the 10 batches of an epoch
    seen = {}
    for c in range(geo.num_chapters):
        batches = geo.batches(c)
        assert len(batches) == (4 if c < 7 else 2)
        assert [b.start for b in batches] == list(np.cumsum([0] + [b.rows for b in batches[:-1]]))
        assert geo.rows(c) == sum(b.rows for b in batches)
        assert [len(s) for s in geo.slices(c)] == ([3, 1] if c < 7 else [2])
        for b in batches:
            seen.setdefault(b.epoch, []).append((b.lo, b.rows))
            assert b.global_epoch == b.epoch + 1  # one shard: the cooldown's epoch is the batch's epoch
    for epoch in range(3):  # each epoch's rows, batch after batch, exactly once
        assert seen[epoch] == [(i * BATCH, min(BATCH, N_TRAIN - i * BATCH)) for i in range(10)]
    assert sum(geo.rows(c) for c in range(geo.num_chapters)) == 3 * N_TRAIN


def test_chapters_of_whole_epochs_and_of_shards():
    geo = Chapters(epochs=4, batch_size=BATCH, chapter_batches=20, shard_lens=[N_TRAIN], slice_batches=100)
    assert geo.num_chapters == 2 and geo.rows(0) == geo.rows(1) == 2 * N_TRAIN and geo.epochs_of(0) == 2
    # Federated over 3 shards: chapter c trains shard c mod 3, each shard E/3 of its epochs in all
    geo = Chapters(epochs=6, batch_size=BATCH, chapter_batches=5, shard_lens=[50, 50, 50], slice_batches=100)
    assert geo.per_epoch == [4, 4, 4] and geo.stream == [8, 8, 8] and geo.num_chapters == 6
    assert [geo.shard(c) for c in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [geo.num_batches(c) for c in range(6)] == [5, 5, 5, 3, 3, 3]
    assert geo.batches(0)[0].global_epoch == 1 and geo.batches(5)[-1].global_epoch == 6  # 23 * 6 // 24 + 1


def test_the_setting_is_checked_and_derives_the_chapters(tmp_path):
    with pytest.raises(ConfigError, match="chapter_batches must be >= 0"):
        Config().replace(train={"chapter_batches": -1})
    with pytest.raises(ConfigError, match="adaptive_mode = 'lag'"):
        Config().replace(train={"chapter_batches": 5, "adaptive_mode": "newest"})
    with pytest.raises(ConfigError, match="Forward-Forward setting"):
        load(None, ["train.algorithm=backprop", "train.chapter_batches=5"])
    cfg = Config().replace(train={"epochs": 10, "chapters": 3, "chapter_batches": 100})  # chapters need not divide
    plan = build_plan(cfg, 1, n_train=60000)
    assert plan.num_chapters == plan.cfg.train.chapters == math.ceil(10 * 938 / 100) == 94
    assert plan.buffer_spec(Buf("neg", -1, 0), False) == (6400, np.int64)
    last = plan.num_chapters - 1
    assert plan.chapter_rows(last) == 79 * 64 + 32  # the tenth epoch's last 80 batches, one of 32 rows
    assert sum(plan.chapter_rows(c) for c in range(plan.num_chapters)) == 10 * 60000
    assert build_plan(Config().replace(train={"chapters": 4, "epochs": 4}), 1, n_train=100).geometry is None


# ------------------------------------------------------------------------------ per-batch FF

def test_one_batch_chapters_are_per_batch_ff_as_a_loop_written_here():
    """Sequential with chapters of one batch: each batch steps layer 1, then layer 2 on that
    batch pushed through layer 1 *after* its step (Hinton's and loeweX's code step every layer from
    one forward pass instead). The loop below uses autograd, not mpff's written-out gradient."""
    cfg = _cfg("sequential", 1, 1, negatives="fixed", classifier="goodness", epochs=4, eval_every=0)
    cfg = cfg.replace(model={"dims": (DIM, 12, 12)})
    plan, state = _execute(cfg, MPI.COMM_SELF)
    assert plan.num_chapters == 40

    t = cfg.train
    layers = [FFLayer(DIM, 12), FFLayer(12, 12)]
    ref = FFState(plan.cfg, build_plan(cfg, 1, n_train=N_TRAIN, num_classes=10), DATA,
                  Tracer(None, 0, {}, enabled=False), torch.device("cpu"))
    for mine, theirs in zip(layers, ref.net.layers, strict=True):  # the same initial weights
        mine.load_state_dict(theirs.state_dict())
    opts = [torch.optim.Adam(layer.parameters(), lr=t.lr) for layer in layers]
    wrong = wrong_label_offsets(N_TRAIN, t.seed, FIXED_STREAM, num_classes=10)
    x_all, y_all = torch.from_numpy(DATA.x_train), torch.from_numpy(DATA.y_train)
    for epoch in range(t.epochs):
        perm = torch.randperm(N_TRAIN, generator=generator(t.seed, SHUFFLE_STREAM, 0, epoch))
        lr = cooldown_lr(t.lr, epoch + 1, t.epochs)
        for i in range(0, N_TRAIN, BATCH):
            idx = perm[i:i + BATCH]
            x_pos = overlay(x_all[idx], y_all[idx])
            x_neg = overlay(x_all[idx], (y_all[idx] + torch.from_numpy(wrong)[idx]) % 10)
            for layer, opt in zip(layers, opts, strict=True):
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = layer.loss(layer.goodness(layer(x_pos)), layer.goodness(layer(x_neg)))
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x_pos, x_neg = layer(x_pos), layer(x_neg)
    for k, layer in enumerate(layers):
        got = state.net.layers[k]
        assert torch.allclose(got.weight, layer.weight, atol=2e-5, rtol=1e-4), k
        assert torch.allclose(got.bias, layer.bias, atol=2e-5, rtol=1e-4), k
        assert not torch.allclose(got.weight, ref.net.layers[k].weight, atol=1e-3)  # it trained


# ------------------------------------------------------------------------------ every schedule, bit for bit

SCHEDULES = ["single_layer", "all_layers", "federated"]


@pytest.mark.parametrize("k", [1, 3, 10, 25])   # one batch; not dividing the epoch's 10; one epoch; 2.5
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_every_schedule_gives_the_sequential_network(comm, schedule, k):
    size = comm.Get_size()
    cfg = _cfg(schedule, size, k)
    plan, state = _execute(cfg, comm)
    ref_cfg = cfg.replace(run={"schedule": "sequential"}, data={"shards": plan.shards})
    ref_plan, ref = _execute(ref_cfg, MPI.COMM_SELF)
    assert plan.num_chapters == ref_plan.num_chapters
    ok = comm.Get_rank() != plan.final_rank() or _same(_network(state), _network(ref))
    assert _all(comm, ok), f"{schedule} with chapters of {k} batches differs from the sequential run"
    accuracy = {}  # every evaluation saw its own chapter's network, wherever it ran
    for evaluated in comm.allgather(state.test_accuracy):
        accuracy.update(evaluated)
    assert accuracy == ref.test_accuracy and len(accuracy) == plan.num_chapters // 4 + (plan.num_chapters % 4 > 0)


@pytest.mark.parametrize("schedule", ["single_layer", "all_layers"])
def test_shipped_inputs_and_random_negatives_too(comm, schedule):
    size = comm.Get_size()
    cfg = _cfg(schedule, size, 3, negatives="random", classifier="goodness")
    if schedule == "single_layer":
        cfg = cfg.replace(run={"inputs": "ship"} if size > 1 else {})
    plan, state = _execute(cfg, comm)
    _, ref = _execute(cfg.replace(run={"schedule": "sequential", "inputs": "recompute"}), MPI.COMM_SELF)
    ok = comm.Get_rank() != plan.final_rank() or _same(_network(state), _network(ref))
    assert _all(comm, ok)


def test_the_comparison_has_power():
    """Another chapter length, or another slice size, trains another network."""
    _, a = _execute(_cfg("sequential", 1, 3), MPI.COMM_SELF)
    _, b = _execute(_cfg("sequential", 1, 4), MPI.COMM_SELF)
    assert not _same(_network(a), _network(b))


# ------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("schedule", ["sequential", "single_layer", "all_layers"])
def test_resume_from_every_boundary_is_bit_identical(comm, schedule):
    size = comm.Get_size()
    if schedule == "sequential" and size > 1:
        pytest.skip("sequential runs on one rank")
    cfg = _cfg(schedule, size, 7)
    keep = Snapshots()
    plan, whole = _execute(cfg, comm, keep=keep)
    assert sorted(keep.at) == list(range(plan.num_chapters))  # a snapshot at every boundary
    for boundary in (0, 3, plan.num_chapters - 2):
        # as mpff.checkpoint.load_checkpoint reads it: every rank's buffers, this rank's optimizers
        buffers = {}
        for snapshot in comm.allgather(keep.at[boundary]):
            buffers.update(snapshot["buffers"])
        snapshot = {"buffers": buffers, "local_optimizer": keep.at[boundary]["local_optimizer"]}
        _, resumed = _execute(cfg, comm, start=boundary + 1, snapshot=snapshot)
        ok = comm.Get_rank() != plan.final_rank() or _same(_network(resumed), _network(whole))
        assert _all(comm, ok), f"resumed after chapter {boundary + 1}"


# ------------------------------------------------------------------------------ memory follows the chapter

def test_a_rank_holds_the_chapter_not_the_data_set():
    """No shard of the training set is copied to the device, the negatives are made for one
    chapter's samples, and the inputs kept between layers are one slice's."""
    cfg = _cfg("sequential", 1, 3)  # 48 rows a chapter; slices of 2 batches = 32 rows
    plan, state = _execute(cfg, MPI.COMM_SELF)
    assert state._shards == {}
    assert all(len(labels) <= 3 * BATCH for labels in state.neg_labels.values())
    chapter, _, _, h_pos, h_neg = state._slice_cache
    assert h_pos.shape[0] <= 2 * BATCH and h_neg.shape[0] <= 2 * BATCH


# ------------------------------------------------------------------------------ under mpiexec

@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_the_suite_under_mpiexec(ranks, tmp_path, mpff_launch):
    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("already under mpiexec")
    from conftest import run_file_on_ranks

    run_file_on_ranks(mpff_launch, "tests/test_chapters.py", ranks, tmp_path, min_tests=15)


def test_thousands_of_chapters_print_about_a_hundred_lines():
    from mpff.progress import Board, Record

    cfg = _cfg("sequential", 1, 1, epochs=30, eval_every=50)  # 300 chapters of one batch
    plan = build_plan(cfg, 1, n_train=N_TRAIN, num_classes=10)
    lines: list[str] = []
    board = Board(plan, 0.0, print_line=lines.append)
    for c in range(plan.num_chapters):
        for k in range(plan.num_layers):
            board.add(Record("loss", c, k, 0.5))
        board.add(Record("head_loss", c, -1, 0.5))
        if (c + 1) % 50 == 0 or c + 1 == plan.num_chapters:
            board.add(Record("accuracy", c, -1, 0.9))
    assert plan.num_chapters == 300 and board.next_to_print == 300
    assert len(lines) == 100 + 4 and lines[-1].startswith("chapter  300/300")  # 50, 100, 200, 250 are no multiples of 3
    assert sum("test acc" in line for line in lines) == 6  # every evaluated chapter has its line
