"""The predictor (mpff.predict, the simulator's message costs and contention): task graphs worked by hand."""

from __future__ import annotations

import json
import math

import pytest
from fake_runs import make_config, make_run, sequential_spans

from mpff import predict
from mpff.analysis.runs import load_run
from mpff.config import ConfigError
from mpff.plan import Task, build_plan
from mpff.predict import interconnect, outcome
from mpff.predict.simulate import simulate

LAYER0_BYTES = (784 * 8 + 8) * 4     # dims (784, 8, 8): layer 0's weights and biases, float32
LAYER1_BYTES = (8 * 8 + 8) * 4
IDEAL = predict.Network(interconnect.preset("ideal"), interconnect.preset("ideal"), 1)


def _train(layers, chapters, times=(1.0,)):
    return {("train", c, k): times[k % len(times)] for c in range(chapters) for k in range(layers)}


# ------------------------------------------------------------------------------ the simulator

def test_message_cost_is_latency_plus_bytes_over_bandwidth():
    # Single Layer, 2 layers on 2 ranks, 3 chapters, 1 s a task; a message costs 0.5 s + bytes / 25120 B/s
    # = 1.5 s for layer 0's 25120 bytes. Layer 1 of chapter c starts when layer 0 of c has arrived:
    # c0: 1 + 1.5 -> [2.5, 3.5]; c1: layer 0 done at 2, arrives 3.5 -> [3.5, 4.5]; c2: [4.5, 5.5].
    plan = build_plan(make_config("single_layer", chapters=3), 2)
    link = interconnect.Link("test", 0.5, LAYER0_BYTES)
    sim = simulate(plan, _train(2, 3), message_cost=lambda src, dst, n: link.seconds(n))
    assert [sim.finish[Task("train", c, 1)] for c in range(3)] == pytest.approx([3.5, 4.5, 5.5])
    assert sim.makespan == pytest.approx(5.5)
    assert sim.messages == 3 and sim.bytes_moved == 3 * LAYER0_BYTES
    assert sim.busy == pytest.approx([3.0, 3.0])


def test_packing_and_unpacking_are_the_ranks_own_work():
    # the same, no latency; packing and unpacking 0.25 s each. Rank 0: T0 [0,1] pack [1,1.25],
    # T1 [1.25,2.25] pack, T2 [2.5,3.5] pack [3.5,3.75]. Rank 1: unpack [1.25,1.5] T [1.5,2.5],
    # unpack [2.5,2.75] T [2.75,3.75], unpack [3.75,4] T [4,5].
    plan = build_plan(make_config("single_layer", chapters=3), 2)
    sim = simulate(plan, _train(2, 3), pack_cost=lambda n: 0.25, unpack_cost=lambda n: 0.25)
    assert [sim.finish[Task("train", c, 1)] for c in range(3)] == pytest.approx([2.5, 3.75, 5.0])
    assert sim.makespan == pytest.approx(5.0)
    assert sim.busy == pytest.approx([3.75, 3.75])


def test_contention_slows_ranks_of_one_node_only_while_both_work():
    # Single Layer, 2 chapters; layer 0 takes 1 s, layer 1 takes 2 s; a rank works twice as slowly
    # while the other rank of its node works (contention 1.0). T(0,0) [0,1] alone; from 1, T(1,0)
    # and T(0,1) share the node: T(1,0) ends at 3 (1 s of work at half speed); by then T(0,1) has
    # done 1 s of its 2 and does the rest alone, ending at 4; T(1,1) [4,6] alone.
    plan = build_plan(make_config("single_layer", chapters=2), 2)
    durations = _train(2, 2, times=(1.0, 2.0))
    sim = simulate(plan, durations, node_of=[0, 0], contention=1.0)
    assert sim.finish[Task("train", 1, 0)] == pytest.approx(3.0)
    assert sim.finish[Task("train", 0, 1)] == pytest.approx(4.0)
    assert sim.makespan == pytest.approx(6.0)
    assert sim.busy == pytest.approx([3.0, 5.0])
    # on nodes of their own the ranks do not slow each other: 1 + 2 + 2
    apart = simulate(plan, durations, node_of=[0, 1], contention=1.0)
    assert apart.makespan == pytest.approx(5.0)
    assert simulate(plan, durations).makespan == pytest.approx(5.0)


def test_simulate_keeps_its_old_signature():
    plan = build_plan(make_config("single_layer", chapters=3), 2)
    assert simulate(plan, _train(2, 3), latency=0.5).makespan == pytest.approx(4.5)
    assert simulate(plan, _train(2, 3), 0.5).finish[Task("train", 0, 1)] == pytest.approx(2.5)


def test_bytes_of_negatives_need_n_train():
    # All Layers on 2 ranks, adaptive negatives with lag 0: those made after chapter c (on rank
    # c % 2) are used in chapter c + 1 on the other rank: 3 messages of 1000 int64 labels
    cfg = make_config("all_layers", negatives="adaptive", chapters=4)
    assert simulate(build_plan(cfg, 2), _train(2, 4)).bytes_moved is None
    sim = simulate(build_plan(cfg, 2, n_train=1000), _train(2, 4))
    assert sim.bytes_moved == 3 * (LAYER0_BYTES + LAYER1_BYTES) + 3 * 1000 * 8
    assert sim.messages == 9
    # with lag 1 a rank uses the negatives it made itself: none travel, so no size is missing
    lagged = make_config("all_layers", negatives="adaptive", adaptive_lag=1, chapters=4)
    assert simulate(build_plan(lagged, 2), _train(2, 4)).bytes_moved == 3 * (LAYER0_BYTES + LAYER1_BYTES)


