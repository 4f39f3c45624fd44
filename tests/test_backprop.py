"""Backprop as an algorithm of mpff (mpff.backprop, mpff.ddp): the MLP, its loss, learning rate
and cooldown checked by hand; buffers, checkpoints and restore; the model file; the settings a
backprop run refuses; and data-parallel training under mpiexec giving the sequential run's
weights (strong scaling, and weak scaling against the sequential run of the same global batch).
"""

from __future__ import annotations

import math
import subprocess
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpff.backprop import BPState, batch_slice
from mpff.config import ConfigError, from_dict, load
from mpff.data import load_dataset
from mpff.ff import cooldown_lr
from mpff.model import MLP
from mpff.modelfile import BPModel, FFModel, load_model, save_bp_model
from mpff.plan import Buf, Plan, Task
from mpff.trace import Tracer

CPU = torch.device("cpu")
DIMS = [784, 32, 24]


def bp_config(**train):
    sections = {"model": {"dims": DIMS},
                "train": {"algorithm": "backprop", "epochs": 2, "chapters": 2, "batch_size": 64, **train},
                "data": {"train_subset": 500, "test_subset": 300}}
    return from_dict(sections)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist_500():
    return load_dataset(bp_config().data)


def make_state(cfg, dataset, tracer=None, rank=0, world_size=1):
    tracer = tracer or Tracer(None, rank, {}, enabled=False)
    return BPState(cfg, Plan(cfg, 1), rank, world_size, dataset, tracer, CPU)


# ------------------------------------------------------------------------------ the network
def test_mlp_is_the_same_network_with_a_10_way_output():
    net = MLP([784, 50, 40], seed=1)
    assert [(lin.in_features, lin.out_features) for lin in net.layers] == [(784, 50), (50, 40), (40, 10)]
    for lin in net.layers:  # PyTorch's default init range, +-1/sqrt(fan_in)
        bound = 1 / math.sqrt(lin.in_features)
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    again, other = MLP([784, 50, 40], seed=1), MLP([784, 50, 40], seed=2)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))
    assert not torch.equal(net.layers[0].weight, other.layers[0].weight)
    x = torch.randn(5, 784)
    h = x
    for lin in net.layers[:-1]:
        h = torch.clamp(h @ lin.weight.T + lin.bias, min=0)  # ReLU after each hidden layer
    logits = h @ net.layers[-1].weight.T + net.layers[-1].bias  # a linear output
    assert torch.allclose(net(x), logits, atol=1e-6)
    assert torch.equal(net.predict(x), logits.argmax(dim=1))


def test_one_step_is_adam_on_the_mean_cross_entropy(mnist_500):
    """One epoch of one full batch: the update of plain (non-fused) torch Adam at train.bp_lr on
    the mean cross-entropy of all samples, from the same initial MLP."""
    cfg = bp_config(epochs=1, chapters=1, batch_size=500, bp_lr=3e-3)
    state = make_state(cfg, mnist_500)
    ref = MLP(DIMS, seed=0)
    opt = torch.optim.Adam(ref.parameters(), lr=3e-3, foreach=False)
    x, y = torch.from_numpy(mnist_500.x_train), torch.from_numpy(mnist_500.y_train)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    opt.step()
    (record,) = state.run(Task("train", 0, 0))
    assert record[:3] == ("loss", 0, 0) and record[3] == pytest.approx(loss.item(), rel=1e-5)
    # Adam's first step is lr * g / (|g| + 1e-8): where a gradient is within a few eps of 0 the
    # rounding of its sum (split or not) moves the update by ~1e-6 (one weight here)
    for a, b in zip(state.net.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(state.net.parameters(), MLP(DIMS).parameters()))
    assert moved > 1e-3  # the step changed the weights by far more than the tolerance


def test_learning_rate_follows_the_cooldown(mnist_500):
    cfg = bp_config(epochs=4, chapters=2, bp_lr=1e-3)
    state = make_state(cfg, mnist_500)
    seen = []
    step = state.opt.step

    def spy(*args, **kwargs):
        seen.append(state.opt.param_groups[0]["lr"])
        return step(*args, **kwargs)

    state.opt.step = spy
    for c in range(2):
        state.run(Task("train", c, 0))
    per_epoch = sorted(set(seen), key=seen.index)
    assert per_epoch == [1e-3, cooldown_lr(1e-3, 3, 4)] == [1e-3, 5e-4]  # epoch 4 holds epoch 3's
    assert len(seen) == 4 * math.ceil(500 / 64)


