"""The pure plan (mpff.plan): who runs which task, what travels, and the bubble model. No MPI."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from mpff.config import Config, ConfigError
from mpff.plan import Buf, Plan, Task, Transfer, build_plan, count_tasks, layer_blocks, pipeline_bubble
from mpff.predict.simulate import simulate


def make_cfg(schedule="sequential", layers=4, chapters=6, negatives="fixed", classifier="goodness",
             lag=0, exchange="full", shards=0, mode="lag", eval_every=1,
             eval_placement="balanced") -> Config:
    return Config().replace(
        model={"dims": (784,) + (8,) * layers},
        train={"epochs": chapters, "chapters": chapters, "negatives": negatives,
               "classifier": classifier, "adaptive_lag": lag, "adaptive_mode": mode,
               "eval_every": eval_every},
        run={"schedule": schedule, "exchange": exchange, "eval_placement": eval_placement},
        data={"shards": shards},
    )


# ------------------------------------------------------------------------------ ownership

def test_single_layer_blocks_five_layers_two_ranks():
    assert layer_blocks(5, 2) == [0, 0, 0, 1, 1]
    assert layer_blocks(4, 4) == [0, 1, 2, 3]
    assert layer_blocks(4, 1) == [0, 0, 0, 0]
    assert layer_blocks(7, 3) == [0, 0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("layers", range(1, 9))
def test_single_layer_blocks_are_contiguous_and_balanced(layers):
    for ranks in range(1, layers + 1):
        owner = layer_blocks(layers, ranks)
        assert owner == sorted(owner)  # contiguous, in rank order
        sizes = Counter(owner)
        assert sorted(sizes) == list(range(ranks))  # every rank owns at least one layer
        assert max(sizes.values()) - min(sizes.values()) <= 1


def test_single_layer_plan_assigns_blocks():
    plan = build_plan(make_cfg("single_layer", layers=5).replace(run={"blocks": "count"}), 2)
    for t in plan.tasks:
        if t.kind == "train":
            assert plan.rank_of[t] == (0 if t.layer < 3 else 1)
        else:  # whole-network tasks run where the last layer is trained
            assert plan.rank_of[t] == 1
    assert plan.final_rank() == 1


def test_blocks_balanced_by_work_by_hand():
    """Layers 784x8 then four 8x8, one epoch a chapter: training costs 3 x in x out, and a block
    also pays the forward passes through every layer below its last one. [0] | [1..4] costs
    18816 | 768 + 6464 = 7232; by count, [0,1,2] | [3,4] would cost 19200 + 6336 | 384 + 6464."""
    from mpff.plan import layer_work
    costs, feeds = layer_work((784, 8, 8, 8, 8, 8), 1)
    assert costs == [3 * 6272.0] + [3 * 64.0] * 4 and feeds == [6272.0] + [64.0] * 4
    assert layer_blocks(5, 2, costs, feeds) == [0, 1, 1, 1, 1]
    plan = build_plan(make_cfg("single_layer", layers=5), 2)  # run.blocks = "cost", the default
    assert [plan.rank_of[Task("train", 0, k)] for k in range(5)] == [0, 1, 1, 1, 1]
    # the paper's network: the 784x2000 layer is light, so rank 0 takes two layers of four
    costs, feeds = layer_work((784, 2000, 2000, 2000, 2000), 1)
    assert layer_blocks(4, 2, costs, feeds) == [0, 0, 1, 1]
    assert layer_blocks(4, 3, costs, feeds) == [0, 0, 1, 2]


@pytest.mark.parametrize("layers", range(1, 8))
def test_blocks_by_work_are_contiguous_and_minimise_the_largest(layers):
    import itertools
    rng = np.random.default_rng(layers)
    costs, feeds = list(rng.uniform(1, 10, layers)), list(rng.uniform(0, 3, layers))
    for ranks in range(1, layers + 1):
        owner = layer_blocks(layers, ranks, costs, feeds)
        assert owner == sorted(owner) and sorted(set(owner)) == list(range(ranks))

        def worst(o, ranks=ranks):
            out = 0.0
            for r in range(ranks):
                ks = [k for k in range(layers) if o[k] == r]
                out = max(out, sum(costs[k] for k in ks) + sum(feeds[:max(ks)]))
            return out
        # every other contiguous partition is no better (exhaustive over the split points)
        for cuts in itertools.combinations(range(1, layers), ranks - 1):
            bounds = [0, *cuts, layers]
            other = [r for r in range(ranks) for _ in range(bounds[r], bounds[r + 1])]
            assert worst(owner) <= worst(other) + 1e-9


def test_shipped_inputs_replace_the_layers_below_a_block():
    """run.inputs = ship: the owner of a block's last layer makes its outputs (a ship task) and
    sends them to the next block's rank, which trains from them; the layers below reach that
    rank only for its whole-network tasks (eval)."""
    cfg = make_cfg("single_layer", layers=3, chapters=2, eval_every=0).replace(
        run={"inputs": "ship", "blocks": "count"})
    plan = build_plan(cfg, 3, n_train=10)
    assert plan.rank_tasks(0) == [Task("train", 0, 0), Task("ship", 0, 0), Task("train", 1, 0), Task("ship", 1, 0)]
    assert plan.rank_tasks(1) == [Task("train", 0, 1), Task("ship", 0, 1), Task("train", 1, 1), Task("ship", 1, 1)]
    assert [tr.buf for _, tr in plan.recvs[1]] == [Buf("act", 0, 0), Buf("act", 0, 1)]
    train_inputs = [b for b, _ in plan.inputs(Task("train", 1, 2))]
    assert train_inputs == [Buf("layer", 2, 0), Buf("act", 1, 1)]
    received = [tr.buf for _, tr in plan.recvs[2]]
    assert Buf("act", 1, 0) in received and Buf("layer", 0, 1) in received  # the last eval's network
    assert Buf("layer", 0, 0) not in received  # no eval after chapter 1: no weights needed then
    assert plan.buffer_spec(Buf("act", 1, 0), False) == (2 * 10 * 8, np.float32)
    tags = {plan.tag(b) for b in plan.producer}
    assert len(tags) == len(plan.producer)  # every buffer its own tag
    with pytest.raises(ConfigError, match="run.inputs = 'ship' is for single_layer"):
        build_plan(make_cfg("all_layers").replace(run={"inputs": "ship"}), 2)


def test_more_ranks_than_layers_is_an_error():
    with pytest.raises(ConfigError, match="single_layer needs at most one rank per layer: 5 ranks for 4 layers"):
        build_plan(make_cfg("single_layer", layers=4), 5)
    with pytest.raises(ConfigError):
        layer_blocks(2, 3)


@pytest.mark.parametrize("schedule", ["all_layers", "federated"])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_all_layers_chapter_on_rank_c_mod_n(schedule, ranks):
    cfg = make_cfg(schedule, chapters=7, classifier="softmax", negatives="adaptive",
                   lag=ranks - 1 if schedule == "federated" else 1)
    plan = build_plan(cfg, ranks)
    for t in plan.tasks:
        if t.kind == "final":
            assert plan.rank_of[t] == 6 % ranks
        else:
            assert plan.rank_of[t] == t.chapter % ranks, t
    if schedule == "federated":
        assert plan.shards == ranks
        for t in plan.tasks:
            if t.kind in ("train", "head"):  # the data never leaves its rank
                assert plan.data_shard(t.chapter) == plan.rank_of[t]


def test_sequential_needs_one_rank():
    build_plan(make_cfg("sequential"), 1)
    with pytest.raises(ConfigError, match="schedule 'sequential' runs on one rank, not 2"):
        build_plan(make_cfg("sequential"), 2)


def test_federated_checks():
    with pytest.raises(ConfigError, match="federated needs one data shard per rank"):
        build_plan(make_cfg("federated", shards=2), 3)
    with pytest.raises(ConfigError, match="set train.adaptive_lag to 2"):
        build_plan(make_cfg("federated", negatives="adaptive", lag=1), 3)
    build_plan(make_cfg("federated", negatives="adaptive", lag=2), 3)
    build_plan(make_cfg("federated", negatives="adaptive", lag=5), 3)  # 1 + 5 is a multiple of 3


def test_newest_mode_only_for_single_layer():
    build_plan(make_cfg("single_layer", negatives="adaptive", mode="newest"), 2)
    with pytest.raises(ConfigError, match="adaptive_mode = 'newest'"):
        build_plan(make_cfg("all_layers", negatives="adaptive", mode="newest"), 2)


# ------------------------------------------------------------------------------ the graph

def test_task_graph_of_one_chapter():
    plan = build_plan(make_cfg("sequential", layers=2, chapters=3, negatives="adaptive",
                               classifier="softmax", lag=0), 1)
    assert plan.tasks == [
        Task("train", 0, 0), Task("train", 0, 1), Task("head", 0), Task("negatives", 0), Task("eval", 0),
        Task("train", 1, 0), Task("train", 1, 1), Task("head", 1), Task("negatives", 1), Task("eval", 1),
        Task("train", 2, 0), Task("train", 2, 1), Task("head", 2), Task("eval", 2),
        Task("final", 2),
    ]
    assert plan.inputs(Task("train", 2, 1)) == [
        (Buf("layer", 1, 1), True), (Buf("layer", 0, 2), False), (Buf("neg", -1, 2), False)]
    assert plan.outputs(Task("negatives", 0)) == [Buf("neg", -1, 1)]
    assert plan.is_initial(Buf("layer", 0, -1)) and plan.is_initial(Buf("head", -1, -1))


def test_eval_every():
    plan = build_plan(make_cfg(chapters=6, eval_every=4), 1)
    assert [t.chapter for t in plan.tasks if t.kind == "eval"] == [3, 5]
    plan = build_plan(make_cfg(chapters=6, eval_every=0), 1)
    assert [t.chapter for t in plan.tasks if t.kind == "eval"] == [5]


def _configs():
    """(config, ranks) for every schedule on 1..4 ranks, both classifiers, all negatives."""
    for schedule, ranks, classifier, negatives, exchange in itertools.product(
            ["sequential", "single_layer", "all_layers", "federated"], [1, 2, 3, 4],
            ["goodness", "softmax"], ["fixed", "random", "adaptive"], ["full", "weights"]):
        if schedule == "sequential" and ranks > 1:
            continue
        lags = [ranks - 1] if schedule == "federated" else [0, 1]
        if negatives != "adaptive":
            lags = [0]
        for lag in lags:
            yield make_cfg(schedule, layers=4, chapters=6, negatives=negatives, classifier=classifier,
                           lag=lag, exchange=exchange), ranks
        if negatives == "adaptive" and schedule == "single_layer":
            yield make_cfg(schedule, layers=4, chapters=6, negatives=negatives, classifier=classifier,
                           mode="newest", exchange=exchange), ranks


def _check_transfers(plan: Plan) -> None:
    sends = [(plan.rank_of[t], tr) for t in plan.tasks for tr in plan.sends[t]]
    recvs = [(r, t, tr) for r in range(plan.world_size) for t, tr in plan.recvs[r]]
    assert len(sends) == len(recvs)
    send_set = Counter((src, tr) for src, tr in sends)
    assert max(send_set.values(), default=1) == 1
    for r, t, tr in recvs:
        assert plan.rank_of[t] == r                 # received where it is first needed
        assert tr.peer != r
        producer = plan.producer[tr.buf]
        assert plan.rank_of[producer] == tr.peer    # from the rank that produces it
        match = Transfer(tr.buf, r, tr.full, tr.tag)
        assert match in plan.sends[producer]        # same buf, tag and payload, peers swapped
        assert tr.tag == plan.tag(tr.buf)
        # ... and the task that needs it really has it as an input (or is newest-mode training)
        assert tr.buf in [b for b, _ in plan.inputs(t)] or (plan.newest and tr.buf.kind == "neg")
    # every buffer arrives at most once on a rank, and tags identify buffers
    assert len({(r, tr.buf) for r, _, tr in recvs}) == len(recvs)
    all_bufs = list(plan.producer)
    assert len({plan.tag(b) for b in all_bufs}) == len(all_bufs)
    # every input a rank needs is initial, produced on that rank before, or received
    received = {(r, tr.buf) for r, _, tr in recvs}
    done: set[tuple[int, Buf]] = set()
    for t in plan.tasks:
        r = plan.rank_of[t]
        for b, _ in plan.inputs(t):
            if plan.is_initial(b):
                continue
            assert (r, b) in done or (r, b) in received, (t, b)
        for b in plan.outputs(t):
            done.add((r, b))


def test_every_receive_has_a_matching_send():
    count = 0
    for cfg, ranks in _configs():
        plan = build_plan(cfg, ranks)
        _check_transfers(plan)
        assert sorted(plan.tasks) == sorted(t for r in range(ranks) for t in plan.rank_tasks(r))
        if ranks == 1:
            assert all(not s for s in plan.sends.values()) and plan.recvs == [[]]
        count += 1
    assert count > 150


def test_tasks_are_counted_without_building_the_plan():
    # what mpff predict checks before it builds a plan (a plan too big to simulate is refused)
    count = 0
    for cfg, ranks in _configs():
        for eval_every, inputs in ((1, "recompute"), (4, "recompute"), (0, "ship")):
            if inputs == "ship" and cfg.run.schedule != "single_layer":
                continue
            c = cfg.replace(train={"eval_every": eval_every}, run={"inputs": inputs})
            assert count_tasks(c, ranks) == len(build_plan(c, ranks).tasks), (c, ranks)
            count += 1
    bp = Config().replace(model={"dims": (784, 8, 8)}, train={"algorithm": "backprop", "chapters": 5,
                                                               "epochs": 5, "eval_every": 2},
                          run={"schedule": "data_parallel"})
    assert count_tasks(bp, 3) == len(build_plan(bp, 3).tasks) == 5 + 3 + 1
    assert count > 300


def test_a_large_plan_is_simulated_in_time_linear_in_its_tasks():
    # 1024 ranks x 1024 chapters: each step of the simulator visits the ranks it concerns, not
    # all 1024 (4.4 s here when it visited them all; 0.15 s now)
    import time
    plan = build_plan(make_cfg("all_layers", layers=2, chapters=1024, eval_every=0), 1024)
    start = time.perf_counter()
    sim = simulate(plan, {("train", c, k): 1.0 for c in range(1024) for k in range(2)})
    assert time.perf_counter() - start < 1.5
    assert sim.makespan == pytest.approx(1025.0)  # chapter c's layer 0 waits for chapter c-1's


def test_full_exchange_ships_optimizer_state_only_to_trainers():
    al = build_plan(make_cfg("all_layers", exchange="full"), 3)
    layer_transfers = [tr for t in al.tasks for tr in al.sends[t] if tr.buf.kind == "layer"]
    # the next chapter's rank trains the layer: it needs the optimizer state
    assert layer_transfers and all(tr.full for tr in layer_transfers
                                   if tr.peer == (tr.buf.chapter + 1) % 3)
    weights_only = build_plan(make_cfg("all_layers", exchange="weights"), 3)
    assert not any(tr.full for t in weights_only.tasks for tr in weights_only.sends[t])
    # single layer: the owner keeps its layer; the ranks above only run it forward
    sl = build_plan(make_cfg("single_layer", exchange="full"), 4)
    assert not any(tr.full for t in sl.tasks for tr in sl.sends[t])


def test_single_layer_traffic():
    # the paper's placement (every evaluation on the last rank); balanced: see below
    plan = build_plan(make_cfg("single_layer", layers=4, chapters=6, eval_placement="last"), 4)
    for r in range(4):
        got = Counter(tr.buf.index for _, tr in plan.recvs[r] if tr.buf.kind == "layer")
        assert got == {k: 6 for k in range(r)}  # every layer below, every chapter
    # goodness eval runs on the last rank: nothing needs to go down
    assert all(tr.peer > plan.rank_of[t] for t in plan.tasks for tr in plan.sends[t])


def test_federated_adaptive_negatives_stay_home():
    for ranks in (2, 3, 4):
        plan = build_plan(make_cfg("federated", negatives="adaptive", lag=ranks - 1), ranks)
        assert not any(tr.buf.kind == "neg" for t in plan.tasks for tr in plan.sends[t])
        negs = [t for t in plan.tasks if t.kind == "negatives"]
        assert negs
        for t in negs:
            (b,) = plan.outputs(t)
            assert plan.data_shard(b.chapter) == plan.data_shard(t.chapter)


# ------------------------------------------------------------------------------ bubble model

def _train_durations(layers, chapters, t=1.0):
    return {("train", c, k): t for c in range(chapters) for k in range(layers)}


def test_pipeline_bubble_formula():
    assert pipeline_bubble(100, 4) == pytest.approx(3 / 103)
    assert pipeline_bubble(100, 4) == pytest.approx(0.0291, abs=1e-4)
    assert pipeline_bubble(10, 1) == 0.0


def test_simulate_single_layer_matches_the_bubble_model():
    cfg = make_cfg("single_layer", layers=4, chapters=100)
    plan = build_plan(cfg, 4)
    sim = simulate(plan, _train_durations(4, 100))
    assert sim.makespan == pytest.approx(103.0)
    assert sim.busy == [100.0] * 4
    assert sim.bubble == pytest.approx(3 / 103)
    assert sim.bubble == pytest.approx(pipeline_bubble(100, 4))


def test_simulate_sequential_and_all_layers():
    seq = simulate(build_plan(make_cfg("sequential", layers=4, chapters=100), 1), _train_durations(4, 100))
    assert seq.makespan == pytest.approx(400.0) and seq.bubble == pytest.approx(0.0)
    al = simulate(build_plan(make_cfg("all_layers", layers=4, chapters=100), 4), _train_durations(4, 100))
    # a wavefront: train(c, k) ends at c + k + 1
    assert al.makespan == pytest.approx(103.0)
    assert al.bubble == pytest.approx(3 / 103)
    assert al.finish[Task("train", 10, 2)] == pytest.approx(13.0)


def test_simulate_latency_delays_cross_rank_inputs():
    plan = build_plan(make_cfg("single_layer", layers=2, chapters=3), 2)
    sim = simulate(plan, _train_durations(2, 3), latency=0.5)
    # layer 1 of chapter 0 waits for layer 0 (1.0) plus the latency
    assert sim.finish[Task("train", 0, 1)] == pytest.approx(2.5)
    assert sim.makespan == pytest.approx(3 + 1 + 0.5)


def test_simulate_forward_passes_fill_the_wait_for_the_layers_own_state():
    # All Layers, 2 layers on 2 ranks: train(c, 0) 4 s, the forward through layer 0 2 s,
    # train(c, 1) 6 s. Worked by hand: the forward of chapter c runs while the rank waits for
    # layer 1 of chapter c-1, so train(c, 1) ends at 12, 18, 24, 30.
    plan = build_plan(make_cfg("all_layers", layers=2, chapters=4), 2)
    durations = {}
    for c in range(4):
        durations.update({("train", c, 0): 4.0, ("forward", c, 1): 2.0, ("train", c, 1): 6.0})
    sim = simulate(plan, durations)
    assert [sim.finish[Task("train", c, 1)] for c in range(4)] == pytest.approx([12.0, 18.0, 24.0, 30.0])
    assert sim.busy == pytest.approx([24.0, 24.0])
    assert sim.makespan == pytest.approx(30.0) and sim.bubble == pytest.approx(0.2)