# ------------------------------------------------------------------------------ from a run

@pytest.fixture
def seq_run(tmp_path):
    """Sequential, 2 layers, 4 chapters: train(c,0) 2 s, forward through layer 0 0.5 s,
    train(c,1) 3 s, eval 1 s after the last chapter, the model write 0.2 s; setup 1 s."""
    return make_run(tmp_path / "seq", [sequential_spans(4)], make_config("sequential"))


def _by(outcome, schedule, ranks):
    return next(p for p in outcome.predictions if p.schedule == schedule and p.ranks == ranks)


def test_all_layers_on_two_ranks_worked_by_hand(seq_run):
    # rank 0, chapter 0: T0 [0,2] fwd [2,2.5] T1 [2.5,5.5]
    # rank 1, chapter 1: T0 waits layer 0 (2) [2,4], fwd [4,4.5], waits layer 1 (5.5) T1 [5.5,8.5]
    # rank 0, chapter 2: T0 [5.5,7.5] fwd [7.5,8] waits layer 1 (8.5) T1 [8.5,11.5]
    # rank 1, chapter 3: T0 [8.5,10.5] fwd [10.5,11] T1 [11.5,14.5], eval [14.5,15.5], write [15.5,15.7]
    out = predict.predict([load_run(seq_run)], ranks=[1, 2], schedules=["sequential", "all_layers"],
                          network=IDEAL)
    seq, al = _by(out, "sequential", 1), _by(out, "all_layers", 2)
    assert seq.training == pytest.approx(4 * 5.5 + 1.0)
    assert seq.wall == pytest.approx(1.0 + 23.2)          # setup + training + the model write
    assert seq.measured_wall == pytest.approx(24.2) and seq.error == pytest.approx(0.0, abs=1e-9)
    assert al.training == pytest.approx(15.5)
    assert al.wall == pytest.approx(1.0 + 15.7)
    assert al.speedup == pytest.approx(24.2 / 16.7)
    assert al.efficiency == pytest.approx(24.2 / 16.7 / 2)
    # busy 2 x (4 x 5.5) + eval 1 over 2 x 15.5
    assert al.bubble == pytest.approx(1 - 23.0 / 31.0)
    assert al.messages == 6 and al.bytes_moved == 3 * (LAYER0_BYTES + LAYER1_BYTES)


@pytest.mark.parametrize("info, why", [
    ({"status": "preempted"}, "run.json says status 'preempted'"),
    ({"status": "running"}, "run.json says status 'running'"),
    ({"status": "failed"}, "run.json says status 'failed'"),
])
def test_a_measured_run_that_did_not_finish_gets_no_error(seq_run, tmp_path, capsys, info, why):
    # its wall is not a whole run's: the error column used to show -60 % with no word
    al = make_run(tmp_path / "al", [sequential_spans(1), sequential_spans(1)], make_config("all_layers"),
                  info=info)
    out = predict.predict([load_run(seq_run), load_run(al)], ranks=[1, 2], schedules=["sequential", "all_layers"],
                          network=IDEAL)
    p = _by(out, "all_layers", 2)
    assert p.measured_wall == pytest.approx(load_run(al).wall) and p.error is None
    assert p.measured_unfinished == f"al did not finish: {why}"
    assert p.record()["wall_error"] is None and p.record()["measured_unfinished"] == p.measured_unfinished
    assert f"| – (al did not finish: {why}) |" in predict.prediction_table(out)
    assert _by(out, "sequential", 1).error == pytest.approx(0.0, abs=1e-9)  # the finished one still has its error
    # the same run as the source: the assumptions say so
    alone = predict.predict([load_run(al)], ranks=[2], schedules=["all_layers"], network=IDEAL)
    assert any(a.startswith(f"The source run did not finish ({why})") for a in alone.assumptions)


def test_a_finished_measured_run_is_taken_before_an_unfinished_one(seq_run, tmp_path):
    pre = make_run(tmp_path / "seq-pre", [sequential_spans(2)], make_config("sequential"),
                   info={"status": "preempted"})
    out = predict.predict([load_run(seq_run), load_run(pre)], ranks=[1], schedules=["sequential"],
                          network=IDEAL)
    p = _by(out, "sequential", 1)
    assert p.measured_run == seq_run and p.measured_unfinished is None and p.error == pytest.approx(0.0, abs=1e-9)
    out = predict.predict([load_run(seq_run), load_run(pre)][::-1], ranks=[1], schedules=["sequential"],
                          network=IDEAL)
    assert _by(out, "sequential", 1).measured_run == seq_run


def test_message_latency_in_a_prediction(seq_run):
    # as above with 0.5 s on every message: rank 1 T0 [2.5,4.5] fwd [4.5,5] T1 waits 6 -> [6,9];
    # rank 0 T0 [5.5,7.5] fwd [7.5,8] T1 waits 9.5 -> [9.5,12.5]; rank 1 T0 [9,11] fwd [11,11.5]
    # T1 waits 13 -> [13,16], eval [16,17]
    net = predict.Network(interconnect.Link("test", 0.5, math.inf), interconnect.preset("ideal"), 1)
    out = predict.predict([load_run(seq_run)], ranks=[2], schedules=["all_layers"], network=net)
    assert _by(out, "all_layers", 2).training == pytest.approx(17.0)