def test_backprop_learns(mnist_500):
    cfg = bp_config(epochs=10, chapters=5, bp_lr=3e-3)
    state = make_state(cfg, mnist_500)
    losses = [state.run(Task("train", c, 0))[0][3] for c in range(5)]
    (acc,) = state.run(Task("eval", 4))
    assert all(a > b for a, b in zip(losses, losses[1:]))
    assert acc[:3] == ("accuracy", 4, -1) and acc[3] > 0.75  # 500 samples, 80 steps (0.85 here); chance 0.1


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_batch_slices_partition_every_batch(world_size):
    for batch in range(0, 12):
        parts = [batch_slice(batch, r, world_size) for r in range(world_size)]
        assert parts[0][0] == 0 and parts[-1][1] == batch
        assert all(parts[r][1] == parts[r + 1][0] for r in range(world_size - 1))
        sizes = [hi - lo for lo, hi in parts]
        assert max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------------ buffers, checkpoints
def test_pack_and_load_round_trip(mnist_500):
    cfg = bp_config()
    state = make_state(cfg, mnist_500)
    state.run(Task("train", 0, 0))
    buf = Buf("model", 0, 0)
    assert state.holds(buf) and not state.holds(Buf("model", 0, 1))
    for full in (False, True):
        packed = state.pack(buf, full)
        assert packed.shape == (Plan(cfg, 1).buffer_spec(buf, full)[0],)
        other = make_state(cfg, mnist_500)
        other.load(buf, packed, full)
        assert other.holds(buf)
        np.testing.assert_array_equal(other.pack(buf, full), packed)
    with pytest.raises(ValueError, match="float32 values was expected"):
        other.load(buf, packed[:-1], True)


def test_model_buffer_size_by_hand():
    cfg = bp_config()
    n = 784 * 32 + 32 + 32 * 24 + 24 + 24 * 10 + 10
    plan = Plan(cfg, 1)
    assert plan.buffer_spec(Buf("model", 0, 3), False) == (n, np.float32)
    assert plan.buffer_spec(Buf("model", 0, 3), True) == (3 * n + 1, np.float32)


def test_checkpoint_and_restore_continue_exactly(mnist_500):
    """Two chapters straight = one chapter, checkpoint, a fresh state restored, one chapter."""
    cfg = bp_config()
    straight = make_state(cfg, mnist_500)
    for c in range(2):
        straight.run(Task("train", c, 0))
    first = make_state(cfg, mnist_500)
    first.run(Task("train", 0, 0))
    snapshot = first.checkpoint(0, [Buf("model", 0, 0)])
    resumed = make_state(cfg, mnist_500)
    resumed.restore(snapshot)
    resumed.run(Task("train", 1, 0))
    final = Buf("model", 0, 1)
    np.testing.assert_array_equal(resumed.pack(final, True), straight.pack(final, True))
    # without the optimizer state the continuation differs: the test can tell
    weights_only = make_state(cfg, mnist_500)
    weights_only.load(Buf("model", 0, 0), first.pack(Buf("model", 0, 0), False), False)
    weights_only.run(Task("train", 1, 0))
    assert np.abs(weights_only.pack(final, False) - straight.pack(final, False)).max() > 1e-3


def test_spans_and_scalars(mnist_500, tmp_path):
    import h5py
    tracer = Tracer(str(tmp_path / "rank0.h5"), 0, {})
    state = make_state(bp_config(), mnist_500, tracer=tracer)
    state.run(Task("train", 0, 0))
    state.run(Task("eval", 0))
    assert state.run(Task("final", 1)) == []
    tracer.close()
    with h5py.File(tmp_path / "rank0.h5") as f:
        kinds = [(k.decode(), c, layer) for k, c, layer in zip(f["spans"]["kind"], f["spans"]["chapter"],
                                                                f["spans"]["layer"])]
        names = [n.decode() for n in f["scalars"]["name"]]
    assert kinds == [("train", 1, 0), ("eval", 1, -1)]  # trace format 2: chapters counted from 1
    # the step phases after the loss (mpff predict splits a step with them), and a memory point at every flush
    assert names == ["loss", "bp_steps", "bp_forward_seconds", "bp_backward_seconds", "bp_optimizer_seconds",
                     "test_accuracy", "host_mem"]
    assert state.bytes_sent == 0  # one rank: no all-reduce