def _three_layer_profile(tmp_path):
    """A Sequential run of 3 layers (train 2, 3, 1 s; the pass through layer 0 0.5 s, through
    layer 1 0.25 s), as a profile and its target."""
    cfg = make_config("sequential", dims=(784, 8, 8, 8))
    run = load_run(make_run(tmp_path / "seq", [sequential_spans(4, train=(2.0, 3.0, 1.0),
                                                                 forward=(0.5, 0.25))], cfg))
    profile = predict.build_profile(run, predict.read_spans(run), predict.Contention(0.0, "none", ""))
    return profile, predict.make_target(profile)


def test_forward_passes_follow_the_schedule(tmp_path):
    # 3 layers: the pass through layer 0 takes 0.5 s, through layer 1 0.25 s (Sequential measures
    # each once per chapter). Single Layer recomputes: on 3 ranks, rank 2 applies layers 0 and 1
    # (0.75 s) before train(c, 2); on 2 ranks (layers 0,1 | 2) the same; All Layers reuses.
    profile, target = _three_layer_profile(tmp_path)
    for schedule, n, expected in (("single_layer", 3, {1: 0.5, 2: 0.75}), ("single_layer", 2, {1: 0.5, 2: 0.75}),
                                  ("all_layers", 2, {1: 0.5, 2: 0.25}), ("sequential", 1, {1: 0.5, 2: 0.25})):
        # blocks by layer count, as the comment above counts them (run.blocks = "cost" is the default)
        plan = build_plan(target.config.replace(run={"schedule": schedule, "blocks": "count"}), n,
                          n_train=target.n_train)
        times = predict.task_times(profile, target, plan, set())
        for c in range(4):
            assert {k: times[("forward", c, k)] for k in (1, 2)} == pytest.approx(expected), (schedule, n)
            assert times[("forward", c, 0)] == 0.0


def test_shipped_inputs_move_the_forward_passes_to_the_sender(tmp_path):
    # The same run; Single Layer with run.inputs = ship: a block starts from the outputs its
    # previous rank shipped (no passes below it), and the sender's ship task is the pass through
    # its last layer (0.5 s through layer 0, 0.25 s through layer 1).
    profile, target = _three_layer_profile(tmp_path)
    for n, forwards, ships in ((3, {1: 0.0, 2: 0.0}, {0: 0.5, 1: 0.25}), (2, {1: 0.5, 2: 0.0}, {1: 0.25})):
        plan = build_plan(target.config.replace(run={"schedule": "single_layer", "blocks": "count",
                                                     "inputs": "ship"}), n, n_train=target.n_train)
        times = predict.task_times(profile, target, plan, set())
        for c in range(4):
            assert {k: times[("forward", c, k)] for k in (1, 2)} == pytest.approx(forwards), n
            assert {k: times[("ship", c, k)] for k in ships} == pytest.approx(ships), n
        assert {key[2] for key in times if key[0] == "ship"} == set(ships)


def test_more_chapters_epochs_and_data_than_measured(seq_run):
    # 8 chapters of 2 epochs on twice the data: every chapter takes the median per sample of the
    # measured ones, training scales with epochs x samples, forward passes with samples, and the
    # evaluation with the test samples (100 -> 200)
    out = predict.predict([load_run(seq_run)], ranks=[1], schedules=["sequential"], network=IDEAL,
                          overrides=["train.chapters=8", "train.epochs=16", "data.train_subset=2000",
                                     "data.test_subset=200"])
    seq = _by(out, "sequential", 1)
    assert seq.training == pytest.approx(8 * (2 * 2 * 2.0 + 2 * 0.5 + 2 * 2 * 3.0) + 2 * 1.0)
    assert any("median of the measured ones" in a for a in out.assumptions)