# ------------------------------------------------------------------------------ model file
def test_model_file_predicts_raw_images(mnist_500, tmp_path):
    cfg = bp_config()
    state = make_state(cfg, mnist_500)
    for c in range(2):
        state.run(Task("train", c, 0))
    (rec,) = state.run(Task("eval", 1))
    path = tmp_path / "model.h5"
    save_bp_model(str(path), state.net, cfg, mnist_500.input_mean, mnist_500.input_std,
                  mnist_500.input_scale, rec[3], {"world_size": 1})
    model = load_model(str(path))
    assert isinstance(model, BPModel) and model.attrs["algorithm"] == "backprop"
    # raw test images, as a user has them: the normalisation inverted
    raw = np.rint(mnist_500.x_test * mnist_500.input_std + mnist_500.input_mean) * 255
    raw = raw.clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    pred = model.predict(raw).numpy()
    assert float((pred == mnist_500.y_test).mean()) == pytest.approx(rec[3], abs=0.01)
    assert model(raw).shape == (300, 10)
    with pytest.raises(ValueError, match="argmax"):
        model.predict(raw, "goodness")


def test_ff_model_files_still_read_as_ff(tiny_run):
    assert isinstance(load_model(str(tiny_run / "model.h5")), FFModel)


# ------------------------------------------------------------------------------ settings
def test_a_plain_backprop_config_is_valid_and_round_trips(tmp_path):
    cfg = from_dict({"train": {"algorithm": "backprop"}})
    assert cfg.train.bp_lr == 1e-3 and cfg.run.scaling == "strong"
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())  # a run writes every key back, FF defaults included
    assert load(str(path)).to_dict() == cfg.to_dict()
    dp = from_dict({"train": {"algorithm": "backprop"}, "run": {"schedule": "data_parallel", "scaling": "weak"}})
    assert dp.run.schedule == "data_parallel"


@pytest.mark.parametrize("data, message", [
    ({"train": {"algorithm": "backprop", "negatives": "random"}},
     "train.negatives = 'random' is a Forward-Forward setting that backprop does not use; remove it"),
    ({"train": {"algorithm": "backprop", "classifier": "softmax"}}, "train.classifier = 'softmax' is a Forward"),
    ({"train": {"algorithm": "backprop", "adaptive_lag": 1}}, "train.adaptive_lag = 1 is a Forward"),
    ({"train": {"algorithm": "backprop", "lr": 0.001}}, "backprop's rate is train.bp_lr"),
    ({"train": {"algorithm": "backprop"}, "data": {"shards": 2}}, "data.shards = 2 is a Forward"),
    ({"train": {"algorithm": "backprop"}, "run": {"schedule": "single_layer"}},
     "run.schedule = 'single_layer' is a Forward-Forward schedule; backprop runs 'sequential' or "
     "'data_parallel'"),
    ({"train": {"algorithm": "backprop"}, "run": {"schedule": "federated"}}, "is a Forward-Forward schedule"),
    ({"run": {"schedule": "data_parallel"}}, "run.schedule = 'data_parallel' is for backprop"),
    ({"train": {"bp_lr": 0.01}}, "train.bp_lr = 0.01 is a backprop setting; remove it"),
    ({"run": {"scaling": "weak"}}, "run.scaling = 'weak' is a backprop setting"),
    ({"train": {"algorithm": "sgd"}}, "train.algorithm = 'sgd' is not one of ff, backprop"),
    ({"run": {"scaling": "linear"}}, "run.scaling = 'linear' is not one of strong, weak"),
])
def test_settings_of_the_other_algorithm_are_refused(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_refuses_ff_settings_for_backprop_with_exit_2(tmp_path, mpff_run):
    proc = mpff_run(["train", "--config", "configs/backprop.toml", "--set", "train.negatives=random",
                     "--out", str(tmp_path / "run")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mpff train: error: train.negatives = 'random' is a Forward-Forward setting that backprop does "
        "not use; remove it, or set train.algorithm = 'ff'"]
    assert not (tmp_path / "run").exists()


def test_backprop_preset_is_the_judged_network():
    cfg = load("configs/backprop.toml")
    assert cfg.train.algorithm == "backprop" and cfg.model.dims == (784, 1000, 1000, 1000)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.run.schedule) == (10, 64, "sequential")


# ------------------------------------------------------------------------------ data-parallel
#: n = 961 = 15 x 64 + 1: the last global batch has one row, so under strong scaling on 2 ranks
#: rank 1 gets none; 20 epochs in 2 chapters = 320 steps.
DP_SETTINGS = {"model": {"dims": [784, 32, 32]}, "data": {"train_subset": 961, "test_subset": 200},
               "train": {"algorithm": "backprop", "epochs": 20, "chapters": 2, "seed": 5}}

DP_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from mpi4py import MPI
    from mpff import ddp
    from mpff.backprop import BPState
    from mpff.comm import Comm
    from mpff.config import from_dict
    from mpff.data import load_dataset
    from mpff.plan import Buf, Task
    from mpff.trace import Tracer

    torch.set_num_threads(1)
    settings, out = json.loads(sys.argv[1]), sys.argv[2]
    comm = Comm(MPI.COMM_WORLD)
    group = ddp.init_process_group(comm, torch.device("cpu"))
    results = {}
    for scaling, batch in (("strong", 64), ("weak", 32)):
        cfg = from_dict({**settings, "train": {**settings["train"], "batch_size": batch},
                         "run": {"schedule": "data_parallel", "scaling": scaling}})
        tracer = Tracer(None, comm.rank, {})
        state = BPState(cfg, None, comm.rank, comm.size, load_dataset(cfg.data), tracer,
                        torch.device("cpu"), process_group=group)
        records = [state.run(Task("train", c, 0)) for c in range(2)]
        spans = [s for s in tracer._spans if s[0] == "allreduce"]
        results[scaling] = {"records": records, "steps": state.steps, "allreduces": len(spans),
                            "allreduce_bytes": sum(s[5] for s in spans), "bytes_sent": state.bytes_sent}
        np.save(f"{out}/{scaling}-rank{comm.rank}.npy", state.pack(Buf("model", 0, 1), True))
    with open(f"{out}/rank{comm.rank}.json", "w") as fh:
        json.dump(results, fh)
    state.close()  # the DDP model goes before its process group
    ddp.shutdown(group)
""")


def sequential_weights(batch: int) -> tuple[np.ndarray, list]:
    cfg = from_dict({**DP_SETTINGS, "train": {**DP_SETTINGS["train"], "batch_size": batch}})
    state = make_state(cfg, load_dataset(cfg.data))
    records = [state.run(Task("train", c, 0)) for c in range(2)]
    return state.pack(Buf("model", 0, 1), True), records


@pytest.mark.mpi
def test_data_parallel_equals_sequential(tmp_path, mpff_launch):
    import json
    assert 961 % 64 == 1  # the uneven last batch is part of the test
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    proc = subprocess.run([mpff_launch.mpiexec, "-n", "2", mpff_launch.python, "-m", "mpi4py", str(script),
                           json.dumps(DP_SETTINGS), str(tmp_path)], cwd=mpff_launch.root, env=mpff_launch.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seq64, seq_records = sequential_weights(64)
    seq32, _ = sequential_weights(32)
    n_params = (len(seq64) - 1) // 3
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for scaling in ("strong", "weak"):
        # strong: global batch 64 split over 2 ranks; weak: 32 a rank, global 64: both are the
        # sequential run at batch 64, up to float rounding of the split sums
        for r in range(2):
            dp = np.load(tmp_path / f"{scaling}-rank{r}.npy")
            assert np.abs(dp[:n_params] - seq64[:n_params]).max() < 1e-5, (scaling, r)
            assert np.abs(dp[n_params:] - seq64[n_params:]).max() < 1e-5, (scaling, r)  # Adam state
        info0, info1 = ranks[0][scaling], ranks[1][scaling]
        assert info0["steps"] == info1["steps"] == 320
        assert info0["allreduces"] >= 320 and info0["allreduce_bytes"] >= 320 * 4 * n_params
        assert info0["bytes_sent"] == info0["allreduce_bytes"]  # ring model, N = 2: 2 (N-1)/N = 1
        # rank 0 reports the global mean loss; the other rank reports nothing
        assert [rec[0][:3] for rec in info0["records"]] == [["loss", 0, 0], ["loss", 1, 0]]
        assert info0["records"][1][0][3] == pytest.approx(seq_records[1][0][3], rel=1e-5)
        assert info1["records"] == [[], []]
    # the tolerance is far below what a different batch size does to the weights
    assert np.abs(seq32[:n_params] - seq64[:n_params]).max() > 1e-2