def test_settings_that_shape_task_times_cannot_change(seq_run):
    with pytest.raises(ConfigError, match=r"--set model.dims: the task times were measured with \[784, 8, 8\]"):
        predict.predict([load_run(seq_run)], overrides=["model.dims=[784,16,16]"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        predict.predict([load_run(seq_run)], overrides=["train.batch_size=128"])


def test_impossible_schedules_are_reported_not_raised(seq_run):
    out = predict.predict([load_run(seq_run)], ranks=[2, 4], schedules=["single_layer"], network=IDEAL)
    assert _by(out, "single_layer", 2).reason is None
    four = _by(out, "single_layer", 4)
    assert four.wall is None and "at most one rank per layer" in four.reason


def test_adaptive_negatives_unmeasured_are_estimated_from_the_evaluation(tmp_path):
    # a one-chapter run (as from the paper's width) makes no negatives; predicted at 100 chapters
    # with adaptive negatives, each is an evaluation over the training shard (1000 / 100 x 1 s)
    cfg = make_config("sequential", chapters=1, negatives="adaptive")
    run = load_run(make_run(tmp_path / "one", [sequential_spans(1)], cfg))
    out = predict.predict([run], ranks=[4], schedules=["sequential", "all_layers"], network=IDEAL,
                          overrides=["train.chapters=100", "train.epochs=100", "train.eval_every=10"],
                          adaptive_lag="ranks-1")
    seq, al = _by(out, "sequential", 1), _by(out, "all_layers", 4)
    # 100 chapters x 5.5 s, 99 negatives x 10 s, 10 evaluations x 1 s
    assert seq.training == pytest.approx(100 * 5.5 + 99 * 10.0 + 10 * 1.0)
    assert any("estimated as an evaluation" in a for a in out.assumptions)
    assert any("lag N-1" in a for a in out.assumptions)
    assert 3.0 < al.speedup < 4.0


# ------------------------------------------------------------------------------ contention

def _pair_run(path, cfg, slowdown, hosts=("node0", "node0"), chapters=4):
    """Two ranks that train at the same time, each task taking 2 s x slowdown (no waits)."""
    d = 2.0 * slowdown
    ranks = [[("setup", -1, -1, 0.0, 1.0)] + [("train", c, 0, 1.0 + i * d, 1.0 + (i + 1) * d)
                                             for i, c in enumerate(range(r, chapters, 2))]
             for r in range(2)]
    return make_run(path, ranks, cfg, hosts=list(hosts))


def test_contention_is_measured_from_ranks_side_by_side(tmp_path):
    cfg1 = make_config("sequential", dims=(784, 8))
    one = load_run(make_run(tmp_path / "one", [sequential_spans(4, train=(2.0,), forward=())], cfg1))
    two = load_run(_pair_run(tmp_path / "two", make_config("all_layers", dims=(784, 8)), 1.3))
    c = predict.measure_contention([one, two], [predict.read_spans(one), predict.read_spans(two)])
    assert c.source == "measured" and c.factor == pytest.approx(1.3, abs=1e-3)
    # the profile from the 2-rank run is that of ranks alone: 2 s a task (per sample: 2 / 1000)
    profile = predict.build_profile(two, predict.read_spans(two), c)
    assert profile.train[(1, 0)] == pytest.approx(2.0 / 1000)
    # ranks on different hosts never slowed each other: nothing to measure
    apart = load_run(_pair_run(tmp_path / "apart", make_config("all_layers", dims=(784, 8)), 1.3,
                               hosts=("node0", "node1")))
    c = predict.measure_contention([apart], [predict.read_spans(apart)])
    assert c.source == "none" and c.slowdown == 0.0 and "cannot be measured" in c.note


def test_contention_applies_only_to_ranks_sharing_a_node(seq_run):
    run = load_run(seq_run)
    shared = predict.Network(interconnect.preset("ideal"), interconnect.preset("ideal"), 2)
    slow = predict.predict([run], ranks=[2], schedules=["all_layers"], network=shared, contention=1.5)
    fast = predict.predict([run], ranks=[2], schedules=["all_layers"], network=IDEAL, contention=1.5)
    assert _by(fast, "all_layers", 2).training == pytest.approx(15.5)
    assert _by(slow, "all_layers", 2).training > 15.5 * 1.2
    assert any("slow each other: given: a task takes 1.5x its time alone" in a for a in slow.assumptions)
    none = predict.predict([run], ranks=[2], schedules=["all_layers"], network=shared)
    assert any("assumed NOT to slow each other" in a for a in none.assumptions)


# ------------------------------------------------------------------------------ command line

def test_command_line_table_json_and_picture(seq_run, tmp_path, capsys):
    out = tmp_path / "pred"
    assert predict.main([seq_run, "--ranks", "1,2", "--network", "ideal", "--intra", "ideal",
                         "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| all_layers | 2 | 2 | 16.7 | 15.5 | 1.45 | 72.5 % |" in printed
    assert "Assumptions and limits:" in printed and "no straggler" in printed
    for name in ("prediction.md", "prediction.json", "speedup.png", "speedup.pdf"):
        assert (out / name).stat().st_size > 0, name
    assert predict.main([seq_run, "--ranks", "2", "--schedules", "all_layers", "--json",
                         "--latency", "0.5s", "--bandwidth", "1e12", "--out", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    (al,) = [r for r in data["predictions"] if r["schedule"] == "all_layers"]
    assert al["ranks"] == 2 and al["training_seconds"] == pytest.approx(17.0, abs=1e-3)
    assert data["network"]["inter"]["latency_seconds"] == 0.5
    assert data["assumptions"] and data["contention"]["source"] == "none"


@pytest.mark.parametrize("argv, fragment", [
    (["--ranks", "0,2"], "--ranks"),
    (["--network", "carrier-pigeon"], "unknown interconnect 'carrier-pigeon'"),
    (["--contention", "0.5"], "--contention '0.5'"),
    (["--bandwidth", "fast"], "--bandwidth 'fast'"),
    (["--schedules", "pipelined"], "unknown schedule 'pipelined'"),
    (["--set", "train.chapters=3"], "not valid"),
])
def test_bad_input_is_one_line_and_exit_2(seq_run, tmp_path, capsys, argv, fragment):
    assert predict.main([seq_run, "--out", str(tmp_path / "p")] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpff predict: error: ") and err.count("\n") == 1, err
    assert fragment in err, err


@pytest.mark.parametrize("argv, largest", [
    (["--ranks", "1,2,100000000"], "all_layers on 100000000 rank(s), 100,000,010"),
    (["--set", "train.chapters=10000000", "--set", "train.epochs=10000000"], "all_layers on 16 rank(s), 20,000,018"),
])
def test_absurd_work_is_refused_at_once(seq_run, tmp_path, capsys, argv, largest):
    # it used to simulate for minutes (hours) with memory growing and nothing said
    import time
    start = time.perf_counter()
    assert predict.main([seq_run, "--out", str(tmp_path / "p")] + argv) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.startswith("mpff predict: error: this prediction would simulate ") and err.count("\n") == 1, err
    assert largest in err and "more than the limit of 1,000,000" in err, err
    assert "--ranks" in err and "--schedules" in err and "train.chapters" in err
    assert not (tmp_path / "p").exists()


def test_large_work_says_what_it_simulates(seq_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(outcome, "PROGRESS_TASKS", 10)
    assert predict.main([seq_run, "--ranks", "1,2,4", "--schedules", "all", "--out", str(tmp_path / "p")]) == 0
    lines = capsys.readouterr().err.splitlines()
    # 'all' from an FF run: the FF schedules (data_parallel is backprop's)
    assert [line.split(" (plan")[0] for line in lines] == [
        "mpff predict: simulating sequential on 1 rank(s)", "mpff predict: simulating the sequential "
        "baseline with 1 shard(s)", "mpff predict: simulating single_layer on 2 rank(s)",
        "mpff predict: simulating all_layers on 2 rank(s)", "mpff predict: simulating all_layers on 4 rank(s)",
        "mpff predict: simulating federated on 2 rank(s)",
        "mpff predict: simulating the sequential baseline with 2 shard(s)",
        "mpff predict: simulating federated on 4 rank(s)",
        "mpff predict: simulating the sequential baseline with 4 shard(s)"], lines
    assert lines[-1].endswith("(plan 9 of 9, 108 tasks in all)"), lines[-1]
    monkeypatch.setattr(outcome, "MAX_SIMULATED_TASKS", 100)
    assert predict.main([seq_run, "--ranks", "1,2,4", "--schedules", "all", "--out", str(tmp_path / "p")]) == 2
    assert "would simulate 108 tasks in 9 plan(s)" in capsys.readouterr().err


def test_not_a_run_is_exit_2(tmp_path, capsys):
    assert predict.main([str(tmp_path)]) == 2
    assert "not an mpff run directory" in capsys.readouterr().err


def test_units_of_links():
    assert interconnect.parse_seconds("2us") == pytest.approx(2e-6)
    assert interconnect.parse_seconds("0.5 ms") == pytest.approx(5e-4)
    assert interconnect.parse_bandwidth("100Gb/s") == pytest.approx(12.5e9)
    assert interconnect.parse_bandwidth("12.5GB/s") == pytest.approx(12.5e9)
    assert interconnect.parse_bandwidth("3e9") == 3e9
    assert interconnect.preset("ib-hdr").seconds(25_000_000) == pytest.approx(1e-6 + 1e-3)


def test_packing_is_measured_from_any_run_that_sent_messages(seq_run, tmp_path):
    # a 2-rank run (on two hosts: no contention) whose send and recv of layer 0 took 0.25 s each
    spans = [[("setup", -1, -1, 0.0, 1.0), ("train", 0, 0, 1.0, 3.0), ("send", 0, 0, 3.0, 3.25, LAYER0_BYTES, 1)],
             [("setup", -1, -1, 0.0, 1.0), ("wait", 1, 0, 1.0, 3.25), ("recv", 0, 0, 3.25, 3.5, LAYER0_BYTES, 0),
              ("train", 1, 0, 3.5, 5.5)]]
    two = make_run(tmp_path / "two", spans, make_config("all_layers"), hosts=["a", "b"])
    out = predict.predict([load_run(seq_run), load_run(two)], ranks=[2], schedules=["all_layers"],
                          network=IDEAL)
    assert out.profile.pack == pytest.approx((0.0, 0.25 / LAYER0_BYTES))
    assert out.profile.unpack == pytest.approx((0.0, 0.25 / LAYER0_BYTES))
    assert any("Packing and unpacking cost the ranks" in a for a in out.assumptions)
    # worked by hand: the layer-1 chain is the critical path, and the receivers' waits hide the
    # layer-0 costs except the first packing (rank 0 packs layer 0 of chapter 0 before its
    # forward pass); the layer-1 messages (288 bytes) cost 6 x 0.25 x 288 / 25120 s to pack and unpack
    small = 0.25 * LAYER1_BYTES / LAYER0_BYTES
    assert _by(out, "all_layers", 2).training == pytest.approx(15.5 + 0.25 + 6 * small)
    alone = predict.predict([load_run(seq_run)], ranks=[2], schedules=["all_layers"], network=IDEAL)
    assert any("Packing and unpacking are not modelled" in a for a in alone.assumptions)


def test_every_rank_pays_the_warm_up_of_its_first_tasks(tmp_path):
    # Sequential whose chapter 0 trains layer 1 in 4 s, later chapters in 3 s: 1 s of warm-up.
    # All Layers on 2 ranks, worked by hand: rank 0 c0 T0 [0,2] fwd [2,2.5] T1 [2.5,6.5];
    # rank 1 c1 T0 [2,4] fwd [4,4.5], T1 its first of layer 1: 3 + 1 s [6.5,10.5]; rank 0 c2
    # T0 [6.5,8.5] fwd [8.5,9] T1 [10.5,13.5]; rank 1 c3 T0 [10.5,12.5] fwd [12.5,13]
    # T1 [13.5,16.5], eval [16.5,17.5]
    spans = sequential_spans(4, train={"default": (2.0, 3.0), 0: (2.0, 4.0)})
    run = load_run(make_run(tmp_path / "seq", [spans], make_config("sequential")))
    out = predict.predict([run], ranks=[2], schedules=["sequential", "all_layers"], network=IDEAL)
    assert out.profile.warmup_train == pytest.approx({0: 0.0, 1: 1.0 / 1000})
    assert _by(out, "sequential", 1).training == pytest.approx(4 * 5.5 + 1.0 + 1.0)
    assert _by(out, "all_layers", 2).training == pytest.approx(17.5)
    assert any("warm-up" in a for a in out.assumptions)


def test_shipping_is_single_layers_setting_the_others_recompute(seq_run):
    # --set run.inputs=ship with Sequential (the baseline) and All Layers in the same prediction:
    # those schedules have nothing to ship and are predicted as they run, with speedups
    out = predict.predict([load_run(seq_run)], ranks=[1, 2], network=IDEAL, overrides=["run.inputs=ship"],
                          schedules=["sequential", "all_layers", "single_layer"])
    assert len(out.predictions) == 3
    for p in out.predictions:
        assert p.reason is None and p.speedup is not None, p.schedule
    plain = predict.predict([load_run(seq_run)], ranks=[2], network=IDEAL, schedules=["all_layers"])
    assert _by(out, "all_layers", 2).wall == pytest.approx(_by(plain, "all_layers", 2).wall)


# ------------------------------------------------------------------------------ backprop (mpff.predict.backprop)

def _bp_profile():
    """Per step of 64 rows: forward 1 ms, backward 2 ms, optimizer 0.5 ms, the rest 0.5 ms."""
    from mpff.predict.backprop import BPProfile
    return BPProfile(run=None, chapters=1, epochs_per_chapter=1, n_train=6400, n_test=None,
                     rows=64, steps={0: 100.0},
                     phases={"forward": {0: 0.1}, "backward": {0: 0.2}, "optimizer": {0: 0.05}},
                     train={0: 0.4}, eval={}, setup=0.0, tail=0.0, checkpoints=0.0)


def test_ddp_buckets_are_the_ones_ddp_makes(tmp_path):
    """The bucket model against DistributedDataParallel itself (one gloo rank: the reducer still
    hands every bucket to the communication hook, in the order it all-reduces them)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mpff.model import MLP
    from mpff.predict.backprop import ddp_buckets
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for dims in ([784, 64, 64], [784, 1000, 1000, 1000], [784, 2000, 2000, 2000, 2000]):
            model = DistributedDataParallel(MLP(dims), gradient_as_bucket_view=True)
            seen: list[int] = []

            def hook(state, bucket, seen=seen):
                seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())
                return fut
            model.register_comm_hook(None, hook)
            for _ in range(2):  # DDP may rebuild its buckets after the first step
                seen.clear()
                model(torch.zeros(2, dims[0])).sum().backward()
            assert seen == [nbytes for nbytes, _ in ddp_buckets(dims)], dims
            del model
    finally:
        dist.destroy_process_group()
    assert len(ddp_buckets([784, 2000, 2000, 2000, 2000])) == 3


def test_data_parallel_step_worked_by_hand():
    from mpff.predict.backprop import VOTE_EVERY, ddp_buckets, model_step
    profile = _bp_profile()
    free = interconnect.preset("ideal")
    # no communication cost: the passes halve with the rows, the optimizer and the rest do not
    step = model_step(profile, [784, 64, 64], 32, 2, free, 1.0)
    assert step.compute == pytest.approx(0.5e-3 + 1e-3 + 0.5e-3 + 0.5e-3)
    assert step.exposed == 0.0 and step.comm == 0.0
    # one bucket: its gradients include layer 0's, ready only at the end of the backward pass,
    # so its whole all-reduce is waited for: 2 (N-1) messages of bytes / N, plus the halt vote
    link = interconnect.Link("test", 1e-3, 1e6)
    (nbytes, first), = ddp_buckets([784, 64, 64])
    assert first == 0
    step = model_step(profile, [784, 64, 64], 16, 4, link, 1.0)
    ring = 6 * (1e-3 + math.ceil(nbytes / 4) / 1e6)
    vote = 6 * (1e-3 + 1 / 1e6) / VOTE_EVERY
    assert step.exposed == pytest.approx(ring + vote)
    assert step.seconds == pytest.approx(0.25e-3 + 0.5e-3 + 1e-3 + ring + vote)
    assert step.bytes_sent == pytest.approx(2 * 3 / 4 * nbytes)
    # two buckets: the first (layers 3 and 2) starts when layer 2's gradient is made, a share
    # of the backward pass by FLOPs (layer 0 computes no input gradient), the second after it
    dims = [784, 1000, 1000, 1000]
    (b1, i1), (b2, i2) = ddp_buckets(dims)
    assert (i1, i2) == (4, 0)
    backward = 2e-3 * 64 / 64
    ready = (1000 * 10 * 2 + 1000 * 1000 * 2) / (784 * 1000 + 2 * 1000 * 1000 * 2 + 1000 * 10 * 2) * backward
    t1, t2 = 2 * (1e-3 + b1 / 2 / 1e6), 2 * (1e-3 + b2 / 2 / 1e6)
    step = model_step(profile, dims, 64, 2, link, 1.0)
    assert step.exposed == pytest.approx(ready + t1 + t2 - backward + 2 * (1e-3 + 2 / 1e6) / VOTE_EVERY)
    # contention slows the work, not the messages
    slow = model_step(profile, dims, 64, 2, link, 1.5)
    assert slow.compute == pytest.approx(1.5 * step.compute)
    assert slow.comm == pytest.approx(step.comm)


def test_ff_and_backprop_runs_are_not_mixed(seq_run, tmp_path):
    from mpff.config import Config
    cfg = Config().replace(model={"dims": (784, 8, 8)}, train={"algorithm": "backprop", "chapters": 4, "epochs": 4},
                           data={"train_subset": 1000, "test_subset": 100})
    bp = make_run(tmp_path / "bp", [sequential_spans(4)], cfg)
    for runs, fragment in (([seq_run, bp], "is backprop and"), ([bp, seq_run], "is Forward-Forward and")):
        with pytest.raises(ConfigError, match=fragment):
            predict.predict([load_run(r) for r in runs], ranks=[1, 2])


def test_predicting_needs_no_torch():
    """mpff predict runs on a login node: importing it (backprop's model included) loads no torch,
    which takes seconds to import with CUDA."""
    import subprocess
    import sys
    code = "import sys, mpff.predict, mpff.predict.backprop, mpff.analysis.report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------------ chapters of K batches

def _batch_config(schedule="sequential", k=8, epochs=2, n=1024, **train):
    """Chapters of K batches of 64 on ``n`` samples, resolved as ``mpff train`` writes them:
    1024 samples are 16 batches an epoch, so K = 8 makes 4 chapters of 512 samples over 2 epochs."""
    cfg = make_config(schedule, chapters=4, epochs=epochs, chapter_batches=k, data={"train_subset": n}, **train)
    return cfg.with_chapters(n, 1)


def _sliced_spans(chapters, slices, train=(2.0, 3.0), forward=(0.5,), eval_time=1.0, final=0.2):
    """A Sequential rank on chapters run in ``slices`` slices: per slice of train(c, k), the pass
    through layer k-1 then the slice's training, each a share of the chapter's times."""
    spans, t = [("setup", -1, -1, 0.0, 1.0)], 1.0
    for c in range(chapters):
        for k, d in enumerate(train):
            for _ in range(slices):
                if k > 0:
                    spans.append(("forward", c, k, t, t + forward[k - 1] / slices))
                    t += forward[k - 1] / slices
                spans.append(("train", c, k, t, t + d / slices))
                t += d / slices
    spans += [("eval", chapters - 1, -1, t, t + eval_time), ("io", chapters - 1, -1, t + eval_time,
                                                              t + eval_time + final)]
    return spans


def test_batch_chapters_predict_their_derived_count_and_scale_with_their_samples(tmp_path):
    # measured: 4 chapters of 8 batches (512 samples), each run in 2 slices of 4 batches;
    # train(c, 0) 2 s, the pass through layer 0 0.5 s, train(c, 1) 3 s per chapter
    cfg = _batch_config(slice_batches=4)
    assert cfg.train.chapters == 4 and cfg.train.epochs_per_chapter == 0
    run = load_run(make_run(tmp_path / "k8", [_sliced_spans(4, 2)], cfg))
    out = predict.predict([run], ranks=[1, 2], schedules=["sequential", "all_layers"], network=IDEAL)
    assert out.profile.chapters == 4 and out.profile.epochs_per_chapter == pytest.approx(0.5)
    # the same K: the measured task times, per task (the passes summed over the slices)
    plan = build_plan(out.target.config, 1, n_train=1024)
    times = predict.task_times(out.profile, out.target, plan, set())
    for c in range(4):
        assert [times[("train", c, k)] for k in (0, 1)] == pytest.approx([2.0, 3.0])
        assert times[("forward", c, 1)] == pytest.approx(0.5)
    assert _by(out, "sequential", 1).training == pytest.approx(4 * 5.5 + 1.0)
    same_al = _by(out, "all_layers", 2)
    assert same_al.messages == 3 * 2  # the weights of both layers after every chapter but the last
    # K = 2: 16 chapters of 128 samples, a quarter of the work each; as many epochs in all
    short = predict.predict([run], ranks=[1, 2], schedules=["sequential", "all_layers"], network=IDEAL,
                            overrides=["train.chapter_batches=2"])
    plan = build_plan(short.target.config, 1, n_train=1024)
    assert plan.num_chapters == 16
    times = predict.task_times(short.profile, short.target, plan, set())
    assert {key[1] for key in times if key[0] == "train"} == set(range(16))
    for c in range(16):
        assert [times[("train", c, k)] for k in (0, 1)] == pytest.approx([0.5, 0.75])
        assert times[("forward", c, 1)] == pytest.approx(0.125)
    assert _by(short, "sequential", 1).training == pytest.approx(16 * 5.5 / 4 + 1.0)
    al = _by(short, "all_layers", 2)
    assert al.messages == 15 * 2  # more chapters, more messages
    assert al.bytes_moved == 15 * (LAYER0_BYTES + LAYER1_BYTES)
    chapters = next(a for a in short.assumptions if a.startswith("Chapters: "))
    assert "4 chapter(s) of 8 batch(es)" in chapters and "16 chapter(s) of 2 batch(es)" in chapters
    assert "0.25x the measured per chapter" in chapters and "optimistic" in chapters
    assert any("median of the measured ones" in a for a in short.assumptions)


def test_batch_chapters_longer_than_a_slice_recompute_every_layer_below(tmp_path):
    # 3 layers, chapters of 8 batches in one slice (measured as Sequential: the pass through
    # layer 0 takes 0.5 s, through layer 1 0.25 s). Predicted in slices of 4 batches, every
    # slice of train(c, 2) is pushed through layers 0 and 1 even on one rank; in slices of 8
    # the pass through layer 0 made for train(c, 1) is reused
    cfg = _batch_config(slice_batches=8).replace(model={"dims": (784, 8, 8, 8)})
    run = load_run(make_run(tmp_path / "k8", [_sliced_spans(4, 1, train=(2.0, 3.0, 1.0), forward=(0.5, 0.25))],
                            cfg))
    profile = predict.build_profile(run, predict.read_spans(run), predict.Contention(0.0, "none", ""))
    for slices, expected in ((4, {1: 0.5, 2: 0.75}), (8, {1: 0.5, 2: 0.25})):
        target = predict.make_target(profile, [f"train.slice_batches={slices}"])
        notes: set[str] = set()
        times = predict.task_times(profile, target, build_plan(target.config, 1, n_train=1024), notes)
        for c in range(4):
            assert {k: times[("forward", c, k)] for k in (1, 2)} == pytest.approx(expected), slices
            assert times[("train", c, 2)] == pytest.approx(1.0)
        assert any("slice by slice" in n for n in notes) == (slices == 4)


def test_sliced_forward_passes_are_timed_per_slice(tmp_path):
    # 2 layers, chapters of 8 batches in 2 slices: a slice's pass through layer 0 (0.25 s) is
    # over 256 samples, not the chapter's 512
    run = load_run(make_run(tmp_path / "k8", [_sliced_spans(4, 2)], _batch_config(slice_batches=4)))
    profile = predict.build_profile(run, predict.read_spans(run), predict.Contention(0.0, "none", ""))
    assert profile.forward[(1, 0)] == pytest.approx([0.25 / 256, 0.25 / 256])
    assert profile.train[(1, 1)] == pytest.approx(3.0 / 512)


def test_more_batch_chapters_of_equal_work_make_a_smaller_bubble():
    # Single Layer, 2 layers on 2 ranks, 2 epochs of 1024 samples; every layer trains 1 s an
    # epoch, shared out over the chapters by their samples: GPipe's (p - 1) / (S + p - 1)
    bubbles = []
    for k, chapters in ((8, 4), (2, 16), (1, 32)):
        plan = build_plan(_batch_config("single_layer", k=k), 2, n_train=1024)
        assert plan.num_chapters == chapters
        durations = {("train", c, j): plan.chapter_rows(c) / 1024 for c in range(chapters) for j in range(2)}
        assert sum(durations.values()) == pytest.approx(4.0)  # equal total work
        sim = simulate(plan, durations)
        assert sim.bubble == pytest.approx(1 / (chapters + 1))
        bubbles.append(sim.bubble)
    assert bubbles[0] > bubbles[1] > bubbles[2]


def test_epoch_chapters_to_batch_chapters_and_back_scale_by_samples(seq_run, tmp_path):
    # from 4 chapters of 1 epoch (1000 samples): chapters of 4 batches of 64 hold 256 samples
    # (232 for the last of an epoch), 16 of them over the 4 epochs: the same work in all
    out = predict.predict([load_run(seq_run)], ranks=[1, 2], schedules=["sequential", "all_layers"],
                          network=IDEAL, overrides=["train.chapter_batches=4"])
    plan = build_plan(out.target.config, 1, n_train=1000)
    assert plan.num_chapters == 16
    times = predict.task_times(out.profile, out.target, plan, set())
    assert times[("train", 0, 0)] == pytest.approx(2.0 * 256 / 1000)
    assert times[("train", 3, 1)] == pytest.approx(3.0 * 232 / 1000)
    assert times[("forward", 3, 1)] == pytest.approx(0.5 * 232 / 1000)
    assert _by(out, "sequential", 1).training == pytest.approx(4 * 5.5 + 1.0)
    assert _by(out, "all_layers", 2).messages == 15 * 2
    assert any(a.startswith("Chapters: the source ran 4 chapter(s) of 1 epoch(s)") for a in out.assumptions)
    # back: from 4 chapters of 8 batches (512 samples of 1024) to 2 chapters of 1 epoch
    cfg = _batch_config()
    run = load_run(make_run(tmp_path / "k8", [sequential_spans(4)], cfg))
    back = predict.predict([run], ranks=[1, 2], schedules=["sequential", "all_layers"], network=IDEAL,
                           overrides=["train.chapter_batches=0", "train.chapters=2"])
    plan = build_plan(back.target.config, 1, n_train=1024)
    assert plan.num_chapters == 2 and plan.geometry is None
    times = predict.task_times(back.profile, back.target, plan, set())
    assert [times[("train", c, k)] for c in (0, 1) for k in (0, 1)] == pytest.approx([4.0, 6.0, 4.0, 6.0])
    assert times[("forward", 1, 1)] == pytest.approx(1.0)
    assert _by(back, "sequential", 1).training == pytest.approx(4 * 5.5 + 1.0)
    assert _by(back, "all_layers", 2).reason is None
    assert any("2x the measured per chapter" in a and "pessimistic" in a for a in back.assumptions)


def test_batch_chapters_model_the_bubble_of_a_killed_run(tmp_path):
    # a run of 4 chapters of K batches killed after 2: the bubble is modelled over those (the
    # plan derives 4 chapters from the data, the later ones take no time)
    from mpff.analysis.report import analyze_run
    cfg = _batch_config("all_layers")
    spans = sequential_spans(4)
    ranks = [[s for s in spans if s[0] == "setup" or s[1] in (0,)], [s for s in spans if s[1] == 1]]
    s = analyze_run(make_run(tmp_path / "killed", ranks, cfg, info={"status": "preempted"}))
    assert s.bubble_modelled is not None and "2 of 4 chapters" in s.model_note
